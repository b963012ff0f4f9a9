"""What a request may ask for: refused up front if it could never be served, so it never occupies the queue
or the cache, and what a request that leaves max_tokens out gets.

A request must fit the KV cache with as many of its n choices at full length as can run at once (at most
--max-num-seqs; the choices share the prompt's full blocks through the prefix cache). One that fits fewer would
be served by preempting its own choices over and over. A sliding-window KV group (GPT-OSS) needs at most the
blocks its window and one prefill chunk span, however long the sequence (server/engine/block_manager.py).
Echoed prompt logprobs are bounded too: each choice returns every prompt token with its top alternatives, so
n x prompt x (logprobs + 1) entries, a response thousands of times its request.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.errors import RequestRejected
from server.engine.sampling_params import SamplingParams

MAX_PROMPT_LOGPROB_ENTRIES = 2**18  # ~8 MB of JSON; a full 128k context scored with one alternative fits


def sliding_blocks(tokens: int, block_size: int, windows: tuple[int | None, ...], max_chunk: int) -> int:
    """The most blocks the sliding-window KV groups (``windows`` after the first, as the block manager's) hold for
    one sequence of ``tokens``: each its window and one prefill chunk of up to ``max_chunk`` tokens."""
    full = -(-tokens // block_size)
    return sum(min(full, -(-(w - 1 + max_chunk) // block_size) + 1) for w in windows[1:] if w is not None)


@dataclass(frozen=True, slots=True)
class Admission:
    max_model_len: int
    block_size: int
    num_blocks: int
    prefix_caching: bool
    max_num_seqs: int
    windows: tuple[int | None, ...] = (None,)  # per KV group (server/engine/block_manager.py)
    max_num_batched_tokens: int = 0  # the longest prefill chunk; only sliding groups' needs depend on it
    scheduling_policy: str = "fcfs"

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def validate(self, prompt_len: int, params: SamplingParams, n: int) -> None:
        if prompt_len == 0:
            raise RequestRejected("the prompt is empty", "prompt")
        total = prompt_len + params.max_tokens
        if total > self.max_model_len:
            raise RequestRejected(
                f"this model's maximum context length is {self.max_model_len} tokens, but {prompt_len} prompt tokens "
                f"+ {params.max_tokens} max_tokens = {total} were requested",
                "max_tokens" if prompt_len <= self.max_model_len else "prompt",
            )
        if params.max_tokens == 0 and n > 1:
            raise RequestRejected("n > 1 needs max_tokens > 0", "n")
        if params.priority != 0 and self.scheduling_policy != "priority":
            raise RequestRejected("priority other than 0 needs the server started with --scheduling-policy priority",
                                  "priority")
        if params.grammar is not None and (params.ignore_eos or params.min_tokens):
            # both would keep a finished grammar from stopping
            raise RequestRejected(f"{params.grammar.param} cannot be combined with ignore_eos or min_tokens",
                                  "ignore_eos" if params.ignore_eos else "min_tokens")
        allowed = params.allowed_token_ids
        if params.bad_words and (allowed or params.grammar is not None):
            # the only tokens left to pick might all be banned: a row with nothing left
            other = params.grammar.param if params.grammar is not None else "allowed_token_ids"
            raise RequestRejected(f"bad_words cannot be combined with {other}", "bad_words")
        if allowed and params.grammar is not None:
            # the grammar's tokens and the allowed ones may not meet: a row with nothing left to pick
            raise RequestRejected(f"allowed_token_ids cannot be combined with {params.grammar.param}",
                                  "allowed_token_ids")
        if allowed and params.min_tokens and set(allowed) <= params.stop_token_ids:
            raise RequestRejected("allowed_token_ids holds only stop tokens, which min_tokens masks",
                                  "allowed_token_ids")
        forced = params.grammar.forced_tokens if params.grammar is not None else 0
        if forced and params.max_tokens <= forced:
            # a header cut short is no answer at all: its text would come out as content
            raise RequestRejected(f"max_tokens must be more than the {forced} tokens forced before the constrained "
                                  "output (a harmony header)", "max_tokens")
        at_once = min(n, self.max_num_seqs)  # choices beyond --max-num-seqs wait for the blocks others free
        if self._blocks_needed(prompt_len, params.max_tokens, at_once) > self.num_blocks:
            alone = self._blocks_needed(prompt_len, params.max_tokens, 1) <= self.num_blocks
            choices = f"{at_once} choices running at once x " if at_once > 1 else ""
            raise RequestRejected(
                f"{choices}{total} tokens (prompt + max_tokens) can never fit the KV cache of "
                f"{self.capacity_tokens} tokens at once; lower {'n' if alone else 'max_tokens'}",
                "n" if alone else "max_tokens",
            )
        if params.prompt_logprobs is not None:
            entries = n * prompt_len * (params.prompt_logprobs + 1)
            if entries > MAX_PROMPT_LOGPROB_ENTRIES:
                raise RequestRejected(
                    f"echo with logprobs returns n ({n}) x prompt tokens ({prompt_len}) x (logprobs + 1) "
                    f"({params.prompt_logprobs + 1}) = {entries} prompt logprobs, more than the "
                    f"{MAX_PROMPT_LOGPROB_ENTRIES} allowed; lower n, logprobs or the prompt's length, or drop echo",
                    "logprobs",
                )

    def default_max_tokens(self, prompt_len: int, n: int) -> int:
        """The most tokens each of ``n`` choices can have with the context and the KV cache holding them all at
        once (0 if not even the prompt fits: validate then says why)."""
        n = min(n, self.max_num_seqs)
        blocks_per_choice = (self.num_blocks + (n - 1) * self._shared_blocks(prompt_len)) // n
        full_blocks = blocks_per_choice - self._sliding_blocks(self.max_model_len)
        return max(min(self.max_model_len, full_blocks * self.block_size) - prompt_len, 0)

    def _shared_blocks(self, prompt_len: int) -> int:
        """Choices after the first find the prompt's full blocks in the prefix cache (echoed prompt logprobs
        too: the engine scores the prompt once, with the first choice)."""
        return (prompt_len - 1) // self.block_size if self.prefix_caching else 0

    def _sliding_blocks(self, tokens: int) -> int:
        return sliding_blocks(tokens, self.block_size, self.windows, self.max_num_batched_tokens)

    def _blocks_needed(self, prompt_len: int, max_tokens: int, n: int) -> int:
        """Sliding groups' blocks are not counted as shared: the choices' windows part as soon as they decode."""
        total = prompt_len + max_tokens
        per_choice = -(-total // self.block_size) + self._sliding_blocks(total)
        return per_choice + (n - 1) * (per_choice - self._shared_blocks(prompt_len))
