"""Share of real (non-pad) tokens: packing several samples per row vs padding each batch to its longest.

The length distribution imitates the stage-2 mix (DESIGN.md section 2) at the paper's 256 px tower
(16x16 grid: an image block is 256 visual positions + 2 markers) and max length 8192:

    caption pair   [image, text]   BOS + 258 + ~30 text + EOS
    generation     [text, image]   BOS + ~30 text + 258 + EOS
    video          [text, video]   BOS + ~20 text + 8 x 256 + 2 + EOS   (~2072)
    interleaved    MMC4 document   0-6 images + a long text (log-normal, median ~800), cut at 8192
    conversation   ShareGPT4V      258 + system/template ~40 + a few turns (log-normal, median ~350)

Run:  python benchmarks/bench_packing.py [--samples 20000] [--seq-len 8192] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import time

import numpy as np

from vilau_model.sequence import BuiltSequence, StreamingPacker, pack_sequences

IMAGE = 256 + 2
MIX = {"caption": 0.40, "generation": 0.25, "video": 0.10, "interleaved": 0.15, "conversation": 0.10}


def sample_lengths(n: int, seq_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    kinds = rng.choice(len(MIX), size=n, p=list(MIX.values()))
    lengths = np.empty(n, dtype=np.int64)
    for i, k in enumerate(kinds):
        kind = list(MIX)[k]
        if kind in ("caption", "generation"):
            lengths[i] = 2 + IMAGE + int(np.clip(rng.normal(30, 12), 5, 80))
        elif kind == "video":
            lengths[i] = 2 + 8 * 256 + 2 + int(np.clip(rng.normal(20, 8), 5, 60))
        elif kind == "interleaved":
            images = int(rng.integers(0, 7))
            text = int(rng.lognormal(np.log(800), 0.8))
            lengths[i] = 2 + images * IMAGE + text
        else:
            lengths[i] = 2 + IMAGE + 40 + int(rng.lognormal(np.log(350), 0.6))
    return np.minimum(lengths, seq_len), kinds  # the builder cuts over-long samples to the row length


def padded_share(lengths: np.ndarray, batch_size: int) -> float:
    """Batches in arrival order, each padded to its longest sample."""
    real = padded = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        real += batch.sum()
        padded += batch.max() * len(batch)
    return real / padded


def default_open_rows() -> int:
    """The open rows the data plane's packer (vilau_model.sequence.pack_sequences) keeps."""
    import inspect

    return inspect.signature(pack_sequences).parameters["max_open_rows"].default


def packed_share(lengths: np.ndarray, seq_len: int, max_open_rows: int, chunk: int | None = None) -> tuple[float, int, float]:
    """The real StreamingPacker (rows are materialised, as the data plane does). Returns share, rows, s.

    chunk: flush every `chunk` samples, as a packer that lives inside one Ray Data batch would.
    """
    packer = StreamingPacker(seq_len=seq_len, code_depth=4, pad_id=0, max_open_rows=max_open_rows)
    start = time.perf_counter()
    for i, n in enumerate(lengths):
        n = int(n)
        packer.add(BuiltSequence(np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros((n, 4), np.int16), np.zeros(n, bool)))
        if chunk and (i + 1) % chunk == 0:
            packer.flush()
    packer.flush()
    elapsed = time.perf_counter() - start
    s = packer.stats
    return s["tokens"] / (s["tokens"] + s["pad_tokens"]), s["rows"], elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", help="append a dated markdown section to this file")
    args = parser.parse_args()

    lengths, kinds = sample_lengths(args.samples, args.seq_len, np.random.default_rng(args.seed))
    lines = [
        f"{args.samples} samples, mean length {lengths.mean():.0f}, median {np.median(lengths):.0f}, "
        f"max {lengths.max()}, row length {args.seq_len}",
        "mix: " + ", ".join(f"{k} {np.mean(kinds == i):.0%}" for i, k in enumerate(MIX)),
        "",
        "| layout | non-pad share |",
        "| --- | --- |",
    ]
    for b in (4, 8, 16, 32):
        lines.append(f"| pad each batch of {b} to its longest sample | {padded_share(lengths, b):.3f} |")
    lines.append(f"| pad every sample to {args.seq_len} | {lengths.sum() / (len(lengths) * args.seq_len):.3f} |")
    for open_rows in (1, 8, 64):
        share, rows, elapsed = packed_share(lengths, args.seq_len, open_rows)
        lines.append(
            f"| packed, best fit over {open_rows} open row(s) | **{share:.3f}** "
            f"({rows} rows, {len(lengths) / elapsed:,.0f} samples/s) |"
        )
    for chunk in (256, 1024, 4096):
        share, rows, elapsed = packed_share(lengths, args.seq_len, 8, chunk)
        lines.append(f"| packed over 8 open rows, flushed every {chunk} samples | {share:.3f} ({rows} rows) |")
    # What the tokenization pool does with the default config: pack each data.pack_window samples.
    from orchestration.config import DataSection

    window, open_rows = DataSection().pack_window, default_open_rows()
    default_share, _, _ = packed_share(lengths, args.seq_len, open_rows, window)
    lines.append(f"| default config: data.pack_window={window}, {open_rows} open rows | **{default_share:.3f}** |")
    report = "\n".join(lines)
    print(report)
    if args.results:
        with open(args.results, "a") as f:
            f.write(f"\n## bench_packing ({datetime.date.today().isoformat()}, machine: 2-core CPU)\n\n")
            f.write("`python benchmarks/bench_packing.py` (goal: packed >= 0.98)\n\n" + report + "\n")
    print(f"RESULT packed_share_default={default_share:.4f}")


if __name__ == "__main__":
    main()
