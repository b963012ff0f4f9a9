"""Request and response bodies of the HTTP API, as OpenAI's API reference defines them (plus vLLM's extras).

Bounds live in the models so the OpenAPI schema states them and a bad value is a 400 naming its field before
any route code runs. Unknown fields are refused (``extra="forbid"``) rather than silently ignored.

Why not the OpenAI SDK's own types: its response models are a client's lenient readers (``extra="allow"``, no
bounds) and its request params are TypedDicts, so they could neither refuse a bad request nor state bounds in
the OpenAPI document; the SDK stays a test dependency, and tests parse our responses with its types
(tests/test_tool_calls_api.py: nothing left over but the reasoning fields, which it does not know).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, JsonValue, Tag, field_validator, model_validator

from server.protocol_base import INTEGRAL, Integer, OptionalInteger, Strict, WithoutNulls
from server.protocol_messages import ChatMessageParam
from server.protocol_tools import ChatTool, NamedToolChoice, ToolCall, ToolCallDelta

MAX_N = 128
MAX_PROMPTS = 1024  # prompts (or perplexity inputs) in one request: each is tokenized before admission
MAX_LOGPROBS = 20  # OpenAI's limit on alternatives a token, and vLLM's default --max-logprobs
LOGPROBS_LIMIT = f"at most the server's --max-logprobs ({MAX_LOGPROBS} unless set)"
MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # a step asks the engine for 2n alternatives, as vLLM's default limit allows
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 512
MAX_BAD_WORDS = 64  # each is matched against every choice's output at every step
MAX_ALLOWED_IDS = 4096  # allowed_token_ids: each row's list is scattered into a mask every step
INT64_BOUND = 2**63  # seeds are int64; a power of two stays exact in tools that read JSON numbers as doubles

PRIORITY_DESCRIPTION = "vLLM extra: with --scheduling-policy priority, lower is served sooner (else only 0)"
CacheSalt = Annotated[str, Field(min_length=1, max_length=1024)]
CACHE_SALT_DESCRIPTION = ("vLLM extra: prefix-cache blocks are shared only with requests that give the same salt "
                          "(make it secret and long, e.g. 256 random bits)")
StopStrings = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
BadWord = Annotated[str, Field(max_length=MAX_STOP_STRING_CHARS, pattern=r"\S")]  # more than whitespace
TokenId = Annotated[int, Field(ge=0), INTEGRAL]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
TruncatePromptTokens = Annotated[int, Field(ge=1, lt=INT64_BOUND), INTEGRAL] | Literal[-1] | None  # vLLM's
PromptInput = (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
               | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM extra: with include_usage, every chunk carries "
                                         "the usage so far")


MAX_CHOICES = 256  # structured_outputs.choice: each is a branch of the grammar the request compiles
MAX_CHOICE_CHARS = 1024
MAX_REGEX_CHARS = 4096
MAX_GRAMMAR_CHARS = 65536
MAX_TEMPLATE_CHARS = 65536  # a request's own chat template, compiled before admission
# Template variables a request's chat_template_kwargs may not set: the request's own fields give them.
RESERVED_TEMPLATE_VARIABLES = ("messages", "tools", "documents", "add_generation_prompt", "continue_final_message")


def _exactly_one_kind(schema: dict[str, Any]) -> None:
    """The validator's rule, stated in the document: exactly one kind given, and not null (json_object true)."""
    kinds = ["json", "json_object", "regex", "choice", "grammar", "structural_tag"]
    schema["oneOf"] = [{"required": [kind], "properties": {
        kind: {"const": True} if kind == "json_object" else {"not": {"type": "null"}}}} for kind in kinds]


class StructuredOutputs(Strict):
    """vLLM's ``structured_outputs`` (its guided decoding): exactly one constraint, on every choice's text."""

    model_config = ConfigDict(json_schema_extra=_exactly_one_kind)

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON schema, or its JSON text")
    json_object: bool | None = Field(None, description="true: any JSON object")
    regex: str | None = Field(None, min_length=1, max_length=MAX_REGEX_CHARS, json_schema_extra={"format": "regex"},
                              description="the text is a full match of this regular expression")
    choice: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_CHOICE_CHARS)]],
                      Field(min_length=1, max_length=MAX_CHOICES)] | None = Field(
        None, description="the text is exactly one of these")
    grammar: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS,
                                description="the text is a sentence of this EBNF grammar (xgrammar's, from `root`)")
    structural_tag: str | None = Field(None, min_length=1, max_length=MAX_GRAMMAR_CHARS, description=(
        "JSON text: {\"structures\", \"triggers\"} as in response_format, or xgrammar's structural tag "
        "{\"type\": \"structural_tag\", \"format\": ...}"))

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [self.json_ is not None, bool(self.json_object), self.regex is not None, self.choice is not None,
                 self.grammar is not None, self.structural_tag is not None]
        if sum(given) != 1:
            raise ValueError("exactly one of json, json_object, regex, choice, grammar and structural_tag is required")
        return self


# OpenAI's metadata: at most 16 pairs, keys of 64 characters, values of 512.
Metadata = dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]


class NoOpFields(Strict):
    """Fields OpenAI clients send that change nothing here: accepted so those clients work, never acted on."""

    user: str | None = Field(None, max_length=512)
    store: bool | None = None
    metadata: Metadata | None = Field(None, max_length=16)
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    prompt_cache_key: str | None = Field(None, max_length=512, description="prefix caching is automatic")
    safety_identifier: str | None = Field(None, max_length=512)


def _is_none(value: object) -> bool:
    return value is None


def _given(name: str) -> dict[str, Any]:
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


def _masks_without_a_constraint(schema: dict[str, Any]) -> None:
    """The engine's rules, stated in the document: allowed_token_ids and a constraint never come together, and
    bad_words comes with neither."""
    constraining_format = {"required": ["response_format"], "properties": {"response_format": {
        "type": "object", "properties": {"type": {"enum": ["json_object", "json_schema", "structural_tag"]}}}}}
    constraint = [_given("structured_outputs"), constraining_format]
    schema["not"] = {"anyOf": [
        {"allOf": [_given("allowed_token_ids"), {"anyOf": constraint}]},
        {"allOf": [_given("bad_words"), {"anyOf": [_given("allowed_token_ids"), *constraint]}]},
    ]}


def _empty_or_null(kind: str) -> dict[str, Any]:
    size = {"array": "maxItems", "object": "maxProperties"}[kind]
    return {"anyOf": [{"type": "null"}, {"type": kind, size: 0}]}


def _beam_search_rules(schema: dict[str, Any]) -> None:
    """use_beam_search ranks by the model's own log-probabilities and returns whole choices: n is its width, at
    most MAX_BEAM_WIDTH, and what would change the log-probabilities or cut the text is refused with it."""
    neutral = {
        "n": {"maximum": MAX_BEAM_WIDTH},
        "stop": _empty_or_null("array"),
        "min_tokens": {"maximum": 0},
        "logit_bias": _empty_or_null("object"),
        "allowed_token_ids": {"type": "null"},
        "bad_words": _empty_or_null("array"),
        "presence_penalty": {"anyOf": [{"type": "null"}, {"const": 0}]},
        "frequency_penalty": {"anyOf": [{"type": "null"}, {"const": 0}]},
        "repetition_penalty": {"anyOf": [{"type": "null"}, {"const": 1}]},
        "structured_outputs": {"type": "null"},
        "response_format": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"type": {"const": "text"}}}]},
        "tool_choice": {"anyOf": [{"type": "null"}, {"enum": ["none", "auto"]}]},
    }
    schema.setdefault("dependentSchemas", {})["use_beam_search"] = {"anyOf": [
        {"properties": {"use_beam_search": {"const": False}}}, {"properties": neutral}]}


def _cross_field_rules(schema: dict[str, Any]) -> None:
    _masks_without_a_constraint(schema)
    _beam_search_rules(schema)


class SamplingFields(NoOpFields):
    """The sampling and stopping fields the completions and chat endpoints share."""

    model_config = ConfigDict(json_schema_extra=_cross_field_rules)

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 is greedy; default 1")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: OptionalInteger = Field(None, ge=-1, lt=INT64_BOUND,
                              description="vLLM extra; 0, -1 or above the vocabulary is off")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM extra")
    n: Integer = Field(1, ge=1, le=MAX_N)
    stop: StopStrings | Annotated[list[StopStrings], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    seed: OptionalInteger = Field(None, ge=-INT64_BOUND, lt=INT64_BOUND)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0, description="vLLM extra; 1 is off")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=1024, description="token id (as a string) -> bias added to its logit"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM extra: keep generating past the end-of-text token")
    min_tokens: Integer = Field(0, ge=0, description="vLLM extra: no stop token before this many tokens")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM extra: constrain every choice's text (not with response_format)")
    include_stop_str_in_output: bool = Field(False, description="vLLM extra: a stop string that ends a choice "
                                             "stays at the end of its text")
    truncate_prompt_tokens: TruncatePromptTokens = Field(
        None, description="vLLM extra: only the prompt's last k tokens are used (-1: the last max_model_len)")
    return_token_ids: bool = Field(False, description="vLLM extra: the prompt's and each choice's token ids in the "
                                   "reply (streamed: each chunk's new ones)")
    return_tokens_as_token_ids: bool | None = Field(None, description="vLLM extra: logprobs name each token "
                                                    "\"token_id:N\", exact where its bytes are not whole UTF-8 "
                                                    "(null: as the server's --return-tokens-as-token-ids says)")
    priority: Integer = Field(0, ge=-INT64_BOUND, lt=INT64_BOUND, description=PRIORITY_DESCRIPTION)
    cache_salt: CacheSalt | None = Field(None, description=CACHE_SALT_DESCRIPTION)
    bad_words: Annotated[list[BadWord], Field(max_length=MAX_BAD_WORDS)] | None = Field(
        None, description="vLLM extra: words never generated as these tokens (each as written and, when that is "
        "another token, after a space); not with a constraint or allowed_token_ids")
    add_special_tokens: bool | None = Field(None, description="vLLM extra, accepted: these tokenizers add no "
                                            "special tokens (no BOS), so it changes nothing")
    spaces_between_special_tokens: bool = Field(True, description="vLLM extra, accepted: special tokens written "
                                                "out are joined without spaces either way, as vLLM's byte-level "
                                                "(fast) tokenizers join them")
    skip_special_tokens: bool = Field(True, description="vLLM extra: false: special tokens generated (end-of-text "
                                      "under ignore_eos, for one) come out in the text as their names")
    prompt_logprobs: OptionalInteger = Field(None, ge=0, lt=INT64_BOUND, description="vLLM extra: each prompt token's "
                                        "logprob and rank, with its k likeliest alternatives (not with stream; k "
                                        f"{LOGPROBS_LIMIT})")
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1, max_length=MAX_ALLOWED_IDS)] | None = Field(
        None, description="vLLM extra: only these tokens are picked (list the end-of-text token to let a choice "
        "stop before max_tokens)")
    use_beam_search: bool = Field(False, description="vLLM extra: the n best continuations by beam search, as "
                                  f"transformers' generate(num_beams=n) finds them (n at most {MAX_BEAM_WIDTH}; "
                                  "sampling fields unused; not with stop strings, penalties, biases, masks, "
                                  "min_tokens or a constraint)")
    length_penalty: float = Field(1.0, ge=-10.0, le=10.0, description="vLLM extra, with use_beam_search: a beam "
                                  "that ended scores its log-probability / its length ** length_penalty")


class CompletionRequest(SamplingFields):
    prompt: PromptInput
    max_tokens: OptionalInteger = Field(16, ge=0, description="null: what the context and KV cache hold for all n")
    logprobs: OptionalInteger = Field(None, ge=0, lt=INT64_BOUND, description=LOGPROBS_LIMIT)
    echo: bool = False
    suffix: str | None = Field(None, description="not supported; must be null")
    best_of: OptionalInteger = Field(None, ge=1, le=MAX_N, description="only best_of == n is supported")
    response_format: ResponseFormat | None = Field(None, description="vLLM extra: constrain every choice's text")


class JsonSchemaFormat(Strict):
    name: str = Field(max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema every output validates against")
    strict: bool | None = Field(None, description="the schema is always enforced, whatever this says")


class StructuralTagItem(Strict):
    """vLLM's structural tag: where the output writes ``begin``, a JSON value valid under ``schema`` follows, then
    ``end``."""

    begin: str = Field(min_length=1, max_length=256)
    schema_: dict[str, Any] = Field(alias="schema")
    end: str = Field(max_length=256)


FORMAT_PARTS = {"json_schema": ("json_schema",), "structural_tag": ("structures", "triggers"), "text": (),
                "json_object": ()}


def _parts_with_their_type(schema: dict[str, Any]) -> None:
    """The validator's rule, stated in the document: json_schema given (not null) exactly with its type, and
    structures and triggers exactly with structural_tag."""
    every = [part for parts in FORMAT_PARTS.values() for part in parts]
    schema["oneOf"] = [
        {"properties": {"type": {"const": kind}} | {
            part: {"not": {"type": "null"}} if part in parts else {"type": "null"} for part in every}}
        | ({"required": list(parts)} if parts else {})
        for kind, parts in FORMAT_PARTS.items()]


class ResponseFormat(Strict):
    """``json_object``: the output is one JSON object; ``json_schema``: one JSON value valid under the schema;
    ``structural_tag`` (vLLM's): free text in which each trigger opens one of the structures."""

    model_config = ConfigDict(json_schema_extra=_parts_with_their_type)

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    structures: Annotated[list[StructuralTagItem], Field(min_length=1, max_length=64)] | None = None
    triggers: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]],
                        Field(min_length=1, max_length=64)] | None = Field(
        None, description="each structure's begin starts with one of these")

    @model_validator(mode="after")
    def _parts_match_the_type(self) -> ResponseFormat:
        for kind, parts in FORMAT_PARTS.items():
            for part in parts:
                if (self.type == kind) != (getattr(self, part) is not None):
                    raise ValueError(f"{part} is required with type {kind!r}, and only there")
        return self


TEMPLATE_VARIABLE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
TemplateVariable = Annotated[str, Field(pattern=TEMPLATE_VARIABLE_PATTERN, max_length=64)]


def _unreserved_names(schema: dict[str, Any]) -> None:
    names = next(option for option in schema["anyOf"] if option.get("type") == "object")
    names["propertyNames"] = names.get("propertyNames", {}) | {
        "pattern": TEMPLATE_VARIABLE_PATTERN, "not": {"enum": list(RESERVED_TEMPLATE_VARIABLES)}}


class ChatTemplateFields(Strict):
    """vLLM's chat-template extras: what a Jinja chat template (GPT-2's) sees beyond the conversation."""

    chat_template: str | None = Field(None, min_length=1, max_length=MAX_TEMPLATE_CHARS, description=(
        "vLLM extra: this request's Jinja chat template instead of the server's (GPT-2; only on a server started "
        "with --trust-request-chat-template)"))
    chat_template_kwargs: dict[TemplateVariable, JsonValue] | None = Field(
        None, max_length=64, json_schema_extra=_unreserved_names, description=(
            "vLLM extra: more variables for the template (not the request's own: messages, tools, documents, "
            "add_generation_prompt, continue_final_message); on GPT-OSS only reasoning_effort and current_date"))
    documents: Annotated[list[dict[Annotated[str, Field(max_length=64)], str]], Field(max_length=64)] | None = \
        Field(None, description="vLLM extra: handed to the template as `documents`, for a template that uses them")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _not_the_request_s_own(cls, kwargs: dict[str, JsonValue] | None) -> dict[str, JsonValue] | None:
        reserved = sorted(set(kwargs or ()) & set(RESERVED_TEMPLATE_VARIABLES))
        if reserved:
            raise ValueError(f"{', '.join(reserved)} come from the request's own fields, not chat_template_kwargs")
        return kwargs


class ChatCompletionRequest(ChatTemplateFields, SamplingFields):
    messages: Annotated[list[ChatMessageParam], Field(min_length=1)]
    tools: Annotated[list[ChatTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default auto with tools; required and named force a call (GPT-OSS only)")
    parallel_tool_calls: bool | None = Field(
        None, description="false: a forced call on a chat-template model is one call (harmony makes one per turn)")
    max_tokens: OptionalInteger = Field(None, ge=0, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: OptionalInteger = Field(None, ge=0,
                                              description="null: what the context and KV cache hold for all n")
    logprobs: bool = False
    top_logprobs: OptionalInteger = Field(None, ge=0, lt=INT64_BOUND, description=LOGPROBS_LIMIT)
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool = Field(True, description="vLLM extra: the prompt ends where the assistant's reply "
                                        "starts; false: it ends with the last message")
    continue_final_message: bool = Field(False, description="vLLM extra (with add_generation_prompt false): the "
                                         "final assistant message is left open and the model continues it")
    echo: bool = Field(False, description="vLLM extra: when the last message is the assistant's, every choice's "
                       "content begins with its text")
    include_reasoning: bool = Field(True, description="vLLM extra: false leaves the reasoning out of the reply")


class PerplexityRequest(Strict):
    model: str
    input: PromptInput
    stride: OptionalInteger = Field(None, ge=1, description="distance between window starts, less than max_length; "
                               "default max_length // 2")
    max_length: OptionalInteger = Field(None, ge=2, description="window length; default the model's context")
    prepend_bos: bool = False
    logprobs: bool = False


EmbeddingText = Annotated[str, Field(min_length=1)]  # OpenAI's rule: an empty string has nothing to embed
EmbeddingInput = (EmbeddingText | Annotated[list[EmbeddingText], Field(min_length=1, max_length=MAX_PROMPTS)]
                  | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])


class EmbeddingFields(Strict):
    """What an embeddings request asks of its vectors, whichever form its input takes."""

    encoding_format: Literal["float", "base64"] = Field("float", description="base64: each vector's float32 "
                                                        "values, little-endian, base64-encoded")
    dimensions: Annotated[int, Field(ge=1, lt=INT64_BOUND), INTEGRAL] | None = Field(
        None, description="only the model's own width: GPT-2 and GPT-OSS were not trained for shortened "
        "(matryoshka) embeddings")
    user: str | None = Field(None, max_length=512)
    truncate_prompt_tokens: TruncatePromptTokens = Field(
        None, description="vLLM extra: only each input's last k tokens are embedded (-1: the last max_model_len)")
    normalize: bool = Field(True, description="vLLM extra: false returns the hidden state as the model gives it, "
                            "not scaled to unit length")


class EmbeddingRequest(EmbeddingFields):
    model: str
    input: EmbeddingInput


class EmbeddingChatRequest(ChatTemplateFields, EmbeddingFields):
    """vLLM's chat form: one embedding of the conversation as the chat endpoint renders it (by default without
    the assistant's opening: the conversation itself, not a reply to it)."""

    model: str
    messages: Annotated[list[ChatMessageParam], Field(min_length=1)]
    add_generation_prompt: bool = Field(False, description="end with the assistant's opening, as chat does")
    continue_final_message: bool = Field(False, description="as chat completions")


def messages_or_prompt(body: Any) -> str:
    """The tag of a body's form: with ``messages`` a chat, else a prompt (so a missing prompt is named as such)."""
    return "chat-form" if isinstance(body, dict) and "messages" in body else "completion-form"


# Two shapes, as vLLM has them: an input or messages, never both, and chat-only fields only with messages.
EmbeddingsBody = Annotated[
    Annotated[EmbeddingRequest, Tag("completion-form")] | Annotated[EmbeddingChatRequest, Tag("chat-form")],
    Discriminator(messages_or_prompt),
]


ScoreTexts = EmbeddingText | Annotated[list[EmbeddingText], Field(min_length=1, max_length=MAX_PROMPTS)]


class ScoreRequest(Strict):
    """vLLM's /score: text_1 paired with each of text_2 (one text, or as many as text_2, pair by pair)."""

    model: str | None = None
    text_1: ScoreTexts
    text_2: ScoreTexts
    truncate_prompt_tokens: TruncatePromptTokens = Field(
        None, description="only each text's last k tokens are embedded (-1: the last max_model_len)")


class RerankRequest(Strict):
    """vLLM's (and Jina's, Cohere's) /rerank: the documents in order of relevance to the query."""

    model: str | None = None
    query: EmbeddingText
    documents: Annotated[list[EmbeddingText], Field(min_length=1, max_length=MAX_PROMPTS)]
    top_n: Annotated[int, Field(ge=0, lt=INT64_BOUND), INTEGRAL] = Field(
        0, description="how many of the most relevant to return; 0: all")
    return_documents: bool = Field(True, description="each result carries its document's text")
    truncate_prompt_tokens: TruncatePromptTokens = Field(
        None, description="only each text's last k tokens are embedded (-1: the last max_model_len)")


# ---- responses ----


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = Field(default=None, exclude_if=_is_none,
                                                                      description="chat: the reasoning's tokens")


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = Field(description="how many tokens are at least as likely, itself included (1: the "
                             "likeliest)")
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token (null for the first), its entry and its alternatives' by token id.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


STOP_REASON_DESCRIPTION = ("vLLM extra: the stop string or stop token that ended the choice; null for the "
                           "tokenizer's own end token, length and the rest")
TOKEN_IDS_DESCRIPTION = "vLLM extra (return_token_ids): the tokens generated, a stop token included"
PROMPT_TOKEN_IDS_DESCRIPTION = "vLLM extra (return_token_ids): the prompt's tokens"


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: int | str | None = Field(None, description=STOP_REASON_DESCRIPTION)
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_is_none, description="vLLM extra")
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_is_none,
                                               description=PROMPT_TOKEN_IDS_DESCRIPTION + " (streamed: in the "
                                               "choice's first chunk)")
    token_ids: list[int] | None = Field(default=None, exclude_if=_is_none, description=TOKEN_IDS_DESCRIPTION)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatResponseMessage(BaseModel):
    role: str = Field("assistant", description="assistant, or the server's --response-role; without a generation "
                      "prompt, the last message's role")
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = Field(None, description="the same text as `reasoning`, for older clients")
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = Field(None, description=STOP_REASON_DESCRIPTION)
    token_ids: list[int] | None = Field(default=None, exclude_if=_is_none, description=TOKEN_IDS_DESCRIPTION)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_is_none, description="vLLM extra")
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_is_none,
                                               description=PROMPT_TOKEN_IDS_DESCRIPTION)


class ChatDeltaMessage(WithoutNulls):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = Field(default=None, exclude_if=_is_none, description=STOP_REASON_DESCRIPTION)
    token_ids: list[int] | None = Field(default=None, exclude_if=_is_none, description=TOKEN_IDS_DESCRIPTION)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = Field(default=None, exclude_if=_is_none,
                                               description=PROMPT_TOKEN_IDS_DESCRIPTION + " (the first chunk only)")


class PerplexityResult(BaseModel):
    object: Literal["perplexity"] = "perplexity"
    index: int
    perplexity: float | None = Field(description="exp(nll); null when no token was scored")
    nll: float | None = Field(description="mean negative log-likelihood per scored token, in nats; null when no "
                              "token was scored (an empty input, or one token without prepend_bos)")
    num_tokens: int = Field(description="tokens scored")
    token_logprobs: list[float | None] | None = Field(None, description="only with logprobs=true")


class PromptUsage(BaseModel):
    """The usage of a request that reads prompts and generates nothing (perplexity, embeddings, scores)."""

    prompt_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int) -> PromptUsage:
        return cls(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)


class PerplexityResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[PerplexityResult]
    usage: PromptUsage


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="unit length (L2) unless normalize is false; a base64 "
                                         "string with encoding_format base64")


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Embedding]
    usage: PromptUsage


class ScoreData(BaseModel):
    object: Literal["score"] = "score"
    index: int
    score: float = Field(description="cosine similarity of the two texts' embeddings, in [-1, 1]")


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: PromptUsage


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument | None = None
    relevance_score: float = Field(description="cosine similarity of the query's and the document's embeddings")


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: PromptUsage
    results: list[RerankResult]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gptserve"
    max_model_len: int
    root: str = Field(description="vLLM's: the path or hub id the model was given as")
    parent: str | None = Field(default=None, description="vLLM's: the base model of an adapter; null (none here)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorObject


class APIError(Exception):
    """Raised by routes; the app turns it into the contract's error body with this status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = ErrorObject(message=message, type=type, param=param, code=code)


class ModelHealth(BaseModel):
    """One engine's state as of its last step: what tests and operators read to see nothing is left behind."""

    healthy: bool
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int


class HealthResponse(BaseModel):
    status: Literal["ok", "unhealthy"]
    models: dict[str, ModelHealth]


def _error_responses(*statuses: tuple[int, str]) -> dict[int | str, dict]:
    return {status: {"model": ErrorResponse, "description": description} for status, description in statuses}


# Every route behind the gateway can answer 401 (API key), 408 (body too slow) and 413 (body size); the
# generation routes also these.
GATEWAY_RESPONSES = _error_responses((401, "missing or wrong API key"), (408, "body not received in time"),
                                     (413, "body too large"))
ERROR_RESPONSES = GATEWAY_RESPONSES | _error_responses(
    (400, "invalid request"), (404, "unknown model"), (429, "queue full (see Retry-After)"),
    (500, "the model failed while running this request"), (503, "not ready or the engine failed"))
STORED_RESPONSE_ERRORS = GATEWAY_RESPONSES | _error_responses((400, "invalid request"),
                                                              (404, "no such stored response"))
CONVERSATION_ERRORS = GATEWAY_RESPONSES | _error_responses((400, "invalid request"),
                                                           (404, "no such conversation or item"))
SSE_DESCRIPTION = ("with stream=true: server-sent events, one `data: {chunk}` per event, an error object as an "
                   "event if the request fails after the stream began, and `data: [DONE]` last")
NAMED_SSE_DESCRIPTION = ("with stream=true: server-sent events, each `event: {its type}` then `data: {event}`, an "
                         "`error` event if the request fails after the stream began, and no [DONE]")


def sse_responses(chunk: type[BaseModel], named: bool = False) -> dict[int | str, dict]:
    """The 200 of a streaming endpoint: the JSON body, or an event stream of ``chunk`` objects (``named``: each
    event named by its type, as the Responses API streams)."""
    # OpenAPI 3.1 has the schema of an event stream describe one event: its ``data`` field holds the chunk.
    description = NAMED_SSE_DESCRIPTION if named else SSE_DESCRIPTION
    data = {"type": "string", "description": f"{description}; chunks are {chunk.__name__}"}
    event_stream = {"schema": {"type": "object", "properties": {"data": data}, "required": ["data"]}}
    return {200: {"content": {"text/event-stream": event_stream}}} | ERROR_RESPONSES
