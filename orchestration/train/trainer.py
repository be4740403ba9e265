"""The one training loop both stages share, run by every Ray Train worker.

A stage is a :class:`Task` (how to build the model, which blocks to shard, the loss, evaluation and
checkpoint contents); the :class:`Trainer` does everything else the same way for both:

    build (same seed on every rank) -> activation checkpointing -> FSDP2 -> AdamW + warmup/cosine
    -> resume from ray.train.get_checkpoint() -> steps: grad accumulation, clipping, non-finite guard
    -> every log_every: metrics to MLflow (rank 0) + progress line + ray.train.report
    -> every checkpoint_every and at the end: sharded DCP checkpoint reported to Ray Train
    -> at the end: nothing collective; the driver exports from the final checkpoint
       (orchestration/train/export.py) once the worker group has finished.

``ray.train.report`` is a barrier, so every rank reports at the same steps (the schedule depends on the
step only).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import defaultdict

import pyarrow.fs as pafs
import ray.train
import torch
import torch.distributed as dist
from torch import nn

from orchestration.config import Config, StageSection
from orchestration.train import checkpoint as ckpt
from orchestration.train.fsdp import checkpoint_blocks, data_parallel_mesh, mixed_precision, shard_model, training_device
from orchestration.train.metrics import WindowMetrics, mean_across_ranks, peak_flops, progress_line
from orchestration.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from orchestration.train.tracking import RunInfo, RunLogger

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run is diverging or the data is broken."""


class NonFiniteGuard:
    """Decides whether a step may be applied. A step with a non-finite loss or gradient norm is skipped
    (and counted); ``limit`` of them in a row stop the run with a clear error."""

    def __init__(self, limit: int, stage: str):
        self.limit, self.stage = limit, stage
        self.in_a_row = 0
        self.skipped = 0

    def check(self, finite: bool, step: int, loss: float) -> bool:
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        log.warning("[%s] step %d: non-finite loss/gradient (loss=%s), update skipped (%d in a row)",
                    self.stage, step, loss, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"[{self.stage}] {self.in_a_row} non-finite losses in a row (last at step {step}, loss={loss}); "
                f"stopping. Lower the learning rate ({self.stage} optim.lr), check the data, or raise "
                f"max_nonfinite_in_a_row."
            )
        return False


class Task:
    """What differs between the stages. Subclasses fill in the model-specific parts."""

    stage: str = ""
    columns: dict[str, torch.dtype] = {}  # dataset column -> dtype (iter_torch_batches must name all)
    ignore_frozen: bool = False  # leave frozen weights out of checkpoints (they come from elsewhere)

    def __init__(self, config: Config, section: StageSection):
        self.config, self.section = config, section

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def block_lists(self, model: nn.Module) -> list[nn.ModuleList]:
        """Repeated blocks: activation-checkpointed (if on) and sharded one by one."""
        return []

    def extra_units(self, model: nn.Module) -> list[nn.Module]:
        """Other submodules worth their own FSDP unit (not checkpointed)."""
        return []

    def ignored_params(self, model: nn.Module) -> set[nn.Parameter] | None:
        return None

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def forward(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def count(self, batch: dict) -> tuple[int, int]:
        """(samples, tokens) in a micro-batch."""
        raise NotImplementedError

    def flops_per_token(self, model: nn.Module) -> float | None:
        return None

    def rows_skipped(self) -> dict[str, int]:
        return {}

    def replica_checks(self, model: nn.Module) -> dict[str, float]:
        """Collective, at log steps: how far state that every rank must hold identically (not sharded
        by FSDP, e.g. EMA buffers) has drifted apart across ranks. 0 = identical."""
        return {}

    def evaluate(self, trainer: "Trainer", step: int) -> dict[str, float]:
        """Collective (every rank calls it); returns metrics (rank 0's are logged)."""
        return {}

    def wants_eval(self, step: int, total: int) -> bool:
        return False


class BatchStream:
    """Micro-batches forever, epoch after epoch, starting at the saved data position.

    A background thread reads ``depth`` batches ahead, also across epoch boundaries, so the start of
    the next epoch's pipeline overlaps with training instead of stalling it. The data position in
    ``state`` advances only when the loop takes a batch, so a checkpoint records what was trained on.
    Resuming re-reads and drops the batches this rank had consumed in the current epoch (Ray Data has
    no seek).
    """

    def __init__(self, shard, state: ckpt.TrainState, rank: int, stage: str, iter_kwargs: dict, depth: int = 4):
        self.state = state
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(
            target=self._read, args=(shard, state.epoch, state.batches_in_epoch, rank, stage, iter_kwargs),
            daemon=True, name=f"{stage}-batches",
        )
        self.thread.start()

    def _read(self, shard, epoch: int, skip: int, rank: int, stage: str, iter_kwargs: dict) -> None:
        try:
            while True:
                n = 0
                for batch in shard.iter_torch_batches(**iter_kwargs):
                    n += 1
                    if n > skip:
                        self.queue.put((epoch, n, batch))
                if n == 0:
                    raise RuntimeError(
                        f"[{stage}] rank {rank}: an epoch gave no full batch of {iter_kwargs['batch_size']}; "
                        "the dataset has too few rows for this many workers"
                    )
                epoch, skip = epoch + 1, 0
        except BaseException as exc:  # handed to the training loop, which raises it
            self.queue.put(exc)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        self.state.epoch, self.state.batches_in_epoch, batch = item
        return batch


class Trainer:
    def __init__(self, task: Task, config: Config, run: RunInfo):
        self.task, self.config, self.run = task, config, run
        self.section = task.section
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        storage = ctx.get_storage()
        self.storage_fs: pafs.FileSystem = storage.storage_filesystem
        self.experiment_path: str = storage.experiment_fs_path
        self.logger = RunLogger(run.tracking_uri, run.mlflow_run_id, active=self.rank == 0)
        self.device = training_device(config.cluster.use_gpu)
        self.model: nn.Module | None = None
        self.state = ckpt.TrainState(world_size=self.world)
        self.reports: list[dict[str, float]] = []  # what this segment reported (returned by rank 0)
        self.step_timings: list[tuple[float, float, float]] = []  # (data wait, step time, start) per step
        self.last_eval: dict[str, float] = {}

    # -- setup ------------------------------------------------------------------------------------

    def build(self) -> None:
        torch.manual_seed(self.config.seed)  # identical init on every rank (codebook buffers included)
        model = self.task.build_model()
        if self.device.type == "cuda":
            model.to(self.device)  # buffers and ignored (frozen) params; fully_shard moves the rest too
        lists = self.task.block_lists(model)
        if self.section.activation_checkpointing:
            for container in lists:
                checkpoint_blocks(container)
        blocks = [b for c in lists for b in c] + self.task.extra_units(model)
        mesh = data_parallel_mesh(self.device)
        self.model = shard_model(model, blocks, mesh, mixed_precision(self.device), self.task.ignored_params(model))
        self.params = self.task.trainable_parameters(self.model)
        self.optimizer = build_optimizer(self.params, self.section.optim)
        self.scheduler = build_scheduler(self.optimizer, self.section.optim, self.section.steps)
        self.guard = NonFiniteGuard(self.section.max_nonfinite_in_a_row, self.task.stage)
        torch.manual_seed(self.config.seed + 1000 + self.rank)  # per-rank randomness from here on

    def resume(self) -> None:
        """Load the latest checkpoint Ray Train knows of; a damaged one falls back to the newest
        complete checkpoint before it."""
        latest = ray.train.get_checkpoint()
        if latest is None:
            return
        candidates = [latest]
        while candidates:
            checkpoint = candidates.pop()
            try:
                with checkpoint.as_directory() as d:
                    self.state = ckpt.load_checkpoint(
                        d, self.model, [self.optimizer], self.scheduler, ignore_frozen=self.task.ignore_frozen
                    )
                self.guard.skipped = self.state.nonfinite_skipped
                self._print(f"resumed from {checkpoint.path} at step {self.state.step}")
                return
            except ckpt.IncompleteCheckpointError as exc:
                log.warning("%s; trying an older checkpoint", exc)
                older = ckpt.newest_complete_sibling(checkpoint.path, checkpoint.filesystem, ckpt.checkpoint_step(checkpoint.path))
                if older is not None:
                    candidates.append(ray.train.Checkpoint(older, filesystem=checkpoint.filesystem))
        raise RuntimeError("no complete checkpoint to resume from; remove the run directory to start over")

    # -- data -------------------------------------------------------------------------------------

    def batches(self) -> "BatchStream":
        return BatchStream(
            ray.train.get_dataset_shard("train"), self.state, self.rank, self.task.stage,
            dict(batch_size=self.section.batch_size_per_worker, dtypes=self.task.columns, device=self.device,
                 drop_last=True, prefetch_batches=2),
        )

    # -- the loop ---------------------------------------------------------------------------------

    def train_step(self, batches, window: WindowMetrics) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns this rank's scalars."""
        model, accum, step = self.model, self.section.grad_accum, self.state.step
        model.train()
        step_start, wait_before = time.perf_counter(), window.data_wait
        scalars: dict[str, float] = defaultdict(float)
        samples = tokens = 0
        for i in range(accum):
            t0 = time.perf_counter()
            batch = next(batches)
            window.data_wait += time.perf_counter() - t0
            model.set_requires_gradient_sync(i == accum - 1)  # reduce-scatter once per step
            out = self.task.forward(model, batch, step)
            (out["loss"] / accum).backward()
            names = [k for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1]
            # One device-to-host copy for all scalars (one sync on GPU, not one per loss term).
            values = torch.stack([out[k].detach().float().reshape(()) for k in names]).tolist()
            for k, v in zip(names, values):
                scalars[k] += v / accum
            n_samples, n_tokens = self.task.count(batch)
            samples, tokens = samples + n_samples, tokens + n_tokens
        self.maybe_fail("step", step + 1)
        grad_norm = float(clip_grad_norm(self.params, self.section.optim.grad_clip))
        # The grad norm is global already; the loss is per rank, so agree on skipping across ranks.
        bad = torch.tensor([float(not (math.isfinite(scalars["loss"]) and math.isfinite(grad_norm)))], device=self.device)
        if self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if self.guard.check(float(bad) == 0.0, step + 1, scalars["loss"]):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        scalars["lr"] = self.scheduler.get_last_lr()[0]
        scalars["grad_norm"] = grad_norm
        self.scheduler.step()
        self.state.advance()
        window.add_step(scalars, samples, tokens)
        self.step_timings.append((window.data_wait - wait_before, time.perf_counter() - step_start, step_start))
        return scalars

    def fit(self) -> dict:
        self.begin()
        while self.state.step < self.section.steps:
            self.step()
        return self.end()

    def begin(self) -> None:
        """Build, resume, and get ready for the first step."""
        self.build()
        self.resume()
        self.state.start_segment()
        self.state.world_size = self.world
        self.global_batch = self.section.batch_size_per_worker * self.world * self.section.grad_accum
        self._print(f"training {self.section.steps} steps, global batch {self.global_batch} "
                    f"({self.section.batch_size_per_worker} x {self.world} workers x {self.section.grad_accum} accum), "
                    f"starting at step {self.state.step}")
        self.flops_per_token = self.task.flops_per_token(self.model)
        self.peak_flops = peak_flops(self.device)
        # A finished run (a rerun of it) reads no data.
        self.stream = self.batches() if self.state.step < self.section.steps else None
        self.window = WindowMetrics()

    def step(self) -> None:
        """One optimizer step, then whatever falls due at it: logging, evaluation, checkpoint, report."""
        self.train_step(self.stream, self.window)
        step, total = self.state.step, self.section.steps
        do_log = step % self.section.log_every == 0 or step == total
        do_eval = self.task.wants_eval(step, total)
        do_ckpt = step % self.section.checkpoint_every == 0 or step == total
        if not (do_log or do_eval or do_ckpt):
            return
        if do_log:
            self.log(step, total)
        report = dict(self.state.metrics, step=step)
        if do_eval:
            evaluation = self.task.evaluate(self, step)
            self.last_eval = evaluation
            report.update(evaluation)
            if self.rank == 0:
                self.logger.log_metrics(evaluation, step)
        self.reports.append(report)
        if do_ckpt:
            self.save_and_report(report)
        else:
            ray.train.report(report)

    def log(self, step: int, total: int) -> None:
        window = self.window
        metrics = mean_across_ranks(window.means())
        metrics.update(self.task.replica_checks(self.model))
        metrics.update(window.summary(self.world, self.flops_per_token, self.peak_flops))
        metrics.update(global_batch_size=self.global_batch, nonfinite_skipped=self.guard.skipped, epoch=self.state.epoch)
        if self.rank == 0:  # one reader of the data plane's counters is enough
            metrics.update({f"rows_skipped/{k}": v for k, v in self.task.rows_skipped().items()})
        self.state.metrics = metrics
        if self.rank == 0:
            self.logger.log_metrics(metrics, step)
            self._print(progress_line(self.task.stage, step, total, metrics))
        window.reset()

    def end(self) -> dict:
        self.state.metrics.update(self.data_wait_shares())
        return self.finish()

    def data_wait_shares(self) -> dict[str, float]:
        """Share of step time spent waiting for data: over all steps of this (re)start, and in steady
        state (without the first step, which also waits for the Ray Data pipeline to start). Also the
        median interval between step starts after 5 warm-up steps (logging and reports included)."""
        if not self.step_timings:
            return {}
        waits, times, starts = zip(*self.step_timings)
        out = {"data_wait_share_run": sum(waits) / max(sum(times), 1e-9)}
        if len(times) > 1:
            out["data_wait_share_steady"] = sum(waits[1:]) / max(sum(times[1:]), 1e-9)
        intervals = sorted(b - a for a, b in zip(starts[5:], starts[6:]))
        if intervals:
            out["step_interval_median_s"] = intervals[len(intervals) // 2]
        return out

    # -- checkpoints, faults, export --------------------------------------------------------------

    def save_and_report(self, metrics: dict[str, float]) -> None:
        step = self.state.step
        local = tempfile.mkdtemp(prefix=f"vilau-{self.task.stage}-step{step}-rank{self.rank}-")
        try:
            self.state.nonfinite_skipped = self.guard.skipped
            ckpt.save_checkpoint(
                local, self.model, [self.optimizer], self.scheduler, self.state,
                ignore_frozen=self.task.ignore_frozen, before_complete=lambda: self.maybe_fail("save", step),
            )
            # Every rank uploads its part into the same directory; rank 0's name is used by all.
            name = f"checkpoint_step{step:07d}_{time.strftime('%Y%m%d-%H%M%S')}"
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local), checkpoint_dir_name=name)
            # report() returns once uploaded; the controller registers the checkpoint a little later. Wait
            # for that, so a worker lost right after a save still resumes from this checkpoint.
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def maybe_fail(self, phase: str, step: int) -> None:
        """Fault injection (config.cluster.fault_injection): the chosen rank exits hard, once per run.

        A marker in the run's storage directory makes it happen the first time only, so the restarted
        worker group runs through.
        """
        fault = self.config.cluster.fault_injection
        if (fault.stage, fault.fail_at_step, fault.rank, fault.phase) != (self.task.stage, step, self.rank, phase):
            return
        marker = f"{self.experiment_path}/fault_injected_{self.task.stage}_{phase}_step{step}"
        if self.storage_fs.get_file_info(marker).type != pafs.FileType.NotFound:
            return
        with self.storage_fs.open_output_stream(marker) as f:
            f.write(b"injected\n")
        print(f"[fault injection] rank {self.rank} exits hard at step {step} ({phase})", flush=True)
        os._exit(1)  # like a lost node: no exception, no cleanup, no report

    def finish(self) -> dict:
        """The end of a run on every rank: no collective, no export. The last step always saves a
        checkpoint, and the driver writes the consolidated export from it (and generates samples) in
        Ray tasks of their own after the worker group has finished, so no rank ever waits on rank 0
        in a collective while it exports (at 7B that outlasts the process-group timeout)."""
        return {
            "stage": self.task.stage,
            "steps_done": self.state.step,
            "history": self.state.history,
            "nonfinite_skipped": self.guard.skipped,
            "final_metrics": {**self.state.metrics, **self.last_eval},
            "reports": self.reports,
            "finished_at": time.time(),
        }

    def _print(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)
