"""From a request's tool_choice to the engine's GrammarSpec for a forced tool call, and to the parser that reads
the call back: naming the constraint, compiling nothing.

On harmony (GPT-OSS) the answer opens with the call's header, as openai-harmony renders it, then the arguments
follow the function's `parameters` schema as compact JSON and `<|call|>` ends the turn. With one candidate
function (a named tool_choice, or "required" with one tool) the whole header is forced; with several, the model
picks the name under a grammar over the names (see server.engine.structured_output). Harmony's own parser reads
the call.

A plain chat template (GPT-2) has no call syntax, so the call is written as JSON, as vLLM writes it for any
model: a named tool_choice makes the output that function's arguments; "required" makes it a JSON array of
`{"name", "parameters"}` objects, one or more (exactly one with parallel_tool_calls false), each under its
tool's schema. server.chat.json_calls reads them back into tool calls.
"""

from __future__ import annotations

import json

from server.chat import ChatMessage, ChatOutputParser, FunctionTool, HarmonyChatFormat, TemplateChatFormat
from server.chat.harmony import recipient
from server.chat.json_calls import CallArrayParser, NamedArgumentsParser
from server.engine.sampling_params import CallChoice, GrammarSpec

ANY_ARGUMENTS: dict = {"type": "object"}  # a tool without a schema still takes an object of arguments


def is_forced(tool_choice: str | None, named: str | None) -> bool:
    return named is not None or tool_choice == "required"


def forced_call_spec(chat_format: HarmonyChatFormat | TemplateChatFormat, tools: list[FunctionTool],
                     tool_choice: str | None, named: str | None, parallel: bool = True) -> GrammarSpec | None:
    """None unless tool_choice is "required" or names a function (``named``; tools already checked).
    ``parallel``: a plain template's "required" may make several calls (harmony makes one per turn)."""
    if not is_forced(tool_choice, named):
        return None
    candidates = [tool for tool in tools if named is None or tool.name == named]
    if not isinstance(chat_format, HarmonyChatFormat):
        return json_calls_spec(candidates, named is not None, parallel)
    call = chat_format.tokens.call
    if len(candidates) == 1:
        tool, = candidates
        return GrammarSpec(schema_text(tool), tuple(chat_format.call_header(tool.name)), (call,), param="tools")
    header = chat_format.call_header(candidates[0].name)
    prefix = chat_format.tokenizer.encode_ordinary(" to=")
    choices = tuple(CallChoice(recipient(tool.name), schema_text(tool)) for tool in candidates)
    rest = header[header.index(chat_format.tokens.channel):]  # `<|channel|>commentary <|constrain|>json<|message|>`
    return GrammarSpec(None, tuple(prefix), (call,), choices, tuple(rest), param="tools")


def json_calls_spec(candidates: list[FunctionTool], named: bool, parallel: bool) -> GrammarSpec:
    """A plain template's forced call: the named tool's arguments, or an array of calls (name first, so a
    streamed call is named before its arguments come)."""
    if named:
        tool, = candidates
        return GrammarSpec(schema_text(tool), param="tools")
    calls = [{"type": "object", "properties": {"name": {"const": tool.name},
                                               "parameters": tool.parameters or ANY_ARGUMENTS},
              "required": ["name", "parameters"], "additionalProperties": False} for tool in candidates]
    array = {"type": "array", "items": {"anyOf": calls}, "minItems": 1} | ({} if parallel else {"maxItems": 1})
    return GrammarSpec(json.dumps(array, separators=(",", ":")), param="tools")


def choice_parser(chat_format: HarmonyChatFormat | TemplateChatFormat, tool_choice: str | None, named: str | None,
                  continued: ChatMessage | None = None, skip_special_tokens: bool = True,
                  tools: bool = False) -> ChatOutputParser:
    """The parser for one choice's output: a plain template's forced call is JSON; otherwise the format's own,
    told whether the request offers ``tools`` (a template model's --tool-call-parser reads calls only then)."""
    if isinstance(chat_format, HarmonyChatFormat):
        return chat_format.parser(continued, skip_special_tokens)
    if named is not None:
        return NamedArgumentsParser(chat_format.tokenizer, named)
    if tool_choice == "required":
        return CallArrayParser(chat_format.tokenizer)
    return chat_format.parser(continued, skip_special_tokens, tools)


def schema_text(tool: FunctionTool) -> str | None:
    """The arguments' schema as compact JSON text (key order kept); None, any bounded object, when it has none
    (an empty schema would allow any JSON value, unbounded, where arguments must be an object)."""
    return json.dumps(tool.parameters, separators=(",", ":")) if tool.parameters else None
