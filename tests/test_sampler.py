"""The sampler's batched logit edits apply each row's own logit_bias, min_tokens mask and allowed_token_ids, and no
other row's; every
schema-valid value (tiny temperature or top_p, top_k beyond int64) samples a token without failing any row."""

from __future__ import annotations

import pytest
import torch

from server.engine.sampler import Sampler
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence


def sequence(params: SamplingParams, outputs: int) -> Sequence:
    prompt = [1, 2, 3]
    seq = Sequence("r", 0, prompt + [7] * outputs, len(prompt), params, 0.0, None)
    assert seq.num_output_tokens == outputs
    return seq


def test_bias_and_min_tokens_edit_only_their_own_rows():
    stops = frozenset({0, 5})
    seqs = [
        sequence(SamplingParams(max_tokens=9, logit_bias={3: 2.5, 9: -1.0}), outputs=0),
        sequence(SamplingParams(max_tokens=9, min_tokens=4, stop_token_ids=stops), outputs=2),  # still short
        sequence(SamplingParams(max_tokens=9, min_tokens=2, stop_token_ids=stops), outputs=2),  # reached it
        sequence(SamplingParams(max_tokens=9, min_tokens=4, stop_token_ids=stops, logit_bias={5: 50.0, 1: 1.0}),
                 outputs=0),
    ]
    logits = torch.randn(4, 12)
    expected = logits.clone()
    expected[0, 3] += 2.5
    expected[0, 9] -= 1.0
    expected[1, [0, 5]] = float("-inf")
    expected[3, 1] += 1.0
    expected[3, [0, 5]] = float("-inf")  # the mask wins over a bias towards a stop token
    got = Sampler._apply_bias_and_masks(logits.clone(), seqs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_allowed_token_ids_leave_only_those_in_their_own_rows():
    seqs = [
        sequence(SamplingParams(max_tokens=9, allowed_token_ids=(2, 7), logit_bias={7: 1.5, 8: 3.0}), outputs=0),
        sequence(SamplingParams(max_tokens=9), outputs=0),
        sequence(SamplingParams(max_tokens=9, allowed_token_ids=(0, 11), min_tokens=3, stop_token_ids=frozenset({0})),
                 outputs=1),
    ]
    logits = torch.randn(3, 12)
    expected = torch.full_like(logits, float("-inf"))
    expected[0, 2], expected[0, 7] = logits[0, 2], logits[0, 7] + 1.5
    expected[1] = logits[1]
    expected[2, 11] = logits[2, 11]  # 0 is allowed, but min_tokens still masks the stop token
    got = Sampler._apply_bias_and_masks(logits.clone(), seqs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    tokens, _ = Sampler()(logits, [sequence(SamplingParams(temperature=1.0, seed=s, allowed_token_ids=(4, 9)),
                                            outputs=0) for s in range(3)])
    assert set(tokens) <= {4, 9}


def test_rows_without_edits_are_left_alone():
    seqs = [sequence(SamplingParams(max_tokens=4), outputs=1) for _ in range(3)]
    logits = torch.randn(3, 8)
    assert torch.equal(Sampler._apply_bias_and_masks(logits.clone(), seqs), logits)


EXTREME_BUT_VALID = {
    "temperature below float32's smallest normal": SamplingParams(temperature=1e-40),
    "temperature that rounds to 0 in float32": SamplingParams(temperature=5e-324),
    "top_p that rounds to 0 in float32": SamplingParams(top_p=1e-46),
    "top_k beyond int64 with a tiny top_p": SamplingParams(top_k=2**63, top_p=1e-30),
    "top_k of 10**30 with a tiny temperature": SamplingParams(top_k=10**30, temperature=1e-39),
}


@pytest.mark.parametrize("name", EXTREME_BUT_VALID)
def test_extreme_but_valid_values_pick_the_top_token(name):
    logits = torch.randn(2, 50)
    seqs = [sequence(EXTREME_BUT_VALID[name], outputs=0), sequence(SamplingParams(temperature=0.0), outputs=0)]
    tokens, _ = Sampler()(logits, seqs)
    assert tokens == logits.argmax(dim=-1).tolist(), name


def test_top_k_beyond_int64_means_off_and_fails_no_row():
    torch.manual_seed(0)
    logits = torch.zeros(3, 8)  # uniform: with top_k off every token can come out
    seqs = [sequence(SamplingParams(top_k=2**63), outputs=0), sequence(SamplingParams(top_k=2**64 + 1), outputs=0),
            sequence(SamplingParams(temperature=0.0), outputs=0)]
    seen = set()
    for _ in range(200):
        tokens, _ = Sampler()(logits, seqs)
        seen.update(tokens[:2])
        assert tokens[2] == 0
    assert seen == set(range(8))


def test_a_repetition_penalty_near_zero_gives_no_nan():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5, 0.2]])
    seq = Sequence("r", 0, [0, 1], 2, SamplingParams(repetition_penalty=1e-300, temperature=0.5), 0.0)
    for _ in range(20):
        [token], _ = Sampler()(logits.clone(), [seq])
        assert token in (0, 1)  # the seen tokens with positive logits went to +inf, and no row became NaN


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch_given_the_same_logits():
    """What the sampler guarantees; the model's logits for the row may still differ with the batch (docs/api.md)."""
    row = torch.randn(1, 64)

    def draws(others: int) -> list[int]:
        generator = torch.Generator().manual_seed(5)
        seeded = Sequence("s", 0, [1, 2, 3], 3, SamplingParams(top_p=0.95, seed=5), 0.0, generator)
        neighbours = [sequence(SamplingParams(top_k=3), outputs=0) for _ in range(others)]
        return [Sampler()(torch.cat([torch.randn(others, 64), row]), neighbours + [seeded])[0][-1] for _ in range(30)]

    assert draws(0) == draws(7) == draws(31)


def test_more_logprobs_than_the_vocabulary_lists_the_whole_vocabulary():
    seqs = [sequence(SamplingParams(temperature=0.0, logprobs=20), outputs=0)]
    _, [entry] = Sampler()(torch.randn(1, 8), seqs)
    assert sorted(token for token, _ in entry.top) == list(range(8))
