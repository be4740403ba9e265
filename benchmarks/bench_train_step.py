"""Overhead of Ray Train on the loop a cluster runs: 2 ranks, FSDP2, gradient accumulation, in both arms.

Both arms run the project's own loop (``orchestration.train.trainer.Trainer.step``: FSDP2 over gloo on
CPU, ``grad_accum`` micro-batches per step, clipping, the non-finite guard, metrics averaged across
ranks and logged to MLflow every ``log_every``, an asynchronous sharded DCP checkpoint every
``checkpoint_every`` and at the end) over the same stage-1 micro-batches:

- **Ray Train**: a ``TorchTrainer`` with 2 workers, started as a job starts a stage
  (``orchestration.launch.run_stage``), so every Ray part of the loop is paid: the worker group, the
  ``ray.train.report`` barrier at log steps, checkpoints registered with Ray Train.
- **torchrun**: ``torchrun --nproc_per_node 2`` running the same ``Trainer.step`` with the Ray parts
  taken out: rank and world from torch.distributed, the same asynchronous DCP save into a local
  directory, no report.

The micro-batches are read once, before either arm, from the real stage-1 data path (each rank's
share of the epoch plan over the synthetic shards, through the rank's Ray Data pipeline and
``BatchStream``) and saved per rank; both arms train on them in the same order. The data pipeline's
own cost is not in the ratio by default: on this 2-core machine the decoding would compete with the
two training ranks for the cores, which a cluster's separate CPU nodes do not. ``--ray-data`` makes the
Ray arm read through its live pipeline instead (the loop exactly as a job runs it).

Step time = the whole loop on rank 0 (every step, log, checkpoint and report steps included, and the
wait for the last checkpoint at the end) divided by the number of steps: a mean, not a median. The
arms alternate (Ray, torchrun, Ray, ...) for ``--rounds`` rounds; start-up (worker group, process
group, FSDP build) is outside the loop in both.

    python benchmarks/bench_train_step.py [--steps 60] [--rounds 2] [--batch 24] [--grad-accum 2]
        [--log-every 10] [--checkpoint-every 20] [--threads 1] [--ray-data]
        [--pretrain | --pretrain-summary PATH]

Last line: ``RESULT overhead_ratio=<ray/torchrun>`` (goal <= 1.05): the mean step over all rounds of
the Ray arm over that of the torchrun arm. ``--pretrain`` also prints the tiny pretrain's steady-state
data-wait share (a whole job, ~4 min here; goal <= 2%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestration.config import load_config  # noqa: E402
from orchestration.train.tower import TowerTask  # noqa: E402
from orchestration.train.trainer import Trainer  # noqa: E402


class BenchTowerTask(TowerTask):
    """Stage 1 exactly, minus evaluation (not part of a training step)."""

    def wants_eval(self, step: int, total: int) -> bool:
        return False


class SavedBatches:
    """A rank's micro-batches as saved before the arms ran, in order (then again from the start)."""

    def __init__(self, path: str):
        self.batches = torch.load(path)
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        return batch

    def data_metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


class RayArmTrainer(Trainer):
    """The Ray Train worker's Trainer as a job runs it, fed the saved micro-batches (unless ray_data)."""

    def __init__(self, task, config, run, batches_path: str | None):
        super().__init__(task, config, run)
        self.batches_path = batches_path

    def batches(self):
        if self.batches_path is None:
            return super().batches()  # the live Ray Data pipeline (--ray-data)
        return SavedBatches(self.batches_path.format(rank=self.rank))


class TorchrunArmTrainer(RayArmTrainer):
    """The same Trainer under torchrun: rank and world from torch.distributed, checkpoints into a local
    directory with the same asynchronous sharded save, nothing reported to Ray Train."""

    def __init__(self, task, config, run, batches_path: str, directory: str):
        import pyarrow.fs as pafs
        import torch.distributed as dist

        from orchestration.train import checkpoint as ckpt
        from orchestration.train.fsdp import training_device
        from orchestration.train.tracking import RunLogger

        # Trainer.__init__ without ray.train.get_context(): the same attributes, from torch.distributed.
        self.task, self.config, self.run = task, config, run
        self.section = task.section
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.storage_fs, self.experiment_path = pafs.LocalFileSystem(), directory
        self.logger = RunLogger(run.tracking_uri, run.mlflow_run_id, active=self.rank == 0)
        self.device = training_device(False)
        self.model = None
        self.state = ckpt.TrainState(world_size=self.world)
        self.reports, self.step_timings, self.last_eval = [], [], {}
        self.batches_path = batches_path

    def resume(self) -> None:
        pass  # a fresh run

    def save_and_report(self, metrics: dict[str, float]) -> None:
        self.state.nonfinite_skipped = self.guard.skipped
        self.saver.start(self.state.step, self.model, [self.optimizer], self.scheduler, self.state,
                         ignore_frozen=self.task.ignore_frozen)  # waits for the previous save, as the Ray arm does

    def report_metrics(self, metrics: dict[str, float]) -> None:
        pass

    def wait_for_checkpoints(self) -> None:
        self.saver.wait()


def timed_loop(trainer: Trainer) -> dict[str, float]:
    """Run the trainer's whole loop; rank 0's wall time of the steps and of the end (last checkpoint)."""
    trainer.begin()
    durations = []
    loop_start = time.perf_counter()
    while trainer.state.step < trainer.section.steps:
        t0 = time.perf_counter()
        trainer.step()
        durations.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    summary = trainer.end()
    end_s = time.perf_counter() - t0
    loop_s = time.perf_counter() - loop_start
    summary["final_metrics"].update(
        loop_s=loop_s, end_s=end_s, steps_timed=len(durations), step_median_s=statistics.median(durations),
        step_max_s=max(durations), final_loss=float(summary["final_metrics"].get("loss", float("nan"))),
    )
    return summary


def ray_worker(loop_config: dict) -> dict:
    torch.set_num_threads(loop_config["threads"])
    trainer = RayArmTrainer(BenchTowerTask(loop_config["config"]), loop_config["config"], loop_config["run"],
                            loop_config["batches_path"])
    return timed_loop(trainer)


def torchrun_worker(spec_path: str) -> None:
    """One torchrun process (``--torchrun-worker SPEC``)."""
    import datetime

    import torch.distributed as dist

    from orchestration.train.tracking import RunInfo

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    try:
        config = load_config(None, spec["overrides"])
        run = RunInfo(spec["run_name"], config.tracking_uri, spec["mlflow_run_id"])
        trainer = TorchrunArmTrainer(BenchTowerTask(config), config, run, spec["batches_path"], spec["directory"])
        summary = timed_loop(trainer)
        if dist.get_rank() == 0:
            Path(spec["out"]).write_text(json.dumps(summary["final_metrics"], default=float))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- driver


def save_batches(config, micro_batches: int, path: str) -> None:
    """Each rank's first ``micro_batches`` micro-batches of the stage-1 data, as its training loop reads
    them (its share of the epoch plan, its Ray Data pipeline, BatchStream), saved to ``path``."""
    import ray.data

    from orchestration.data.pipeline import rank_dataset, training_plan
    from orchestration.launch import TOWER
    from orchestration.train import checkpoint as ckpt
    from orchestration.train.batch_stream import BatchStream

    plan = training_plan(config, TOWER)
    task = BenchTowerTask(config)
    world = config.cluster.num_workers
    for rank in range(world):
        def make_dataset(epoch, position, rank=rank) -> ray.data.Dataset:
            return rank_dataset(config, TOWER, plan, epoch=epoch, rank=rank, world=world, position=position)

        # world=1 for the stream itself: one rank read alone needs no agreement with the others.
        stream = BatchStream(make_dataset, ckpt.TrainState(world_size=world), rank, 1, TOWER,
                             config.tower_train.batch_size_per_worker, task.columns, torch.device("cpu"),
                             batches_needed=micro_batches, host_batch=task.host_batch, batch_timeout_s=600)
        batches = [next(stream) for _ in range(micro_batches)]
        stream.close()
        torch.save(batches, path.format(rank=rank))


def ray_round(config, index: int, batches_path: str | None, threads: int) -> dict:
    from orchestration.launch import TOWER, publish_data_plan, run_stage, stage_run_name

    run_config = config.model_copy(update={"run_name": f"{config.run_name}-ray{index}"})
    if batches_path is None:
        from orchestration.data.pipeline import training_plan

        publish_data_plan(run_config, stage_run_name(run_config, TOWER), training_plan(run_config, TOWER))
    result = run_stage(run_config, TOWER, config.tower_train, ray_worker,
                       loop_config={"threads": threads, "batches_path": batches_path})
    return result.metrics


def torchrun_round(config, overrides: list[str], index: int, batches_path: str, threads: int, work: str) -> dict:
    from orchestration.train.tracking import close_run, open_run

    run_name = f"{config.run_name}-torchrun{index}"
    run_id = open_run(config, "tower", run_name)
    spec = {
        "overrides": overrides, "threads": threads, "batches_path": batches_path, "run_name": run_name,
        "mlflow_run_id": run_id, "directory": f"{work}/torchrun/{run_name}", "out": f"{work}/torchrun-{index}.json",
    }
    spec_path = Path(work) / f"torchrun-{index}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS=str(threads))
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={config.cluster.num_workers}",
         str(Path(__file__).resolve()), "--torchrun-worker", str(spec_path)],
        check=True, env=env, timeout=900,
    )
    close_run(config, run_id)
    return json.loads(Path(spec["out"]).read_text())


def pretrain_wait_shares(summary_path: str | None, workdir: str) -> dict[str, float]:
    if summary_path:
        return json.loads(Path(summary_path).read_text())["data_wait_share"]
    from orchestration.launch import pretrain

    config = load_config(None, [
        f"data.root={workdir}/data", f"output_dir={workdir}/outputs", f"cluster.storage_path={workdir}/outputs/ray",
    ])
    tower, lm = pretrain(config)
    return {"tower": tower.metrics["data_wait_share_steady"], "lm": lm.metrics["data_wait_share_steady"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=24, help="per-rank micro-batch")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank in both arms")
    parser.add_argument("--ray-data", action="store_true", help="the Ray arm reads through its live Ray Data pipeline")
    parser.add_argument("--pretrain", action="store_true", help="also run the tiny pretrain for its data-wait share")
    parser.add_argument("--pretrain-summary", default=None)
    parser.add_argument("--torchrun-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torchrun_worker:
        torchrun_worker(args.torchrun_worker)
        return

    work = tempfile.mkdtemp(prefix="bench_train_step-")
    micro_batches = args.steps * args.grad_accum
    sources = len(load_config(None, []).data.tower_sources)
    samples = -(-micro_batches * args.batch * args.workers // sources)  # one epoch holds the run
    overrides = [
        "run_name=bench", f"data.root={work}/data", f"output_dir={work}/outputs", f"cluster.storage_path={work}/outputs/ray",
        f"tower_train.steps={args.steps}", f"tower_train.batch_size_per_worker={args.batch}",
        f"tower_train.grad_accum={args.grad_accum}", f"tower_train.log_every={args.log_every}",
        f"tower_train.checkpoint_every={args.checkpoint_every}", f"cluster.num_workers={args.workers}",
        f"cluster.cpus_per_worker={args.threads}", f"data.synthetic.samples={samples}",
    ]
    config = load_config(None, overrides)
    from orchestration.data.synthetic import ensure_synthetic_dataset
    from orchestration.launch import init_ray
    from ray.data import DataContext

    ensure_synthetic_dataset(config.data.root, samples=config.data.synthetic.samples, seed=config.data.synthetic.seed,
                             eval_samples=config.data.synthetic.eval_samples)
    # As in a job: no Ray Data progress bars (a worker's redraws come back to this console as lines).
    DataContext.get_current().enable_progress_bars = False
    init_ray(config)
    batches_path = f"{work}/batches-rank{{rank}}.pt"
    started = time.perf_counter()
    save_batches(config, micro_batches, batches_path)
    print(f"saved {micro_batches} micro-batches of {args.batch} per rank from the stage-1 data path "
          f"in {time.perf_counter() - started:.1f} s", flush=True)

    arms: dict[str, list[dict]] = {"ray": [], "torchrun": []}
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        arms["ray"].append(ray_round(config, r, None if args.ray_data else batches_path, args.threads))
        arms["torchrun"].append(torchrun_round(config, overrides, r, batches_path, args.threads, work))
        ray_m, tr_m = arms["ray"][-1], arms["torchrun"][-1]
        print(f"round {r} (load average {load:.2f} at its start): mean step Ray Train "
              f"{ray_m['loop_s'] / args.steps * 1000:.1f} ms, torchrun {tr_m['loop_s'] / args.steps * 1000:.1f} ms "
              f"(medians {ray_m['step_median_s'] * 1000:.1f} / {tr_m['step_median_s'] * 1000:.1f} ms, slowest step "
              f"{ray_m['step_max_s'] * 1000:.0f} / {tr_m['step_max_s'] * 1000:.0f} ms, end-of-run wait "
              f"{ray_m['end_s'] * 1000:.0f} / {tr_m['end_s'] * 1000:.0f} ms; final loss "
              f"{ray_m['final_loss']:.4f} / {tr_m['final_loss']:.4f}); ratio {ray_m['loop_s'] / tr_m['loop_s']:.3f}",
              flush=True)
    mean_step = {arm: sum(m["loop_s"] for m in runs) / (args.steps * len(runs)) for arm, runs in arms.items()}
    ratio = mean_step["ray"] / mean_step["torchrun"]
    per_round = [a["loop_s"] / b["loop_s"] for a, b in zip(arms["ray"], arms["torchrun"])]
    print(f"\ntiny tower, {args.workers} ranks FSDP2 (gloo), micro-batch {args.batch} x grad_accum {args.grad_accum}, "
          f"{args.threads} thread(s) per rank, {args.steps} steps (log every {args.log_every}, checkpoint every "
          f"{args.checkpoint_every}), {args.rounds} rounds, Ray arm data: {'live Ray Data' if args.ray_data else 'saved batches'}: "
          f"mean step Ray Train {mean_step['ray'] * 1000:.1f} ms, torchrun {mean_step['torchrun'] * 1000:.1f} ms; "
          f"ratio {ratio:.3f} (per round {', '.join(f'{x:.3f}' for x in per_round)}; goal <= 1.05); "
          f"load average now {os.getloadavg()[0]:.2f}")
    if args.pretrain or args.pretrain_summary:
        shares = pretrain_wait_shares(args.pretrain_summary, work)
        print("tiny pretrain data-wait share (steady state): "
              + ", ".join(f"{k} {100 * v:.2f}%" for k, v in shares.items()) + " (goal <= 2%)")
    print(f"RESULT overhead_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
