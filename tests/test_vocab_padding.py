"""Ids the tokenizer lacks are never sampled, listed in top logprobs or detokenized.

GPT-OSS's unembedding has 201088 rows while its tokenizer.json defines ids only up to 200018: the rows above
are padding. The checkpoint here makes those rows loud (20x the others' scale), so any path that let them
through would pick one at once and fail the request: served in one process (streamed, prompt logprobs) and
over two tensor-parallel ranks; CUDA graph replay is checked on the runner with a stand-in for the graphs.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError
from models.loader import load_model
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss
from models.testing.tokenizer_files import GPT_OSS_TOKENIZER_SIZE
from server.engine.model_runner import ModelRunner
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import ScheduledChunk
from server.engine.sequence import Sequence
from tests.server_process import ServerProcess
from tests.test_tensor_parallel_api import tp_server

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def loud_padding_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny GPT-OSS whose padding rows of the unembedding outscore every real token's row."""
    model_dir = write_tiny_gpt_oss(tmp_path_factory.mktemp("loud") / "gpt-oss", layout="original")
    weights = load_file(model_dir / "model.safetensors")
    assert weights["unembedding.weight"].shape[0] > GPT_OSS_TOKENIZER_SIZE
    weights["unembedding.weight"][GPT_OSS_TOKENIZER_SIZE:] *= 20
    save_file(weights, model_dir / "model.safetensors")
    return model_dir


def test_two_ranks_with_logprobs_never_list_a_padding_id(loud_padding_dir):
    """First in the file: it runs before the one-process server starts, not beside it."""
    body = {"model": "tiny", "prompt": ["Hello", "The harmony"], "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 1.0, "seed": 1, "logprobs": 5}
    with tp_server(loud_padding_dir) as tp:
        response = httpx.post(tp.v1 + "/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        assert len(choice["logprobs"]["tokens"]) == MAX_TOKENS
        assert all(len(top) >= 5 for top in choice["logprobs"]["top_logprobs"])


@pytest.fixture(scope="module")
def server(loud_padding_dir):
    with ServerProcess(["--model", f"oss={loud_padding_dir}", "--dtype", "float32", "--kv-cache-tokens", "2048"]) as s:
        yield s


def stream_events(server: ServerProcess, body: dict) -> list[dict]:
    with httpx.stream("POST", server.v1 + "/completions", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_sampled_stream_never_reaches_a_padding_id(server):
    body = {"model": "oss", "prompt": "Hello", "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 1.0,
            "seed": 0, "logprobs": 5, "n": 2}
    events = stream_events(server, body)
    assert not [e for e in events if "error" in e]
    finished = [c for e in events for c in e["choices"] if c.get("finish_reason")]
    assert sorted((c["index"], c["finish_reason"]) for c in finished) == [(0, "length"), (1, "length")]


def test_greedy_logprobs_and_echoed_prompt_logprobs_list_only_real_tokens(server):
    body = {"model": "oss", "prompt": "Hello world", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "temperature": 0, "logprobs": 5, "echo": True}
    response = httpx.post(server.v1 + "/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    assert logprobs["top_logprobs"][0] is None  # the first prompt token has nothing before it
    assert all(len(top) >= 5 for top in logprobs["top_logprobs"][1:])  # 6: the prompt token itself is not a top 5


@pytest.mark.parametrize(
    ("field", "value_naming"),
    [("prompt", lambda i: [i]), ("logit_bias", lambda i: {str(i): 5}), ("stop_token_ids", lambda i: [i])],
    ids=["prompt", "logit_bias", "stop_token_ids"],
)
def test_request_naming_a_padding_id_is_a_400(server, field: str, value_naming):
    def post(token_id: int) -> httpx.Response:
        body = {"model": "oss", "prompt": "Hi", "max_tokens": 2, field: value_naming(token_id)}
        return httpx.post(server.v1 + "/completions", json=body, timeout=60)

    response = post(GPT_OSS_TOKENIZER_SIZE)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field
    assert post(GPT_OSS_TOKENIZER_SIZE - 1).status_code == 200


def test_tokenizer_with_ids_past_the_model_vocabulary_is_refused_at_load(tmp_path):
    """The converse: a prompt could name an id that has no embedding row."""
    model_dir = write_tiny_gpt_oss(tmp_path / "small", layout="original", vocab_size=GPT_OSS_TOKENIZER_SIZE - 1)
    with pytest.raises(CheckpointError, match=f"defines {GPT_OSS_TOKENIZER_SIZE} token ids"):
        load_model(model_dir, dtype="float32", device="cpu")


class ReplayedGraphs:
    """Stands in for captured CUDA graphs (none on this CPU): a replay's logits cover every unembedding row."""

    def serves(self, chunks: list[ScheduledChunk]) -> bool:
        return True

    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        logits = torch.zeros(len(chunks), GPT_OSS_TOKENIZER_SIZE + 1069)
        logits[:, GPT_OSS_TOKENIZER_SIZE:] = 100.0
        return logits


def test_graph_replay_logits_are_cut_to_the_tokenizer_too():
    runner = ModelRunner(None, None, torch.device("cpu"), GPT_OSS_TOKENIZER_SIZE, ReplayedGraphs())
    seq = Sequence("r", 0, [1, 2, 3], 2, SamplingParams(), 0.0, num_computed_tokens=2)
    step = runner.run([ScheduledChunk(seq, 1)])
    assert step.logits.shape == (1, GPT_OSS_TOKENIZER_SIZE)
