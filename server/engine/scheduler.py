"""Who runs this step, and how many tokens each: iteration-level scheduling under one token budget.

Running sequences go first, oldest first (a decode costs one token, an unfinished prompt the next chunk),
then waiting ones are admitted in arrival order while budget, sequence slots and blocks last. When a running
sequence needs a block and none is free, the newest running sequence is preempted: its blocks are freed and
it goes back to the front of the queue to be recomputed later (its prefix may still be cached).

Under the priority policy (vLLM's `--scheduling-policy priority`) "oldest" reads "most urgent": each list is
kept in order of (priority, arrival), lower first, so the queue admits the most urgent first and a preemption
takes the least urgent running sequence. A waiting sequence never preempts a running one to get in.

Prompts go first: while a prompt waits and a sequence slot is free, the step runs prompt chunks only and the
decodes wait one step (as SGLang's default and vLLM's scheduler before chunked prefill do). A newcomer's first
token then costs its own prefill, not its prefill plus every running sequence's decode row beside it; on 2 CPU
cores the steady C=16 TTFT p99 fell from 2.45x to 2.14x an idle one's, and throughput held at C=16 and C=64
(bench/NOTES.md). One decode is never held: a sequence's first after its prefill. Held, it would take its
second token in the same step as the prompt prefilled beside it, and the two would run in step to the end:
with outputs of one length (a benchmark's forced lengths) they finish together, their clients return together,
and one of them waits for both prefills, every time round. Once nobody waits, the later chunks of a long
prompt share their steps with the decodes again, and when nobody can be admitted (no free slot, or no blocks
and no prompt chunk to run) decodes run as usual, so they wait at most while the running sequences grow to
--max-num-seqs.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens of seq computed this step, starting at seq.num_computed_tokens

    @property
    def catches_up(self) -> bool:
        """The chunk ends at the sequence's last token, so the sequence samples its next one this step."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


def urgency(seq: Sequence) -> tuple[int, float, int]:
    """The priority policy's order: lower priority values first, then earlier arrivals, then choice index."""
    return seq.params.priority, seq.arrival_time, seq.index


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "fcfs") -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.by_priority = policy == "priority"
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """A newcomer queues behind those that came before it (under priority: as urgent or more)."""
        if self.by_priority:
            self.waiting.insert(bisect.bisect_right(self.waiting, urgency(seq), key=urgency), seq)
        else:
            self.waiting.append(seq)

    def requeue(self, seq: Sequence) -> None:
        """A preempted sequence (or a choice released to run) goes back ahead of later arrivals."""
        seq.status = SequenceStatus.WAITING
        if self.by_priority:
            self.add(seq)
        else:
            self.waiting.appendleft(seq)

    def schedule(self) -> list[ScheduledChunk]:
        if self.waiting and len(self.running) < self.max_num_seqs:
            chunks = self._schedule(prompts_only=True)
            if chunks:
                return chunks
        return self._schedule(prompts_only=False)  # nobody waits, or nobody could be admitted

    def _schedule(self, prompts_only: bool) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        if self.by_priority:
            self.running.sort(key=urgency)  # the least urgent last: it is the one preempted
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if prompts_only and num_tokens == 1 and seq.num_output_tokens != 1:
                continue  # a decode (or a prompt's last token): it waits for the admitting step to pass
            if not self._make_room(seq, num_tokens):
                continue
            self.block_manager.allocate(seq, num_tokens)
            chunks.append(ScheduledChunk(seq, num_tokens))
            budget -= num_tokens
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_tokens = self.block_manager.admit(seq, budget)
            if num_tokens == 0:
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, num_tokens))
            budget -= num_tokens
        return chunks

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take ``seq`` out of the queues and release its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt the newest (least urgent) running sequences until ``seq`` fits; False if ``seq`` itself had
        to go."""
        while not self.block_manager.can_allocate(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_published_blocks = 0
        self.requeue(seq)
        self.num_preemptions += 1
