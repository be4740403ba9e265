"""Attention over packed rows without an [L, L] mask: a FlexAttention block mask from segment ids.

A packed row holds many samples (`segment_ids` 1, 2, ... per sample, 0 for padding); a query sees the
keys of its own segment up to itself. The dense path (`unified_lm.segment_attention_mask`) spells this
out as a [B, 1, L, L] boolean mask: every row pays the full L^2 work however short its samples, and the
flash kernel is ruled out. Here the same rule is a FlexAttention `BlockMask`: per tile of 128 queries,
the list of 128-key tiles it may touch, split into *full* tiles (one segment on both sides, strictly
below the diagonal: no mask to evaluate) and *partial* ones (the diagonal, segment borders: the mask
rule is evaluated per element). Tiles of other samples are never visited, so a row of 32 samples costs
about 1/32 of the dense work. Only per-tile tables are built ([B, L/128, L/128]), never [L, L].

`model.attention` (`LMConfig.attention`) chooses the path:
    sdpa_dense    the dense boolean mask through SDPA (any device; the tiny default on CPU)
    flex          this file: FlexAttention with the block mask (GPU training; on CPU torch 2.14 runs
                  FlexAttention forward only, it has no CPU backward)
    flash_varlen  flash-attn's varlen kernel, sample boundaries from the restarting position_ids
                  (needs the `flash-attn` package: the `gpu` extra)

The LLM (transformers LLaMA) calls attention through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`:
`FLEX_IMPLEMENTATION` is registered there and routes a `BlockMask` to FlexAttention and any other mask
(generation's padding masks, with a KV cache) to SDPA, so a model trained with flex generates as before.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION_CHOICES = ("sdpa_dense", "flex", "flash_varlen")
FLEX_IMPLEMENTATION = "vilau_flex"  # the transformers attention name registered below
TILE = 128  # FlexAttention's default sparse block size


def segment_block_mask(segment_ids: torch.Tensor, tile: int = TILE) -> BlockMask:
    """The block-diagonal causal rule of packed rows as a FlexAttention BlockMask [B, 1, L, L].

    segment_ids: [B, L] (equal ids = one sample; padding, id 0, attends within itself as on the dense
    path). Which tiles to visit comes from per-tile segment sets (one-hot [B, tiles, segments]), exact
    for any layout of ids; the per-element rule (same segment, key <= query) runs on partial tiles only.
    """
    B, L = segment_ids.shape
    device = segment_ids.device
    tiles = -(-L // tile)
    seg = segment_ids.long()
    # Past L (the kernels pad to whole tiles) ids are -1: in range for the lookup, equal to no real id.
    padded = torch.full((B, tiles * tile), -1, dtype=torch.long, device=device)
    padded[:, :L] = seg
    present = torch.zeros(B, tiles, int(seg.max()) + 2, dtype=torch.float32, device=device)
    present.scatter_(2, (padded + 1).view(B, tiles, tile), 1.0)  # column 0 = "beyond L"
    present[:, :, 0] = 0.0
    shared = present @ present.transpose(1, 2) > 0  # [B, q tile, k tile]: some segment on both sides
    q_tile = torch.arange(tiles, device=device)
    below = q_tile[None, :, None] > q_tile[None, None, :]
    diagonal = q_tile[None, :, None] == q_tile[None, None, :]
    # A tile holds one segment and no position past L: then every query sees every key of an earlier
    # tile of the same segment (full); otherwise the element rule decides (partial).
    single = (present.sum(-1) == 1) & (padded.view(B, tiles, tile) >= 0).all(-1)
    same_single = single[:, :, None] & single[:, None, :] & (present.argmax(-1)[:, :, None] == present.argmax(-1)[:, None, :])
    full = shared & below & same_single
    partial = shared & (below | diagonal) & ~full

    def tables(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = blocks.sum(-1, dtype=torch.int32)
        order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[:, None], order[:, None]  # one head dimension: the same mask for every head

    def same_segment_causal(b, h, q_idx, kv_idx):
        return (padded[b, q_idx] == padded[b, kv_idx]) & (kv_idx <= q_idx)

    kv_num, kv_idx = tables(partial)
    full_num, full_idx = tables(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile,
                                    mask_mod=same_segment_causal, seq_lengths=(L, L))


@functools.cache
def _compiled_flex():
    # FlexAttention is only fast compiled (eager runs a dense reference); one compile per process.
    return torch.compile(flex_attention, dynamic=False)


def flex_or_sdpa_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: FlexAttention for a BlockMask, SDPA for anything else.
    query [B, H, L, d], key/value [B, H_kv, L, d] -> ([B, L, H, d], None)."""
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("model.attention=flex: attention dropout is not supported")
    out = _compiled_flex()(query, key, value, block_mask=attention_mask, scale=scaling,
                           enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(FLEX_IMPLEMENTATION, flex_or_sdpa_forward)
# Masks transformers builds itself (generation: 2-d padding masks, KV cache) are SDPA's.
ALL_MASK_ATTENTION_FUNCTIONS.register(FLEX_IMPLEMENTATION, sdpa_mask)


def llm_attn_implementation(attention: str, dense_implementation: str) -> str:
    """The transformers `attn_implementation` for `model.attention` (`dense_implementation`, "sdpa" or
    "eager", serves sdpa_dense)."""
    if attention == "sdpa_dense":
        return dense_implementation
    if attention == "flex":
        return FLEX_IMPLEMENTATION
    if attention == "flash_varlen":
        if importlib.util.find_spec("flash_attn") is None:
            raise ImportError("model.attention=flash_varlen needs the flash-attn package (pip install '.[gpu]', "
                              "CUDA only); use flex or sdpa_dense otherwise")
        return "flash_attention_2"
    raise ValueError(f"model.attention={attention!r}: expected one of {ATTENTION_CHOICES}")
