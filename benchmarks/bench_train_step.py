"""Overhead of the training orchestration, measured against bare PyTorch in the same process run.

1. Steady-state step time of the Ray Train loop (orchestration.train.trainer, 1 worker, the real loop:
   meta build, no FSDP with one rank, grad clipping, non-finite guard, metrics read once per log step,
   MLflow every log_every, reports, an asynchronous checkpoint at the end; batches from the real data
   path: the rank's Ray Data pipeline over the synthetic shards, epoch after epoch) vs a bare PyTorch
   loop (the same tiny tower, AdamW, schedule and clipping, no FSDP, no Ray Train, no Ray Data) on one
   fixed batch of the same shapes, with the same number of threads. Both run in the same Ray Train worker
   process, in alternating blocks of steps, so they see the same process (priority, threads,
   allocator) and, on a shared machine, nearly the same load; medians per step in each round, and the
   median of the rounds' ratios.
   Goal: ratio <= 1.03. The batch is sized so that a bare step takes >= 0.3 s here. By default the
   synthetic data holds as many records as a round trains, so that the steps measured are steady
   state, as in a real run's epoch of millions of samples; `--samples 256` (an epoch of ~6 steps)
   adds the start of a new epoch's pipeline every few steps to the Ray loop's cost.
   Also printed per round: the training thread's CPU time per step in each loop (what the loop itself
   costs, whatever the load) and the CPU of the worker's other threads (batch reader, Ray Data).
2. The data-wait share of the tiny pretrain (both stages, steady state: the first step, which waits
   for the Ray Data pipeline to start, left out). Goal: <= 2%.

    python benchmarks/bench_train_step.py [--steps 80] [--rounds 5] [--batch 80] [--threads 1] [--settle 3] [--samples N]
        [--pretrain-summary PATH | --skip-pretrain]

Last line: ``RESULT overhead_ratio=<ray/bare>``.

--pretrain-summary reads the shares from `python jobs/pretrain.py --summary-json PATH` instead of
running the tiny pretrain here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestration.config import load_config  # noqa: E402
from orchestration.train.tower import TowerTask, tower_loss_config  # noqa: E402

WARMUP = 5


def fixed_batch(config, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One batch of pixels (uint8) and caption tokens, the same for both loops."""
    from orchestration.data.scenes import render_scene
    from orchestration.data.tower_data import tokenize_captions, tower_config

    tower = tower_config(config)
    rng = np.random.default_rng(seed)
    scenes = [render_scene(rng, tower.image_size) for _ in range(size)]
    pixels = np.stack([s[0] for s in scenes]).astype(np.uint8)
    if pixels.shape[-1] == 3:  # HWC -> CHW
        pixels = pixels.transpose(0, 3, 1, 2)
    return {"pixels": np.ascontiguousarray(pixels), "text_tokens": tokenize_captions(tower, [s[1] for s in scenes])}


class BareLoop:
    """Plain PyTorch: the same tiny tower, AdamW, schedule and clipping; no FSDP, no Ray."""

    def __init__(self, config, batch: dict[str, np.ndarray], steps: int):
        from orchestration.train.optim import build_optimizer, build_scheduler
        from vilau_model.vision_tower import UnifiedVisionTower

        torch.manual_seed(config.seed)
        self.model = UnifiedVisionTower(TowerTask(config).tower_cfg, tower_loss_config(config))
        self.params = self.model.trainable_parameters()
        self.optimizer = build_optimizer(self.params, config.tower_train.optim)
        self.scheduler = build_scheduler(self.optimizer, config.tower_train.optim, steps)
        self.grad_clip = config.tower_train.optim.grad_clip
        self.pixels = torch.from_numpy(batch["pixels"])
        self.tokens = torch.from_numpy(batch["text_tokens"])

    def step(self, step: int) -> None:
        out = self.model(self.pixels.float().div(255.0), self.tokens, step=step)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if step % 10 == 0:
            float(out["loss"])  # a bare loop prints its loss now and then; the Ray loop reads once per log step


class BenchTowerTask(TowerTask):
    """Stage 1 exactly, minus evaluation (not part of a step)."""

    def wants_eval(self, step: int, total: int) -> bool:
        return False


def bench_worker(loop_config: dict) -> dict:
    """In one Ray Train worker, alternating blocks of steps: the bare loop, then the real Ray Train
    FSDP2 loop (Trainer.step: logging, reports and checkpoints included when they fall due), and so on,
    so that both see the same process and, on a shared machine, nearly the same load.

    The Ray loop's reader thread works ahead while the bare loop runs, so the first steps of each Ray
    block find their batches ready; those steps (the read-ahead depth) are left out, so that the cost
    of reading batches stays with the Ray loop. Each block starts after ``settle`` idle seconds: on 2
    cores the pipeline filling its buffers after a Ray block would otherwise slow the bare block.
    """
    import torch

    from orchestration.train.trainer import Trainer

    torch.set_num_threads(loop_config["threads"])
    config, steps, block = loop_config["config"], loop_config["steps"], loop_config["block"]
    bare = BareLoop(config, loop_config["batch"], steps)
    trainer = Trainer(BenchTowerTask(config), config, loop_config["run"])
    trainer.begin()
    skip_ray = trainer.stream.queue.maxsize + 2  # our read-ahead + Ray Data's prefetch_batches
    bare_times, ray_times, done = [], [], 0
    bare_cpu, ray_cpu, ray_other_cpu = [], [], []  # training thread's CPU per step; the process's other threads
    while done < steps:
        n = min(block, steps - done)
        time.sleep(loop_config["settle"])
        for i in range(n):
            t0, c0 = time.perf_counter(), time.thread_time()
            bare.step(done + i)
            if done + i >= WARMUP:
                bare_times.append(time.perf_counter() - t0)
                bare_cpu.append(time.thread_time() - c0)
        time.sleep(loop_config["settle"])
        for i in range(n):
            t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
            trainer.step()
            if done + i >= WARMUP and i >= skip_ray:
                ray_times.append(time.perf_counter() - t0)
                ray_cpu.append(time.thread_time() - c0)
                ray_other_cpu.append(time.process_time() - p0 - ray_cpu[-1])
        done += n
    summary = trainer.end()
    summary["final_metrics"].update(
        bare_median_s=statistics.median(bare_times), ray_median_s=statistics.median(ray_times),
        bare_cpu_median_s=statistics.median(bare_cpu), ray_cpu_median_s=statistics.median(ray_cpu),
        ray_other_threads_cpu_s=statistics.mean(ray_other_cpu),
    )
    return summary


def one_round(config, batch: dict[str, np.ndarray], steps: int, threads: int, block: int, settle: float,
              round_index: int) -> tuple[float, float]:
    """(bare, Ray) median seconds per step in one Ray Train worker (1 worker): the bare loop on the
    fixed batch, the Ray loop on the stage's real data plan."""
    from orchestration.data.pipeline import training_plan
    from orchestration.launch import TOWER, publish_data_plan, run_stage, stage_run_name

    run_config = config.model_copy(update={"run_name": f"{config.run_name}-r{round_index}"})
    publish_data_plan(run_config, stage_run_name(run_config, TOWER), training_plan(run_config, TOWER))
    result = run_stage(run_config, TOWER, config.tower_train, bench_worker,
                       loop_config={"threads": threads, "steps": steps, "batch": batch, "block": block, "settle": settle})
    m = result.metrics
    print(f"round {round_index}: training thread CPU per step: bare {m['bare_cpu_median_s'] * 1000:.1f} ms, Ray Train loop "
          f"{m['ray_cpu_median_s'] * 1000:.1f} ms; the worker's other threads (reader, Ray Data) "
          f"{m['ray_other_threads_cpu_s'] * 1000:.1f} ms", flush=True)
    return m["bare_median_s"], m["ray_median_s"]


def pretrain_wait_shares(summary_path: str | None, workdir: str) -> dict[str, float]:
    if summary_path:
        summary = json.loads(Path(summary_path).read_text())
        return summary["data_wait_share"]
    from orchestration.launch import pretrain

    config = load_config(None, [
        f"data.root={workdir}/data", f"output_dir={workdir}/outputs", f"cluster.storage_path={workdir}/outputs/ray",
    ])
    tower, lm = pretrain(config)
    return {"tower": tower.metrics["data_wait_share_steady"], "lm": lm.metrics["data_wait_share_steady"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=80,
                        help="per-worker batch (80: a bare step of ~0.31 s on an idle 2-core CPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--block", type=int, default=20, help="steps per block of each loop")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both loops")
    parser.add_argument("--settle", type=float, default=3.0, help="idle seconds before each block")
    parser.add_argument("--samples", type=int, default=None,
                        help="synthetic records per source (default: enough for one epoch to hold a round's steps)")
    parser.add_argument("--pretrain-summary", default=None)
    parser.add_argument("--skip-pretrain", action="store_true")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench_train_step-")
    sources = len(load_config(None, []).data.tower_sources)
    samples = args.samples or -(-args.steps * args.batch // sources)
    config = load_config(None, [
        "run_name=bench", f"data.root={work}/data", f"output_dir={work}/outputs", f"cluster.storage_path={work}/outputs/ray",
        f"tower_train.steps={args.steps}", f"tower_train.batch_size_per_worker={args.batch}",
        f"tower_train.checkpoint_every={args.steps}", "tower_train.log_every=10",
        "cluster.num_workers=1", f"cluster.cpus_per_worker={args.threads}",
        f"data.synthetic.samples={samples}",
    ])
    from orchestration.data.synthetic import ensure_synthetic_dataset

    ensure_synthetic_dataset(config.data.root, samples=config.data.synthetic.samples, seed=config.data.synthetic.seed,
                             eval_samples=config.data.synthetic.eval_samples)
    batch = fixed_batch(config, args.batch)
    bare, ray_times = [], []
    from orchestration.launch import init_ray

    # As in a job (orchestration/console.py): no Ray Data progress bars, which the training worker would
    # redraw and Ray would forward to this console as new lines. (Ray Train hands the driver's context
    # to the workers.)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    init_ray(config)  # before any Ray Data call, which would start a default (too small) instance
    for r in range(args.rounds):
        b, t = one_round(config, batch, args.steps, args.threads, args.block, args.settle, r)
        bare.append(b)
        ray_times.append(t)
        print(f"round {r}: bare {bare[-1] * 1000:.1f} ms/step, Ray Train loop {ray_times[-1] * 1000:.1f} ms/step", flush=True)
    bare_ms, ray_ms = statistics.median(bare) * 1000, statistics.median(ray_times) * 1000
    # Each round pairs the two loops in one process at nearly the same moment; the machine drifts between
    # rounds (a few % here), so the headline is the median of the per-round ratios.
    ratios = sorted(t / b for b, t in zip(bare, ray_times))
    ratio = statistics.median(ratios)
    print(f"\nsteady-state step, tiny tower, batch {args.batch}, {args.threads} thread(s), {args.rounds} rounds: "
          f"bare {bare_ms:.1f} ms, Ray Train loop (1 worker) {ray_ms:.1f} ms (medians); "
          f"ratio {ratio:.3f} (median of the per-round ratios {', '.join(f'{r:.3f}' for r in ratios)}; goal <= 1.03)")
    if not args.skip_pretrain:
        shares = pretrain_wait_shares(args.pretrain_summary, work)
        print("tiny pretrain data-wait share (steady state): "
              + ", ".join(f"{k} {100 * v:.2f}%" for k, v in shares.items()) + " (goal <= 2%)")
    print(f"RESULT overhead_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
