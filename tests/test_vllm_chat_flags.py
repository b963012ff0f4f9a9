"""vLLM's front-end flags for how chat answers are made: --default-chat-template-kwargs (template variables under each
request's own; harmony's for GPT-OSS, checked against openai-harmony), --response-role and
--return-tokens-as-token-ids."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from bench.server_process import PROJECT_ROOT
from server.cli import parse_config
from tests.server_process import ServerProcess
from tests.test_chat_harmony import DATE, harmony, reference_prompt, user  # noqa: F401

TEMPLATE = ("{% if greeting %}{{ greeting }}|{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
HI = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "greeting.jinja"
    template.write_text(TEMPLATE)
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--chat-template", str(template),
            "--default-chat-template-kwargs", '{"greeting": "Good morning to you"}', "--response-role", "bot",
            "--return-tokens-as-token-ids"]
    with ServerProcess(args) as running:
        yield running


@pytest.fixture(scope="module")
def gpt_oss_server(tmp_path_factory):
    from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss

    model = write_tiny_gpt_oss(tmp_path_factory.mktemp("gpt-oss"))
    defaults = json.dumps({"reasoning_effort": "low", "current_date": DATE})
    with ServerProcess(["--model", f"oss={model}", "--dtype", "float32", "--default-chat-template-kwargs", defaults],
                       startup_timeout=300) as running:
        yield running


def tokens(server: ServerProcess, **body) -> list[int]:
    reply = httpx.post(server.base_url + "/tokenize", json={"add_special_tokens": False, **body}, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()["tokens"]


def chat(server: ServerProcess, **fields) -> httpx.Response:
    body = {"model": "tiny", "messages": HI, "max_tokens": 2, "ignore_eos": True, **fields}
    return httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)


def test_the_default_kwargs_render_under_the_requests_own(server):
    assert tokens(server, messages=HI) == tokens(server, prompt="Good morning to you|user: Say hi\nassistant:")
    assert tokens(server, messages=HI, chat_template_kwargs={"greeting": "Yo"}) == \
        tokens(server, prompt="Yo|user: Say hi\nassistant:")
    reply = chat(server)
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == len(tokens(server, messages=HI))


def test_responses_render_with_the_default_kwargs(server):
    reply = httpx.post(server.v1 + "/responses", json={"model": "tiny", "input": "Say hi", "max_output_tokens": 2},
                       timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["input_tokens"] == \
        len(tokens(server, prompt="Good morning to you|user: Say hi\nassistant:"))


def test_gpt_oss_renders_harmonys_defaults_and_the_request_overrides_them(gpt_oss_server, harmony):  # noqa: F811
    conversation = {"model": "oss", "messages": HI}
    assert tokens(gpt_oss_server, **conversation) == reference_prompt(harmony, [user("Say hi")], "Low")
    assert tokens(gpt_oss_server, **conversation, reasoning_effort="high") == \
        reference_prompt(harmony, [user("Say hi")], "High")
    assert tokens(gpt_oss_server, **conversation, chat_template_kwargs={"reasoning_effort": "medium"}) == \
        reference_prompt(harmony, [user("Say hi")], "Medium")


def test_gpt_oss_refuses_at_the_start_defaults_harmony_cannot_render(tmp_path):
    from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss

    model = write_tiny_gpt_oss(tmp_path / "gpt-oss")
    result = subprocess.run([sys.executable, "-m", "server", "--device", "cpu", "--dtype", "float32", "--model",
                             f"oss={model}", "--default-chat-template-kwargs", '{"enable_thinking": false}'],
                            check=False, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "--default-chat-template-kwargs: ['oss'] render harmony's prompt" in result.stderr
    assert "not enable_thinking" in result.stderr


@pytest.mark.parametrize("value", ["[1]", "not json", '{"messages": []}', '{"add_generation_prompt": false}'])
def test_default_kwargs_that_are_no_template_variables_are_refused(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--default-chat-template-kwargs", value], {})
    assert exit_info.value.code == 2
    assert "--default-chat-template-kwargs" in capsys.readouterr().err


def test_answers_carry_the_response_role(server):
    assert chat(server).json()["choices"][0]["message"]["role"] == "bot"
    with httpx.stream("POST", server.v1 + "/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": HI, "max_tokens": 2, "stream": True}) as reply:
        first = next(line for line in reply.iter_lines() if line.startswith("data: {"))
    assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "bot"


def test_without_a_generation_prompt_the_role_is_the_last_messages(server):
    reply = chat(server, add_generation_prompt=False)
    assert reply.json()["choices"][0]["message"]["role"] == "user"
    continued = chat(server, messages=HI + [{"role": "assistant", "content": "Hi"}], add_generation_prompt=False,
                     continue_final_message=True)
    assert continued.json()["choices"][0]["message"]["role"] == "assistant"


def test_logprobs_name_tokens_by_id_unless_the_request_says_false(server):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "logprobs": 1, "ignore_eos": True}
    named = httpx.post(server.v1 + "/completions", json=body, timeout=60).json()["choices"][0]["logprobs"]
    assert all(token.startswith("token_id:") for token in named["tokens"]), named
    plain = httpx.post(server.v1 + "/completions", json={**body, "return_tokens_as_token_ids": False},
                       timeout=60).json()["choices"][0]["logprobs"]
    assert not any(token.startswith("token_id:") for token in plain["tokens"]), plain
    chat_named = chat(server, logprobs=True).json()["choices"][0]["logprobs"]["content"]
    assert all(entry["token"].startswith("token_id:") for entry in chat_named)
