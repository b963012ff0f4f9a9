"""Greedy generation over the paged KV cache without the serving engine: for the offline CLI and tests.

Every sequence gets its own run of blocks up front; step one prefills all prompts in one batch, later steps
decode one token per live sequence, so this exercises exactly the forward the engine uses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.forward_batch import ForwardBatch
from models.kv_cache import PagedKVCache
from models.servable import ServableModel


def _cache_for(model: ServableModel, lengths: list[int], block_size: int) -> tuple[PagedKVCache, list[list[int]]]:
    blocks_per_seq = [-(-n // block_size) for n in lengths]
    device, dtype = _placement(model)
    cache = PagedKVCache(model.kv_cache_spec(), sum(blocks_per_seq), block_size, dtype=dtype, device=device)
    tables, start = [], 0
    for n in blocks_per_seq:
        tables.append(list(range(start, start + n)))
        start += n
    return cache, tables


def _placement(model: ServableModel) -> tuple[torch.device, torch.dtype]:
    """Where the weights live and their floating dtype: a model of one process is an nn.Module."""
    assert isinstance(model, nn.Module), "offline generation runs a single-process model"
    return next(model.parameters()).device, next(p for p in model.parameters() if p.is_floating_point()).dtype


@torch.inference_mode()
def prompt_logits(model: ServableModel, prompts: list[list[int]], block_size: int = 16) -> list[Tensor]:
    """Next-token logits [len(prompt), vocab] at every position of each prompt, from one batched prefill."""
    cache, tables = _cache_for(model, [len(p) for p in prompts], block_size)
    device = _placement(model)[0]
    batch = ForwardBatch.build(prompts, [0] * len(prompts), tables, block_size, device)
    logits = model.compute_logits(model(batch, cache))
    return list(logits.split([len(p) for p in prompts]))


@torch.inference_mode()
def greedy_generate(
    model: ServableModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_token_ids: frozenset[int] = frozenset(),
    block_size: int = 16,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Greedy continuations (stop tokens excluded) of each prompt, at most ``max_new_tokens`` long; with
    ``vocab_size`` (the tokenizer's), ids past it (padding rows of the unembedding) are never chosen."""
    cache, tables = _cache_for(model, [len(p) + max_new_tokens for p in prompts], block_size)
    device = _placement(model)[0]
    outputs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    step_tokens, starts = [list(p) for p in prompts], [0] * len(prompts)
    while live and max_new_tokens > 0:
        batch = ForwardBatch.build(step_tokens, starts, [tables[i] for i in live], block_size, device)
        hidden = model(batch, cache)[batch.last_token_index]
        next_ids = model.compute_logits(hidden)[:, :vocab_size].argmax(-1).tolist()
        still_live = []
        for i, token, tokens, start in zip(live, next_ids, step_tokens, starts):
            if token in stop_token_ids:
                continue
            outputs[i].append(token)
            if len(outputs[i]) < max_new_tokens:
                still_live.append((i, token, start + len(tokens)))
        live = [i for i, _, _ in still_live]
        step_tokens = [[token] for _, token, _ in still_live]
        starts = [position for _, _, position in still_live]
    return outputs
