"""``--tensor-parallel-size 2`` on CPU (two gloo ranks): the same greedy tokens and logprobs as one process,
and a worker rank that dies turns the server to 503 within seconds, then stops it with status 1, instead of
hanging it."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from models.generation import greedy_generate, prompt_logits
from models.loader import load_model
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss
from server.detokenizer import token_text
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.outputs import TokenLogprob
from server.engine.sampling_params import SamplingParams
from tests.server_process import ServerProcess, exits_within
from tests.test_engine_core_process import core_pid

MAX_TOKENS = 8
TOP = 3


def tp_server(model_dir) -> ServerProcess:
    return ServerProcess(["--model", f"tiny={model_dir}", "--tensor-parallel-size", "2", "--dtype", "float32",
                          "--kv-cache-tokens", "4096", "--block-size", "8"])


def random_prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in (3, 11, 25)]


def check_against_one_process(server: ServerProcess, model_dir, prompts: list[list[int]]) -> None:
    """One batched request (three sequences prefilled and decoded together) vs the unsharded model."""
    body = {"model": "tiny", "prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": TOP,
            "ignore_eos": True}
    response = httpx.post(server.v1 + "/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    loaded = load_model(model_dir, dtype="float32", device="cpu")
    vocab = loaded.tokenizer.vocab_size  # the gpt-oss unembedding has rows past the tokenizer's ids: padding
    expected = greedy_generate(loaded.model, prompts, MAX_TOKENS, vocab_size=vocab)
    for prompt, tokens, choice in zip(prompts, expected, response.json()["choices"]):
        logprobs = choice["logprobs"]
        assert logprobs["tokens"] == [token_text(loaded.tokenizer, t) for t in tokens]
        reference = torch.log_softmax(prompt_logits(loaded.model, [prompt + tokens])[0][:, :vocab].double(), -1)
        for i, (token, top) in enumerate(zip(tokens, logprobs["top_logprobs"])):
            row = reference[len(prompt) - 1 + i]
            assert logprobs["token_logprobs"][i] == pytest.approx(float(row[token]), abs=1e-4)
            best = row.topk(TOP)
            assert sorted(top.values()) == pytest.approx(sorted(best.values.tolist()), abs=1e-4)


@pytest.fixture(scope="module")
def gpt2_server(tiny_gpt2_dir):
    with tp_server(tiny_gpt2_dir) as server:
        yield server


def test_gpt2_two_ranks_greedy_tokens_and_logprobs_equal_one_process(gpt2_server, tiny_gpt2_dir):
    check_against_one_process(gpt2_server, tiny_gpt2_dir, random_prompts(50257, seed=1))


def test_gpt_oss_two_ranks_greedy_tokens_and_logprobs_equal_one_process_and_sigterm_stops_every_rank(tmp_path):
    model_dir = write_tiny_gpt_oss(tmp_path / "gpt-oss", sliding_window=4)
    with tp_server(model_dir) as server:
        check_against_one_process(server, model_dir, random_prompts(199_998, seed=2))
        worker = worker_pid(server)
    assert exits_within(worker, seconds=5)


def worker_pid(server: ServerProcess) -> int:
    for line in server.log_text().splitlines():
        if line.startswith("{") and json.loads(line).get("msg") == "started tensor-parallel rank 1":
            return json.loads(line)["pid"]
    raise AssertionError("the server did not log its worker's pid")


def test_two_ranks_with_a_bf16_kv_cache_equal_one_engine_with_one(tiny_gpt2_dir):
    """Every rank stores its heads' keys and values in the dtype rank 0 sized the pool for (--kv-cache-dtype)."""
    prompts = random_prompts(50257, seed=3)
    engine = LLMEngine(load_model(tiny_gpt2_dir, dtype="float32", device="cpu"),
                       EngineConfig(kv_cache_tokens=4096, block_size=8, kv_cache_dtype="bfloat16"))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=TOP)
    expected: dict[str, list[TokenLogprob]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    while engine.has_work:
        for request_id, output in engine.step():
            expected.setdefault(request_id, []).extend(output.logprobs or [])
    body = {"model": "tiny", "prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": TOP,
            "ignore_eos": True}
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}", "--tensor-parallel-size", "2", "--dtype", "float32",
                        "--kv-cache-tokens", "4096", "--block-size", "8", "--kv-cache-dtype", "bfloat16"]) as server:
        response = httpx.post(server.v1 + "/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    for i, choice in enumerate(response.json()["choices"]):
        got = choice["logprobs"]["token_logprobs"]
        assert len(got) == MAX_TOKENS
        # 1e-3: sharded sums may round a key or value to the other side of a bf16 step (tests/test_kv_cache_dtype.py)
        assert got == pytest.approx([lp.logprob for lp in expected[str(i)]], abs=1e-3)


def test_killed_worker_rank_fails_requests_and_health_with_503_then_the_server_exits_1(gpt2_server):
    """Defined last: it stops the module's server (one server start less for the suite). The engine core is
    alive but its engine failed: the same path as a dead core, and the core exits too."""
    server = gpt2_server
    core = core_pid(server)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 120, "ignore_eos": True}
    with ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(httpx.post, server.v1 + "/completions", json=body, timeout=30) for _ in range(4)]
        time.sleep(0.5)  # the requests are decoding
        os.kill(worker_pid(server), signal.SIGKILL)
        killed = time.monotonic()
        statuses = [future.result().status_code for future in in_flight]
    assert time.monotonic() - killed < 10
    assert statuses == [503] * 4
    assert httpx.get(server.base_url + "/health", timeout=5).status_code == 503
    assert server._process.wait(timeout=30) == 1
    assert exits_within(core, seconds=5)
    assert "tensor-parallel rank 1" in server.log_text()
