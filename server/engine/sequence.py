"""One choice of one request as the engine tracks it: its tokens, how many are in the KV cache, and its blocks.

There is no prefill or decode phase: ``num_computed_tokens`` catches up with ``token_ids`` under the
scheduler's token budget, a chunk at a time; the step that catches it up samples the next token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.engine.outputs import TokenLogprob
from server.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from server.engine.structured_output import GrammarState


class SequenceStatus(enum.Enum):
    HELD = "held"  # not queued yet: waits for its request's first choice to score the prompt
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    index: int  # choice index within the request
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    arrival_time: float
    generator: torch.Generator | None = None  # per-choice RNG when the request has a seed
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_tables: list[list[int]] = field(default_factory=list)  # per KV group; -1: freed behind its window
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first scheduled
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    reported_prompt: bool = False  # prompt-level fields go out with the first output only
    block_hashes: list[bytes] = field(default_factory=list)  # chained digest of each full block so far
    num_published_blocks: int = 0  # leading blocks of the block tables already offered to the prefix cache
    grammar: GrammarState | None = None  # constrained decoding: advanced with every token this choice outputs

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def block_table(self) -> list[int]:
        """The first KV group's blocks: full attention, so every block of the sequence, none freed."""
        return self.block_tables[0] if self.block_tables else []

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens
