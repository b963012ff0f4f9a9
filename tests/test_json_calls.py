"""The JSON tool-call parsers (server.chat.json_calls) read output as the whole text, parsed at once, reads, however
the text is cut into tokens: a forced call's JSON as json.loads reads it (names once, arguments as the
`parameters` value's own text), and Hermes' tagged calls as a regular expression over the whole text finds them."""

from __future__ import annotations

import json
import re

import pytest

from server.chat.json_calls import CallArrayParser, NamedArgumentsParser, TaggedCallsParser

ARRAYS = [
    '[{"name":"get","parameters":{"id":7}}]',
    '[{"name":"a","parameters":{"s":"}],{\\"name\\":\\"x\\"","n":[1,{"b":[]}],"e":"\\\\"}},'
    '{"name":"b\\u00e9","parameters":{}}]',
    '[ {"name": "spaced", "parameters": {"k": "v"} } , {"name": "t", "parameters": {"q": null}} ]',
    '[{"parameters":{"late":"name"},"name":"after"}]',  # arguments before the name wait for it
    '[{"name":"scalar","parameters":"text, with } and ]"},{"name":"number","parameters":-1.5e3}]',
]


def parsed_calls(parser, token_ids: list[int]) -> list[dict]:
    calls: list[dict] = []
    deltas = [delta for token in token_ids for delta in parser.feed(token).tool_calls]
    for delta in deltas + parser.finish().tool_calls:
        if delta.name is not None:
            assert delta.index == len(calls), "each call is named once, in order, before its arguments"
            calls.append({"name": delta.name, "arguments": ""})
        calls[delta.index]["arguments"] += delta.arguments
    return calls


def char_tokens(tokenizer, text: str) -> list[int]:
    return [token for char in text for token in tokenizer.encode_ordinary(char)]


@pytest.mark.parametrize("text", ARRAYS)
@pytest.mark.parametrize("split", ["bpe", "chars"])
def test_calls_are_what_json_loads_reads(gpt2_tokenizer, text, split):
    tokens = gpt2_tokenizer.encode_ordinary(text) if split == "bpe" else char_tokens(gpt2_tokenizer, text)
    calls = parsed_calls(CallArrayParser(gpt2_tokenizer), tokens)
    written = json.loads(text)
    assert [call["name"] for call in calls] == [item["name"] for item in written]
    for call, item in zip(calls, written):
        assert json.loads(call["arguments"]) == item["parameters"]
        assert call["arguments"].strip() in text  # the model's own text, not a re-serialisation


def test_a_cut_off_array_keeps_its_finished_calls_and_the_last_one_s_text(gpt2_tokenizer):
    text = '[{"name":"get","parameters":{"id":7}},{"name":"get","parameters":{"id":1'
    calls = parsed_calls(CallArrayParser(gpt2_tokenizer), gpt2_tokenizer.encode_ordinary(text))
    assert calls == [{"name": "get", "arguments": '{"id":7}'}, {"name": "get", "arguments": '{"id":1'}]


def test_every_token_is_settled_as_not_content(gpt2_tokenizer):
    tokens = gpt2_tokenizer.encode_ordinary(ARRAYS[0]) + [gpt2_tokenizer.eos_token_id]
    for parser in (CallArrayParser(gpt2_tokenizer), NamedArgumentsParser(gpt2_tokenizer, "get")):
        deltas = [parser.feed(token) for token in tokens]
        assert [delta.settled for delta in deltas] == [[False]] * len(tokens)
        assert not any(delta.content or delta.reasoning for delta in deltas)


def test_named_arguments_are_the_whole_text_and_special_tokens_add_none(gpt2_tokenizer):
    text = '{"city":"Zürich","unit":"c"}'
    tokens = char_tokens(gpt2_tokenizer, text) + [gpt2_tokenizer.eos_token_id]
    assert parsed_calls(NamedArgumentsParser(gpt2_tokenizer, "get_weather"), tokens) == [
        {"name": "get_weather", "arguments": text}]


HERMES_OUTPUTS = [
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>',
    '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {"x": [1, '
    '"</tool_call"]}}</tool_call> done',
    'a < b and <tool but no call; <tool_call>not json</tool_call> then text',
    'unclosed at the end: <tool_call>{"name": "late", "arguments": {"k": 1}}',
    'no calls at all, only <tool_ca',
    '<tool_call>{"name": "deep", "arguments": ' + "[" * 5000 + "]" * 5000 + '}</tool_call> too deep to read',
]


def hermes_oracle(text: str) -> tuple[str, list[dict]]:
    """The whole text read at once: content outside the tags (a block that is no call stays, tags and all), and
    each tagged call (an unclosed last one included)."""
    content, calls, rest = "", [], text
    for match in re.finditer(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)$", text, re.DOTALL):
        body = match.group(1) if match.group(1) is not None else match.group(2)
        content += text[len(text) - len(rest): match.start()]
        rest = text[match.end():]
        try:
            call = json.loads(body)
            calls.append({"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)})
        except (json.JSONDecodeError, RecursionError, KeyError, TypeError):
            content += match.group(0)
    return content + rest, calls


@pytest.mark.parametrize("text", HERMES_OUTPUTS)
@pytest.mark.parametrize("split", ["bpe", "chars"])
def test_hermes_calls_are_read_as_the_whole_text_reads_them(gpt2_tokenizer, text, split):
    tokens = gpt2_tokenizer.encode_ordinary(text) if split == "bpe" else char_tokens(gpt2_tokenizer, text)
    parser = TaggedCallsParser(gpt2_tokenizer)
    deltas = [parser.feed(token) for token in tokens] + [parser.finish()]
    calls: list[dict] = []
    for delta in [part for d in deltas for part in d.tool_calls]:
        if delta.name is not None:
            assert delta.index == len(calls)
            calls.append({"name": delta.name, "arguments": ""})
        calls[delta.index]["arguments"] += delta.arguments
    assert ("".join(d.content for d in deltas), calls) == hermes_oracle(text)
    assert sum(len(d.settled) for d in deltas) == len(tokens)
