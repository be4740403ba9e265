"""Peak memory of the depth-head cross-entropy: all positions at once vs chunks of positions.

At vilau-384 code shapes (D=16 depths, 16384 codes) the teacher-forced depth logits of N visual positions
are [N, 16, 16384]: 1 GiB per 1024 positions in fp32, and the softmax and its gradient add as much again,
each. The chunked loss (`vilau_model.depth_transformer.depth_cross_entropy_sum`) holds one chunk's logits
at a time and recomputes the chunk in the backward pass. The LLM and depth hidden sizes are cut here (they
scale the FLOPs, not the logits) to fit a small machine.

Each variant (forward + backward) runs in a fresh subprocess with the same seed; its extra memory is its
peak RSS (VmHWM, reset just before the call) minus the RSS just before the call (model and inputs
already allocated).

Then the FSDP2 all-gathers of one micro-batch (forward + backward, a fake process group of 8 ranks in a
subprocess, `--gather-positions` visual positions): the depth transformer as one unit whose loss runs all
chunks in one module call (stage 2's layout, `orchestration.train.lm.lm_units`) vs the previous layout
(each depth block its own unit, the module called once per chunk: every chunk re-gathers every block in
forward and again in its backward recompute, and reduce-scatters per chunk).

    python benchmarks/bench_depth_loss.py [--positions 2048] [--depth 16] [--codes 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

GIB = 1024**3


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _child(args) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from vilau_model.depth_transformer import DepthTransformer, depth_cross_entropy_sum

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    depth = DepthTransformer(
        llm_hidden_size=args.llm_hidden, code_width=args.code_width, code_depth=args.depth,
        codebook_size=args.codes, hidden_size=args.depth_hidden, layers=args.depth_layers, heads=args.depth_heads,
    )
    codebook = torch.randn(args.codes, args.code_width) * 0.1
    h = torch.randn(args.positions, args.llm_hidden, requires_grad=True)
    codes = torch.randint(0, args.codes, (args.positions, args.depth))
    chunk = None if args.variant == "full" else args.chunk_logits

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    loss = depth_cross_entropy_sum(depth, h, codes, lambda c: codebook[c], max_logits_per_chunk=chunk)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    grad_norm = float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in depth.parameters()])))
    return {
        "variant": args.variant,
        "extra_bytes": peak - before,
        "seconds": seconds,
        "mean_loss": float(loss) / (args.positions * args.depth),
        "grad_norm": grad_norm,
        "h_grad_norm": float(h.grad.norm()),
    }


def _gathers_child(args) -> dict:
    """All-gathers and reduce-scatters of the depth parameters in one forward + backward, per layout."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.utils.checkpoint import checkpoint

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from orchestration.train.fsdp import count_fsdp_collectives
    from vilau_model.depth_transformer import DepthTransformer

    torch.set_num_threads(args.threads)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    mesh = init_device_mesh("cpu", (8,))
    torch.manual_seed(0)
    root = nn.Module()  # stands for the UnifiedLM root unit
    root.depth = DepthTransformer(
        llm_hidden_size=args.llm_hidden, code_width=args.code_width, code_depth=args.depth,
        codebook_size=args.codes, hidden_size=args.depth_hidden, layers=args.depth_layers, heads=args.depth_heads,
    )
    depth = root.depth
    if args.variant == "gathers_per_chunk":
        for block in depth.blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(depth, mesh=mesh, reshard_after_forward=False)  # listed last by lm_units: kept for backward
    fully_shard(root, mesh=mesh)
    codebook = torch.randn(args.codes, args.code_width) * 0.1
    n = args.gather_positions
    h = torch.randn(n, args.llm_hidden, requires_grad=True)
    codes = torch.randint(0, args.codes, (n, args.depth))
    per_chunk = max(1, args.chunk_logits // (args.depth * args.codes))

    def chunk_ce(h_part, codes_part):  # the previous layout: one module call per chunk
        logits = depth(h_part, codebook[codes_part][:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, args.codes), codes_part.reshape(-1), reduction="sum")

    with count_fsdp_collectives() as counts:
        if args.variant == "gathers_per_chunk":
            loss = sum(checkpoint(chunk_ce, h[i:i + per_chunk], codes[i:i + per_chunk], use_reentrant=False)
                       for i in range(0, n, per_chunk))
        else:
            loss = depth(h, target_codes=codes, code_vectors=lambda c: codebook[c],
                         max_logits_per_chunk=args.chunk_logits)
        loss.backward()
    dist.destroy_process_group()
    return {"chunks": -(-n // per_chunk),
            **{kind: sum(c.values()) for kind, c in counts.items()}}  # the root holds no parameter here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--codes", type=int, default=16384)
    parser.add_argument("--code-width", type=int, default=1152)  # SigLIP-SO400M's width, the code dimension
    parser.add_argument("--llm-hidden", type=int, default=512)  # 4096 in LLaMA-2-7B (cut)
    parser.add_argument("--depth-hidden", type=int, default=256)  # 1024 in vilau-7b (cut)
    parser.add_argument("--depth-layers", type=int, default=3)
    parser.add_argument("--depth-heads", type=int, default=4)
    parser.add_argument("--chunk-logits", type=int, default=2**25)  # the LMConfig default
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gather-positions", type=int, default=512)
    parser.add_argument("--variant", choices=["full", "chunked", "gathers_one_call", "gathers_per_chunk"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child = _gathers_child if args.variant.startswith("gathers") else _child
        print(json.dumps(child(args)))
        return

    rows = {}
    for variant in ("full", "chunked"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                             capture_output=True, text=True, check=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    full, chunked = rows["full"], rows["chunked"]
    logits_gib = args.positions * args.depth * args.codes * 4 / GIB
    per_chunk = max(1, args.chunk_logits // (args.depth * args.codes))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch threads {args.threads}")
    print(f"shapes: {args.positions} positions x D={args.depth} x {args.codes} codes "
          f"(fp32 logits {logits_gib:.2f} GiB); code width {args.code_width}, LLM hidden {args.llm_hidden}, "
          f"depth hidden {args.depth_hidden} x {args.depth_layers} layers; chunk = {per_chunk} positions")
    print("| variant | peak extra memory (GiB) | forward+backward (s) | mean CE | grad norm |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['extra_bytes'] / GIB:.3f} | {row['seconds']:.1f} | {row['mean_loss']:.7f} | "
              f"{row['grad_norm']:.6f} |")
    loss_diff = abs(full["mean_loss"] - chunked["mean_loss"])
    grad_rel = abs(full["grad_norm"] - chunked["grad_norm"]) / max(full["grad_norm"], 1e-12)
    print(f"|loss full - chunked| = {loss_diff:.2e} (goal <= 1e-5); relative grad-norm difference {grad_rel:.2e}")
    if loss_diff > 1e-5:
        print("WARNING: losses differ by more than 1e-5")

    gathers = {}
    for variant in ("gathers_one_call", "gathers_per_chunk"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                             capture_output=True, text=True, check=True)
        gathers[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    one, per = gathers["gathers_one_call"], gathers["gathers_per_chunk"]
    print(f"FSDP2, 8 fake ranks, one micro-batch of {args.gather_positions} visual positions ({one['chunks']} chunks), "
          f"depth-transformer collectives (forward + backward):")
    print(f"  one unit, one call for all chunks (stage 2 now): {one['all_gather']} all-gathers, "
          f"{one['reduce_scatter']} reduce-scatters")
    print(f"  a unit per block, one call per chunk (before):   {per['all_gather']} all-gathers, "
          f"{per['reduce_scatter']} reduce-scatters")
    print(f"RESULT depth_ce_memory_ratio={full['extra_bytes'] / chunked['extra_bytes']:.2f}")
    print(f"RESULT depth_all_gathers_per_micro_batch={one['all_gather']}")
    print(f"RESULT depth_all_gathers_per_micro_batch_before={per['all_gather']}")


if __name__ == "__main__":
    main()
