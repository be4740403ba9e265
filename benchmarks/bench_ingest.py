"""Ingest throughput of the data plane, each workload against its baseline in the same run.

1. Stage 1: samples/s of `build_tower_dataset` (Ray Data: one read task per shard, decode + resize
   as CPU map_batches; the captions tokenized by the consumer, as the trainer's reader thread does) vs a torch DataLoader with 2 workers doing the same
   decode + resize + tokenize (the same functions: decode.decode_image, tower_data.tokenize_captions)
   on the same parquet shards. Two DataLoader variants: the usual one (per-sample work, default
   collate) and one whose workers work on whole batches as the Ray UDF does. Two shard sets: the
   synthetic writer's 64 px JPEGs, and 512 px JPEGs (closer to a crawl's images).
2. Stage 2: the tokenization actor pool with 1 vs 2 actors (decode, tower encode, sequence building,
   packing): rows/s over the whole pass, and after the first row (without the pool's start-up).
3. Re-encoding every pass (the pool on the fly, as the public VILA-U code re-encodes every step) vs
   reading the tokenized cache.

Every workload runs once to warm up, then in interleaved rounds (rotated each round), so that load from
other processes drifting over the run hits all alike; medians are printed, and ratios are medians of
ratios taken within one round. Rates are given for the whole pass and after the first batch (leaving
out start-up: worker processes, the pool's actors loading the tower, which long epochs amortize).
Run:

    python benchmarks/bench_ingest.py [--samples 8192] [--lm-samples 384] [--rounds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from orchestration.config import load_config
from orchestration.data import scenes
from orchestration.data.decode import SkipRecord, decode_image
from orchestration.data.pipeline import build_lm_dataset, build_tower_dataset, data_stats, torch_dtypes, with_text_tokens, write_lm_cache
from orchestration.data.records import list_shards
from orchestration.data.synthetic import jpeg_bytes, make_synthetic_dataset
from orchestration.data.tower_data import tokenize_captions, tower_config

BATCH = 32


# ---------------------------------------------------------------- shards


def write_large_jpeg_shards(out: str, samples: int, px: int, shard_size: int = 256) -> None:
    """img2dataset-style parquet (key, jpg, caption) with px x px scenes: bigger JPEGs to decode."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(7)
    for shard, start in enumerate(range(0, samples, shard_size)):
        rows = []
        for i in range(start, min(start + shard_size, samples)):
            pixels, caption, _ = scenes.render_scene(rng, px)
            rows.append({"key": f"{i:09d}", "jpg": jpeg_bytes(pixels), "caption": caption})
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(out, f"part-{shard:05d}.parquet"))


# ---------------------------------------------------------------- the DataLoader baseline


class ParquetShards(IterableDataset):
    """COYO parquet shards split across DataLoader workers; each worker streams its shards."""

    def __init__(self, files: list[str], tower, batched: bool):
        self.files, self.tower, self.batched = files, tower, batched

    def __iter__(self):
        info = get_worker_info()
        files = self.files[info.id :: info.num_workers] if info else self.files
        size = self.tower.image_size
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=BATCH, columns=["jpg", "caption"]):
                images, captions = batch.column(0).to_pylist(), batch.column(1).to_pylist()
                if self.batched:  # whole batches, as the Ray UDF works
                    pixels, kept = [], []
                    for image, caption in zip(images, captions):
                        try:
                            pixels.append(decode_image(image, size))
                            kept.append(caption)
                        except SkipRecord:
                            pass
                    if pixels:
                        yield {"pixels": torch.from_numpy(np.stack(pixels)), "text_tokens": torch.from_numpy(tokenize_captions(self.tower, kept))}
                    continue
                for image, caption in zip(images, captions):  # the usual map-per-sample loader
                    try:
                        pixels = decode_image(image, size)
                    except SkipRecord:
                        continue
                    yield {"pixels": torch.from_numpy(pixels), "text_tokens": torch.from_numpy(tokenize_captions(self.tower, [caption])[0])}


def count_batches(batches) -> tuple[int, float, int, float]:
    """(samples, seconds, samples after the first batch, their seconds): the second pair leaves out
    start-up (worker processes, the first tasks), which long epochs amortize."""
    start, samples, first = time.perf_counter(), 0, None
    for batch in batches:
        if first is None:
            first, first_samples = time.perf_counter(), len(batch["pixels"])
        samples += len(batch["pixels"])
    end = time.perf_counter()
    return samples, end - start, samples - first_samples, end - first


def run_dataloader(files, tower, batched: bool):
    loader = DataLoader(ParquetShards(files, tower, batched), batch_size=None if batched else BATCH, num_workers=2)
    return count_batches(loader)


def run_ray_tower(config):
    ds = build_tower_dataset(config, stats_group="bench-tower")  # planning counts: it is part of the pass
    tower, dtypes = tower_config(config), torch_dtypes("tower")
    # As the trainer consumes it: captions tokenized in this process, then tensors.
    batches = (with_text_tokens(tower, b) for b in ds.iter_batches(batch_size=BATCH, batch_format="numpy"))
    return count_batches({k: torch.as_tensor(b[k]).to(dt) for k, dt in dtypes.items()} for b in batches)


# ---------------------------------------------------------------- stage 2


def run_lm(config, group: str) -> tuple[int, int, float, int, float]:
    """One pass over build_lm_dataset: (samples, rows, seconds, rows after the first batch, their seconds)."""
    start, rows, first = time.perf_counter(), 0, None
    for batch in build_lm_dataset(config, stats_group=group).iter_batches(batch_size=4, batch_format="numpy"):
        if first is None:
            first, first_rows = time.perf_counter(), len(batch["input_ids"])
        rows += len(batch["input_ids"])
    end = time.perf_counter()
    return sum(data_stats(group)["samples"].values()), rows, end - start, rows - first_rows, end - first


# ---------------------------------------------------------------- measuring


def rounds(workloads: dict, n: int) -> dict[str, list]:
    """Every workload once to warm up (worker processes, imports), then ``n`` interleaved timed rounds."""
    names = list(workloads)
    for name in names:
        workloads[name]()
    out = {name: [] for name in names}
    for r in range(n):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out[name].append(workloads[name]())
    return out


def median_rate(results: list, count: int = 0, seconds: int = 1) -> float:
    return float(np.median([r[count] / r[seconds] for r in results]))


def paired_ratio(a: list, b: list, count: int = 0, seconds: int = 1) -> float:
    """Median over rounds of rate(a) / rate(b) measured in the same round."""
    return float(np.median([(x[count] / x[seconds]) / (y[count] / y[seconds]) for x, y in zip(a, b)]))


def stage1(lines: list[str], root: str, workdir: str, label: str, samples: int, n_rounds: int) -> float:
    """Appends the stage-1 table to ``lines``; returns Ray / per-sample DataLoader over a whole pass."""
    config = load_config(
        None, [f"data.root={root}", f"output_dir={workdir}/out", "data.tower_sources={coyo: {format: coyo_parquet, path: coyo/parquet}}"]
    )
    files = list_shards("coyo_parquet", config.resolve_path("coyo/parquet"), None)
    tower = tower_config(config)
    # Import and build the tokenizer here, so that forked DataLoader workers inherit it instead of
    # paying for it every epoch (Ray's task workers are reused and pay once): the baseline at its best.
    tokenize_captions(tower, ["warm up"])
    s1 = rounds(
        {
            "ray": lambda: run_ray_tower(config),
            "loader": lambda: run_dataloader(files, tower, batched=False),
            "loader_batched": lambda: run_dataloader(files, tower, batched=True),
        },
        n_rounds,
    )
    assert all(r[0] == samples for results in s1.values() for r in results), s1
    lines.append(f"\nstage 1, {label}: {samples} records in {len(files)} parquet shards -> {tower.image_size} px + tower tokenizer, batch {BATCH}")
    lines.append("| pipeline | samples/s, whole pass | samples/s after the first batch |\n| --- | --- | --- |")
    for name, label in (
        ("ray", "Ray Data build_tower_dataset + iter_torch_batches"),
        ("loader", "DataLoader, 2 workers, per sample + default collate"),
        ("loader_batched", "DataLoader, 2 workers, batched like the Ray UDF"),
    ):
        lines.append(f"| {label} | {median_rate(s1[name]):,.0f} | {median_rate(s1[name], 2, 3):,.0f} |")
    lines.append(
        f"\n**Ray / DataLoader, whole pass: {paired_ratio(s1['ray'], s1['loader']):.2f}x vs per-sample, "
        f"{paired_ratio(s1['ray'], s1['loader_batched']):.2f}x vs batched; after the first batch: "
        f"{paired_ratio(s1['ray'], s1['loader'], 2, 3):.2f}x, {paired_ratio(s1['ray'], s1['loader_batched'], 2, 3):.2f}x** (goal >= 1.3)"
    )
    return paired_ratio(s1['ray'], s1['loader'])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8192, help="COYO records for stage 1")
    parser.add_argument("--large-px", type=int, default=512, help="side of the large-JPEG stage-1 shards (0: skip)")
    parser.add_argument("--lm-samples", type=int, default=384, help="records per stage-2 format")
    parser.add_argument("--pack-window", type=int, default=64, help="samples per pool call (more calls to share)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per workload")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--num-cpus", type=int, default=8, help="Ray logical CPUs (oversubscribed on small machines)")
    args = parser.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_ingest-")
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    load_before = os.getloadavg()[0]
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Ray logical CPUs {args.num_cpus}; "
        f"median of {args.rounds} interleaved rounds after a warm-up round"
    ]

    # ---- stage 1
    small = os.path.join(workdir, f"stage1_{args.samples}")
    if not os.path.exists(os.path.join(small, "manifest.json")):
        make_synthetic_dataset(small, samples=args.samples, seed=0, eval_samples=8, shard_size=256, video_samples=4)
    ratio = stage1(lines, small, workdir, "64 px JPEGs (synthetic writer)", args.samples, args.rounds)
    if args.large_px:
        large = os.path.join(workdir, f"stage1_{args.samples}_{args.large_px}px")
        if not os.path.exists(os.path.join(large, "coyo", "parquet")):
            write_large_jpeg_shards(os.path.join(large, "coyo", "parquet"), args.samples, args.large_px)
        ratio = stage1(lines, large, workdir, f"{args.large_px} px JPEGs", args.samples, args.rounds)

    # ---- stage 2: 1 vs 2 actors, and re-encoding vs the cache
    stage2 = os.path.join(workdir, f"stage2_{args.lm_samples}")
    if not os.path.exists(os.path.join(stage2, "manifest.json")):
        make_synthetic_dataset(stage2, samples=args.lm_samples, seed=1, eval_samples=8, shard_size=32, video_samples=args.lm_samples // 4)
    base = [f"data.root={stage2}", f"output_dir={workdir}/out", "data.seq_len=1024", f"data.pack_window={args.pack_window}"]
    one = load_config(None, base + ["data.tokenizer_actors=1"])
    two = load_config(None, base + ["data.tokenizer_actors=2"])
    cache_dir = os.path.join(workdir, "cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    cached = load_config(None, base + [f"data.cache_dir={cache_dir}", "data.tokenizer_actors=2"])
    start = time.perf_counter()
    manifest = write_lm_cache(cached, force=True)
    write_s = time.perf_counter() - start
    unique = lambda: f"bench-{time.monotonic_ns()}"  # noqa: E731  (a fresh stats group per pass)
    s2 = rounds(
        {"one": lambda: run_lm(one, unique()), "two": lambda: run_lm(two, unique()), "cache": lambda: run_lm(cached, unique())},
        args.rounds,
    )
    assert {r[1] for rs in s2.values() for r in rs} == {manifest["rows"]}, (s2, manifest["rows"])
    samples = s2["one"][0][0]
    lines.append(
        f"\nstage 2: {args.lm_samples} records per format (COYO, MMC4, ShareGPT4V; {args.lm_samples // 4} OpenVid clips) "
        f"-> {samples} samples, {manifest['rows']} packed rows of 1024, {args.pack_window} samples per pool call; tiny tower, CPU actors"
    )
    lines.append("| rows from | samples/s | rows/s | rows/s after the first row |\n| --- | --- | --- | --- |")
    for name, label in (("one", "tokenization pool, 1 actor"), ("two", "tokenization pool, 2 actors")):
        lines.append(f"| {label} | {median_rate(s2[name], 0, 2):,.1f} | {median_rate(s2[name], 1, 2):,.2f} | {median_rate(s2[name], 3, 4):,.2f} |")
    lines.append(f"| the tokenized cache | - | {median_rate(s2['cache'], 1, 2):,.1f} | {median_rate(s2['cache'], 3, 4):,.1f} |")
    lines.append(f"| (writing the cache once, 2 actors: {write_s:.1f} s) | | | |")
    lines.append(
        f"\n**2 actors / 1 actor: {paired_ratio(s2['two'], s2['one'], 0, 2):.2f}x samples/s "
        f"({paired_ratio(s2['two'], s2['one'], 3, 4):.2f}x after the first row); "
        f"cache / re-encoding (2 actors): {paired_ratio(s2['cache'], s2['two'], 1, 2):.1f}x rows/s**"
    )
    lines.append(f"\nload average (1 min) at start / end: {load_before:.1f} / {os.getloadavg()[0]:.1f}")

    print(f"## bench_ingest ({datetime.date.today().isoformat()})\n")
    print("\n".join(lines))
    ray.shutdown()
    # Headline: stage-1 Ray Data vs the per-sample DataLoader over a whole pass, on the largest images
    # measured (goal >= 1.3).
    print(f"RESULT ingest_ray_vs_dataloader={ratio:.3f}")


if __name__ == "__main__":
    main()
