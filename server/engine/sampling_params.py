"""What a client asked for, per choice: how to pick tokens and when to stop, as the engine reads it."""

from __future__ import annotations

from dataclasses import dataclass, field

GRAMMAR_CACHE_SIZE = 64  # compiled constraints the engine core keeps (and the front end knows of), LRU


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A constraint on the output, as the engine compiles it: plain data (hashable, the compile cache's key), so
    the front end does no grammar work and the spec crosses any process boundary as it is."""

    json_schema: str | None = None  # canonical JSON text of the schema; None: any (bounded) JSON object
    forced_prefix: tuple[int, ...] = ()  # tokens output as they are before the grammar applies (a harmony header)
    end_token_ids: tuple[int, ...] = ()  # the stop tokens that may end the output; empty: any of the request's
    calls: tuple[CallChoice, ...] = ()  # a forced call to one of these: its name picked first, then its arguments
    call_header: tuple[int, ...] = ()  # with calls: forced between the chosen name and its arguments; the first
    # token ends the name (the model picks it where a name is complete), the rest are output as they are
    param: str = "response_format"  # the request field a schema that cannot be compiled came from
    regex: str | None = None  # instead of JSON: the output is a full match of this regular expression
    ebnf: str | None = None  # instead of JSON: the output is a sentence of this grammar (xgrammar's EBNF, from root)
    structural_tag: str | None = None  # instead of JSON: free text with tagged JSON (xgrammar's structural tag)

    @property
    def forced_tokens(self) -> int:
        """The fewest tokens an output spends before its grammar proper: the forced prefix and, for a call among
        several functions, at least one name token and the header's rest."""
        return len(self.forced_prefix) + (1 + len(self.call_header) if self.calls else 0)


@dataclass(frozen=True, slots=True)
class CallChoice:
    """One function a forced call may pick: the text that names it and the schema of its arguments."""

    name_text: str  # as it appears in the output, e.g. "functions.get_weather"
    json_schema: str | None  # None: any (bounded) JSON object


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0  # the stop tokens are masked until this many tokens are out
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: tuple[int, ...] = ()  # when given, no other token is picked
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()  # the model's eos/stop ids plus any the client added
    client_stop_ids: frozenset[int] = frozenset()  # those the client added: they end a choice under ignore_eos too
    ignore_eos: bool = False  # keep going past the model's end tokens until max_tokens
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's logprob plus the top k
    prompt_logprobs: int | None = None  # same, for every prompt token after the first (echo, perplexity)
    grammar: GrammarSpec | None = None  # constrained decoding: every choice's output follows it
    priority: int = 0  # with --scheduling-policy priority: lower is served first
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences the output never ends with (vLLM's bad_words)
    cache_salt: str | None = None  # prefix-cache blocks are shared only with requests that give the same salt
    embed: bool = False  # return the last prompt token's final hidden state (an embedding) instead of sampling

    @property
    def ending_token_ids(self) -> frozenset[int]:
        """What ends a choice, as vLLM stops: ignore_eos passes the model's end tokens, never the client's
        stop_token_ids. (min_tokens masks all of stop_token_ids either way, as vLLM masks them.)"""
        return self.client_stop_ids if self.ignore_eos else self.stop_token_ids

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
