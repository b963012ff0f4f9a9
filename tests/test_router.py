"""Two replicas behind the router of deploy/router (nginx + njs, prefix affinity), all on loopback.

The router's own config file runs here, with only the replicas' addresses, its port and the module and script
paths put in for this machine: requests sharing a long prompt prefix all reach one replica (its prefix cache
hits, the other sees none of them); different prefixes spread over both; and a killed replica costs no
request, because the router resends to the other one.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.server_process import free_port
from tests.server_process import ServerProcess

ROUTER_DIR = Path(__file__).resolve().parents[1] / "deploy" / "router"
JS_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/etc/nginx/modules")  # Debian, others
SHARED_PREFIX = "You are a helpful assistant who answers in one short sentence. " * 5  # about 60 tokens
MAX_TOKENS = 2
STARTUP_S = 300.0  # a replica waits for the CPU kernels' build when another process is compiling them


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    assert found, "nginx is missing; install it with: apt-get install nginx libnginx-mod-http-js"
    return found


def js_module() -> str:
    for folder in JS_MODULE_DIRS:
        if (Path(folder) / "ngx_http_js_module.so").exists():
            return f"{folder}/ngx_http_js_module.so"
    raise AssertionError("nginx's njs module is missing; install it with: apt-get install libnginx-mod-http-js")


def render_config(replicas: list[str], port: int) -> str:
    """deploy/router/nginx.conf with this machine's paths, the test's replicas and a loopback port."""
    text = (ROUTER_DIR / "nginx.conf").read_text()
    text = text.replace("load_module modules/ngx_http_js_module.so;", f"load_module {js_module()};")
    text = text.replace("js_path /etc/nginx/router/;", f"js_path {ROUTER_DIR}/;")
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    options = re.search(r"server gptserve-gpu-0:8000( [^;]*);", text).group(1)
    servers = "".join(f"        server {address}{options};\n" for address in replicas)
    return re.sub(r"(        server gptserve-gpu-\d+:8000[^;]*;\n)+", servers, text)


class Router:
    """nginx in the foreground with the rendered config, its temp files and log under ``workdir``."""

    def __init__(self, replicas: list[str], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        (workdir / "nginx.conf").write_text(render_config(replicas, self.port))
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Router:
        conf = self.workdir / "nginx.conf"
        with (self.workdir / "nginx.log").open("wb") as log:
            self.process = subprocess.Popen(
                [nginx_binary(), "-p", str(self.workdir), "-c", str(conf), "-e", "stderr",
                 "-g", f"daemon off; pid {self.workdir / 'nginx.pid'};"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.workdir / "nginx.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise TimeoutError("nginx did not listen within 20 s")

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish open requests, then exit
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def replicas(tiny_gpt2_dir) -> Iterator[list[ServerProcess]]:
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--block-size", "8", "--kv-cache-tokens", "2048"]
    with ServerProcess(args, startup_timeout=STARTUP_S) as first, \
            ServerProcess(args, startup_timeout=STARTUP_S) as second:
        yield [first, second]


@pytest.fixture(scope="module")
def router(replicas, tmp_path_factory) -> Iterator[Router]:
    with Router([r.base_url.removeprefix("http://") for r in replicas], tmp_path_factory.mktemp("nginx")) as running:
        yield running


def counter(server: ServerProcess, name: str) -> float:
    """The sum of a counter's samples over all labels, read from the replica's /metrics."""
    text = httpx.get(server.base_url + "/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name)


def finished(server: ServerProcess) -> float:
    return counter(server, "gptserve:request_success_total")


def complete(router: Router, prompt: str) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    return httpx.post(router.url + "/v1/completions", json=body, timeout=60)


def test_requests_sharing_a_long_prefix_land_on_one_replica_and_hit_its_prefix_cache(router, replicas):
    for question in ("What is 2 + 2?", "Name a colour.", "Where is Paris?", "Is water wet?"):
        response = complete(router, SHARED_PREFIX + question)
        assert response.status_code == 200, response.text
    served = [finished(r) for r in replicas]
    assert sorted(served) == [0, 4], served
    holder, other = (replicas[0], replicas[1]) if served[0] else (replicas[1], replicas[0])
    assert counter(holder, "gptserve:prefix_cache_hits_total") >= 3 * 48  # three repeats, 6 full blocks each
    assert counter(other, "gptserve:prefix_cache_hits_total") == 0


def test_streamed_events_pass_through_the_router(router):
    body = {"model": "tiny", "prompt": "Stream this", "max_tokens": MAX_TOKENS, "stream": True}
    with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) >= MAX_TOKENS + 1


def test_different_prefixes_spread_over_both_replicas(router, replicas):
    before = [finished(r) for r in replicas]
    for i in range(12):
        response = complete(router, f"Conversation {i} starts here with its own system prompt.")
        assert response.status_code == 200, response.text
    gained = [finished(r) - b for r, b in zip(replicas, before)]
    assert sum(gained) == 12 and min(gained) > 0, gained


def test_killing_the_replica_that_holds_a_prefix_loses_no_request(router, replicas):
    before = [finished(r) for r in replicas]
    assert complete(router, SHARED_PREFIX + "Who holds this?").status_code == 200
    holder_index = 0 if finished(replicas[0]) > before[0] else 1
    survivor = replicas[1 - holder_index]
    replicas[holder_index]._process.kill()  # no drain, no goodbye: connections to it are refused from now on
    replicas[holder_index]._process.wait()
    survivor_before = finished(survivor)
    responses = [complete(router, SHARED_PREFIX + f"After the crash, question {i}") for i in range(5)]
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    assert finished(survivor) - survivor_before == 5
    assert counter(survivor, "gptserve:prefix_cache_hits_total") > 0  # the prefix now lives there
