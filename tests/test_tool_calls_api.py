"""Tool calls through POST /v1/chat/completions and the OpenAI SDK, with the model's tokens scripted.

A tiny random model never chooses a tool, so the route here talks to a scripted engine: it records the prompt it
is given and answers with tokens openai-harmony rendered from a real assistant tool-call message. Everything
between the SDK and the engine (request models, rendering, parsing, streaming) is the server's own code.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator

import openai
import openai_harmony as oh
import pytest
from fastapi.testclient import TestClient

from models.testing.tokenizer_files import write_gpt2_tokenizer
from models.tokenizer import load_tokenizer
from server.app import create_app
from server.chat import TemplateChatFormat
from server.config import ServerConfig
from server.engine.outputs import ChoiceOutput
from server.engine.sampling_params import GrammarSpec, SamplingParams
from server.generation_defaults import GenerationDefaults
from server.routes.models import ServedModel
from tests.test_chat_harmony import assistant, chat, harmony, tokenizer  # noqa: F401 - fixtures

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ARGUMENTS = '{"city": "Oslo"}'
QUESTION = [{"role": "user", "content": "Weather in Oslo?"}]
# A Hermes-style template and what such a model writes (`--tool-call-parser hermes`), scripted
HERMES_TEMPLATE = ("{% if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>\n{% endif %}"
                   "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
                   "{% if add_generation_prompt %}assistant:{% endif %}")
HERMES_TEXT = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


class ScriptedEngine:
    """The part of AsyncEngine the chat route uses; each choice generates `script`, one token per output."""

    max_model_len = 4096

    def __init__(self, tokenizer, script: list[int]) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.prompts: list[list[int]] = []

    def validate(self, prompt_len: int, params: SamplingParams, n: int) -> None:
        pass

    def default_max_tokens(self, prompt_len: int, n: int) -> int:
        return self.max_model_len - prompt_len

    def check_admission(self, num_seqs: int) -> None:
        pass

    async def compile_grammar(self, spec: GrammarSpec | None) -> None:
        pass  # the script ignores constraints: forced calls are tested on a real engine (test_forced_tool_calls)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       n: int = 1) -> AsyncIterator[ChoiceOutput]:
        self.prompts.append(prompt_ids)
        tokens = self.script[: params.max_tokens]
        for position, token in enumerate(tokens):
            last = position == len(tokens) - 1
            finish = None if not last else "stop" if len(tokens) == len(self.script) else "length"
            stop_token = token if finish == "stop" and token in params.stop_token_ids else None
            for index in range(n):
                yield ChoiceOutput(index=index, new_token_ids=[token], finish_reason=finish, stop_token_id=stop_token)

    def stop_choice(self, request_id: str, index: int) -> None:
        pass

    async def shutdown(self) -> None:
        pass


def prompt_after_weather_call(harmony: oh.HarmonyEncoding, function: dict, reasoning: str,
                              effort: oh.ReasoningEffort | None = None) -> list[int]:
    """openai-harmony's prompt for: "Weather in Oslo?", the model's ``reasoning``, its call to ``function`` with
    ARGUMENTS, and the result "sunny"."""
    tool = oh.ToolDescription.new(function["name"], function["description"], parameters=function["parameters"])
    system = oh.SystemContent.new().with_conversation_start_date(datetime.date.today().isoformat())
    if effort is not None:
        system = system.with_reasoning_effort(effort)
    result = oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "functions.get_weather"), "sunny")
    return harmony.render_conversation_for_completion(oh.Conversation.from_messages([
        oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
        oh.Message.from_role_and_content(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_function_tools([tool])),
        oh.Message.from_role_and_content(oh.Role.USER, "Weather in Oslo?"),
        assistant(reasoning, "analysis"),
        assistant(ARGUMENTS, "commentary", "functions.get_weather").with_content_type("<|constrain|>json"),
        result.with_recipient("assistant").with_channel("commentary"),
    ]), oh.Role.ASSISTANT)


def model_tokens(harmony: oh.HarmonyEncoding, messages: list[oh.Message], end: int) -> list[int]:
    """What gpt-oss writes after `<|start|>assistant`: the messages rendered, minus that prefix, then `end`."""
    tokens = [token for message in messages for token in harmony.render(message)]
    return tokens[2:-1] + [end]


@pytest.fixture(scope="module")
def call_tokens(harmony, chat) -> list[int]:
    call = assistant(ARGUMENTS, "commentary", "functions.get_weather").with_content_type("<|constrain|>json")
    return model_tokens(harmony, [assistant("Look it up.", "analysis"), call], chat.tokens.call)


@pytest.fixture(scope="module")
def engines(chat, call_tokens, tmp_path_factory) -> dict[str, ScriptedEngine]:
    directory = tmp_path_factory.mktemp("gpt2_tokenizer")
    write_gpt2_tokenizer(directory)
    gpt2 = load_tokenizer(directory)
    hermes = gpt2.encode_ordinary(HERMES_TEXT) + [gpt2.eos_token_id]
    return {"oss": ScriptedEngine(chat.tokenizer, call_tokens), "gpt2": ScriptedEngine(gpt2, [0, gpt2.eos_token_id]),
            "hermes": ScriptedEngine(gpt2, hermes)}


@pytest.fixture(scope="module")
def http(chat, engines) -> TestClient:
    app = create_app(ServerConfig(), {})
    with TestClient(app) as running:
        app.state.models["oss"] = ServedModel("oss", engines["oss"], chat, 0, {},
                                                GenerationDefaults(chat.stop_token_ids))
        template = TemplateChatFormat(engines["gpt2"].tokenizer)
        app.state.models["gpt2"] = ServedModel("gpt2", engines["gpt2"], template, 0, {},
                                                 GenerationDefaults(template.stop_token_ids))
        hermes = TemplateChatFormat(engines["hermes"].tokenizer, HERMES_TEMPLATE, tool_call_parser="hermes")
        app.state.models["hermes"] = ServedModel("hermes", engines["hermes"], hermes, 0, {},
                                                   GenerationDefaults(hermes.stop_token_ids))
        yield running


@pytest.fixture(scope="module")
def client(http) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def test_a_generated_call_becomes_tool_calls_with_finish_reason_tool_calls(client):
    result = client.chat.completions.create(model="oss", messages=QUESTION, tools=[WEATHER_TOOL])
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, call.function.arguments) == ("get_weather", ARGUMENTS)
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    assert choice.message.content == ""
    assert choice.message.reasoning == choice.message.reasoning_content == "Look it up."


def test_streamed_call_deltas_give_index_id_and_name_first_then_argument_fragments(client):
    chunks = list(client.chat.completions.create(model="oss", messages=QUESTION, tools=[WEATHER_TOOL], stream=True))
    deltas = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
    first, rest = deltas[0], deltas[1:]
    assert (first.index, first.type, first.function.name) == (0, "function", "get_weather")
    assert first.id.startswith("call_")
    assert len(rest) > 1 and all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert "".join(d.function.arguments for d in rest) == ARGUMENTS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning", None) or "" for c in chunks)
    assert reasoning == "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    assert reasoning == "Look it up."


def test_the_sdk_stream_helper_accumulates_the_call(client):
    with client.chat.completions.stream(model="oss", messages=QUESTION, tools=[WEATHER_TOOL]) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", ARGUMENTS)
    assert final.choices[0].finish_reason == "tool_calls"


def test_a_call_cut_by_max_tokens_finishes_with_length(client, call_tokens):
    result = client.chat.completions.create(model="oss", messages=QUESTION, tools=[WEATHER_TOOL],
                                            max_completion_tokens=len(call_tokens) - 2)
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_the_prompt_is_what_openai_harmony_renders_for_the_call_and_its_result(client, harmony, engines):
    history = QUESTION + [
        {"role": "assistant", "content": None, "reasoning": "Look it up.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": ARGUMENTS}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    client.chat.completions.create(model="oss", messages=history, tools=[WEATHER_TOOL], reasoning_effort="low")
    expected = prompt_after_weather_call(harmony, WEATHER_TOOL["function"], "Look it up.", oh.ReasoningEffort.LOW)
    assert engines["oss"].prompts[-1] == expected


def test_reasoning_is_accepted_under_either_name(client, engines):
    def prompt_with(field: str) -> list[int]:
        turn = {"role": "assistant", "content": "", field: "Thinking it over."}
        client.chat.completions.create(model="oss", messages=QUESTION + [turn])
        return engines["oss"].prompts[-1]

    assert prompt_with("reasoning") == prompt_with("reasoning_content")


def test_tool_choice_none_leaves_the_tools_out_of_the_prompt(client, engines):
    client.chat.completions.create(model="oss", messages=QUESTION, tools=[WEATHER_TOOL], tool_choice="none")
    without_tools = engines["oss"].prompts[-1]
    client.chat.completions.create(model="oss", messages=QUESTION)
    assert without_tools == engines["oss"].prompts[-1]


def test_required_and_named_tool_choice_render_the_prompt_as_auto_does(client, engines):
    prompts = []
    for choice in ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}]:
        client.chat.completions.create(model="oss", messages=QUESTION, tools=[WEATHER_TOOL], tool_choice=choice,
                                       parallel_tool_calls=False)
        prompts.append(engines["oss"].prompts[-1])
    assert prompts[0] == prompts[1] == prompts[2]


@pytest.mark.parametrize(("model", "extra", "param"), [
    ("oss", {"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER_TOOL]},
     "tool_choice"),
    ("oss", {"tool_choice": "required"}, "tool_choice"),
    ("oss", {"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "tools"),
    ("oss", {"messages": QUESTION + [{"role": "tool", "content": "sunny"}]}, "messages"),
    ("oss", {"messages": QUESTION + [{"role": "tool", "content": "sunny", "tool_call_id": "x"}]}, "messages"),
    ("gpt2", {"tools": [WEATHER_TOOL]}, "tools"),
])
def test_bad_tool_requests_are_400s_naming_the_parameter(client, model, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, **({"messages": QUESTION} | extra))
    assert caught.value.body["param"] == param
    assert client.chat.completions.create(model="oss", messages=QUESTION).choices, "the server keeps serving"


def deep_tool(depth: int) -> str:
    schema = '{"type": "object", "properties": {"a": ' * depth + '{"type": "string"}' + "}}" * depth
    return '{"type": "function", "function": {"name": "deep", "parameters": ' + schema + "}}"


def test_a_schema_too_deep_for_openai_harmony_is_a_400_not_a_crash(http):
    body = f'{{"model": "oss", "messages": {json.dumps(QUESTION)}, "tools": [{deep_tool(300)}]}}'
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages"
    assert http.post("/v1/chat/completions", json={"model": "oss", "messages": QUESTION}).status_code == 200


def test_the_sdk_types_read_every_field_we_send_but_vllm_s_extras(client):
    result = client.chat.completions.create(model="oss", messages=QUESTION, tools=[WEATHER_TOOL])
    assert not result.model_extra and set(result.choices[0].model_extra) == {"stop_reason"}  # vLLM's, null here
    message = result.choices[0].message
    assert set(message.model_extra) == {"reasoning", "reasoning_content"}
    assert not message.tool_calls[0].model_extra and not message.tool_calls[0].function.model_extra
    for chunk in client.chat.completions.create(model="oss", messages=QUESTION, tools=[WEATHER_TOOL], stream=True):
        delta = chunk.choices[0].delta
        assert set(delta.model_extra) <= {"reasoning", "reasoning_content"}
        assert all(not call.model_extra and not (call.function and call.function.model_extra)
                   for call in delta.tool_calls or [])


def test_a_hermes_model_s_tagged_call_becomes_tool_calls(client):
    result = client.chat.completions.create(model="hermes", messages=QUESTION, tools=[WEATHER_TOOL])
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", ARGUMENTS)
    assert choice.message.content == "Checking.\n"
    with client.chat.completions.stream(model="hermes", messages=QUESTION, tools=[WEATHER_TOOL]) as stream:
        final = stream.get_final_completion()
    [streamed] = final.choices[0].message.tool_calls
    assert (streamed.function.name, streamed.function.arguments) == ("get_weather", ARGUMENTS)
    assert final.choices[0].message.content == "Checking.\n" and final.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("extra", [{}, {"tools": [WEATHER_TOOL], "tool_choice": "none"}])
def test_without_tools_offered_a_hermes_model_s_text_is_all_content(client, extra):
    choice = client.chat.completions.create(model="hermes", messages=QUESTION, **extra).choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (HERMES_TEXT, None, "stop")


def test_the_responses_api_reads_a_hermes_model_s_call_too(http):
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL["function"]["parameters"]}
    response = http.post("/v1/responses", json={"model": "hermes", "input": "Weather in Oslo?", "tools": [tool],
                                                "store": False})
    assert response.status_code == 200, response.text
    message, call = response.json()["output"]
    assert message["content"][0]["text"] == "Checking.\n"
    assert (call["type"], call["name"], call["arguments"]) == ("function_call", "get_weather", ARGUMENTS)
