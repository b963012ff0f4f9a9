"""vLLM's tool-calling flags on the command line: --tool-call-parser openai (GPT-OSS's harmony calls),
--reasoning-parser openai_gptoss (its reasoning) and --enable-auto-tool-choice, whose negative form refuses
tool_choice "auto" as vLLM does without the flag."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from bench.server_process import PROJECT_ROOT
from tests.server_process import ServerProcess, exits_within

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
RESPONSES_WEATHER = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
HI = [{"role": "user", "content": "Weather in Oslo?"}]
TEMPLATE = ("{% if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>\n{% endif %}"
            "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}assistant:")


@pytest.fixture(scope="module")
def no_auto_server(tiny_gpt2_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "hermes.jinja"
    template.write_text(TEMPLATE)
    args = ["--model", f"tiny={tiny_gpt2_dir}", "--chat-template", str(template), "--tool-call-parser", "hermes",
            "--no-enable-auto-tool-choice"]
    with ServerProcess(args) as running:
        yield running


def chat(server, **fields) -> httpx.Response:
    body = {"model": "tiny", "messages": HI, "max_tokens": 8, **fields}
    return httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize("choice", [None, "auto"])
def test_without_auto_tool_choice_tools_left_to_the_model_are_refused(no_auto_server, choice):
    reply = chat(no_auto_server, tools=[WEATHER], **({} if choice is None else {"tool_choice": choice}))
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tool_choice", reply.text
    assert "--no-enable-auto-tool-choice" in reply.json()["error"]["message"]
    responses = httpx.post(no_auto_server.v1 + "/responses", timeout=60,
                           json={"model": "tiny", "input": "Weather in Oslo?", "tools": [RESPONSES_WEATHER],
                                 "max_output_tokens": 8, **({} if choice is None else {"tool_choice": choice})})
    assert responses.status_code == 400 and responses.json()["error"]["param"] == "tool_choice", responses.text


@pytest.mark.parametrize("choice", ["none", "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_without_auto_tool_choice_the_other_choices_are_served(no_auto_server, choice):
    reply = chat(no_auto_server, tools=[WEATHER], tool_choice=choice, max_tokens=48)
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    assert bool(message.get("tool_calls")) == (choice != "none")
    assert chat(no_auto_server).status_code == 200  # no tools, nothing to choose


def test_vllms_gpt_oss_command_line_serves_tools_for_the_model_to_choose(tmp_path):
    """The flags vLLM's GPT-OSS guide gives for function calling."""
    from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss

    model = write_tiny_gpt_oss(tmp_path / "gpt-oss")
    args = ["--model", f"tiny={model}", "--dtype", "float32", "--tool-call-parser", "openai",
            "--enable-auto-tool-choice", "--reasoning-parser", "openai_gptoss"]
    with ServerProcess(args, startup_timeout=300) as server:
        reply = chat(server, tools=[WEATHER])
        forced = chat(server, tools=[WEATHER], tool_choice="required", max_tokens=64)
    assert reply.status_code == 200, reply.text
    assert forced.status_code == 200 and forced.json()["choices"][0]["message"]["tool_calls"], forced.text


@pytest.mark.parametrize("flag, value, error", [
    ("--tool-call-parser", "openai", "--tool-call-parser openai reads GPT-OSS's harmony tool calls, and ['tiny'] use "
                                     "a chat template"),
    ("--reasoning-parser", "openai_gptoss", "--reasoning-parser openai_gptoss reads GPT-OSS's harmony reasoning, and "
                                            "['tiny'] use a chat template"),
])
def test_harmonys_parsers_with_a_chat_template_model_stop_the_start(tiny_gpt2_dir, flag, value, error):
    result = subprocess.run([sys.executable, "-m", "server", "--device", "cpu", "--model", f"tiny={tiny_gpt2_dir}",
                             flag, value],
                            check=False, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert error in result.stderr
    core = next(int(line.split('"pid": ')[1].split("}")[0]) for line in result.stderr.splitlines()
                if '"started engine core"' in line)
    assert exits_within(core, seconds=5)
