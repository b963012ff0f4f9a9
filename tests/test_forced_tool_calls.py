"""tool_choice "required" or a named function forces a call whose arguments validate against the tool's schema.

The tiny checkpoints have random weights and never choose a tool by themselves, so every call here was made
because the constraint allowed nothing else. On GPT-OSS: the header openai-harmony renders for a call, then the
arguments under the tool's schema as compact JSON, then `<|call|>`. On GPT-2 with a chat template that renders
tools: the named function's arguments, or a JSON array of calls, as vLLM forces them on any model. Through a real
server, raw HTTP and the OpenAI SDK, streamed and not, n > 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import openai_harmony as oh
import pytest
import torch

from models.loader import load_model
from server.chat import ChatMessage, FunctionTool, HarmonyChatFormat
from server.chat.harmony_encoding import harmony_encoding
from tests.server_process import ServerProcess
from tests.test_structured_output import assert_compact_json

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
LOOKUP = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["id"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "get": LOOKUP}  # "get" is a prefix of "get_weather": the name must end right
TOOLS = [{"type": "function", "function": {"name": name, "parameters": schema}} for name, schema in SCHEMAS.items()]
MESSAGES = [{"role": "user", "content": "Weather in Oslo?"}]
SAMPLED = {"temperature": 1.0, "seed": 11, "max_tokens": 200, "n": 2}
TOOLS_TEMPLATE = ("{% if tools %}Tools:{% for tool in tools %} {{ tool.name }}{% endfor %}\n{% endif %}"
                  "{% for message in messages %}{{ message.role | capitalize }}: {{ message.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}Assistant:{% endif %}")
TEMPLATE_SAMPLED = SAMPLED | {"max_tokens": 90}  # the tiny GPT-2 has 128 positions


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from models.testing.gpt2_checkpoint import write_tiny_gpt2
    from models.testing.gpt_oss_checkpoint import write_tiny_gpt_oss

    root = tmp_path_factory.mktemp("tiny")
    return {"gpt2": write_tiny_gpt2(root / "gpt2"), "oss": write_tiny_gpt_oss(root / "gpt-oss")}


@pytest.fixture(scope="module")
def server(checkpoints):
    args = [arg for name, path in checkpoints.items() for arg in ("--model", f"{name}={path}")]
    with ServerProcess([*args, "--chat-template", TOOLS_TEMPLATE, "--trust-request-chat-template"]) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.v1, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def assert_forced_call(choice: dict, names: set[str]) -> None:
    """One call to one of ``names``, its arguments compact JSON valid under that tool's schema, and nothing else."""
    assert choice["finish_reason"] == "tool_calls", choice
    call, = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] in names, call
    assert_compact_json(call["function"]["arguments"], SCHEMAS[call["function"]["name"]])
    assert not choice["message"]["content"] and not choice["message"].get("reasoning")


def streamed_calls(http: httpx.Client, body: dict) -> tuple[list[list[dict]], list[str]]:
    """Each choice's calls reassembled from their deltas (named once, in order, then argument fragments, by
    index), and each choice's finish_reason."""
    calls: list[list[dict]] = [[] for _ in range(body["n"])]
    finishes = [""] * body["n"]
    with http.stream("POST", "/chat/completions", json=body | {"stream": True}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[len("data: "):])["choices"]:
                finishes[choice["index"]] = choice["finish_reason"] or finishes[choice["index"]]
                for delta in choice["delta"].get("tool_calls") or []:
                    made = calls[choice["index"]]
                    if "id" in delta:
                        assert delta["index"] == len(made), "calls are named once, in order"
                        made.append({"id": delta["id"], "name": delta["function"]["name"], "arguments": ""})
                    made[delta["index"]]["arguments"] += delta["function"].get("arguments") or ""
    return calls, finishes


def test_call_header_is_what_openai_harmony_renders_for_a_call(checkpoints):
    tokenizer = load_model(checkpoints["oss"], dtype="float32", device="cpu").tokenizer
    chat_format = HarmonyChatFormat(tokenizer)
    call = (oh.Message.from_role_and_content(oh.Role.ASSISTANT, "").with_channel("commentary")
            .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"))
    rendered = harmony_encoding(tokenizer).render(call)  # <|start|>assistant HEADER <|message|> <|call|>
    assert chat_format.call_header("get_weather") == rendered[2:-1]
    assert tokenizer.decode(chat_format.call_header("get_weather")) == (
        " to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>")


@pytest.mark.parametrize("tool_choice", [named("get_weather"), named("get"), "required"])
def test_forced_call_arguments_validate_in_every_choice(http, tool_choice):
    tools = TOOLS if tool_choice != "required" else TOOLS[:1]  # "required" with one tool is that tool named
    body = {"model": "oss", "messages": MESSAGES, "tools": tools, "tool_choice": tool_choice} | SAMPLED
    response = http.post("/chat/completions", json=body)
    assert response.status_code == 200, response.text
    expected = {tool_choice["function"]["name"]} if isinstance(tool_choice, dict) else {"get_weather"}
    for choice in response.json()["choices"]:
        assert_forced_call(choice, expected)


def test_required_with_several_tools_picks_one_under_the_names_grammar(http):
    body = {"model": "oss", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required"} | SAMPLED | {"n": 4}
    response = http.post("/chat/completions", json=body)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        assert_forced_call(choice, set(SCHEMAS))


@pytest.mark.parametrize("tool_choice", [named("get_weather"), "required"])
def test_streamed_call_deltas_reassemble_to_the_same_call(http, tool_choice):
    body = {"model": "oss", "messages": MESSAGES, "tools": TOOLS, "tool_choice": tool_choice} | SAMPLED
    calls, finishes = streamed_calls(http, body | {"temperature": 0.0})
    whole = http.post("/chat/completions", json=body | {"temperature": 0.0}).json()["choices"]
    assert finishes == ["tool_calls"] * body["n"]
    for (call,), choice in zip(calls, whole):  # one call per choice
        assert_forced_call(choice, set(SCHEMAS))
        function = choice["message"]["tool_calls"][0]["function"]
        assert (call["name"], call["arguments"]) == (function["name"], function["arguments"])
    sampled_calls, _ = streamed_calls(http, body)
    for (call,) in sampled_calls:
        assert_compact_json(call["arguments"], SCHEMAS[call["name"]])


def test_the_sdk_gets_the_forced_call(client):
    result = client.chat.completions.create(model="oss", messages=MESSAGES, tools=TOOLS,
                                            tool_choice=named("get_weather"), max_tokens=200, n=2, seed=5)
    for choice in result.choices:
        assert choice.finish_reason == "tool_calls"
        call, = choice.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_a_forced_call_wins_over_response_format(http):
    body = {"model": "oss", "messages": MESSAGES, "tools": TOOLS, "tool_choice": named("get"),
            "response_format": {"type": "json_object"}} | SAMPLED
    for choice in http.post("/chat/completions", json=body).json()["choices"]:
        assert_forced_call(choice, {"get"})


@pytest.mark.parametrize("tool_choice", [named("get_weather"), named("get")])
def test_a_template_model_s_named_call_is_the_function_s_arguments(http, tool_choice):
    body = {"model": "gpt2", "messages": MESSAGES, "tools": TOOLS, "tool_choice": tool_choice} | TEMPLATE_SAMPLED
    response = http.post("/chat/completions", json=body | {"return_token_ids": True})
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        assert_forced_call(choice, {tool_choice["function"]["name"]})
        arguments = choice["message"]["tool_calls"][0]["function"]["arguments"]
        assert choice["token_ids"][-1] == GPT2_EOS and arguments == gpt2_text(http, choice["token_ids"][:-1])


def assert_calls_array(choice: dict, http: httpx.Client) -> list[dict]:
    """The choice's text is a JSON array of calls, each under its tool's schema, and its tool_calls are those
    calls as json.loads reads them, each call's arguments its `parameters` text as written. A choice cut by
    max_tokens holds the calls before its last, unfinished one likewise."""
    calls = choice["message"]["tool_calls"]
    assert calls and len({call["id"] for call in calls}) == len(calls), choice
    assert not choice["message"]["content"]
    ended = choice["finish_reason"] == "tool_calls"
    assert ended or choice["finish_reason"] == "length", choice
    text = gpt2_text(http, choice["token_ids"][:-1] if ended else choice["token_ids"])
    complete = calls if ended else calls[:-1]
    if ended:
        written = json.loads(text)
        assert [call["function"]["name"] for call in calls] == [item["name"] for item in written]
        for call, item in zip(calls, written):
            assert json.loads(call["function"]["arguments"]) == item["parameters"]
    for call in complete:
        assert_compact_json(call["function"]["arguments"], SCHEMAS[call["function"]["name"]])
        assert f'"name":"{call["function"]["name"]}","parameters":{call["function"]["arguments"]}}}' in text
    return calls


def gpt2_text(http: httpx.Client, token_ids: list[int]) -> str:
    response = http.post(str(http.base_url).removesuffix("v1/") + "detokenize",
                         json={"model": "gpt2", "tokens": token_ids})
    return response.json()["prompt"]


GPT2_EOS = 50256


def test_required_on_a_template_model_is_an_array_of_calls(http):
    """Random weights seldom close the array, so most choices run to max_tokens with several calls made."""
    body = {"model": "gpt2", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
            "return_token_ids": True} | TEMPLATE_SAMPLED | {"n": 8, "seed": 6}
    choices = http.post("/chat/completions", json=body).json()["choices"]
    counts = [len(assert_calls_array(choice, http)) for choice in choices]
    assert any(choice["finish_reason"] == "tool_calls" for choice in choices) and max(counts) > 1, choices
    single = http.post("/chat/completions", json=body | {"parallel_tool_calls": False}).json()["choices"]
    for choice in single:
        assert choice["finish_reason"] == "tool_calls" and len(assert_calls_array(choice, http)) == 1


@pytest.mark.parametrize("tool_choice", [named("get_weather"), "required"])
def test_a_template_model_s_streamed_calls_reassemble_to_the_same_calls(http, tool_choice):
    body = {"model": "gpt2", "messages": MESSAGES, "tools": TOOLS, "tool_choice": tool_choice} | TEMPLATE_SAMPLED
    body |= {"n": 4, "seed": 6}  # the same seed samples the same tokens streamed or not
    streamed, _ = streamed_calls(http, body)
    whole = http.post("/chat/completions", json=body).json()["choices"]
    assert max(len(calls) for calls in streamed) > (1 if tool_choice == "required" else 0)
    for calls, choice in zip(streamed, whole):
        assert [(c["name"], c["arguments"]) for c in calls] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]]


def test_the_sdk_gets_a_template_model_s_required_calls(client):
    result = client.chat.completions.create(model="gpt2", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=90, n=2, seed=5)
    for choice in result.choices:
        assert choice.finish_reason == "tool_calls"
        call, = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_tools_a_chat_template_does_not_render_are_a_400_naming_tools(http):
    plain = "{% for message in messages %}{{ message.content }}\n{% endfor %}"
    for tool_choice in (named("get_weather"), "required", "auto"):
        body = {"model": "gpt2", "messages": MESSAGES, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": 4,
                "chat_template": plain}
        response = http.post("/chat/completions", json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "tools"
    assert http.post("/chat/completions", json={"model": "gpt2", "messages": MESSAGES, "max_tokens": 2}).is_success


def test_an_unservable_tool_schema_is_a_400_naming_tools(http):
    tool = {"type": "function", "function": {"name": "bad", "parameters": {"type": "no-such-type"}}}
    body = {"model": "oss", "messages": MESSAGES, "tools": [tool], "tool_choice": named("bad"), "max_tokens": 4}
    response = http.post("/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "tools"


def response_items(http: httpx.Client, body: dict, model: str = "oss") -> list[dict]:
    response = http.post("/responses", json={"model": model, "input": "Weather in Oslo?", "max_output_tokens":
                                             200 if model == "oss" else 90, "store": False} | body)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed", response.json()
    return response.json()["output"]


@pytest.mark.parametrize("tool_choice", [{"type": "function", "name": "get"}, "required"])
def test_responses_api_forces_the_call_too(http, tool_choice):
    tools = [{"type": "function", "name": name, "parameters": schema} for name, schema in SCHEMAS.items()]
    item, = response_items(http, {"tools": tools, "tool_choice": tool_choice, "temperature": 1.0})
    assert item["type"] == "function_call" and item["name"] in ({"get"} if isinstance(tool_choice, dict)
                                                                else set(SCHEMAS)), item
    assert_compact_json(item["arguments"], SCHEMAS[item["name"]])


def test_responses_api_forces_a_template_model_s_calls_too(http):
    tools = [{"type": "function", "name": name, "parameters": schema} for name, schema in SCHEMAS.items()]
    item, = response_items(http, {"tools": tools, "tool_choice": "required", "parallel_tool_calls": False,
                                  "temperature": 0.0}, model="gpt2")
    assert item["type"] == "function_call"
    assert_compact_json(item["arguments"], SCHEMAS[item["name"]])
    item, = response_items(http, {"tools": tools, "tool_choice": {"type": "function", "name": "get"},
                                  "temperature": 1.0}, model="gpt2")
    assert item["type"] == "function_call" and item["name"] == "get"
    assert_compact_json(item["arguments"], LOOKUP)


def test_responses_api_text_format_constrains_the_answer(http, client):
    text_format = {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}
    item, = response_items(http, {"text": {"format": text_format}, "temperature": 1.0})
    assert item["type"] == "message"
    assert_compact_json(item["content"][0]["text"], WEATHER)
    streamed = client.responses.create(model="oss", input="Weather?", text={"format": text_format},
                                       max_output_tokens=200, store=False, stream=True)
    deltas = "".join(event.delta for event in streamed if event.type == "response.output_text.delta")
    assert_compact_json(deltas, WEATHER)


@pytest.mark.parametrize("text_format", [{"type": "json_schema", "name": "x"},
                                         {"type": "json_schema", "name": "x", "schema": {"type": "no-such-type"}}])
def test_responses_api_unservable_text_format_is_a_400_naming_it(http, text_format):
    body = {"model": "oss", "input": "Hi", "text": {"format": text_format}, "max_output_tokens": 4}
    response = http.post("/responses", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "text.format"


def test_forced_call_tokens_open_with_the_header_and_only_call_may_end_them(checkpoints):
    from server.engine.engine import EngineConfig, LLMEngine
    from server.engine.sampling_params import SamplingParams
    from server.engine.structured_output import apply_grammars
    from server.routes.forced_call import forced_call_spec

    loaded = load_model(checkpoints["oss"], dtype="float32", device="cpu")
    chat_format = HarmonyChatFormat(loaded.tokenizer)
    tools = [FunctionTool(name, "", schema) for name, schema in SCHEMAS.items()]
    spec = forced_call_spec(chat_format, tools, "required", None)
    engine = LLMEngine(loaded, EngineConfig(kv_cache_tokens=4096, max_num_seqs=4))
    params = SamplingParams(max_tokens=200, seed=3, stop_token_ids=chat_format.stop_token_ids, grammar=spec)
    engine.add_request("r", chat_format.render([ChatMessage("user", "Hi")]), params, n=3)
    outputs: dict[int, list[int]] = {0: [], 1: [], 2: []}
    while engine.has_work:
        for _, out in engine.step():
            outputs[out.index] += out.new_token_ids
            assert out.finish_reason in (None, "stop"), out
    for tokens in outputs.values():
        text = loaded.tokenizer.decode(tokens)
        name = text.removeprefix(" to=functions.").split("<|channel|>")[0]
        assert name in SCHEMAS and text.startswith(loaded.tokenizer.decode(chat_format.call_header(name))), text
        header_tail = spec.call_header  # the name's own tokens are the model's pick; the rest is forced
        start = tokens.index(chat_format.tokens.channel)
        assert tuple(tokens[start: start + len(header_tail)]) == header_tail
        assert tokens[-1] == chat_format.tokens.call  # the stop token ends the output, as generated
        state = engine.grammars.new_state(spec, params.stop_token_ids)
        assert all(state.accept(token) for token in tokens[:-1])
        logits = torch.zeros(1, loaded.tokenizer.vocab_size)
        apply_grammars(logits, [state])
        assert logits[0].isfinite().nonzero().flatten().tolist() == [chat_format.tokens.call]


@pytest.mark.parametrize("tool_choice", [named("get_weather"), "required"])
def test_max_tokens_too_small_for_the_forced_header_is_a_400_not_header_text(http, tool_choice):
    body = {"model": "oss", "messages": MESSAGES, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": 3}
    response = http.post("/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("parameters", [{}, None])
def test_a_tool_without_a_schema_gets_a_bounded_json_object(http, parameters):
    tool = {"type": "function", "function": {"name": "ping"} | ({} if parameters is None else {"parameters": {}})}
    body = {"model": "oss", "messages": MESSAGES, "tools": [tool], "tool_choice": named("ping")} | SAMPLED
    for choice in http.post("/chat/completions", json=body | {"max_tokens": 480, "n": 3}).json()["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        assert_compact_json(choice["message"]["tool_calls"][0]["function"]["arguments"], {"type": "object"})
