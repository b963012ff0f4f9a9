"""The synchronous engine core: one ``step()`` schedules, runs the model, samples and reports.

It owns the KV pool, the block manager, the scheduler, the model runner and the sampler for one model, and
is driven by one thread (the engine-core process's loop, core_process). Outputs are reported per choice; a
choice that ends is freed at once, so its blocks are available to the very next step.

A step of decodes alone can be given up between layers for a newcomer (``step(interrupt=...)``): in a closed
loop a client sends its next request right after its last token, just as the next decode step starts, and
would otherwise wait for that whole step before its prefill. The decodes lose the layers already run, a few
milliseconds when the newcomer comes early in the step, and run again after its prefill. A step with a prompt
in it is given up only before its second layer, and only while the newcomer's prompt could join it (a token
budget not yet spent): requests sent together reach the core a few milliseconds apart, and on a CPU the first
one's prefill alone took seconds (gpt-oss-20b widths, 512 tokens: 3.3 s) before the others could start; now
they share one step, for at most one layer's work lost.
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from models.forward_batch import ForwardInterrupted, Interrupt
from models.kv_cache import PagedKVCache, kv_cache_dtype
from models.loader import LoadedModel
from server.config import EngineConfig
from server.engine.admission import Admission, sliding_blocks
from server.engine.block_manager import BlockManager
from server.engine.decode_graphs import DecodeGraphs
from server.engine.engine_stats import EngineStats
from server.engine.model_runner import ModelRunner
from server.engine.outputs import ChoiceOutput
from server.engine.sampler import Sampler
from server.engine.sampling_params import GrammarSpec, SamplingParams
from server.engine.scheduler import ScheduledChunk, Scheduler
from server.engine.sequence import Sequence, SequenceStatus
from server.engine.step_metrics import StepMetrics
from server.engine.structured_output import GrammarCompiler

log = logging.getLogger("gptserve.engine")
# A step with a prompt chunk hears an interrupt at its first two questions only: before its first layer and
# before its second, so that giving it up loses at most one layer's work.
PROMPT_STEP_QUESTIONS = 2

Output = tuple[str, ChoiceOutput]  # (request id, what happened to one of its choices)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _meminfo_bytes("MemAvailable")


def total_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return _meminfo_bytes("MemTotal")


def _meminfo_bytes(field: str) -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields[field].split()[0]) * 1024


def kv_budget_bytes(config: EngineConfig, device: torch.device) -> int:
    """What the KV pool may take: --kv-memory-fraction of the memory free now, or with vLLM's
    --gpu-memory-utilization what keeps the device's memory in use (the weights and everything else on it
    included) within that share of its total."""
    free = free_memory_bytes(device)
    if config.gpu_memory_utilization is None:
        return int(free * config.kv_memory_fraction)
    total = total_memory_bytes(device)
    budget = int(total * config.gpu_memory_utilization) - (total - free)
    if budget <= 0:
        raise ValueError(f"--gpu-memory-utilization {config.gpu_memory_utilization}: {(total - free) / 2**30:.1f} "
                         f"GiB of the device's {total / 2**30:.1f} GiB are in use already, the weights loaded; "
                         "nothing is left for the KV cache: raise it, or give --kv-cache-tokens")
    return budget


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, metrics: StepMetrics | None = None) -> None:
        self.loaded = loaded
        self.config = config
        self.metrics = metrics or StepMetrics(None)
        self.max_model_len = min(config.max_model_len or loaded.max_context, loaded.max_context)
        spec = loaded.model.kv_cache_spec()
        cache_dtype = kv_cache_dtype(config.kv_cache_dtype, loaded.dtype)
        windows = spec.group_windows  # one KV group per attention window (models/kv_cache.py)
        grouped = len(windows) > 1
        num_blocks = self._pool_blocks(spec.bytes_per_token(cache_dtype, grouped), windows)
        # one block more than the block manager hands out: scratch space for the padding rows of decode graphs
        self.cache = PagedKVCache(spec, num_blocks + 1, config.block_size, dtype=cache_dtype, device=loaded.device,
                                  grouped=grouped)
        salt = f"{loaded.family}:{loaded.directory.resolve()}:{loaded.dtype}:{cache_dtype}"  # what shapes the KV
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching, salt,
                                          windows=windows)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.scheduling_policy)
        self.runner = ModelRunner(loaded.model, self.cache, loaded.device, loaded.tokenizer.vocab_size,
                                  self._decode_graphs(num_blocks))
        self.sampler = Sampler()
        self.admission = Admission(self.max_model_len, config.block_size, num_blocks, config.enable_prefix_caching,
                                   config.max_num_seqs, windows, config.max_num_batched_tokens,
                                   config.scheduling_policy)
        self.requests: dict[str, list[Sequence]] = {}
        self.held: dict[str, list[Sequence]] = {}  # choices waiting for their first sibling to score the prompt
        self._grammars: GrammarCompiler | None = None  # built on the first constrained request
        log.info("KV cache: %d blocks of %d tokens (%d tokens, %s; KV groups by window: %s)", num_blocks,
                 config.block_size, num_blocks * config.block_size, str(cache_dtype).removeprefix("torch."), windows)
        if num_blocks * config.block_size < self.max_model_len:
            log.warning("the KV cache holds fewer tokens than the context (%d): a request's prompt + max_tokens "
                        "must fit the cache, and a request without max_tokens gets what fits", self.max_model_len)

    def _pool_blocks(self, bytes_per_token: int, windows: tuple[int | None, ...]) -> int:
        """Blocks of the pool: ``bytes_per_token`` is a grouped pool's per token of one group (models/kv_cache.py)."""
        tokens, bs = self.config.kv_cache_tokens, self.config.block_size
        if tokens is None:
            budget = kv_budget_bytes(self.config, self.loaded.device)
            sliding = sliding_blocks(self.max_model_len, bs, windows, self.config.max_num_batched_tokens)
            useful = self.config.max_num_seqs * (self.max_model_len + sliding * bs)  # never used at once
            tokens = min(budget // bytes_per_token, useful)
        blocks = tokens // bs
        if blocks < 1:
            raise ValueError(f"KV cache of {tokens} tokens holds no block of {self.config.block_size}")
        return blocks

    def _decode_graphs(self, scratch_block: int) -> DecodeGraphs | None:
        capable = self.loaded.model.capabilities.captures_cuda_graphs
        if self.config.enforce_eager or self.loaded.device.type != "cuda" or not capable:
            return None
        max_blocks = -(-self.max_model_len // self.config.block_size)
        return DecodeGraphs(self.loaded.model, self.cache, self.config.max_num_seqs, max_blocks, scratch_block)

    @property
    def grammars(self) -> GrammarCompiler:
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.loaded.tokenizer)
        return self._grammars

    def grammar_compiled(self, spec: GrammarSpec) -> bool:
        """Whether ``spec`` is compiled already; never builds the grammar tables (seconds on o200k)."""
        return self._grammars is not None and self._grammars.cached(spec)

    @property
    def capacity_tokens(self) -> int:
        return self.admission.capacity_tokens

    def validate(self, prompt_len: int, params: SamplingParams, n: int) -> None:
        """Reject up front what could never be served, so it never occupies the queue or the cache."""
        self.admission.validate(prompt_len, params, n)
        if params.grammar is not None:
            self.grammars.compile(params.grammar)  # cached: add_request finds it ready

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, n: int = 1) -> None:
        """With prompt logprobs (echo), only the first choice scores the prompt; the others are held until it
        has, then take its scores and, from the prefix cache, its KV."""
        now = time.monotonic()
        seqs = []
        for index in range(n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(self.loaded.device).manual_seed((params.seed + index * 0x9E3779B9) % 2**63)
            seq = Sequence(request_id, index, list(prompt_ids), len(prompt_ids), params, now, generator)
            if params.grammar is not None:
                seq.grammar = self.grammars.new_state(params.grammar, params.stop_token_ids)
            seqs.append(seq)
            if params.prompt_logprobs is None:
                self.scheduler.add(seq)
                continue
            seq.prompt_logprobs = [None]
            if index == 0:
                self.scheduler.add(seq)
            else:
                seq.status = SequenceStatus.HELD
                self.held.setdefault(request_id, []).append(seq)
        self.requests[request_id] = seqs

    def abort(self, request_id: str) -> list[Output]:
        return [(request_id, out) for out in self._end_request(request_id, "abort")]

    def stop_choice(self, request_id: str, index: int) -> list[Output]:
        """The front end matched a stop string: end that choice now, and close its stream."""
        for seq in self.requests.get(request_id, []):
            if seq.index == index and not seq.is_finished:
                self._finish(seq, "stop")
                return [(request_id, ChoiceOutput(index, [], finish_reason="stop"))]
        return []

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.num_used_blocks, bm.num_blocks,
                           self.scheduler.num_preemptions)

    def step(self, interrupt: Interrupt | None = None) -> list[Output]:
        """Run one step; ``interrupt`` (asked between layers) may give up the step (see the module's docstring),
        which then reports nothing and leaves every sequence as it was (the caller admits the newcomer and
        steps again)."""
        preemptions = self.scheduler.num_preemptions
        chunks = self.scheduler.schedule()
        self.metrics.preempted(self.scheduler.num_preemptions - preemptions)
        if not chunks:  # nothing fits yet: the gauges still show who waits
            self.metrics.scheduler_state(self.stats())
            return []
        now = time.monotonic()
        for chunk in chunks:
            if chunk.seq.first_scheduled_time is None:
                chunk.seq.first_scheduled_time = now
                self.metrics.prefix_cache(chunk.seq)
        try:
            step = self.runner.run(chunks, self._interrupt_for(chunks, interrupt))
        except ForwardInterrupted:
            for chunk in chunks:
                self.block_manager.withdraw_unfilled(chunk.seq)
            self.metrics.interrupted()
            return []
        except Exception as exc:  # a failed forward fails only this step's requests; the engine keeps serving
            log.exception("model step failed; failing the %d sequences in it", len(chunks))
            return self._fail(chunks, f"model step failed: {exc}")
        self.metrics.step(sum(c.num_tokens for c in chunks))
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            chunk.seq.prompt_logprobs.extend(step.prompt_logprobs.get(id(chunk.seq), []))
            if self.held and chunk.seq.request_id in self.held and not chunk.seq.wants_prompt_logprobs:
                self._release_held(chunk.seq)
        tokens, logprobs, failed = self._sample(step.logits, step.sampling_seqs)
        now = time.monotonic()
        outputs = [self._advance(seq, token, lp, now) for seq, token, lp in zip(step.sampling_seqs, tokens, logprobs)]
        outputs += [self._embedded(seq, state) for seq, state in step.embeddings]
        self.metrics.scheduler_state(self.stats())
        return failed + [o for o in outputs if o is not None]

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list, list[Output]]:
        """Sample the batch; if that raises, sample row by row and fail only the requests whose row raises
        (their KV is sound: the forward ran), so one request's parameters never fail its neighbours."""
        try:
            return *self.sampler(logits, seqs), []
        except Exception:
            log.exception("sampling a batch of %d failed; sampling its rows one by one", len(seqs))
        tokens, logprobs, failed = [], [], []
        for row, seq in enumerate(seqs):
            try:
                [token], [logprob] = self.sampler(logits[row : row + 1], [seq])
            except Exception as exc:
                token, logprob = -1, None  # never appended: the request ends here
                failed += [(seq.request_id, out) for out in self._end_request(seq.request_id, "error",
                                                                              f"sampling failed: {exc}")]
            tokens.append(token)
            logprobs.append(logprob)
        return tokens, logprobs, failed

    def _release_held(self, first: Sequence) -> None:
        """``first`` has scored the prompt: its held siblings copy the scores and go to the front of the queue."""
        for seq in reversed(self.held.pop(first.request_id)):
            seq.prompt_logprobs = list(first.prompt_logprobs)
            self.scheduler.requeue(seq)

    def _interrupt_for(self, chunks: list[ScheduledChunk], interrupt: Interrupt | None) -> Interrupt | None:
        """What the step asks between layers: None unless a newcomer could be admitted at once (a free
        sequence slot, nobody already waiting for blocks); then ``interrupt`` itself for decodes alone, and for
        a step with a prompt chunk, while its token budget is not spent, an ``interrupt`` heard only before its
        second layer (see the module's docstring)."""
        scheduler = self.scheduler
        if (interrupt is None or not self.loaded.model.capabilities.interruptible or scheduler.waiting
                or len(scheduler.running) >= scheduler.max_num_seqs):
            return None
        if all(chunk.num_tokens == 1 for chunk in chunks):
            return interrupt
        if sum(chunk.num_tokens for chunk in chunks) >= scheduler.max_num_batched_tokens:
            return None
        asked = itertools.count()
        return lambda: next(asked) < PROMPT_STEP_QUESTIONS and interrupt()

    def _advance(self, seq: Sequence, token: int, logprob, now: float) -> Output | None:
        """Append the sampled token (unless the choice is done) and report it."""
        if seq.is_finished:
            return None
        params = seq.params
        new_tokens, new_logprobs, reason, stop_token = [], [], None, None
        if seq.num_output_tokens >= params.max_tokens:
            reason = "length"  # max_tokens=0: the prompt alone was asked for
        else:
            seq.token_ids.append(token)
            new_tokens.append(token)
            if logprob is not None:
                new_logprobs.append(logprob)
            if token in params.ending_token_ids:
                reason, stop_token = "stop", token  # an output token like any other (as vLLM counts it)
            elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
            if stop_token is None and seq.grammar is not None and not seq.grammar.accept(token):
                reason = "error"  # only a row its mask left nothing in: fail the choice, never the engine
        if new_tokens:
            self.metrics.token(seq, now)
            seq.first_token_time = seq.first_token_time or now
            seq.last_token_time = now
        out = ChoiceOutput(seq.index, new_tokens, new_logprobs if params.logprobs is not None else None)
        if not seq.reported_prompt:
            seq.reported_prompt = True
            self.metrics.prompt_processed(seq)
            out.num_prompt_tokens = seq.num_prompt_tokens
            out.num_cached_tokens = seq.num_cached_tokens
            if params.prompt_logprobs is not None:
                out.prompt_logprobs = list(seq.prompt_logprobs)
        if reason is not None:
            self._finish(seq, reason)
            out.finish_reason = reason
            out.stop_token_id = stop_token
            if reason == "error":
                out.error = "the output left its grammar (response_format or a forced tool call)"
        return seq.request_id, out

    def _embedded(self, seq: Sequence, embedding: list[float]) -> Output:
        """An embedding request is done once its prompt is in: it reports the hidden state, no tokens."""
        seq.reported_prompt = True
        self.metrics.prompt_processed(seq)
        self._finish(seq, "length")
        out = ChoiceOutput(seq.index, [], finish_reason="length", num_prompt_tokens=seq.num_prompt_tokens,
                           num_cached_tokens=seq.num_cached_tokens, embedding=embedding)
        return seq.request_id, out

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.metrics.finished(seq, time.monotonic())
        self.metrics.scheduler_state(self.stats())  # aborts and stop strings end requests between steps
        seqs = self.requests.get(seq.request_id, [])
        if all(s.is_finished for s in seqs):
            self.requests.pop(seq.request_id, None)
            self.held.pop(seq.request_id, None)

    def _end_request(self, request_id: str, reason: str, error: str | None = None) -> list[ChoiceOutput]:
        ended = []
        for seq in self.requests.get(request_id, []):
            if not seq.is_finished:
                self._finish(seq, reason)
                ended.append(ChoiceOutput(seq.index, [], finish_reason=reason, error=error))
        return ended

    def _fail(self, chunks: list[ScheduledChunk], message: str) -> list[Output]:
        for chunk in chunks:
            self.block_manager.forget(chunk.seq)
        outputs = []
        for request_id in dict.fromkeys(c.seq.request_id for c in chunks):
            outputs += [(request_id, out) for out in self._end_request(request_id, "error", message)]
        self.metrics.scheduler_state(self.stats())
        return outputs
