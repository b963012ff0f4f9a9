"""From a request's ``response_format`` (or vLLM's ``structured_outputs``) to the engine's GrammarSpec: naming the
constraint only, compiling nothing."""

from __future__ import annotations

import json

from pydantic import ValidationError

from server.chat.harmony import HarmonyChatFormat
from server.engine.sampling_params import GrammarSpec
from server.protocol import APIError, ResponseFormat, StructuralTagItem, StructuredOutputs
from server.protocol_responses import TextFormat


def grammar_spec(response_format: ResponseFormat | None, forced_prefix: tuple[int, ...] = ()) -> GrammarSpec | None:
    """None for plain text; the schema as compact JSON text (key order kept: properties come out in it)."""
    if response_format is None:
        return None
    if response_format.structures is not None and response_format.triggers is not None:
        return GrammarSpec(None, forced_prefix,
                           structural_tag=structural_tag(response_format.structures, response_format.triggers))
    schema = response_format.json_schema.schema_ if response_format.json_schema is not None else None
    return format_spec(response_format.type, schema, forced_prefix)


def request_grammar(response_format: ResponseFormat | None, structured: StructuredOutputs | None,
                    forced_prefix: tuple[int, ...] = ()) -> GrammarSpec | None:
    """The constraint a completions or chat request names in either field (one at most)."""
    if structured is None:
        return grammar_spec(response_format, forced_prefix)
    if response_format is not None and response_format.type != "text":
        raise APIError(400, "structured_outputs: give it or response_format, not both", param="structured_outputs")
    return structured_spec(structured, forced_prefix)


def structural_tag(tags: list[StructuralTagItem], triggers: list[str]) -> str:
    """vLLM's structures and triggers as xgrammar's structural tag: text in which a trigger must open one of the
    tags (its begin, JSON under its schema, its end), any number of times."""
    return json.dumps({"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": triggers, "tags": [
        {"begin": tag.begin, "content": {"type": "json_schema", "json_schema": tag.schema_}, "end": tag.end}
        for tag in tags]}}, separators=(",", ":"))


def structured_tag_text(text: str) -> str:
    """structured_outputs.structural_tag: vLLM's structures and triggers, or xgrammar's own form, as JSON text."""
    try:
        tag = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"structured_outputs.structural_tag: not JSON text: {exc}",
                       param="structured_outputs") from None
    if isinstance(tag, dict) and "format" in tag:
        return json.dumps({"type": "structural_tag", "format": tag["format"]}, separators=(",", ":"))
    try:
        legacy = ResponseFormat.model_validate(tag | {"type": "structural_tag"} if isinstance(tag, dict) else tag)
    except ValidationError as exc:
        raise APIError(400, "structured_outputs.structural_tag: an object with structures and triggers (as in "
                       f"response_format), or with format: {exc.errors()[0]['msg']}", param="structured_outputs") \
            from None
    assert legacy.structures is not None and legacy.triggers is not None  # the model's rule for its type
    return structural_tag(legacy.structures, legacy.triggers)


def structured_spec(structured: StructuredOutputs, forced_prefix: tuple[int, ...] = ()) -> GrammarSpec:
    """``choice`` becomes a grammar of its literal strings (JSON string literals are valid EBNF ones)."""
    if structured.regex is not None:
        return GrammarSpec(None, forced_prefix, param="structured_outputs", regex=structured.regex)
    if structured.grammar is not None:
        return GrammarSpec(None, forced_prefix, param="structured_outputs", ebnf=structured.grammar)
    if structured.structural_tag is not None:
        return GrammarSpec(None, forced_prefix, param="structured_outputs",
                           structural_tag=structured_tag_text(structured.structural_tag))
    if structured.choice is not None:
        choices = "root ::= " + " | ".join(json.dumps(choice) for choice in structured.choice)
        return GrammarSpec(None, forced_prefix, param="structured_outputs", ebnf=choices)
    if structured.json_object:
        return GrammarSpec(None, forced_prefix, param="structured_outputs")
    schema = structured.json_
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"structured_outputs.json: not JSON text: {exc}",
                           param="structured_outputs") from None
        if not isinstance(schema, dict):
            raise APIError(400, "structured_outputs.json: a JSON schema is an object", param="structured_outputs")
    return GrammarSpec(json.dumps(schema, separators=(",", ":")), forced_prefix, param="structured_outputs")


def text_format_spec(text_format: TextFormat | None, forced_prefix: tuple[int, ...] = ()) -> GrammarSpec | None:
    """The Responses API's `text.format`: the same constraint as chat's response_format."""
    if text_format is None:
        return None
    if text_format.type == "json_schema" and text_format.json_schema is None:
        raise APIError(400, "text.format: type json_schema needs a schema", param="text.format")
    return format_spec(text_format.type, text_format.json_schema, forced_prefix, param="text.format")


def format_spec(kind: str, schema: dict | None, forced_prefix: tuple[int, ...],
                param: str = "response_format") -> GrammarSpec | None:
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec(None, forced_prefix, param=param)
    return GrammarSpec(json.dumps(schema, separators=(",", ":")), forced_prefix, param=param)


def answer_prefix(chat_format: object) -> tuple[int, ...]:
    """What a chat format's answer starts with before its content: for harmony, the final channel's header
    (`<|channel|>final<|message|>` after the prompt's `<|start|>assistant`), forced so the constrained JSON is
    the final answer and no reasoning comes first; nothing for a plain template."""
    if not isinstance(chat_format, HarmonyChatFormat):
        return ()
    tokens = chat_format.tokens
    return (tokens.channel, *chat_format.tokenizer.encode_ordinary("final"), tokens.message)
