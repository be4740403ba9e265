"""Packing: the row format, packed vs unpacked loss, and attention confined to each sample."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vilau_model.config import get_lm_config
from vilau_model.sequence import (
    IGNORE_INDEX,
    ROW_SCHEMA,
    BuiltSequence,
    CaptionSample,
    ConversationSample,
    GenerationSample,
    InterleavedSample,
    SequenceBuilder,
    StreamingPacker,
    VideoSample,
    collate_rows,
    fill_row,
    pack_sequences,
    pad_to_row,
)
from vilau_model.tokenizer import train_bpe_tokenizer
from vilau_model.unified_lm import UnifiedLM, segment_attention_mask


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts(tiny_tower, tmp_path_factory):
    tok = train_bpe_tokenizer(
        ["a photo of a red circle at the top left", "a blue square moving right", "what is it? it is a cross."] * 10,
        tmp_path_factory.mktemp("tok"),
        vocab_size=300,
    )
    return tiny_tower, tok


def mixed_sequences(builder: SequenceBuilder, rng: np.random.Generator) -> list[BuiltSequence]:
    """One or more samples of every kind with random codes (the LM only needs valid codes)."""
    g, D, K = 8, 4, 256

    def img():
        return rng.integers(0, K, size=(g, g, D))

    samples = [
        CaptionSample(img(), "a photo of a red circle at the top left"),
        GenerationSample("a blue square", img()),
        VideoSample("a blue square moving right", rng.integers(0, K, size=(8, g, g, D))),
        InterleavedSample(["what is it?", "it is a cross.", "a red circle"], [img(), img()], [0, 2]),
        ConversationSample.from_sharegpt(
            [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "it is a cross."}], img()
        ),
        CaptionSample(img(), "a blue square"),
        GenerationSample("a red circle at the top left", img()),
    ]
    return [builder.build(s) for s in samples]


def test_rows_have_the_documented_fixed_schema(parts):
    tower, tok = parts
    b = SequenceBuilder(tok, code_depth=4, system_prompt="")
    seqs = mixed_sequences(b, np.random.default_rng(0))
    L = 1024
    rows = pack_sequences(seqs, seq_len=L, code_depth=4, pad_id=b.ids.pad)
    assert len(rows) < len(seqs)
    shapes = {"L": L, "D": 4}
    seen = []
    for row in rows:
        assert set(row) == set(ROW_SCHEMA)
        for name, (dtype, dims) in ROW_SCHEMA.items():
            assert row[name].dtype == dtype, name
            assert row[name].shape == tuple(shapes[d] for d in dims), name
        seg = row["segment_ids"]
        # samples are contiguous, numbered 1.. in order, padding (0) only at the end
        used = int((seg > 0).sum())
        assert (seg[:used] > 0).all() and (seg[used:] == 0).all()
        assert (np.diff(seg[:used]) >= 0).all() and seg[0] == 1
        for k in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == k)
            assert (row["position_ids"][idx] == np.arange(len(idx))).all()  # positions restart per sample
            seen.append(row["input_ids"][idx].tolist())
        assert (row["position_ids"][used:] == np.arange(L - used)).all()
        assert (row["labels"][used:] == IGNORE_INDEX).all() and not row["is_visual"][used:].any()
    # every sequence is in exactly one row, unchanged
    assert sorted(seen) == sorted(s.input_ids.tolist() for s in seqs)


def test_rows_roundtrip_through_parquet(parts, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tower, tok = parts
    b = SequenceBuilder(tok, code_depth=4)
    rows = pack_sequences(mixed_sequences(b, np.random.default_rng(1)), seq_len=1024, code_depth=4, pad_id=b.ids.pad)
    # [L] columns as fixed-size lists, the [L, D] codes as a fixed-shape tensor column
    columns = {}
    for name, (dtype, dims) in ROW_SCHEMA.items():
        stacked = np.stack([r[name] for r in rows])
        if len(dims) == 1:
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(stacked.reshape(-1)), stacked.shape[1])
        else:
            columns[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(stacked)
    pq.write_table(pa.table(columns), tmp_path / "rows.parquet")
    back = pq.read_table(tmp_path / "rows.parquet")
    for name, (dtype, dims) in ROW_SCHEMA.items():
        column = back.column(name).combine_chunks()
        if len(dims) == 1:
            array = column.flatten().to_numpy(zero_copy_only=False).reshape(len(rows), -1)
        else:
            array = column.to_numpy_ndarray()
        assert array.dtype == dtype, name
        np.testing.assert_array_equal(array, np.stack([r[name] for r in rows]))


def test_streaming_packer_rejects_too_long_and_fills_rows():
    pad = 0
    seq = lambda n: BuiltSequence(np.ones(n, np.int32), np.ones(n, np.int32), np.zeros((n, 2), np.int16), np.zeros(n, bool))
    with pytest.raises(ValueError, match="exceeds the row length"):
        StreamingPacker(seq_len=100, code_depth=2, pad_id=pad).add(seq(101))

    def fill(max_open_rows):
        packer = StreamingPacker(seq_len=100, code_depth=2, pad_id=pad, max_open_rows=max_open_rows)
        rows = []
        for n in np.random.default_rng(0).integers(5, 60, size=400):
            rows += packer.add(seq(int(n)))
        rows += packer.flush()
        assert packer.stats["sequences"] == 400
        used = sum(int((r["segment_ids"] > 0).sum()) for r in rows)
        assert used == packer.stats["tokens"] and len(rows) == packer.stats["rows"]
        return used / (100 * len(rows))

    # sequences up to 60% of a row: one open row wastes a lot, a few open rows fill well
    assert fill(1) < 0.85 < 0.95 < fill(16)


def test_block_diagonal_mask():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    m = segment_attention_mask(seg)[0, 0].int()
    assert m.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    additive = segment_attention_mask(seg, torch.float32)[0, 0]
    assert (additive[m.bool()] == 0).all() and (additive[~m.bool()] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(parts, attn):
    tower, tok = parts
    torch.manual_seed(0)
    model = UnifiedLM(dataclasses.replace(get_lm_config("tiny"), attn_implementation=attn), tower,
                      SequenceBuilder(tok, code_depth=4).ids).eval()
    b = SequenceBuilder(tok, code_depth=4)
    seqs = mixed_sequences(b, np.random.default_rng(2))
    L = 1024
    packed = collate_rows(pack_sequences(seqs, seq_len=L, code_depth=4, pad_id=b.ids.pad))
    longest = max(len(s) for s in seqs)  # unpacked: one sample per row, padded to the longest
    unpacked = collate_rows([pad_to_row(s, longest, 4, b.ids.pad) for s in seqs])
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]
    with torch.no_grad():
        out_p, out_u = model(**packed), model(**unpacked)
    assert out_p["num_text"] == out_u["num_text"] > 0 and out_p["num_image"] == out_u["num_image"] > 0
    for key in ("loss", "loss_text", "loss_image"):
        torch.testing.assert_close(out_p[key], out_u[key], rtol=1e-5, atol=1e-5)
    assert torch.isclose(out_p["loss"], out_p["loss_text"] + out_p["loss_image"])

    if attn == "eager":
        return
    # the same holds for the gradients the optimizer sees
    grads = []
    for batch in (packed, unpacked):
        model.zero_grad()
        model(**batch)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.trainable_parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_no_attention_crosses_samples(parts):
    tower, tok = parts
    torch.manual_seed(0)
    b = SequenceBuilder(tok, code_depth=4)
    model = UnifiedLM(get_lm_config("tiny"), tower, b.ids).eval()
    rng = np.random.default_rng(3)
    a = b.build(CaptionSample(rng.integers(0, 256, size=(8, 8, 4)), "a photo of a red circle"))
    c = b.build(GenerationSample("a blue square moving right", rng.integers(0, 256, size=(8, 8, 4))))
    L = len(a) + len(c) + 5

    # sample A changed: one text token and one visual position's codes
    a2 = BuiltSequence(a.input_ids.copy(), a.labels.copy(), a.codes.copy(), a.is_visual.copy())
    text_pos = len(a) - 3
    a2.input_ids[text_pos] = (a2.input_ids[text_pos] + 1) % 200 + 3
    vis_pos = int(np.flatnonzero(a.is_visual)[5])
    a2.codes[vis_pos] = (a2.codes[vis_pos] + 7) % 256

    def hidden(first):
        batch = collate_rows([fill_row([first, c], L, 4, b.ids.pad)])
        with torch.no_grad():
            return model.hidden_states(batch["input_ids"], batch["codes"], batch["is_visual"],
                                       batch["position_ids"], batch["segment_ids"])[0]

    h1, h2 = hidden(a), hidden(a2)
    in_a, in_c = slice(0, len(a)), slice(len(a), len(a) + len(c))
    assert (h1[in_a] - h2[in_a]).abs().max() > 1e-3  # the change is visible inside A
    torch.testing.assert_close(h1[in_c], h2[in_c], rtol=0, atol=1e-6)  # and invisible to C
    # C's logits are exactly those of C alone in a row
    alone = collate_rows([pad_to_row(c, L, 4, b.ids.pad)])
    with torch.no_grad():
        h_alone = model.hidden_states(alone["input_ids"], alone["codes"], alone["is_visual"],
                                      alone["position_ids"], alone["segment_ids"])[0, : len(c)]
    head = model.llm.get_output_embeddings()
    torch.testing.assert_close(head(h1[in_c]), head(h_alone), rtol=1e-5, atol=1e-5)


def test_boundaries_from_position_ids_match_the_segment_mask(parts):
    """The path used with flash attention (rows laid end to end, sample boundaries read from the
    restarting position_ids, no dense mask) gives the same hidden states as the block-diagonal mask.
    Flash attention needs a GPU; on CPU, transformers' SDPA takes the same position-id boundaries."""
    tower, tok = parts
    torch.manual_seed(0)
    b = SequenceBuilder(tok, code_depth=4)
    model = UnifiedLM(get_lm_config("tiny"), tower, b.ids).eval()
    seqs = mixed_sequences(b, np.random.default_rng(4))
    batch = collate_rows(pack_sequences(seqs, seq_len=1024, code_depth=4, pad_id=b.ids.pad))
    assert batch["input_ids"].shape[0] >= 2
    args = (batch["input_ids"], batch["codes"], batch["is_visual"], batch["position_ids"], batch["segment_ids"])
    with torch.no_grad():
        with_mask = model.hidden_states(*args)
        model.boundaries_from_positions = lambda: True
        from_positions = model.hidden_states(*args)
    real = batch["segment_ids"] > 0
    torch.testing.assert_close(from_positions[real], with_mask[real], rtol=1e-5, atol=1e-5)
