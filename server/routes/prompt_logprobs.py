"""vLLM's ``prompt_logprobs``: how likely the model found each prompt token, given the tokens before it."""

from __future__ import annotations

from models.tokenizer import Tokenizer
from server.detokenizer import token_id_name, token_text
from server.engine.outputs import TokenLogprob
from server.protocol import APIError, PromptLogprob, PromptLogprobs, SamplingFields


def check_prompt_logprobs(body: SamplingFields) -> None:
    """vLLM's rule: no prompt_logprobs on a stream (a chunk has no place for them)."""
    if body.prompt_logprobs is not None and body.stream:
        raise APIError(400, "prompt_logprobs is not available with stream: true", param="prompt_logprobs")


def prompt_logprobs_body(tokenizer: Tokenizer, prompt_ids: list[int], scores: list[TokenLogprob | None], k: int,
                         tokens_as_ids: bool) -> PromptLogprobs:
    """Per prompt token: null for the first (nothing predicts it), else its entry then its k likeliest
    alternatives', keyed by token id (a prompt token among the alternatives appears once)."""
    def entry(token_id: int, logprob: float, rank: int | None) -> PromptLogprob:
        name = token_id_name(token_id) if tokens_as_ids else token_text(tokenizer, token_id)
        return PromptLogprob(logprob=logprob, rank=rank, decoded_token=name)

    body: PromptLogprobs = []
    for token_id, score in zip(prompt_ids, scores):
        if score is None:
            body.append(None)
            continue
        entries = {str(token_id): entry(token_id, score.logprob, score.rank)}
        for rank, (alternative, logprob) in enumerate(score.top[:k], start=1):
            entries.setdefault(str(alternative), entry(alternative, logprob, rank))
        body.append(entries)
    return body
