"""Packing one pool call, known in full: best fit decreasing (vilau_model.sequence.pack_call)."""

from __future__ import annotations

import numpy as np
import pytest

from vilau_model.sequence import BuiltSequence, StreamingPacker, best_fit_decreasing, fill_row, pack_call


def seq(n: int, token: int = 7) -> BuiltSequence:
    return BuiltSequence(np.full(n, token, np.int32), np.full(n, token, np.int32), np.zeros((n, 2), np.int16), np.zeros(n, bool))


def test_long_samples_arriving_last_still_share_rows_with_the_short_ones():
    lengths = [3000, 3000, 5000, 5000]
    streamed = StreamingPacker(seq_len=8000, code_depth=2, pad_id=0)
    for n in lengths:
        streamed.add(seq(n))
    streamed.flush()
    assert streamed.stats["rows"] == 3  # the two short ones filled one row before the long ones came
    assert best_fit_decreasing(lengths, 8000) == [[2, 0], [3, 1]]


def test_every_sequence_lands_once_in_a_row_it_fits_and_the_rows_depend_only_on_the_call():
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(1, 900, size=400)]
    groups = best_fit_decreasing(lengths, 1024)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 1024 for g in groups)
    streamed = StreamingPacker(seq_len=1024, code_depth=2, pad_id=0)
    for n in lengths:
        streamed.add(seq(n))
    streamed.flush()
    assert -(-sum(lengths) // 1024) <= len(groups) < streamed.stats["rows"]
    assert best_fit_decreasing(lengths, 1024) == groups


def test_pack_call_rows_hold_their_groups_sequences():
    seqs = [seq(n, token=k + 1) for k, n in enumerate([300, 700, 200, 900, 100])]
    rows, groups = pack_call(seqs, seq_len=1000, code_depth=2, pad_id=0)
    assert len(rows) == len(groups) == 3
    for row, group in zip(rows, groups):
        expected = fill_row([seqs[i] for i in group], 1000, 2, 0)
        assert all(np.array_equal(row[k], expected[k]) for k in expected)
        assert sorted(set(row["input_ids"][row["segment_ids"] > 0].tolist())) == sorted(i + 1 for i in group)
    with pytest.raises(ValueError, match="exceeds the row length"):
        pack_call([seq(1001)], seq_len=1000, code_depth=2, pad_id=0)
