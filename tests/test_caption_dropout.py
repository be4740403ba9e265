"""Caption dropout is drawn when batches are built (``LMTask.host_batch``), per (record, epoch): the rows the
tokenization pool writes (and the cache keeps) hold every prompt, and a record's prompt is dropped in some
epochs and kept in others. No Ray: the rows are laid out and packed here as the pool does."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from orchestration.config import load_config
from orchestration.data.lm_data import directory_files
from orchestration.train.lm import LMTask
from vilau_model.sequence import (
    IGNORE_INDEX,
    ROW_COLUMNS,
    CaptionSample,
    GenerationSample,
    SequenceBuilder,
    fill_row,
)
from vilau_model.tokenizer import train_bpe_tokenizer

RECORDS, RATE, SEQ_LEN = 400, 0.25, 64
CORPUS = ["a photo of a red circle at the top left", "a blue square at the bottom right"] * 20


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(CORPUS, directory, vocab_size=300)
    return LMTask(load_config(None, [f"lm_train.caption_dropout={RATE}"]), directory_files(str(directory)))


def _codes(depth: int, i: int) -> np.ndarray:
    return (np.arange(2 * 2 * depth).reshape(2, 2, depth) + i) % 256


def _batch(task: LMTask, builder: SequenceBuilder) -> tuple[dict, list[list]]:
    """One row per record: its caption sample, then its generation sample (two segments), keyed as the
    pool keys them ("source/key"), plus the sequences that went in."""
    depth = task.tower_source.config.code_depth
    rows, keys, seqs = [], [], []
    for i in range(RECORDS):
        text = CORPUS[i % 2]
        pair = [builder.build(CaptionSample(codes=_codes(depth, i), text=text)),
                builder.build(GenerationSample(text=text, codes=_codes(depth, i)))]
        rows.append(fill_row(pair, SEQ_LEN, depth, task.special.pad))
        keys.append(["coyo/%06d" % i] * 2)
        seqs.append(pair)
    batch = {name: np.stack([r[name] for r in rows]) for name in ROW_COLUMNS}
    batch["keys"] = np.empty(RECORDS, dtype=object)
    batch["keys"][:] = keys
    return batch, seqs


def _dropped(task: LMTask, batch: dict) -> set[int]:
    """Rows whose generation segment (the second) starts [BOS, <im_start>]: its prompt was dropped."""
    out = set()
    for i in range(RECORDS):
        second = np.flatnonzero(batch["segment_ids"][i] == 2)[:2]
        if batch["input_ids"][i][second[1]] == task.special.im_start:
            out.add(i)
    return out


def test_caption_dropout_is_drawn_per_record_and_epoch_when_batches_are_built(task):
    builder = SequenceBuilder(task.tokenizer, code_depth=task.tower_source.config.code_depth)  # the pool's: no dropout
    stored, seqs = _batch(task, builder)
    original = copy.deepcopy(stored)
    assert _dropped(task, stored) == set()  # what the pool writes and the cache keeps: every prompt

    by_epoch = {}
    for epoch in (0, 1):
        batch = copy.deepcopy(stored)
        batch["epoch"] = epoch
        by_epoch[epoch] = _dropped(task, task.host_batch(batch))
        # the draw is a function of (seed, record, epoch): the same again (another rank, a resumed run)
        again = copy.deepcopy(stored) | {"epoch": epoch}
        assert _dropped(task, task.host_batch(again)) == by_epoch[epoch]
        if epoch == 0:
            first = batch
    zero, one = by_epoch[0], by_epoch[1]
    print(f"dropped: epoch 0 {len(zero)}, epoch 1 {len(one)}, both {len(zero & one)} of {RECORDS} (rate {RATE})")
    assert zero != one  # different unconditional prompts in the two epochs
    for dropped in (zero, one):
        assert abs(len(dropped) - RATE * RECORDS) < 4 * (RATE * (1 - RATE) * RECORDS) ** 0.5
    assert len(zero & one) < 0.5 * len(zero)  # independent draws: ~RATE of them overlap, not all
    # nothing stored was touched
    for name in ROW_COLUMNS:
        assert np.array_equal(stored[name], original[name]), name

    # A dropped row is exactly the row the builder lays out without the prompt: [BOS, <im_start>, codes,
    # <im_end>, EOS] in segment 2, positions from 0, the tokens after it moved up, padding after.
    unconditional = SequenceBuilder(task.tokenizer, code_depth=task.tower_source.config.code_depth, caption_dropout=1.0)
    depth = task.tower_source.config.code_depth
    for i in sorted(zero)[:5]:
        expected = fill_row([seqs[i][0], unconditional.build(GenerationSample(text=CORPUS[i % 2], codes=_codes(depth, i)))],
                            SEQ_LEN, depth, task.special.pad)
        for name in ROW_COLUMNS:
            assert np.array_equal(first[name][i], expected[name]), (i, name)
    # a row whose prompt was kept is the stored row
    kept = next(i for i in range(RECORDS) if i not in zero)
    for name in ROW_COLUMNS:
        assert np.array_equal(first[name][kept], stored[name][kept])
    # the caption (understanding) segment is never touched: its text stays supervised
    assert all((first["labels"][i][first["segment_ids"][i] == 1] != IGNORE_INDEX).any() for i in zero)


def test_rows_of_the_tokenized_cache_get_a_draw_per_sample_and_epoch(task):
    """A cached row names only itself ("cache/<id>"), not its samples: each of its generation samples
    still gets a draw of its own per epoch (keyed by row and segment), the same on every rerun."""
    builder = SequenceBuilder(task.tokenizer, code_depth=task.tower_source.config.code_depth)
    depth = task.tower_source.config.code_depth
    samples = [builder.build(GenerationSample(text=CORPUS[k % 2], codes=_codes(depth, k))) for k in range(3)]
    row = fill_row(samples, 3 * SEQ_LEN // 2, depth, task.special.pad)
    stored = {name: np.stack([row[name]] * RECORDS) for name in ROW_COLUMNS}
    stored["keys"] = np.empty(RECORDS, dtype=object)
    stored["keys"][:] = [[f"cache/{i}"] for i in range(RECORDS)]

    def dropped_segments(epoch: int) -> set[tuple[int, int]]:
        batch = task.host_batch(copy.deepcopy(stored) | {"epoch": epoch})
        out = set()
        for i in range(RECORDS):
            for segment in (1, 2, 3):
                first = np.flatnonzero(batch["segment_ids"][i] == segment)[:2]
                if batch["input_ids"][i][first[1]] == task.special.im_start:
                    out.add((i, segment))
        return out

    zero, one = dropped_segments(0), dropped_segments(1)
    assert zero == dropped_segments(0) and zero != one
    assert len({segment for _, segment in zero}) > 1  # the samples of a row are drawn apart
    assert abs(len(zero) - RATE * 3 * RECORDS) < 4 * (RATE * (1 - RATE) * 3 * RECORDS) ** 0.5


def test_no_dropout_configured_leaves_batches_alone(task):
    off = LMTask(load_config(None, ["lm_train.caption_dropout=0"]), task.tokenizer_files)
    stored, _ = _batch(off, SequenceBuilder(off.tokenizer, code_depth=off.tower_source.config.code_depth))
    batch = copy.deepcopy(stored) | {"epoch": 3}
    assert _dropped(off, off.host_batch(batch)) == set()
