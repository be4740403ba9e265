"""Resume cost vs how far into the epoch: time from a restart to the first trained micro-batch when a
rank resumes at 10% and at 90% of its epoch (stage 1, COYO parquet, the training loop's BatchStream).

The position in the checkpoint lets the rank's dataset leave out the windows it finished and drop
trained records inside the current window before decoding, so the cost should not grow with the
position. The baseline is what resuming did before: read the epoch again from its start and drop the
batches already trained (every one of them decoded again).

Run:  python benchmarks/bench_resume.py [--samples 3072] [--repeats 3] [--results benchmarks/RESULTS.md]
Last line: RESULT resume_ratio_90_10=<t90/t10>  (goal <= 1.3)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3072, help="records of the COYO parquet source")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", help="append a dated markdown section to this file")
    args = parser.parse_args()

    import functools
    import json

    import ray
    import torch

    from orchestration.config import load_config
    from orchestration.data.epochs import DataPosition
    from orchestration.data.pipeline import rank_dataset, torch_dtypes, training_plan, with_text_tokens
    from orchestration.data.tower_data import tower_config
    from orchestration.data.synthetic import make_synthetic_dataset
    from orchestration.train.checkpoint import TrainState
    from orchestration.train.batch_stream import BatchStream

    workdir = tempfile.mkdtemp(prefix="bench-resume-")
    root = os.path.join(workdir, "data")
    start = time.perf_counter()
    make_synthetic_dataset(root, samples=args.samples, seed=0, eval_samples=4, shard_size=128, video_samples=1)
    print(f"wrote {args.samples} records in {time.perf_counter() - start:.0f}s", flush=True)
    config = load_config(None, [f"data.root={root}", f"output_dir={workdir}/out",
                                "data.tower_sources={coyo: {format: coyo_parquet, path: coyo/parquet}}"])
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    plan = training_plan(config, "tower")

    def make_dataset(epoch, position):
        return rank_dataset(config, "tower", plan, epoch=epoch, rank=0, world=1, position=position)

    # One full pass: the epoch's rows in order (and a warm-up of workers and imports).
    rows = []
    for batch in make_dataset(0, None).iter_batches(batch_size=256, batch_format="numpy"):
        rows += [(int(c), json.loads(i)) for c, i in zip(batch["call_start"], batch["sample_ids"])]
    columns = torch_dtypes("tower")
    tokenize = functools.partial(with_text_tokens, tower_config(config))  # what TowerTask.host_batch does

    def resumed(fraction: float) -> float:
        """Restart -> first micro-batch, with the position a checkpoint at ``fraction`` holds."""
        position = DataPosition()
        for call_start, ids in rows[: int(fraction * len(rows))]:
            position.consume(call_start, ids)
        state = TrainState(data={"position": position.state()})
        begin = time.perf_counter()
        stream = BatchStream(make_dataset, state, 0, 1, "tower", BATCH, columns, torch.device("cpu"), host_batch=tokenize)
        next(stream)
        elapsed = time.perf_counter() - begin
        stream.close()
        return elapsed

    def reread(fraction: float) -> float:
        """The old resume: the epoch from its start, dropping the batches already trained."""
        skip = int(fraction * len(rows)) // BATCH
        begin = time.perf_counter()
        for n, _ in enumerate(make_dataset(0, None).iter_batches(batch_size=BATCH, batch_format="numpy"), start=1):
            if n > skip:
                break
        return time.perf_counter() - begin

    times = {name: [] for name in ("new 10%", "new 90%", "old 10%", "old 90%")}
    for _ in range(args.repeats):  # alternating, so that drift hits all alike
        times["new 10%"].append(resumed(0.1))
        times["new 90%"].append(resumed(0.9))
        times["old 10%"].append(reread(0.1))
        times["old 90%"].append(reread(0.9))
    ray.shutdown()
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = median["new 90%"] / median["new 10%"]
    lines = [
        f"stage 1, {len(rows)} records in {len(plan.units)} parquet shards, 1 rank, batch {BATCH}, "
        f"windows of {plan.window_units} shards; medians of {args.repeats} alternating runs",
        "",
        "| resume at | restart -> first batch (s): position in the checkpoint | old: re-read and drop (s) |",
        "| --- | --- | --- |",
        f"| 10% of the epoch | {median['new 10%']:.2f} | {median['old 10%']:.2f} |",
        f"| 90% of the epoch | {median['new 90%']:.2f} | {median['old 90%']:.2f} |",
        f"\nresume_ratio_90_10 = {ratio:.3f} (old: {median['old 90%'] / median['old 10%']:.2f})",
    ]
    report = "\n".join(lines)
    print(report)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n## bench_resume (2026-11-27, 2-core x86_64 CPU, shared with other sessions' work)\n\n")
            f.write("`python benchmarks/bench_resume.py` (goal: resume_ratio_90_10 <= 1.3)\n\n" + report + "\n")
    print(f"RESULT resume_ratio_90_10={ratio:.3f}")


if __name__ == "__main__":
    main()
