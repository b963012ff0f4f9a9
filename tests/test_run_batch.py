"""gptserve-run-batch: OpenAI's batch file format answered offline, line for line as the HTTP server answers."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from bench.server_process import PROJECT_ROOT
from tests.same_answer import assert_same_answer
from tests.server_process import ServerProcess

COMPLETION = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
EMBEDDING = {"model": "tiny", "input": ["fox", "The quick brown fox"]}
RERANK = {"model": "tiny", "query": "fox", "documents": ["a fox", "the sea"]}
PERPLEXITY = {"model": "tiny", "input": "The quick brown fox jumps"}
CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


def line(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def run_batch(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.run_batch", "--device", "cpu", *args], input=stdin,
                          check=False, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_args(tiny_gpt2_dir, tmp_path_factory) -> list[str]:
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    return ["--model", f"tiny={tiny_gpt2_dir}", "--chat-template", str(template)]


@pytest.fixture(scope="module")
def server(model_args):
    with ServerProcess(model_args) as running:
        yield running


@pytest.fixture(scope="module")
def batch(model_args, tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("batch")
    requests = [line("completion", "/v1/completions", COMPLETION), line("chat", "/v1/chat/completions", CHAT),
                line("embedding", "/v1/embeddings", EMBEDDING), line("rerank", "/v1/rerank", RERANK),
                "",  # blank lines are skipped
                line("perplexity", "/v1/perplexity", PERPLEXITY),
                line("unknown model", "/v1/completions", {**COMPLETION, "model": "nope"}),
                line("bad field", "/v1/completions", {**COMPLETION, "max_tokens": -1}),
                line("stream", "/v1/completions", {**COMPLETION, "stream": True})]
    (folder / "in.jsonl").write_text("\n".join(requests) + "\n")
    result = run_batch(["-i", str(folder / "in.jsonl"), "-o", str(folder / "out.jsonl"), *model_args])
    assert result.returncode == 0, result.stderr[-5000:]
    assert '"batch done"' in result.stderr and '"failed": 3' in result.stderr
    return [json.loads(text) for text in (folder / "out.jsonl").read_text().splitlines()]


def test_each_line_gets_what_the_server_answers_over_http(batch, server):
    by_id = {result["custom_id"]: result for result in batch}
    for custom_id, path, body in [("completion", "/v1/completions", COMPLETION),
                                  ("chat", "/v1/chat/completions", CHAT), ("embedding", "/v1/embeddings", EMBEDDING),
                                  ("rerank", "/v1/rerank", RERANK), ("perplexity", "/v1/perplexity", PERPLEXITY)]:
        served = httpx.post(server.base_url + path, json=body, timeout=60).json()
        response = by_id[custom_id]["response"]
        assert response["status_code"] == 200 and by_id[custom_id]["error"] is None
        assert response["request_id"] and by_id[custom_id]["id"].startswith("batch_req_")
        assert_same_answer(response["body"], served, custom_id)


def test_the_output_keeps_the_inputs_order_and_refusals_keep_their_status(batch):
    assert [result["custom_id"] for result in batch] == ["completion", "chat", "embedding", "rerank", "perplexity",
                                                         "unknown model", "bad field", "stream"]
    statuses = {result["custom_id"]: result["response"]["status_code"] for result in batch}
    assert (statuses["unknown model"], statuses["bad field"], statuses["stream"]) == (404, 400, 400)
    refused = {result["custom_id"]: result["response"]["body"]["error"] for result in batch[-3:]}
    assert refused["bad field"]["param"] == "max_tokens" and refused["stream"]["param"] == "stream"
    assert refused["unknown model"]["code"] == "model_not_found"


def test_requests_beyond_the_engine_s_room_wait_their_turn_instead_of_failing(model_args):
    """Two sequences run and two wait; each request asks for three, so most of them meet a full queue (429) at
    first and are retried until there is room."""
    body = {**COMPLETION, "n": 3, "temperature": 1.0, "seed": 1}
    requests = "\n".join(line(f"r{i}", "/v1/completions", body) for i in range(6))
    result = run_batch(["-i", "-", "-o", "-", "--max-num-seqs", "2", "--max-queue", "2", "--api-key", "secret",
                        *model_args], stdin=requests)
    assert result.returncode == 0, result.stderr[-5000:]
    results = [json.loads(text) for text in result.stdout.splitlines()]
    assert [r["custom_id"] for r in results] == [f"r{i}" for i in range(6)]
    assert all(r["response"]["status_code"] == 200 and len(r["response"]["body"]["choices"]) == 3 for r in results)
    assert len({json.dumps(r["response"]["body"]["choices"]) for r in results}) == 1  # one seed, one answer


@pytest.mark.parametrize(("content", "message"), [
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\nnot json\n', "line 2: "),
    (line("a", "/v1/completions", COMPLETION) + "\n" + line("a", "/v1/completions", COMPLETION),
     "line 2: custom_id 'a' is used twice"),
    (line("a", "/v1/models", {}), "line 1: url: "),
    (json.dumps({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}), "line 1: method: "),
    ("\n\n", "the input has no requests"),
])
def test_a_malformed_file_stops_the_run_before_any_model_loads(tmp_path, content, message):
    (tmp_path / "in.jsonl").write_text(content)
    result = run_batch(["-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--model",
                        f"x={tmp_path / 'no-such-model'}"])  # never reached: the file is checked first
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_an_output_folder_that_cannot_be_written_stops_the_run_before_any_model_loads(tmp_path):
    (tmp_path / "in.jsonl").write_text(line("a", "/v1/completions", COMPLETION))
    result = run_batch(["-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "missing" / "out.jsonl"),
                        "--model", f"x={tmp_path / 'no-such-model'}"])
    assert result.returncode == 2 and "its folder is missing or not writable" in result.stderr, result.stderr
