"""From a request's tool_choice to the engine's GrammarSpec for a forced tool call: naming it, compiling nothing.

Only harmony (GPT-OSS) can express a forced call: the answer opens with the call's header, as openai-harmony
renders it, then the arguments follow the function's `parameters` schema as compact JSON and `<|call|>` ends
the turn. With one candidate function (a named tool_choice, or "required" with one tool) the whole header is
forced; with several, the model picks the name under a grammar over the names (see
server.engine.structured_output). A plain chat template (GPT-2) has no call syntax its output is parsed by, so
a required or named tool_choice there is a 400.
"""

from __future__ import annotations

import json

from server.chat import FunctionTool, HarmonyChatFormat, TemplateChatFormat
from server.chat.harmony import recipient
from server.engine.sampling_params import CallChoice, GrammarSpec
from server.protocol import APIError


def forced_call_spec(chat_format: HarmonyChatFormat | TemplateChatFormat, tools: list[FunctionTool],
                     tool_choice: str | None, named: str | None) -> GrammarSpec | None:
    """None unless tool_choice is "required" or names a function (``named``; tools already checked)."""
    if named is None and tool_choice != "required":
        return None
    if not isinstance(chat_format, HarmonyChatFormat):
        raise APIError(400, "tool_choice: this model's chat template cannot express a tool call, so a call "
                            "cannot be forced; use \"auto\" or \"none\"", param="tool_choice")
    candidates = [tool for tool in tools if named is None or tool.name == named]
    call = chat_format.tokens.call
    if len(candidates) == 1:
        tool, = candidates
        return GrammarSpec(schema_text(tool), tuple(chat_format.call_header(tool.name)), (call,), param="tools")
    header = chat_format.call_header(candidates[0].name)
    prefix = chat_format.tokenizer.encode_ordinary(" to=")
    choices = tuple(CallChoice(recipient(tool.name), schema_text(tool)) for tool in candidates)
    rest = header[header.index(chat_format.tokens.channel):]  # `<|channel|>commentary <|constrain|>json<|message|>`
    return GrammarSpec(None, tuple(prefix), (call,), choices, tuple(rest), param="tools")


def schema_text(tool: FunctionTool) -> str | None:
    """The arguments' schema as compact JSON text (key order kept); None, any bounded object, when it has none
    (an empty schema would allow any JSON value, unbounded, where arguments must be an object)."""
    return json.dumps(tool.parameters, separators=(",", ":")) if tool.parameters else None
