"""A tensor-parallel step message (server/engine/step_channel.py) rebuilds, on the other ranks, the batch rank 0
ran: every KV group's block tables included, freed (-1) entries and all."""

from __future__ import annotations

from models.forward_batch import ForwardBatch
from server.engine.step_channel import batch_from_payload, step_payload

BLOCK = 4


def test_a_grouped_batch_round_trips_through_the_payload():
    full = [[3, 7, 9, 2], [5], [8, 1, 6]]
    sliding = [[-1, -1, 11, 12], [13], [-1, 14, 15]]  # a window's group: blocks behind it freed
    batch = ForwardBatch.build([[1], [4, 5, 6], [2]], [13, 0, 9], full, BLOCK, group_tables=[sliding])
    got = batch_from_payload(step_payload(batch), 3, batch.num_tokens, 2, BLOCK, "cpu")
    assert got.input_ids.tolist() == batch.input_ids.tolist()
    assert got.positions.tolist() == batch.positions.tolist()
    assert len(got.views) == 2
    for ours, theirs in zip(got.views, batch.views):
        assert ours.slot_mapping.tolist() == theirs.slot_mapping.tolist()
        assert [g.key_blocks.tolist() for g in ours.groups] == [g.key_blocks.tolist() for g in theirs.groups]
    assert got.views[1].block_tables == [[-1, -1, 11, 12], [13], [-1, 14, 15]]
