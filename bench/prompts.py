"""Seeded random token-id prompts, optionally sharing a common prefix (to exercise prefix caching)."""

from __future__ import annotations

import random


class PromptSource:
    """Hands out a fresh prompt per request, so no two requests of a run share tokens beyond the shared prefix.

    Prompts are never reused across levels or the warm-up: a server with a prefix cache would otherwise
    serve later levels from cache and report TTFTs no cold request sees.
    """

    def __init__(self, prompt_len: int, vocab_size: int, seed: int, shared_prefix_len: int = 0) -> None:
        if not 0 <= shared_prefix_len <= prompt_len:
            raise ValueError(f"shared_prefix_len must be within [0, prompt_len={prompt_len}]")
        self.prompt_len = prompt_len
        self.vocab_size = vocab_size
        self._rng = random.Random(seed)
        self.shared_prefix = self._tokens(shared_prefix_len)

    def _tokens(self, count: int) -> list[int]:
        return [self._rng.randrange(self.vocab_size) for _ in range(count)]

    def next(self) -> list[int]:
        return self.shared_prefix + self._tokens(self.prompt_len - len(self.shared_prefix))
