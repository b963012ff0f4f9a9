"""The served OpenAPI document: FastAPI's, corrected to what this server really answers.

What only the running server knows or does differently from FastAPI's defaults: validation errors are 400 (not
FastAPI's 422 with its own body); ``model`` accepts only the names this process serves (any other gets 404);
token ids stop at the vocabulary, lengths at the context; and each request body has an example that is served.
With these stated, most of a schema-driven fuzzer's valid requests reach the engine (tests/test_fuzz_schema.py
fails when most are refused), and its checks of status codes and bodies against the document are exact. What
JSON Schema cannot say (prompt + max_tokens within the context, min_tokens <= max_tokens, a perplexity stride
below max_length) is still a 400.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.chat import HarmonyChatFormat, TemplateChatFormat


def install_openapi(app: FastAPI, model_names: list[str]) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes, servers=app.servers)  # --root-path's, once a request named it
            _drop_validation_422(document)
            _pin_model_names(document, model_names)
            served = list(app.state.models.values())
            if served:  # the engines start with the app, before any request asks for the document
                _state_limits(document, min(s.engine.max_model_len for s in served),
                              min(s.engine.tokenizer.vocab_size for s in served))
                _add_examples(document, model_names[0])
                _state_embedding_widths(document, sorted({s.engine.hidden_size for s in served}))
                _state_logprob_limit(document, min(s.max_logprobs for s in served))
                _state_template_extras(document, [s.chat_format for s in served],
                                       any(s.frontend.trust_request_chat_template for s in served))
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema


def _drop_validation_422(document: dict[str, Any]) -> None:
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _pin_model_names(document: dict[str, Any], model_names: list[str]) -> None:
    """In request bodies and in query parameters (GET /tokenizer_info), where ``model`` may also be null."""
    schemas = document.get("components", {}).get("schemas", {})
    models = [schema["properties"]["model"] for name, schema in schemas.items()
              if name.endswith("Request") and "model" in schema.get("properties", {})]
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            models += [p["schema"] for p in operation.get("parameters", []) if p["name"] == "model"]
    for node in _nodes(models, "string"):
        node["enum"] = list(model_names)


def _state_limits(document: dict[str, Any], max_model_len: int, vocab_size: int) -> None:
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("CompletionRequest", "ChatCompletionRequest", "PerplexityRequest", "EmbeddingRequest",
                 "DetokenizeRequest"):
        properties = schemas.get(name, {}).get("properties", {})
        for field in ("prompt", "input", "stop_token_ids", "allowed_token_ids", "tokens"):  # every integer: a token id
            for node in _nodes(properties.get(field), "integer"):
                node["maximum"] = vocab_size - 1
        for field in ("max_tokens", "max_completion_tokens", "stride"):  # a prompt takes at least one token
            if field == "max_tokens" and "max_completion_tokens" in properties:
                continue  # chat's deprecated alias, ignored when max_completion_tokens is given: no bound holds
            for node in _nodes(properties.get(field), "integer"):
                node["maximum"] = max_model_len - 1
        for node in _nodes(properties.get("max_length"), "integer"):
            node["maximum"] = max_model_len
        if "logit_bias" in properties:  # keys are token ids; digits one fewer than the vocabulary's stay inside it
            digits = len(str(vocab_size - 1)) - 1
            for node in _nodes(properties["logit_bias"], "object"):
                node["propertyNames"] = {"pattern": f"^(0|[1-9][0-9]{{0,{digits - 1}}})$"}
        if "top_logprobs" in properties and "logprobs" in properties:  # a number only with logprobs: true
            schemas[name].setdefault("dependentSchemas", {})["top_logprobs"] = {"anyOf": [
                {"properties": {"top_logprobs": {"type": "null"}}},
                {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}]}
        if "suffix" in properties:  # refused unless null
            properties["suffix"] = {"type": "null", "title": "Suffix", "description": "not supported; must be null"}


def _state_embedding_widths(document: dict[str, Any], widths: list[int]) -> None:
    """``dimensions`` may only be a served model's own width (none is trained for shortened embeddings)."""
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("EmbeddingRequest", "EmbeddingChatRequest"):
        for node in _nodes(schemas.get(name, {}).get("properties", {}).get("dimensions"), "integer"):
            node["enum"] = widths


def _state_logprob_limit(document: dict[str, Any], limit: int) -> None:
    """Alternatives a token: at most --max-logprobs (chat's boolean ``logprobs`` has no integer to bound)."""
    for schema in document.get("components", {}).get("schemas", {}).values():
        for field in ("logprobs", "top_logprobs", "prompt_logprobs"):
            for node in _nodes(schema.get("properties", {}).get(field), "integer"):
                node["maximum"] = limit


def _state_template_extras(document: dict[str, Any], formats: list[HarmonyChatFormat | TemplateChatFormat],
                           request_templates: bool) -> None:
    """A request's own chat template only on a server that takes them, documents only where a template may use
    them, and on GPT-OSS alone only the kwargs harmony has."""
    templates = [f for f in formats if isinstance(f, TemplateChatFormat)]
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("ChatCompletionRequest", "TokenizeChatRequest", "EmbeddingChatRequest"):
        properties = schemas.get(name, {}).get("properties", {})
        if not properties:
            continue
        if not (templates and request_templates):
            properties["chat_template"] = {"type": "null", "description": "this server takes no request templates"}
            if not any(f.uses_documents for f in templates):
                properties["documents"] = {"type": "null", "description": "no served chat template uses them"}
        if not templates:
            properties["chat_template_kwargs"] = {"anyOf": [{"type": "null"}, {
                "type": "object", "additionalProperties": False, "properties": {
                    "reasoning_effort": {"enum": ["low", "medium", "high"]}, "current_date": {"type": "string"}}}]}


def _add_examples(document: dict[str, Any], model: str) -> None:
    schemas = document.get("components", {}).get("schemas", {})
    examples = {
        "CompletionRequest": {"model": model, "prompt": "Hello", "max_tokens": 4},
        "ChatCompletionRequest": {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        "PerplexityRequest": {"model": model, "input": "The quick brown fox"},
        "EmbeddingRequest": {"model": model, "input": "The quick brown fox"},
        "EmbeddingChatRequest": {"model": model, "messages": [{"role": "user", "content": "The quick brown fox"}]},
        "ScoreRequest": {"model": model, "text_1": "What is a fox?", "text_2": ["A fox is an animal.", "Hello"]},
        "RerankRequest": {"model": model, "query": "What is a fox?", "documents": ["A fox is an animal.", "Hello"]},
    }
    for name, example in examples.items():
        if name in schemas:
            schemas[name]["examples"] = [example]


def _nodes(schema: Any, kind: str) -> list[dict[str, Any]]:
    """Every sub-schema of ``kind`` in ``schema`` (through anyOf branches and array items)."""
    if isinstance(schema, list):
        return [node for item in schema for node in _nodes(item, kind)]
    if not isinstance(schema, dict):
        return []
    found = [schema] if schema.get("type") == kind else []
    return found + [node for key in ("anyOf", "oneOf", "items") for node in _nodes(schema.get(key), kind)]
