"""Turns a step's scheduled chunks into one model forward, and returns only the logits someone needs.

Next-token logits are computed for sequences whose chunk catches them up (they sample this step); every
prompt position is scored only for requests that asked for prompt logprobs (echo, perplexity). An embedding
request (``SamplingParams.embed``) gets the final hidden state of its last prompt token instead, and no
logits. Steps of one-token chunks replay a captured CUDA graph where the engine has them
(server/engine/decode_graphs.py).
An eager step given an ``interrupt`` asks it before each layer and before the logits, and stops with
ForwardInterrupted when it says so (a replayed graph runs to the end).

Every logits row it returns covers only the ids the tokenizer defines (``vocab_size``): an unembedding padded
beyond them (GPT-OSS: 201088 rows, 200019 tokens) never has a padding id sampled, listed among top logprobs
or handed to detokenization, on any path (eager, graph replay, tensor-parallel rank 0, prompt logprobs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.forward_batch import ForwardBatch, Interrupt, check_interrupt
from models.kv_cache import PagedKVCache
from models.servable import ServableModel
from server.engine import fault_injection
from server.engine.decode_graphs import DecodeGraphs
from server.engine.outputs import TokenLogprob
from server.engine.sampler import top_logprobs
from server.engine.scheduler import ScheduledChunk
from server.engine.sequence import Sequence


@dataclass(slots=True)
class StepLogits:
    sampling_seqs: list[Sequence]  # sequences that sample a token this step, in row order of `logits`
    logits: Tensor  # [len(sampling_seqs), vocab] float32
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)  # id(seq) -> new entries
    embeddings: list[tuple[Sequence, list[float]]] = field(default_factory=list)  # each with its last token's state


class ModelRunner:
    def __init__(
        self,
        model: ServableModel,
        cache: PagedKVCache,
        device: torch.device,
        vocab_size: int,
        decode_graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.vocab_size = vocab_size
        self.decode_graphs = decode_graphs

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk], interrupt: Interrupt | None = None) -> StepLogits:
        fault_injection.check_step(chunks)  # test-only hook; a no-op unless its env var is set
        if self.decode_graphs is not None and self.decode_graphs.serves(chunks):
            return self._run_graph(self.decode_graphs, chunks)
        batch = ForwardBatch.build(
            [c.seq.token_ids[c.seq.num_computed_tokens : c.seq.num_computed_tokens + c.num_tokens] for c in chunks],
            [c.seq.num_computed_tokens for c in chunks],
            [c.seq.block_tables[0] for c in chunks],
            self.cache.block_size,
            self.device,
            [[c.seq.block_tables[g] for c in chunks] for g in range(1, self.cache.num_groups)],
        )
        hidden = self.model(batch, self.cache, interrupt)
        check_interrupt(interrupt)
        sampled: list[tuple[int, Sequence]] = []  # (row of its last token in `hidden`, sequence)
        embedded: list[tuple[int, Sequence]] = []
        offset = 0
        for chunk in chunks:
            offset += chunk.num_tokens
            if chunk.catches_up:
                (embedded if chunk.seq.params.embed else sampled).append((offset - 1, chunk.seq))
        picked = hidden[torch.tensor([row for row, _ in sampled], dtype=torch.long, device=self.device)]
        logits = self._logits(picked) if sampled else hidden.new_empty(0, self.vocab_size, dtype=torch.float32)
        step = StepLogits([seq for _, seq in sampled], logits)
        if embedded:
            rows = torch.tensor([row for row, _ in embedded], dtype=torch.long, device=self.device)
            step.embeddings = list(zip([seq for _, seq in embedded], hidden[rows].float().tolist()))
        offset = 0
        for chunk in chunks:
            if chunk.seq.wants_prompt_logprobs:
                rows_of_chunk = hidden[offset : offset + chunk.num_tokens]
                step.prompt_logprobs[id(chunk.seq)] = self._prompt_logprobs(chunk, rows_of_chunk)
            offset += chunk.num_tokens
        return step

    def _run_graph(self, graphs: DecodeGraphs, chunks: list[ScheduledChunk]) -> StepLogits:
        logits = graphs.run(chunks)
        rows = [i for i, c in enumerate(chunks) if c.catches_up]
        # indexing copies the rows out of the graph's output buffer, which the next replay overwrites
        picked = logits[torch.tensor(rows, dtype=torch.long, device=self.device), : self.vocab_size]
        return StepLogits([chunks[i].seq for i in rows], picked)

    def _logits(self, hidden: Tensor) -> Tensor:
        return self.model.compute_logits(hidden)[:, : self.vocab_size]

    def _prompt_logprobs(self, chunk: ScheduledChunk, hidden: Tensor) -> list[TokenLogprob]:
        """Logprob of each prompt token this chunk predicts that the sequence has not scored yet."""
        seq, start = chunk.seq, chunk.seq.num_computed_tokens
        first_target = len(seq.prompt_logprobs)  # index of the next prompt token to score
        last_target = min(start + chunk.num_tokens, seq.num_prompt_tokens - 1)  # position p predicts token p+1
        if first_target > last_target:
            return []
        positions = torch.arange(first_target - 1, last_target, device=self.device)
        logprobs = torch.log_softmax(self._logits(hidden[positions - start]), dim=-1)
        targets = torch.tensor(seq.token_ids[first_target : last_target + 1], dtype=torch.long, device=self.device)
        entries = top_logprobs(logprobs, targets, seq.params.prompt_logprobs or 0)
        # vLLM's rank: tokens at least as likely as the prompt's, itself included.
        ranks = (logprobs >= logprobs.gather(1, targets.unsqueeze(1))).sum(dim=1).tolist()
        for entry, rank in zip(entries, ranks):
            entry.rank = rank
        return entries
