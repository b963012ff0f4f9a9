"""The sampler's batched logit edits apply each row's own logit_bias and min_tokens mask, and no other row's."""

from __future__ import annotations

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
    got = Sampler._apply_bias_and_min_tokens(logits.clone(), seqs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_rows_without_edits_are_left_alone():
    seqs = [sequence(SamplingParams(max_tokens=4), outputs=1) for _ in range(3)]
    logits = torch.randn(3, 8)
    assert torch.equal(Sampler._apply_bias_and_min_tokens(logits.clone(), seqs), logits)
