"""From the request's sampling fields and prompt to what the engine reads: token ids and SamplingParams."""

from __future__ import annotations

from models.tokenizer import Tokenizer
from server.engine.sampling_params import GrammarSpec, SamplingParams
from server.generation_defaults import SamplingDefaults
from server.protocol import APIError, SamplingFields


def count_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    """How many prompts a request carries, known before any is tokenized."""
    return 1 if isinstance(prompt, str) or isinstance(prompt[0], int) else len(prompt)


def tokenize_prompts(prompt: str | list[str] | list[int] | list[list[int]], tokenizer: Tokenizer,
                     param: str = "prompt") -> list[list[int]]:
    """One token list per prompt: text is encoded, token ids are checked against the vocabulary."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if isinstance(prompt[0], str):
        return [tokenizer.encode(text) for text in prompt]
    prompts = [prompt] if isinstance(prompt[0], int) else prompt
    for ids in prompts:
        check_token_ids(ids, tokenizer, param)
    return [list(ids) for ids in prompts]


def truncated(prompt: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last ``keep`` tokens (-1: the last max_model_len)."""
    if keep is None:
        return prompt
    return prompt[-(max_model_len if keep == -1 else keep) :]


def check_token_ids(ids: list[int], tokenizer: Tokenizer, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                       param=param)


def stop_strings(body: SamplingFields) -> list[str]:
    if body.stop is None:
        return []
    return [body.stop] if isinstance(body.stop, str) else list(body.stop)


def sampling_params(body: SamplingFields, tokenizer: Tokenizer, *, max_tokens: int, model_stop_ids: frozenset[int],
                    defaults: SamplingDefaults, logprobs: int | None = None, prompt_logprobs: int | None = None,
                    grammar: GrammarSpec | None = None) -> SamplingParams:
    """The engine's view of one request; ``max_tokens`` is already resolved (defaults differ per endpoint). A field
    the request leaves unset takes the model's default (its generation config's), else the API's; beam search
    ranks by the model's own log-probabilities and takes none."""
    if body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})",
                       param="min_tokens")
    client_stop_ids = body.stop_token_ids or []
    check_token_ids(client_stop_ids, tokenizer, "stop_token_ids")
    allowed = body.allowed_token_ids or []
    check_token_ids(allowed, tokenizer, "allowed_token_ids")
    if body.use_beam_search:
        defaults = SamplingDefaults()
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        **defaults.resolve(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                           repetition_penalty=body.repetition_penalty),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=_logit_bias(body.logit_bias or {}, tokenizer),
        allowed_token_ids=tuple(sorted(set(allowed))),
        seed=body.seed,
        stop_token_ids=model_stop_ids | frozenset(client_stop_ids),
        client_stop_ids=frozenset(client_stop_ids),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        grammar=grammar,
        priority=body.priority,
        cache_salt=body.cache_salt,
        bad_words=_bad_words(body.bad_words or [], tokenizer),
    )


def _bad_words(words: list[str], tokenizer: Tokenizer) -> tuple[tuple[int, ...], ...]:
    """vLLM's tokenization of bad_words: each word without its leading spaces, and also after one space when
    that starts with another token in as many tokens (a word-initial form, " word" beside "word")."""
    banned: list[tuple[int, ...]] = []
    for word in words:
        text = word.lstrip()
        if not text:
            raise APIError(400, "bad_words: a word needs more than whitespace", param="bad_words")
        bare = tuple(tokenizer.encode_ordinary(text))
        spaced = tuple(tokenizer.encode_ordinary(" " + text))
        banned.append(bare)
        if spaced[0] != bare[0] and len(spaced) == len(bare):
            banned.append(spaced)
    return tuple(banned)


def _logit_bias(bias: dict[str, float], tokenizer: Tokenizer) -> dict[int, float]:
    parsed = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias: key {key!r} is not a token id", param="logit_bias") from None
        check_token_ids([token_id], tokenizer, "logit_bias")
        parsed[token_id] = value
    return parsed
