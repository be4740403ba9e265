"""Resume cost vs how far into a window: a rank resumed at 90% of a real-sized window against one
resumed at 10% (stage 1, COYO parquet, one rank's 8 shards of 10k rows with inline JPEGs: one read
window of 80k records).

Two measures, each at 10% and 90% of the window:

- restart: a Ray Train worker group (1 worker) is killed once and restarted by Ray (FailureConfig);
  the restarted worker reads the data state its checkpoint part holds, builds the training loop's
  BatchStream (`load_state_dict`) and takes its first micro-batch. Timed from the restarted train
  function's start to that batch (the worker group's own restart, the same at every position, is
  printed apart). RESULT resume_ratio_90_10 is this measure's ratio.
- read task: the window's read function alone (in this process, no Ray), to its first records due:
  with the order drawn from the shards' exact sizes and only the rows due read (now), and reading
  every record as it is drawn up to the position (`mix_as_drawn`: how every window was read before).

Run:  python benchmarks/bench_resume.py [--rows 10000] [--shards 8] [--repeats 3] [--results benchmarks/RESULTS.md]
Last line: RESULT resume_ratio_90_10=<t90/t10>  (goal <= 1.3)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH = 16
FRACTIONS = (0.1, 0.9)


def write_shards(root: str, shards: int, rows: int) -> int:
    """img2dataset-style parquet shards of distinct 64x64 JPEGs (1k-row row groups); returns bytes written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    bases = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=85)
        bases.append(buf.getvalue())
    os.makedirs(f"{root}/coyo/parquet", exist_ok=True)
    total = 0
    for shard in range(shards):
        keys = [f"{shard:05d}{i:05d}" for i in range(rows)]
        # Bytes after a JPEG's end marker are ignored by decoders: every row's image bytes differ.
        images = [bases[i % len(bases)] + key.encode() for i, key in enumerate(keys)]
        table = pa.table({"key": keys, "jpg": images, "caption": [f"a photo number {k}" for k in keys]})
        path = f"{root}/coyo/parquet/part-{shard:05d}.parquet"
        pq.write_table(table, path, row_group_size=1000)
        total += os.path.getsize(path)
    return total


def position_at(plan, fraction: float):
    """The data position of a rank that trained the first ``fraction`` of its (one) window."""
    from orchestration.data.epochs import DataPosition, part_id

    (window,) = plan.windows(0, 0, 1)
    size = sum(c.size for part in window.parts for c in part)
    last = part_id((window.index << 32) | (int(fraction * size) - 1))
    return DataPosition(0, last, {last})


def restart_worker(args: dict) -> None:
    """Ray Train worker: dies once (Ray restarts the worker group), then resumes and times its first batch."""
    import functools
    import inspect

    import torch

    from orchestration.config import load_config
    from orchestration.data.epochs import EpochPlan
    from orchestration.data.pipeline import rank_dataset, torch_dtypes, with_text_tokens
    from orchestration.data.tower_data import tower_config
    from orchestration.train.batch_stream import BatchStream

    begin = time.perf_counter()
    if not os.path.exists(args["marker"]):
        with open(args["marker"], "w") as f:
            f.write(str(time.time()))
        os._exit(1)  # like a lost node: Ray Train restarts the worker group
    restarted_after = time.time() - float(open(args["marker"]).read())
    config = load_config(None, args["overrides"])
    plan = EpochPlan.from_json(open(args["plan"]).read())
    data = torch.load(args["checkpoint_part"], weights_only=False)["data"]  # what the checkpoint part holds
    def make_dataset(epoch, position):
        return rank_dataset(config, "tower", plan, epoch=epoch, rank=0, world=1, position=position)

    rest = ("tower", BATCH, torch_dtypes("tower"), torch.device("cpu"))
    tokenize = functools.partial(with_text_tokens, tower_config(config))
    if "state" in inspect.signature(BatchStream).parameters:  # the code before BatchStream owned its state
        from orchestration.train.checkpoint import TrainState

        stream = BatchStream(make_dataset, TrainState(data=data), 0, 1, *rest, host_batch=tokenize)
    else:
        stream = BatchStream(make_dataset, 0, 1, *rest, host_batch=tokenize)
        stream.load_state_dict(data)
    next(stream)
    elapsed = time.perf_counter() - begin
    stream.close()
    with open(args["out"], "w") as f:
        json.dump({"first_batch_s": elapsed, "restart_s": restarted_after}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000, help="records per parquet shard")
    parser.add_argument("--shards", type=int, default=8, help="shards of the rank (one window: data.shuffle_window_shards)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", help="append a dated markdown section to this file")
    parser.add_argument("--label", default="", help="what code this run measures (in the results section)")
    args = parser.parse_args()

    import ray
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestration.config import load_config
    from orchestration.data.epochs import mix_window

    try:
        from orchestration.data.epochs import mix_as_drawn
    except ImportError:  # the code before this benchmark (for the before/after record): it read as drawn
        mix_as_drawn = mix_window
    from orchestration.data.pipeline import training_plan

    workdir = tempfile.mkdtemp(prefix="bench-resume-")
    root = os.path.join(workdir, "data")
    start = time.perf_counter()
    size = write_shards(root, args.shards, args.rows)
    print(f"wrote {args.shards} x {args.rows} records ({size / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f}s", flush=True)
    overrides = [f"data.root={root}", f"output_dir={workdir}/out", f"data.shuffle_window_shards={args.shards}",
                 "data.tower_sources={coyo: {format: coyo_parquet, path: coyo/parquet}}", "data.synthetic.make_if_missing=false"]
    config = load_config(None, overrides)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    plan = training_plan(config, "tower")
    windows = plan.windows(0, 0, 1)
    assert len(windows) == 1, f"expected one window of {args.shards} shards, got {len(windows)}"
    plan_path = os.path.join(workdir, "plan.json")
    with open(plan_path, "w") as f:
        f.write(plan.to_json())

    def read_task(fraction: float, read) -> float:
        (window,) = plan.windows(0, 0, 1, position_at(plan, fraction))
        begin = time.perf_counter()
        next(iter(read(window, None)))
        return time.perf_counter() - begin

    def restart(fraction: float, run: int) -> dict:
        part = os.path.join(workdir, f"rank_0_{run}.pt")
        torch.save({"data": {"position": position_at(plan, fraction).state()}}, part)  # a checkpoint's per-rank part
        out = os.path.join(workdir, f"restart_{run}.json")
        TorchTrainer(
            restart_worker,
            train_loop_config={"marker": os.path.join(workdir, f"died_{run}"), "overrides": overrides, "plan": plan_path,
                               "checkpoint_part": part, "out": out},
            scaling_config=ScalingConfig(num_workers=1),
            run_config=RunConfig(name=f"resume-{run}", storage_path=os.path.join(workdir, "ray"),
                                 failure_config=FailureConfig(max_failures=1)),
        ).fit()
        with open(out) as f:
            return json.load(f)

    for fraction in FRACTIONS:  # warm-up: imports, the shards in the page cache
        read_task(fraction, mix_window), read_task(fraction, mix_as_drawn)
    times: dict[str, list[float]] = {}
    run = 0
    for _ in range(args.repeats):  # alternating, so that drift hits all alike
        for fraction in FRACTIONS:
            pct = f"{fraction:.0%}"
            times.setdefault(f"task new {pct}", []).append(read_task(fraction, mix_window))
            times.setdefault(f"task old {pct}", []).append(read_task(fraction, mix_as_drawn))
            got = restart(fraction, run)
            run += 1
            times.setdefault(f"restart {pct}", []).append(got["first_batch_s"])
            times.setdefault("group restart", []).append(got["restart_s"])
            print(f"{pct}: restart -> first batch {got['first_batch_s']:.2f} s (worker group restarted in "
                  f"{got['restart_s']:.1f} s); read task {times[f'task new {pct}'][-1]:.2f} s, "
                  f"as drawn {times[f'task old {pct}'][-1]:.2f} s", flush=True)
    ray.shutdown()
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = median["restart 90%"] / median["restart 10%"]
    lines = [
        f"stage 1, 1 rank: {args.shards} COYO parquet shards x {args.rows} rows with inline JPEGs "
        f"({size / 2**20:.0f} MiB), one window of {args.shards * args.rows} records; batch {BATCH}; "
        f"medians of {args.repeats} alternating runs",
        "",
        "| resume at | restart -> first batch (s) | read task -> first records: now (s) | as drawn, before (s) |",
        "| --- | --- | --- | --- |",
        *(f"| {f:.0%} of the window | {median[f'restart {f:.0%}']:.2f} | {median[f'task new {f:.0%}']:.2f} | "
          f"{median[f'task old {f:.0%}']:.2f} |" for f in FRACTIONS),
        f"\nthe worker group's restart itself (death -> restarted train function): {median['group restart']:.1f} s",
        f"resume_ratio_90_10 = {ratio:.3f} (read task alone: now {median['task new 90%'] / median['task new 10%']:.2f}, "
        f"before {median['task old 90%'] / median['task old 10%']:.2f})",
    ]
    report = "\n".join(lines)
    print(report)
    if args.results:
        with open(args.results, "a") as f:
            f.write(f"\n## bench_resume at real window sizes{args.label} (2026-12-02, 2-core CPU, no GPU, shared with other sessions)\n\n")
            f.write(f"`python benchmarks/bench_resume.py --rows {args.rows} --shards {args.shards} --repeats {args.repeats}` "
                    "(goal: resume_ratio_90_10 <= 1.3)\n\n" + report + "\n")
    print(f"RESULT resume_ratio_90_10={ratio:.3f}")


if __name__ == "__main__":
    main()
