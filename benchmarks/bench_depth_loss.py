"""Peak memory of the depth-head cross-entropy: all positions at once vs chunks of positions.

At vilau-384 code shapes (D=16 depths, 16384 codes) the teacher-forced depth logits of N visual positions
are [N, 16, 16384]: 1 GiB per 1024 positions in fp32, and the softmax and its gradient add as much again,
each. The chunked loss (`vilau_model.depth_transformer.depth_cross_entropy_sum`) holds one chunk's logits
at a time and recomputes the chunk in the backward pass. The LLM and depth hidden sizes are cut here (they
scale the FLOPs, not the logits) to fit a small machine.

Each variant (forward + backward) runs in a fresh subprocess with the same seed; its extra memory is its
peak RSS (VmHWM, reset just before the call) minus the RSS just before the call (model and inputs
already allocated).

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
    parser.add_argument("--variant", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_child(args)))
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
    print(f"RESULT depth_ce_memory_ratio={full['extra_bytes'] / chunked['extra_bytes']:.2f}")


if __name__ == "__main__":
    main()
