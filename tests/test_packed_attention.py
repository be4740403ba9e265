"""model.attention: the FlexAttention path over packed rows equals the dense-mask path, and its block
mask visits exactly the tiles where some query may see some key (vilau_model/packed_attention.py).

torch 2.14 has no FlexAttention backward on CPU and its compiled CPU kernel cannot differentiate: the
model test runs FlexAttention's eager reference (the device check lifted), which takes the same BlockMask
and mask rule but evaluates the rule on every element. That the kernel skips exactly the right tiles is
the separate tile-table test; the compiled CPU kernel's forward is checked against the dense path by
benchmarks/bench_attention.py (a compile costs ~100 s here: too slow for the suite).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

from orchestration.config import ConfigError, load_config
from vilau_model import packed_attention
from vilau_model.config import get_lm_config
from vilau_model.packed_attention import segment_block_mask
from vilau_model.unified_lm import UnifiedLM, segment_attention_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def segment_rows(layouts: list[list[int]], length: int) -> torch.Tensor:
    """[B, length] segment ids: row b holds samples of the given lengths, then padding (id 0)."""
    rows = []
    for lengths in layouts:
        ids = torch.repeat_interleave(torch.arange(1, len(lengths) + 1), torch.tensor(lengths))
        rows.append(torch.cat([ids, ids.new_zeros(length - len(ids))]))
    return torch.stack(rows)


@pytest.mark.parametrize("tile", [16, 128])
def test_block_mask_visits_exactly_the_tiles_with_an_allowed_pair(tile):
    # Samples shorter and longer than a tile, one ending on a tile border, padding, L not a tile multiple.
    segments = segment_rows([[5, 40, 16, 100, 1, 30], [200], [16, 16, 16, 16, 64, 63]], 203)
    L = segments.shape[1]
    tiles = -(-L // tile)
    allowed = torch.zeros(segments.shape[0], tiles * tile, tiles * tile, dtype=torch.bool)
    allowed[:, :L, :L] = segment_attention_mask(segments)[:, 0]
    per_tile = allowed.view(-1, tiles, tile, tiles, tile).transpose(2, 3).flatten(-2)  # [B, q tile, k tile, tile^2]
    real = torch.zeros(tiles * tile, dtype=torch.bool)
    real[:L] = True
    real_pairs = (real.view(tiles, 1, tile, 1) & real.view(1, tiles, 1, tile)).flatten(-2)
    expect_any = per_tile.any(-1)
    expect_full = (per_tile | ~real_pairs).all(-1) & expect_any & real_pairs.all(-1)

    mask = segment_block_mask(segments, tile=tile)

    def dense(num, idx):
        out = torch.zeros(segments.shape[0], tiles, tiles, dtype=torch.bool)
        for b in range(segments.shape[0]):
            for q in range(tiles):
                out[b, q, idx[b, 0, q, : num[b, 0, q]].long()] = True
        return out

    partial = dense(mask.kv_num_blocks, mask.kv_indices)
    full = dense(mask.full_kv_num_blocks, mask.full_kv_indices)
    assert not (partial & full).any()
    assert torch.equal(partial | full, expect_any)  # no tile with an allowed pair skipped, none without visited
    assert torch.equal(full, expect_full)  # "full" (no per-element rule) only where every pair is allowed
    if tile == 16:  # both kinds of tile occur, and whole tiles are skipped
        assert full.any() and expect_any.sum() < tiles * (tiles + 1) // 2 * segments.shape[0]


@pytest.fixture
def flex_with_cpu_backward(monkeypatch):
    """FlexAttention's eager reference, which differentiates on CPU once torch's device check is lifted."""
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *tensors: None)
    monkeypatch.setattr(packed_attention, "_compiled_flex", lambda: torch_flex.flex_attention)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_path_equals_the_dense_mask_path_in_values_and_gradients(tiny_tower, flex_with_cpu_backward):
    # A tiny LLaMA with grouped-query attention; rows of different sample lengths and padding.
    base = get_lm_config("tiny", num_kv_heads=2)
    torch.manual_seed(0)
    dense = UnifiedLM(dataclasses.replace(base, attention="sdpa_dense"), tiny_tower)
    flex = UnifiedLM(dataclasses.replace(base, attention="flex"), tiny_tower)
    flex.load_state_dict(dense.state_dict())
    assert flex.llm.config._attn_implementation == packed_attention.FLEX_IMPLEMENTATION

    L = 150
    segments = segment_rows([[30, 7, 90], [1, 140], [150]], L)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(3, base.vocab_size, size=segments.shape))
    codes = torch.from_numpy(rng.integers(0, tiny_tower.config.codebook_size, size=(*segments.shape, tiny_tower.config.code_depth)))
    is_visual = torch.from_numpy(rng.random(segments.shape) < 0.4) & (segments > 0)
    positions = torch.zeros_like(segments)
    for b in range(segments.shape[0]):  # positions restart at every sample
        for s in segments[b].unique():
            where = segments[b] == s
            positions[b, where] = torch.arange(int(where.sum()))
    labels = torch.where(segments > 0, ids, -100)
    batch = dict(input_ids=ids, labels=labels, codes=codes, is_visual=is_visual, position_ids=positions, segment_ids=segments)

    outputs, grads = [], []
    for model in (dense, flex):
        model.train()
        out = model(**batch)
        out["loss"].backward()
        outputs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert outputs[0]["num_image"] > 0 and outputs[0]["num_text"] > 0
    for key in ("loss_text", "loss_image"):
        torch.testing.assert_close(outputs[1][key], outputs[0][key], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)

    # Hidden states of real positions agree too (padding is no sample's output).
    with torch.no_grad():
        args = (ids, codes, is_visual, positions, segments)
        h_dense, h_flex = dense.hidden_states(*args), flex.hidden_states(*args)
    torch.testing.assert_close(h_flex[segments > 0], h_dense[segments > 0], rtol=1e-5, atol=1e-5)


def test_flex_model_generates_through_sdpa_masks(tiny_tower):
    """A model trained with flex keeps transformers' own masks (2-d padding + KV cache) in generation:
    the registered attention routes everything that is not a BlockMask to SDPA."""
    torch.manual_seed(0)
    dense = UnifiedLM(get_lm_config("tiny"), tiny_tower).eval()
    flex = UnifiedLM(get_lm_config("tiny", attention="flex"), tiny_tower).eval()
    flex.load_state_dict(dense.state_dict())
    ids = torch.randint(3, 200, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as generation pads prompts
    with torch.no_grad():
        a = dense.llm(input_ids=ids, attention_mask=mask, use_cache=True).logits
        b = flex.llm(input_ids=ids, attention_mask=mask, use_cache=True).logits
    torch.testing.assert_close(b, a)


def test_attention_choice_is_validated_before_anything_runs():
    assert load_config(None).model.attention == "sdpa_dense"
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=flex"])  # the tiny default trains on CPU
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(None, ["model.attention=dense"])
    config = load_config(None, ["model.attention=flex", "cluster.use_gpu=true"])
    assert config.model.lm_overrides()["attention"] == "flex"
    if packed_attention.importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="flash_varlen"):
            packed_attention.llm_attn_implementation("flash_varlen", "sdpa")
