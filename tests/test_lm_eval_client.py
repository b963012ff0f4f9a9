"""lm-evaluation-harness's ``local-completions`` model against a real server, given nothing but the server's URL.

It finds the gpt2_tokenizer through GET /tokenizer_info and POST /tokenize (its remote backend, as with vLLM); without
them it would download one named after the model from the hub, which fails offline. Its three request kinds
(loglikelihood, loglikelihood_rolling, generate_until) must then give what transformers gives on the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from tests.server_process import ServerProcess

EOS = 50256
PAIRS = [("Hello, my name is", " Ada and I"), ("The capital of France", " is Paris"), ("", "Once upon a time")]
ROLLING_TEXT = "one two three four five six seven eight nine ten " * 3
# A multiple-choice task of two questions, read from a local file (the `datasets` json loader: no hub)
TASK_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
QUESTIONS = [{"question": "The capital of France is", "choices": [" Paris", " Rome", " a dog"], "answer": 0},
             {"question": "One two three", "choices": [" four", " five"], "answer": 1}]


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    with ServerProcess(["--model", f"tiny={tiny_gpt2_dir}"]) as running:
        yield running


@pytest.fixture(scope="module")
def lm(server):
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.utils import RemoteTokenizer

    model = LocalCompletionsAPI(base_url=server.v1 + "/completions", model="tiny", max_length=128, max_retries=1,
                                batch_size=2, num_concurrent=2)  # several prompts a request, two requests at once
    assert isinstance(model.tokenizer, RemoteTokenizer), "lm-eval did not find the server's tokenizer endpoints"
    return model


def instances(kind: str, arguments: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


@torch.inference_mode()
def oracle_score(gpt2_oracle, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Sum of the continuation's log-probabilities after the context, and whether each was the argmax."""
    ids = torch.tensor([context + continuation])
    logprobs = gpt2_oracle(ids).logits[0].float().log_softmax(-1)[len(context) - 1 : -1]
    picked = logprobs[torch.arange(len(continuation)), torch.tensor(continuation)]
    return float(picked.sum()), bool((logprobs.argmax(-1) == torch.tensor(continuation)).all())


def test_the_tokenizer_it_finds_is_the_servers(lm, gpt2_tokenizer):
    assert lm.eot_token_id == EOS
    text = "Tokens, as the server makes them: <|endoftext|> included."
    assert lm.tok_encode(text) == gpt2_tokenizer.encode(text)
    assert lm.decode_batch([gpt2_tokenizer.encode(text)]) == [text]


def test_loglikelihood_is_transformers(lm, gpt2_tokenizer, gpt2_oracle):
    """An empty context stands on the end-of-text token, as lm-eval does with local models."""
    got = lm.loglikelihood(instances("loglikelihood", PAIRS))
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        context_ids = gpt2_tokenizer.encode(context) if context else [EOS]
        expected, expected_greedy = oracle_score(gpt2_oracle, context_ids, gpt2_tokenizer.encode(continuation))
        assert logprob == pytest.approx(expected, abs=1e-3)
        assert greedy == expected_greedy


def test_a_greedy_continuation_is_scored_greedy(lm, gpt2_tokenizer, gpt2_oracle):
    context = gpt2_tokenizer.encode("Hello, my name is")
    with torch.inference_mode():
        generated = gpt2_oracle.generate(torch.tensor([context]), max_new_tokens=3, do_sample=False,
                                    pad_token_id=EOS)[0, len(context):].tolist()
    [(logprob, greedy)] = lm.loglikelihood(instances("loglikelihood", [("Hello, my name is",
                                                                         gpt2_tokenizer.decode(generated))]))
    assert greedy
    assert logprob == pytest.approx(oracle_score(gpt2_oracle, context, generated)[0], abs=1e-3)


def test_rolling_loglikelihood_is_transformers(lm, gpt2_tokenizer, gpt2_oracle):
    """A text within one window: every token scored, the first after the end-of-text token."""
    [got] = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(ROLLING_TEXT,)]))
    assert got == pytest.approx(oracle_score(gpt2_oracle, [EOS], gpt2_tokenizer.encode(ROLLING_TEXT))[0], abs=1e-3)


def test_generate_until_is_greedy_transformers_cut_at_the_stop(lm, gpt2_tokenizer, gpt2_oracle):
    """Two prompts with the same arguments, so one request holds both (batch_size=2); each stop string is cut
    from the middle of what greedy writes for one of them."""
    prompts, texts = ("Once upon a time", "The capital of France"), []
    for prompt in prompts:
        ids = gpt2_tokenizer.encode(prompt)
        with torch.inference_mode():
            generated = gpt2_oracle.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                        pad_token_id=EOS)[0, len(ids):].tolist()
        texts.append(gpt2_tokenizer.decode(generated))
    stops = [text[len(text) // 2 : len(text) // 2 + 2] for text in texts]
    expected = [text[: min(text.index(stop) for stop in stops if stop in text)] for text in texts]
    arguments = {"until": stops, "max_gen_toks": 12}
    assert lm.generate_until(instances("generate_until", [(prompt, arguments) for prompt in prompts])) == expected


def test_tokenizer_endpoints_take_the_only_model_when_none_is_named(server):
    """As vLLM's do: lm-eval names no model to them (tests/test_api_tokenize.py: several served need one)."""
    messages = [{"role": "user", "content": "Hi"}]
    for path, body in (("/tokenize", {"prompt": "Hello"}), ("/tokenize", {"messages": messages}),
                       ("/detokenize", {"tokens": [15496]})):
        named = httpx.post(server.base_url + path, json=body | {"model": "tiny"}, timeout=30)
        unnamed = httpx.post(server.base_url + path, json=body, timeout=30)
        assert named.status_code == unnamed.status_code == 200, unnamed.text
        assert unnamed.json() == named.json()
    info = httpx.get(server.base_url + "/tokenizer_info", timeout=30)
    assert info.status_code == 200
    assert info.json() == httpx.get(server.base_url + "/tokenizer_info", params={"model": "tiny"}, timeout=30).json()


def test_the_lm_eval_command_scores_a_task_as_transformers_does(server, gpt2_tokenizer, gpt2_oracle, tmp_path):
    """The command docs/api.md gives, on a local multiple-choice task: each choice's score is transformers' on
    the pair lm-eval made (it splits context and continuation as encoding the whole text does)."""
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data))
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
               f"base_url={server.v1}/completions,model=tiny,max_length=128", "--tasks", "tiny_choice",
               "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out"), "--log_samples"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    [samples] = Path(tmp_path / "out").glob("*/samples_tiny_choice_*.jsonl")
    scored = 0
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        for arguments, [[logprob, greedy]] in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = arguments["arg_0"], arguments["arg_1"]
            context_ids = gpt2_tokenizer.encode(context)
            whole = gpt2_tokenizer.encode(context + continuation)
            expected, expected_greedy = oracle_score(gpt2_oracle, context_ids, whole[len(context_ids):])
            assert float(logprob) == pytest.approx(expected, abs=1e-3)
            assert greedy == str(expected_greedy)
            scored += 1
    assert scored == sum(len(q["choices"]) for q in QUESTIONS)
