"""What the engine hands back to the front end for each choice, one record per step that produced something."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float  # log-softmax of the model's raw logits (before temperature and penalties), as vLLM reports
    top: list[tuple[int, float]]  # the k most likely (token_id, logprob), most likely first
    rank: int | None = None  # prompt tokens only: how many tokens are at least as likely (1: the likeliest)


@dataclass(slots=True)
class ChoiceOutput:
    index: int  # which of the request's n choices
    new_token_ids: list[int]  # tokens produced since the last output for this choice (often one)
    logprobs: list[TokenLogprob] | None = None  # one per new token when the request asked for logprobs
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" once the choice is done
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output only; None for the first prompt token
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # what went wrong, with finish_reason "error"
    stop_token_id: int | None = None  # the stop token that ended the choice, new_token_ids' last: it has no text
    embedding: list[float] | None = None  # SamplingParams.embed: the last prompt token's final hidden state
