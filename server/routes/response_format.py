"""From a request's ``response_format`` to the engine's GrammarSpec: naming the constraint only, compiling nothing."""

from __future__ import annotations

import json

from server.chat.harmony import HarmonyChatFormat
from server.engine.sampling_params import GrammarSpec
from server.protocol import ResponseFormat


def grammar_spec(response_format: ResponseFormat | None, forced_prefix: tuple[int, ...] = ()) -> GrammarSpec | None:
    """None for plain text; the schema as compact JSON text (key order kept: properties come out in it)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return GrammarSpec(None, forced_prefix)
    schema = json.dumps(response_format.json_schema.schema_, separators=(",", ":"))
    return GrammarSpec(schema, forced_prefix)


def answer_prefix(chat_format: object) -> tuple[int, ...]:
    """What a chat format's answer starts with before its content: for harmony, the final channel's header
    (`<|channel|>final<|message|>` after the prompt's `<|start|>assistant`), forced so the constrained JSON is
    the final answer and no reasoning comes first; nothing for a plain template."""
    if not isinstance(chat_format, HarmonyChatFormat):
        return ()
    tokens = chat_format.tokens
    return (tokens.channel, *chat_format.tokenizer.encode_ordinary("final"), tokens.message)
