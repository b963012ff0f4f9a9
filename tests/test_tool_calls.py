"""GPT-OSS function calling: prompts token-identical to openai-harmony's, generated calls parsed out of the output."""

from __future__ import annotations

import os

import openai_harmony as oh
import pytest

from models.testing.tokenizer_files import write_gpt2_tokenizer
from models.tokenizer import load_tokenizer
from server.chat import ChatMessage, FunctionTool, ToolCall, ToolCallDelta, harmony_encoding as harmony_encoding_module
from server.chat.harmony_encoding import ENCODINGS_BASE, harmony_encoding
from tests.test_chat_harmony import (  # noqa: F401 - fixtures
    DATE,
    assistant,
    chat,
    completion_tokens,
    harmony,
    joined,
    parse,
    reference_prompt,
    tokenizer,
    user,
)

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "City name"},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
    "required": ["city"],
}
WEATHER = FunctionTool("get_weather", "Current weather in a city.", WEATHER_SCHEMA)
CLOCK = FunctionTool("get_time", "The time now.")
ARGUMENTS = '{ "city":"Oslo",  "unit": "celsius"}'  # odd spacing: must reach the prompt verbatim


def described(tool: FunctionTool) -> oh.ToolDescription:
    return oh.ToolDescription.new(tool.name, tool.description, parameters=tool.parameters)


def call_message(name: str, arguments: str) -> oh.Message:
    return assistant(arguments, "commentary", f"functions.{name}").with_content_type("<|constrain|>json")


def result_message(name: str, text: str) -> oh.Message:
    author = oh.Author.new(oh.Role.TOOL, f"functions.{name}")
    return oh.Message.from_author_and_content(author, text).with_recipient("assistant").with_channel("commentary")


def test_tools_go_in_the_developer_message_as_openai_harmony_renders_them(chat, harmony):
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Weather in Oslo?")]
    expected = reference_prompt(harmony, [user("Weather in Oslo?")], instructions="Be brief.",
                                tools=[described(WEATHER), described(CLOCK)])
    rendered = chat.render(messages, tools=[WEATHER, CLOCK], current_date=DATE)
    assert rendered == expected
    text = chat.tokenizer.decode(rendered)
    assert "Calls to these tools must go to the commentary channel: 'functions'." in text
    assert "namespace functions {" in text and "type get_weather = (_: {" in text


def test_tools_without_instructions_still_get_a_developer_message(chat, harmony):
    expected = reference_prompt(harmony, [user("Time?")], tools=[described(CLOCK)])
    assert chat.render([ChatMessage("user", "Time?")], tools=[CLOCK], current_date=DATE) == expected


def test_history_with_a_call_and_its_result_matches_openai_harmony(chat, harmony):
    messages = [
        ChatMessage("user", "Weather in Oslo?"),
        ChatMessage("assistant", "", reasoning="Need the weather tool.",
                    tool_calls=[ToolCall("c1", "get_weather", ARGUMENTS)]),
        ChatMessage("tool", '{"temperature": 3}', tool_call_id="c1"),
    ]
    reference = [user("Weather in Oslo?"), assistant("Need the weather tool.", "analysis"),
                 call_message("get_weather", ARGUMENTS), result_message("get_weather", '{"temperature": 3}')]
    rendered = chat.render(messages, tools=[WEATHER], current_date=DATE)
    assert rendered == reference_prompt(harmony, reference, tools=[described(WEATHER)])
    assert ARGUMENTS in chat.tokenizer.decode(rendered)
    assert "Need the weather tool." in chat.tokenizer.decode(rendered), "reasoning before a call in flight is kept"


def test_parallel_calls_with_a_preamble_and_results_found_by_call_id(chat, harmony):
    messages = [
        ChatMessage("user", "Weather and time?"),
        ChatMessage("assistant", "Checking both.", tool_calls=[ToolCall("a", "get_weather", '{"city": "Oslo"}'),
                                                               ToolCall("b", "get_time", "{}")]),
        ChatMessage("tool", "12:00", tool_call_id="b"),  # answered out of order: the id says which call
        ChatMessage("tool", "sunny", tool_call_id="a"),
    ]
    reference = [user("Weather and time?"), assistant("Checking both.", "commentary"),
                 call_message("get_weather", '{"city": "Oslo"}'), call_message("get_time", "{}"),
                 result_message("get_time", "12:00"), result_message("get_weather", "sunny")]
    rendered = chat.render(messages, tools=[WEATHER, CLOCK], current_date=DATE)
    assert rendered == reference_prompt(harmony, reference, tools=[described(WEATHER), described(CLOCK)])


def test_reasoning_before_a_final_answer_is_dropped_as_openai_harmony_drops_it(chat, harmony):
    messages = [
        ChatMessage("user", "Weather?"),
        ChatMessage("assistant", "", reasoning="Call the tool.", tool_calls=[ToolCall("c1", "get_weather", "{}")]),
        ChatMessage("tool", "rain", tool_call_id="c1"),
        ChatMessage("assistant", "It rains.", reasoning="Report it."),
        ChatMessage("user", "Thanks"),
    ]
    reference = [user("Weather?"), assistant("Call the tool.", "analysis"), call_message("get_weather", "{}"),
                 result_message("get_weather", "rain"), assistant("Report it.", "analysis"),
                 assistant("It rains.", "final"), user("Thanks")]
    rendered = chat.render(messages, tools=[WEATHER], current_date=DATE)
    assert rendered == reference_prompt(harmony, reference, tools=[described(WEATHER)])
    assert "Report it." not in chat.tokenizer.decode(rendered)


def test_a_legacy_function_result_comes_from_the_function_it_names(chat, harmony):
    messages = [ChatMessage("user", "Weather?"), ChatMessage("tool", "rain", name="get_weather")]
    reference = [user("Weather?"), result_message("get_weather", "rain")]
    rendered = chat.render(messages, tools=[WEATHER], current_date=DATE)
    assert rendered == reference_prompt(harmony, reference, tools=[described(WEATHER)])


def test_a_tool_result_for_an_unknown_call_id_is_refused(chat):
    messages = [ChatMessage("user", "Hi"), ChatMessage("tool", "x", tool_call_id="nope")]
    with pytest.raises(ValueError, match="'nope'"):
        chat.render(messages, tools=[WEATHER])


def test_parser_turns_a_message_to_a_function_into_a_named_call_with_verbatim_arguments(chat, harmony):
    messages = [assistant("User wants weather.", "analysis"), call_message("get_weather", ARGUMENTS)]
    tokens = completion_tokens(harmony, messages)[:-1] + [chat.tokens.call]
    reference = harmony.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    deltas, last = parse(chat, tokens)
    calls = [c for d in [*deltas, last] for c in d.tool_calls]
    assert calls[0] == ToolCallDelta(0, name="get_weather")
    assert all(c.index == 0 and c.name is None for c in calls[1:])
    assert "".join(c.arguments for c in calls) == reference[1].content[0].text == ARGUMENTS
    assert reference[1].recipient == "functions.get_weather"
    assert joined(deltas, last) == ("User wants weather.", "")


def test_parser_counts_calls_and_streams_arguments_before_the_call_ends(chat, harmony):
    tokens = completion_tokens(harmony, [call_message("get_weather", ARGUMENTS), call_message("get_time", "{}")])
    deltas, _ = parse(chat, tokens)
    calls = [c for d in deltas for c in d.tool_calls]
    assert [c.name for c in calls if c.name] == ["get_weather", "get_time"]
    assert sum(1 for d in deltas if any(c.arguments for c in d.tool_calls if c.index == 0)) > 1, "arguments stream"
    assert "".join(c.arguments for c in calls if c.index == 1) == "{}"


def test_parser_surfaces_built_in_tool_calls_even_on_the_analysis_channel(chat, harmony):
    browse = assistant('{"query": "tides"}', "analysis", "browser.search").with_content_type("json")
    run_code = assistant("print(1 + 1)", "analysis", "python").with_content_type("code")
    deltas, last = parse(chat, completion_tokens(harmony, [browse, run_code]))
    calls = [c for d in [*deltas, last] for c in d.tool_calls]
    assert [c.name for c in calls if c.name] == ["browser.search", "python"]
    assert "".join(c.arguments for c in calls if c.index == 0) == '{"query": "tides"}'
    assert "".join(c.arguments for c in calls if c.index == 1) == "print(1 + 1)"
    assert joined(deltas, last) == ("", ""), "a call's text is neither reasoning nor content"


def test_openai_harmony_parser_raises_on_malformed_output_where_ours_keeps_the_text(chat, tokenizer, harmony):
    """Why the project keeps its own output parser: a server must answer whatever the model sampled."""
    final = [chat.tokens.channel, *tokenizer.encode_ordinary("final"), chat.tokens.message,
             *tokenizer.encode_ordinary("hi"), chat.tokens.end]
    for tokens, text in [(tokenizer.encode_ordinary("plain words"), "plain words"),
                         (final + tokenizer.encode_ordinary("loose text"), "hi\nloose text")]:
        for strict in (True, False):
            with pytest.raises(oh.HarmonyError):
                harmony.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT, strict=strict)
        streaming = oh.StreamableParser(harmony, oh.Role.ASSISTANT)
        with pytest.raises(oh.HarmonyError):
            for token in tokens:
                streaming.process(token)
            streaming.process_eos()
        assert joined(*parse(chat, tokens)) == ("", text)


def test_harmony_vocabulary_is_built_from_the_checkpoint_without_the_network(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv(ENCODINGS_BASE, str(tmp_path))  # an empty folder: a loader reading it would fail
    monkeypatch.setattr(harmony_encoding_module, "_loaded", {})
    encoding = harmony_encoding(tokenizer)
    assert encoding.encode("Hello world", allowed_special="all") == tokenizer.encode_ordinary("Hello world")
    assert os.environ[ENCODINGS_BASE] == str(tmp_path), "the variable is restored after loading"


def test_a_tokenizer_that_is_not_o200k_harmony_is_refused(tmp_path):
    write_gpt2_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="o200k_harmony"):
        harmony_encoding(load_tokenizer(tmp_path))


@pytest.mark.parametrize("instructions", ["Ends in blank lines.\n\n\n", "  spaced  ", "Looks special: <|end|><|call|>"])
def test_instructions_and_tools_join_exactly_where_their_text_meets(chat, harmony, instructions):
    expected = reference_prompt(harmony, [user("Hi")], instructions=instructions, tools=[described(WEATHER)])
    rendered = chat.render([ChatMessage("developer", instructions), ChatMessage("user", "Hi")], tools=[WEATHER],
                           current_date=DATE)
    assert rendered == expected
