"""Attention over packed rows: the dense [B,1,L,L] mask through SDPA vs FlexAttention with a block mask.

One attention layer (LLaMA shapes cut in heads: head dim 128) over a packed row of L tokens made of
`--samples` samples of random lengths plus end padding, as the stage-2 loader packs them. The dense path
(`model.attention: sdpa_dense`) does the full L^2 work whatever the samples; the flex path
(`model.attention: flex`, `vilau_model.packed_attention`) visits only the 128 x 128 tiles inside one
sample. Both are timed in the same run on the same inputs, forward only: torch 2.14 has no FlexAttention
backward on CPU (on GPU both run forward and backward). The block mask is built once per row and
serves every layer: its build time is charged per layer as build / `--layers` (LLaMA-2-7B: 32).

    python benchmarks/bench_attention.py [--seq 8192] [--samples 32] [--heads 4] [--head-dim 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vilau_model.packed_attention import _compiled_flex, segment_block_mask  # noqa: E402
from vilau_model.unified_lm import segment_attention_mask  # noqa: E402


def packed_row(seq: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """segment_ids [1, seq]: `samples` samples of random lengths filling ~97% of the row, then padding."""
    weights = torch.rand(samples, generator=generator) + 0.5
    lengths = (weights / weights.sum() * seq * 0.97).long().clamp(min=1)
    ids = torch.repeat_interleave(torch.arange(1, samples + 1), lengths)
    return torch.cat([ids, ids.new_zeros(seq - len(ids))])[None]


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32, help="layers sharing one block mask (LLaMA-2-7B: 32)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    segment_ids = packed_row(args.seq, args.samples, generator)
    q, k, v = (torch.randn(1, args.heads, args.seq, args.head_dim, generator=generator) for _ in range(3))
    print(f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"row L={args.seq}, {args.samples} samples + {(segment_ids == 0).sum().item()} padding, "
          f"{args.heads} heads x {args.head_dim}")

    with torch.no_grad():
        dense_mask_s, dense_mask = timed(lambda: segment_attention_mask(segment_ids), args.repeats)
        dense_s, dense_out = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask), args.repeats)
        block_mask_s, block_mask = timed(lambda: segment_block_mask(segment_ids), args.repeats)
        start = time.perf_counter()
        _compiled_flex()(q, k, v, block_mask=block_mask)  # compiles once per process
        compile_s = time.perf_counter() - start
        flex_s, flex_out = timed(lambda: _compiled_flex()(q, k, v, block_mask=block_mask), args.repeats)

    # Compare only real positions (padding attends to itself on both paths, but it is no sample's output).
    real = (segment_ids[0] > 0)
    max_diff = (flex_out - dense_out)[:, :, real].abs().max().item()
    visited = (block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()).item()
    tiles = block_mask.kv_indices.shape[-1]
    dense_per_layer = dense_s + dense_mask_s / args.layers
    flex_per_layer = flex_s + block_mask_s / args.layers
    print(f"dense mask build {dense_mask_s * 1e3:.1f} ms ({dense_mask.numel() / 2**20:.0f} Mi booleans), "
          f"SDPA forward {dense_s * 1e3:.1f} ms")
    print(f"block mask build {block_mask_s * 1e3:.1f} ms ({visited} of {tiles * (tiles + 1) // 2} causal tiles visited), "
          f"flex forward {flex_s * 1e3:.1f} ms (compile {compile_s:.1f} s, once)")
    print(f"per layer (mask build / {args.layers} layers): dense {dense_per_layer * 1e3:.1f} ms, "
          f"flex {flex_per_layer * 1e3:.1f} ms; max |flex - dense| over real positions {max_diff:.2e}")
    equal = max_diff < 1e-4
    print(f"RESULT packed_attention_speedup={dense_per_layer / flex_per_layer:.2f}")
    print(f"RESULT packed_attention_outputs_equal={int(equal)}")
    if not equal:
        sys.exit(f"outputs differ: max |flex - dense| = {max_diff:.3e}")


if __name__ == "__main__":
    main()
