"""Next-token choice for a whole batch at once: penalties, bias, temperature, top-k/top-p/min-p, seeds, logprobs.

Every transform is a tensor operation over the batch; the only per-row Python work is for rows that carry
their own seed (their noise is drawn from their own generator, so what else shares the batch never changes
a seeded row's random draws) or a logit_bias. The logits themselves are not batch-invariant: a batch of
another shape runs other kernel reductions and moves them by ~1e-5, which can flip a sampled token whose
draw falls near a boundary, or a greedy one at a near-tie. So a seed reproduces an output only when the
batch is the same each step too (e.g. the request alone); docs/api.md says so.
"""

from __future__ import annotations

import torch
from torch import Tensor

from server.engine.outputs import TokenLogprob
from server.engine.sequence import Sequence
from server.engine.structured_output import apply_grammars


def top_logprobs(logprobs: Tensor, chosen: Tensor, k: int) -> list[TokenLogprob]:
    """Logprob of each row's chosen token plus its k most likely alternatives (at most the whole vocabulary)."""
    k = min(k, logprobs.shape[-1])
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    top_values, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], chosen[:, None][:, :0])
    return [
        TokenLogprob(token, lp, list(zip(ids, values)))
        for token, lp, ids, values in zip(chosen.tolist(), chosen_lp, top_ids.tolist(), top_values.tolist())
    ]


class Sampler:
    def __call__(self, logits: Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits [B, V] float32, one row per sequence -> next token ids and (when asked) their logprobs."""
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
        logits = self._apply_penalties(logits.clone(), seqs)
        logits = self._apply_bias_and_masks(logits, seqs)
        apply_grammars(logits, [s.grammar for s in seqs])
        tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            tokens[rows] = self._sample(logits[rows], [seqs[i] for i in sampled_rows])
        token_list = tokens.tolist()
        logprob_list: list[TokenLogprob | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            wanted = {i: s.params.logprobs for i, s in enumerate(seqs) if s.params.logprobs is not None}
            index = torch.tensor(list(wanted), device=logits.device)
            entries = top_logprobs(raw_logprobs[index], tokens[index], max(wanted.values()))
            for (i, k), entry in zip(wanted.items(), entries):
                entry.top = entry.top[:k]
                logprob_list[i] = entry
        return token_list, logprob_list

    @staticmethod
    def _apply_penalties(logits: Tensor, seqs: list[Sequence]) -> Tensor:
        params = [s.params for s in seqs]
        if all(p.presence_penalty == 0 and p.frequency_penalty == 0 and p.repetition_penalty == 1 for p in params):
            return logits
        batch, vocab = logits.shape
        device = logits.device
        counts = torch.zeros(batch, vocab, device=device)
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        for row, seq in enumerate(seqs):
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=device)
            counts[row].index_add_(0, out, torch.ones(len(out), device=device))
            seen[row, torch.tensor(seq.token_ids, dtype=torch.long, device=device)] = True
        rep = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
        freq = torch.tensor([p.frequency_penalty for p in params], device=device).unsqueeze(1)
        presence = torch.tensor([p.presence_penalty for p in params], device=device).unsqueeze(1)
        return logits - freq * counts - presence * (counts > 0).float()

    @staticmethod
    def _apply_bias_and_masks(logits: Tensor, seqs: list[Sequence]) -> Tensor:
        """One scatter for every row's logit_bias, one for every row still short of min_tokens or ending in the
        start of a bad word, and one for every row limited to its allowed_token_ids: per-row indexing from host
        lists costs a host-to-device copy each (64 a step at C=64 on a GPU)."""
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        mask_rows: list[int] = []
        mask_ids: list[int] = []
        limited_rows: list[int] = []
        allowed_rows: list[int] = []
        allowed_ids: list[int] = []
        for row, seq in enumerate(seqs):
            p = seq.params
            bias_rows += [row] * len(p.logit_bias)
            bias_ids += p.logit_bias.keys()
            bias_values += p.logit_bias.values()
            if seq.num_output_tokens < p.min_tokens and p.stop_token_ids:
                mask_rows += [row] * len(p.stop_token_ids)
                mask_ids += p.stop_token_ids
            if p.bad_words:
                banned = banned_tokens(seq)
                mask_rows += [row] * len(banned)
                mask_ids += banned
            if p.allowed_token_ids:
                limited_rows.append(row)
                allowed_rows += [row] * len(p.allowed_token_ids)
                allowed_ids += p.allowed_token_ids
        device = logits.device
        if limited_rows:
            refused = torch.zeros(logits.shape, dtype=torch.bool, device=device)
            refused[torch.tensor(limited_rows, device=device)] = True
            index = torch.tensor([allowed_rows, allowed_ids], dtype=torch.long).to(device)
            refused.index_put_(tuple(index), torch.tensor(False, device=device))
            logits.masked_fill_(refused, float("-inf"))
        if bias_rows:
            index = torch.tensor([bias_rows, bias_ids], dtype=torch.long).to(device)
            logits.index_put_(tuple(index), torch.tensor(bias_values, dtype=logits.dtype).to(device), accumulate=True)
        if mask_rows:
            index = torch.tensor([mask_rows, mask_ids], dtype=torch.long).to(device)
            logits.index_put_(tuple(index), torch.tensor(float("-inf"), dtype=logits.dtype, device=device))
        return logits

    @staticmethod
    def _sample(logits: Tensor, seqs: list[Sequence]) -> Tensor:
        device = logits.device
        # Every schema-valid value keeps the top token: the row's maximum goes to 0 before dividing, so a
        # temperature that rounds to 0 in float32 (or an overflowing logit) cannot make the row NaN.
        finfo = torch.finfo(logits.dtype)
        logits = logits.clamp(max=finfo.max)
        temperature = torch.tensor([s.params.temperature for s in seqs], device=device).unsqueeze(1)
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature.clamp(min=finfo.tiny)
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        min_p = torch.tensor([s.params.min_p for s in seqs], device=device).unsqueeze(1)
        if (min_p > 0).any():
            probs = torch.where(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
        # Inverse-CDF sampling: one uniform per row (drawn from the row's own generator when it has a seed, so the
        # batch never changes a seeded row's draws), at a fraction of the cost of per-token noise.
        cdf = probs.cumsum(dim=-1)
        uniform = torch.rand(len(seqs), 1, device=device)
        for row, seq in enumerate(seqs):
            if seq.generator is not None:
                uniform[row] = torch.rand(1, generator=seq.generator, device=device)
        picks = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
        return picks.squeeze(1).clamp_(max=probs.shape[-1] - 1)


def banned_tokens(seq: Sequence) -> list[int]:
    """vLLM's bad_words: the last token of each banned sequence whose other tokens the output ends with."""
    banned = []
    for *prefix, last in seq.params.bad_words:
        if not prefix or (len(prefix) <= seq.num_output_tokens and seq.token_ids[-len(prefix):] == prefix):
            banned.append(last)
    return banned


def _top_k_top_p(logits: Tensor, top_k: list[int], top_p: list[float]) -> Tensor:
    """Mask everything outside each row's top-k and outside the smallest set whose probability reaches top-p."""
    vocab = logits.shape[-1]
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([min(kk, vocab) if kk > 0 else vocab for kk in top_k], device=device)  # any int: no overflow
    ranks = torch.arange(vocab, device=device).unsqueeze(0)
    drop = ranks >= k.unsqueeze(1)
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop |= mass_before >= torch.tensor(top_p, device=device).unsqueeze(1)
    drop[:, 0] = False  # a top_p that rounds to 0 in float32 still keeps the top token
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
