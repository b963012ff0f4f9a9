"""A checkpoint's generation_config.json, as vLLM reads it (--generation-config, --override-generation-config):
its eos_token_id list ends choices, its sampling fields are the defaults of requests that leave them unset, and
its max_new_tokens bounds every choice. The files are written by transformers' GenerationConfig where a test
can, and GPT-OSS's is the real one's content."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from transformers import GenerationConfig

from bench.server_process import PROJECT_ROOT
from models.testing.gpt2_checkpoint import write_tiny_gpt2
from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss
from models.tokenizer import load_tokenizer
from server.generation_defaults import generation_defaults, parse_overrides
from tests.server_process import ServerProcess

DOT = 13  # GPT-2's "."
RETURN, ENDOFTEXT, CALL = 200002, 199999, 200012  # GPT-OSS's <|return|>, <|endoftext|>, <|call|>
CAP = 6  # the GPT-2 checkpoint's max_new_tokens


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A GPT-2 whose generation config makes "." an end token, picks greedily (top_k 1) and caps outputs."""
    directory = write_tiny_gpt2(tmp_path_factory.mktemp("generation") / "gpt2")
    GenerationConfig(eos_token_id=[50256, DOT], do_sample=True, top_k=1, max_new_tokens=CAP).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def server(gpt2_dir, tmp_path_factory):
    oss = write_tiny_gpt_oss(tmp_path_factory.mktemp("generation") / "gpt-oss")
    with ServerProcess(["--model", f"tiny={gpt2_dir}", "--model", f"oss={oss}"], startup_timeout=300) as running:
        yield running


@pytest.fixture(scope="module")
def elsewhere_server(gpt2_dir, tmp_path_factory):
    """The same GPT-2 with a generation config from another folder, and a default set on the command line."""
    folder = tmp_path_factory.mktemp("elsewhere")
    GenerationConfig(max_new_tokens=3).save_pretrained(folder)
    args = ["--model", f"tiny={gpt2_dir}", "--generation-config", str(folder),
            "--override-generation-config", '{"temperature": 0}']
    with ServerProcess(args) as running:
        yield running


def complete(server, **fields) -> dict:
    body = {"model": "tiny", "prompt": "The weather today", **fields}
    reply = httpx.post(server.v1 + "/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.parametrize("end", [RETURN, CALL, ENDOFTEXT])
def test_gpt_oss_completions_end_at_each_end_token_its_generation_config_lists(server, end):
    """A harmony prompt sent to /v1/completions ends at the assistant's <|return|> or <|call|>, as under vLLM."""
    answer = complete(server, model="oss", prompt="<|start|>assistant<|channel|>final<|message|>", max_tokens=8,
                      logit_bias={str(end): 100})
    assert answer["choices"][0]["finish_reason"] == "stop", answer
    assert answer["usage"]["completion_tokens"] == 1
    # vLLM's: the tokenizer's own end (tokenizer_config.json's eos_token) leaves stop_reason null, the rest are named
    assert answer["choices"][0]["stop_reason"] == (None if end == RETURN else end)
    kept = complete(server, model="oss", max_tokens=8, logit_bias={str(end): 100}, ignore_eos=True)
    assert kept["choices"][0]["finish_reason"] == "length" and kept["usage"]["completion_tokens"] == 8


def test_an_end_token_of_the_generation_config_ends_chat_and_completions(server):
    for path, body in [("/completions", {"prompt": "Hi"}), ("/chat/completions",
                                                            {"messages": [{"role": "user", "content": "Hi"}]})]:
        reply = httpx.post(server.v1 + path, timeout=120,
                           json={"model": "tiny", "max_tokens": 5, "logit_bias": {str(DOT): 100}, **body})
        choice = reply.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and reply.json()["usage"]["completion_tokens"] == 1, reply.text
        assert choice["stop_reason"] == DOT  # an end of the generation config's, not the tokenizer's own: named


def test_the_generation_configs_top_k_is_the_default_of_requests_that_leave_it_unset(server):
    greedy = complete(server, temperature=0, max_tokens=CAP, ignore_eos=True)["choices"][0]["text"]
    sampled = [complete(server, temperature=2.0, seed=seed, max_tokens=CAP, ignore_eos=True)["choices"][0]["text"]
               for seed in range(4)]
    assert sampled == [greedy] * 4
    unbounded = [complete(server, temperature=2.0, top_k=0, seed=seed, max_tokens=CAP,
                          ignore_eos=True)["choices"][0]["text"] for seed in range(4)]
    assert len(set(unbounded)) > 1  # the request's own top_k wins


@pytest.mark.parametrize("asked", [None, 20])
def test_max_new_tokens_bounds_every_choice_asked_for_or_not(server, asked):
    answer = complete(server, ignore_eos=True, **({} if asked is None else {"max_tokens": asked}))
    assert answer["usage"]["completion_tokens"] == CAP and answer["choices"][0]["finish_reason"] == "length"
    chat = httpx.post(server.v1 + "/chat/completions", timeout=120,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True,
                            **({} if asked is None else {"max_completion_tokens": asked})}).json()
    assert chat["usage"]["completion_tokens"] == CAP
    response = httpx.post(server.v1 + "/responses", timeout=120,
                          json={"model": "tiny", "input": "Hi", "max_output_tokens": asked}).json()
    assert response["usage"]["output_tokens"] <= CAP


def test_a_generation_config_from_another_folder_and_overrides(elsewhere_server):
    answer = complete(elsewhere_server, ignore_eos=True, max_tokens=10, seed=1)
    assert answer["usage"]["completion_tokens"] == 3  # that folder's max_new_tokens, not the model's 6
    greedy = complete(elsewhere_server, ignore_eos=True, temperature=0)["choices"][0]["text"]
    assert [complete(elsewhere_server, ignore_eos=True, seed=seed)["choices"][0]["text"]
            for seed in range(3)] == [greedy] * 3  # temperature 0 from the command line
    assert complete(elsewhere_server, max_tokens=5, logit_bias={str(DOT): 100})["usage"]["completion_tokens"] == 3


def test_vllm_mode_keeps_the_end_tokens_and_drops_the_defaults(gpt2_dir):
    tokenizer = load_tokenizer(gpt2_dir)
    auto = generation_defaults(gpt2_dir, gpt2_dir, tokenizer)
    assert auto.eos_token_ids == {50256, DOT}
    assert (auto.sampling.top_k, auto.sampling.max_new_tokens, auto.sampling.temperature) == (1, CAP, None)
    vllm = generation_defaults(gpt2_dir, gpt2_dir, tokenizer, "vllm", {"top_p": 0.5})
    assert vllm.eos_token_ids == {50256, DOT}
    assert vllm.sampling.model_dump(exclude_none=True) == {"top_p": 0.5}
    assert vllm.max_tokens(100) == 100 and auto.max_tokens(100) == CAP and auto.max_tokens(2) == 2


def test_fields_at_transformers_defaults_are_no_defaults(tmp_path, gpt2_dir):
    """vLLM reads the file through to_diff_dict, which drops them: a hand-written "top_k": 50 changes nothing."""
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"top_k": 50, "temperature": 1.0, "top_p": 0.9, "repetition_penalty": 1.0, "min_p": None, "do_sample": True}))
    defaults = generation_defaults(gpt2_dir, gpt2_dir, load_tokenizer(gpt2_dir), str(tmp_path))
    assert defaults.sampling.model_dump(exclude_none=True) == {"top_p": 0.9}


def test_without_the_file_config_json_and_tokenizer_config_name_the_ends(tmp_path, tiny_gpt2_dir):
    """GPT-OSS's tokenizer_config.json names <|return|> its eos_token; config.json's eos_token_id is read when
    there is no generation_config.json, as transformers' GenerationConfig.from_model_config reads it."""
    oss = write_tiny_gpt_oss(tmp_path / "gpt-oss")
    (oss / "generation_config.json").unlink()
    config = json.loads((oss / "config.json").read_text())
    (oss / "config.json").write_text(json.dumps({**config, "eos_token_id": CALL}))
    defaults = generation_defaults(oss, oss, load_tokenizer(oss))
    assert defaults.eos_token_ids == {ENDOFTEXT, RETURN, CALL}
    assert generation_defaults(tiny_gpt2_dir, tiny_gpt2_dir, load_tokenizer(tiny_gpt2_dir)).eos_token_ids == {50256}


@pytest.mark.parametrize("content, message", [
    ({"eos_token_id": [50256, 60000]}, "eos_token_id 60000 is not a token id"),
    ({"eos_token_id": True}, "eos_token_id True is not a token id"),
    ({"temperature": 7.5}, "temperature: Input should be less than or equal to 2"),
    ({"max_new_tokens": 0}, "max_new_tokens: Input should be greater than or equal to 1"),
    ([1, 2], "not a JSON object"),
])
def test_a_generation_config_that_cannot_be_honoured_is_refused_naming_the_file(tmp_path, gpt2_dir, content,
                                                                                 message):
    (tmp_path / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as refused:
        generation_defaults(gpt2_dir, gpt2_dir, load_tokenizer(gpt2_dir), str(tmp_path))
    assert str(tmp_path / "generation_config.json") in str(refused.value)


@pytest.mark.parametrize("text, message", [
    ("{temperature: 0}", "not JSON"),
    ('["temperature"]', "must be a JSON object"),
    ('{"do_sample": true}', "do_sample: Extra inputs are not permitted"),
    ('{"top_k": 2.5}', "top_k: Input should be a valid integer"),
    ('{"top_k": 9223372036854775808}', "top_k: Input should be less than 9223372036854775808"),
])
def test_overrides_are_checked_field_by_field(text, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides(text)


@pytest.mark.parametrize("flags, message", [
    (["--generation-config", "/nonexistent/folder"], "--generation-config /nonexistent/folder: no such folder"),
    (["--override-generation-config", '{"top_p": 0}'], "argument --override-generation-config: "
                                                        "--override-generation-config: top_p: Input should be greater"),
])
def test_the_cli_refuses_what_it_cannot_honour(gpt2_dir, flags, message):
    result = subprocess.run([sys.executable, "-m", "server", "--device", "cpu", "--model", f"tiny={gpt2_dir}",
                             *flags], check=False, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_a_folder_without_the_file_is_refused_naming_it(tmp_path, gpt2_dir):
    with pytest.raises(ValueError, match=f"no generation_config.json in {tmp_path}"):
        generation_defaults(gpt2_dir, gpt2_dir, load_tokenizer(gpt2_dir), str(tmp_path))
