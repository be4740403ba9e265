"""Peak memory and time of one nearest-code search: chunked vs the naive full distance matrix.

The paper shape is 131072 vectors (512 images x 16x16 grid) against 16384 codes. A naive search makes
the whole [N, K] score matrix (8 GiB in fp32, whatever the dimension); the chunked one holds one
[chunk, K] block at a time. The dimension (1024 in the paper) only scales the inputs and the FLOPs, so
it is cut here to fit a small machine.

Each variant runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own; the extra memory
is that peak minus the RSS just before the call (inputs already allocated). Also reported: one full
ResidualQuantizer training step (D=4 depths, EMA update, restarts) with the chunked search.

    python benchmarks/bench_quantizer.py [--dim 64] [--vectors 131072] [--codes 16384] [--chunk 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(variant: str, n: int, k: int, dim: int, chunk: int, threads: int) -> dict:
    import torch

    from vilau_model.quantizer import ResidualQuantizer, nearest_codes

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    codebook = torch.randn(k, dim, generator=g)
    if variant == "rq_step":
        rq = ResidualQuantizer(dim, k, depth=4, chunk_size=chunk).train()
        call = lambda: rq(x)  # noqa: E731
    else:
        size = chunk if variant == "chunked" else None
        nearest_codes(x[:1024], codebook, size)  # warm up kernels outside the measurement
        call = lambda: nearest_codes(x, codebook, size)  # noqa: E731
    before = _rss_bytes()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "seconds": seconds, "extra_bytes": max(peak - before, 0)}


def _run(variant: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--dim", str(args.dim), "--vectors", str(args.vectors),
           "--codes", str(args.codes), "--chunk", str(args.chunk), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--vectors", type=int, default=131072)
    p.add_argument("--codes", type=int, default=16384)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.vectors, args.codes, args.dim, args.chunk, args.threads)))
        return

    naive_matrix = args.vectors * args.codes * 4
    need = naive_matrix * 1.2 + args.vectors * args.dim * 4 * 2
    if _available_bytes() < need:
        sys.exit(f"naive baseline needs ~{need / 2**30:.1f} GiB; only {_available_bytes() / 2**30:.1f} GiB available")

    gib = 2**30
    print(f"machine: {platform.machine()} {os.cpu_count()}-core CPU, torch threads {args.threads}")
    print(f"shape: {args.vectors} vectors x {args.codes} codes x dim {args.dim} (fp32), chunk {args.chunk}")
    print(f"naive [N, K] score matrix alone: {naive_matrix / gib:.2f} GiB; "
          f"one chunk: {args.chunk * args.codes * 4 / gib:.3f} GiB")
    results = {v: _run(v, args) for v in ("chunked", "naive", "rq_step")}
    for v, r in results.items():
        label = {"chunked": "chunked search", "naive": "naive search", "rq_step": "RQ train step, D=4, chunked"}[v]
        print(f"{label:30s} time {r['seconds']:7.2f} s   extra peak memory {r['extra_bytes'] / gib:7.3f} GiB")
    c, n = results["chunked"], results["naive"]
    print(f"naive / chunked: memory x{n['extra_bytes'] / max(c['extra_bytes'], 1):.1f}, "
          f"time x{n['seconds'] / c['seconds']:.2f}")
    print(f"RESULT quantizer_memory_ratio={n['extra_bytes'] / max(c['extra_bytes'], 1):.2f}")


if __name__ == "__main__":
    main()
