"""The one training loop both stages share, run by every Ray Train worker.

A stage is a :class:`Task` (how to build the model, which blocks to shard, the loss, evaluation and
checkpoint contents); the :class:`Trainer` does everything else the same way for both:

    build on the meta device -> activation checkpointing -> FSDP2 (HSDP with cluster.hsdp_replicas;
    nothing with one rank) -> this rank's shards only, filled by the task (seeded init, pretrained
    weights read shard-wise) -> AdamW + warmup/cosine -> resume (each rank reads its own shards from
    storage) -> steps: grad accumulation, clipping, non-finite guard, no host sync per micro-batch
    -> every log_every: metrics to MLflow (rank 0) + progress line + ray.train.report
    -> every checkpoint_every and at the end: asynchronous sharded DCP save straight to storage,
       registered with Ray Train once every rank has committed it
    -> at the end: nothing collective; the driver exports from the final checkpoint
       (orchestration/train/export.py) once the worker group has finished.

``ray.train.report`` is a barrier, so every rank reports at the same steps (the schedule depends on the
step only).
"""

from __future__ import annotations

import logging
import os
import time

import pyarrow.fs as pafs
import ray.train
import torch
from torch import nn

from orchestration.config import Config, StageSection
from orchestration.storage import is_s3
from orchestration.train import checkpoint as ckpt
from orchestration.train.fsdp import (
    build_sharded_model,
    data_parallel_mesh,
    is_sharded,
    mixed_precision,
    set_micro_batch_sync,
    training_device,
)
from orchestration.train.metrics import WindowMetrics, mean_across_ranks, peak_flops, progress_line
from orchestration.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from orchestration.train.batch_stream import BatchStream
from orchestration.train.tracking import RunInfo, RunLogger, start_system_metrics

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
    columns: dict[str, torch.dtype] = {}  # training column -> dtype (after ``host_batch``)
    ignore_frozen: bool = False  # leave frozen weights out of checkpoints (they come from elsewhere)

    def __init__(self, config: Config, section: StageSection):
        self.config, self.section = config, section

    def build_model(self) -> nn.Module:
        """The model; the trainer calls this under ``torch.device("meta")`` (shapes only)."""
        raise NotImplementedError

    def init_weights(self, model: nn.Module, seed: int) -> None:
        """Fill a materialized (``to_empty``) model: default, rank 0 builds the model eagerly from the
        seed and every rank receives its shards (see ``weights.broadcast_from_rank0``)."""
        from orchestration.train.fsdp import match_shapes
        from orchestration.train.weights import broadcast_from_rank0

        def reference() -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.build_model()

        broadcast_from_rank0(model, reference, adapt=match_shapes)

    loss_sums_over_step: bool = False  # forward's loss is this rank's share of the step's total (see LMTask)

    def host_batch(self, batch: dict) -> dict:
        """A micro-batch of numpy columns as read, before it becomes tensors; runs in the data thread
        (e.g. the tower's caption tokenization, which the data processes leave to the trainer; the LM's
        caption dropout, drawn per sample and epoch: ``batch["epoch"]`` is the data epoch)."""
        return batch

    def prepare_step(self, micro_batches: list[dict]) -> None:
        """Called with the step's micro-batches before their forward passes (e.g. global token counts)."""

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

    def count(self, batch: dict) -> tuple[int | torch.Tensor, int | torch.Tensor]:
        """(samples, tokens) in a micro-batch: ints or device tensors (never read back per batch)."""
        raise NotImplementedError

    def flops_per_token(self, model: nn.Module) -> float | None:
        return None

    def extra_optimizers(self, model: nn.Module) -> list[torch.optim.Optimizer]:
        """Optimizers of parameters trained on a loss of their own (a GAN discriminator), none of them in
        ``trainable_parameters``; checkpointed and restored with the main optimizer."""
        return []

    def after_backward(self, model: nn.Module, batch: dict, out: dict, step: int, scale: float) -> dict[str, torch.Tensor]:
        """After a micro-batch's backward of the main loss: the task's own second backward, if any (the
        discriminator's loss, times ``scale``); returns scalars to log with the step's."""
        return {}

    def after_optimizer_step(self, model: nn.Module, step: int, applied: bool) -> dict[str, torch.Tensor]:
        """After the main optimizer step (``applied`` False when the non-finite guard skipped it): step the
        extra optimizers. Same calls on every rank. Returns scalars to log."""
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
        self.stream: BatchStream | None = None

    # -- setup ------------------------------------------------------------------------------------

    def build(self) -> None:
        """Meta-device build -> activation checkpointing -> FSDP2 (or nothing with one rank) -> storage
        for this rank's shards only (``to_empty``) -> the task fills it (random init reproducible from
        the seed whatever the world size, pretrained weights read shard-wise)."""
        torch.manual_seed(self.config.seed)
        self.mesh = data_parallel_mesh(self.device, self.config.cluster.hsdp_replicas)
        model = build_sharded_model(self.task, self.mesh, mixed_precision(self.device))
        model.to_empty(device=self.device)
        self.task.init_weights(model, self.config.seed)
        self.model = model
        self.sharded = is_sharded(model)
        self.params = self.task.trainable_parameters(self.model)
        self.optimizer = build_optimizer(self.params, self.section.optim)
        self.optimizers = [self.optimizer, *self.task.extra_optimizers(self.model)]  # what checkpoints hold
        self.scheduler = build_scheduler(self.optimizer, self.section.optim, self.section.steps)
        self.guard = NonFiniteGuard(self.section.max_nonfinite_in_a_row, self.task.stage)
        self.saver = ckpt.AsyncSaver(self.storage_fs, self.experiment_path)
        torch.manual_seed(self.config.seed + 1000 + self.rank)  # per-rank randomness from here on

    def resume(self) -> None:
        """Load the latest checkpoint Ray Train knows of, each rank reading only its own shards straight
        from storage; a damaged one falls back to the newest complete checkpoint before it."""
        latest = ray.train.get_checkpoint()
        if latest is None:
            return
        candidates = [(latest.path, latest.filesystem)]
        started = time.perf_counter()
        while candidates:
            path, fs = candidates.pop()
            try:
                self.state = ckpt.load_checkpoint(
                    path, self.model, self.optimizers, self.scheduler, ignore_frozen=self.task.ignore_frozen,
                    filesystem=fs,
                )
                self.guard.skipped = self.state.nonfinite_skipped
                self._print(f"resumed from {path} at step {self.state.step} in {time.perf_counter() - started:.1f} s")
                if self.config.cluster.fault_injection.record_restored_state:
                    self._record_restored_state(path)
                return
            except ckpt.IncompleteCheckpointError as exc:
                log.warning("%s; trying an older checkpoint", exc)
                older = ckpt.newest_complete_sibling(path, fs, ckpt.checkpoint_step(path))
                if older is not None:
                    candidates.append((older, fs))
        raise RuntimeError("no complete checkpoint to resume from; remove the run directory to start over")

    def _record_restored_state(self, checkpoint_path: str) -> None:
        """cluster.fault_injection.record_restored_state: what this run holds right after the restore
        (collective), written by rank 0 beside the checkpoints for a test to compare with their files."""
        import json

        digest = ckpt.state_digest(self.model, self.optimizers, self.task.ignore_frozen)
        if self.rank == 0:
            path = f"{self.experiment_path}/restored_state_step{self.state.step:07d}.json"
            with self.storage_fs.open_output_stream(path) as f:
                f.write(json.dumps({"checkpoint": checkpoint_path, "step": self.state.step, "tensors": digest}).encode())

    # -- data -------------------------------------------------------------------------------------

    def batches(self) -> "BatchStream":
        """This rank's micro-batches: its own share of each epoch, built here from the epoch plan the
        driver published in the run's directory (nothing of the data pipeline outlives this worker)."""
        from orchestration.data.epochs import EpochPlan
        from orchestration.data.pipeline import pool_wait_error, rank_dataset

        with self.storage_fs.open_input_stream(f"{self.experiment_path}/data_plan.json") as f:
            plan = EpochPlan.from_json(f.read().decode())
        tokenizer_files = getattr(self.task, "tokenizer_files", None)

        # Unreadable shards are recorded in the run's folder, so that a restart does not read into them again.
        run_dir = f"s3://{self.experiment_path}" if is_s3(self.config.cluster.storage_path) else self.experiment_path

        def make_dataset(epoch, position):
            return rank_dataset(self.config, self.task.stage, plan, epoch=epoch, rank=self.rank, world=self.world,
                                position=position, tokenizer_files=tokenizer_files, fault_dir=run_dir)

        stream = BatchStream(
            make_dataset, self.rank, self.world, self.task.stage, self.section.batch_size_per_worker,
            self.task.columns, self.device, recorder=self._key_recorder() if self.config.data.record_trained_keys else None,
            batches_needed=(self.section.steps - self.state.step) * self.section.grad_accum,
            host_batch=self.task.host_batch, batch_timeout_s=self.config.data.batch_timeout_s,
            explain_error=lambda exc: pool_wait_error(self.config, exc) or exc,
            sources=sorted({unit.source for unit in plan.units}),
        )
        # The restored data state: this rank's, or every old rank's after a change of world size.
        stream.load_state_dict(self.state.data)
        if "ranks" in self.state.data:
            self._print(f"the world size changed ({self.state.data['world']} -> {self.world} ranks): epoch "
                        f"{stream.epoch} continues with what the old ranks left dealt over the new ones")
        return stream

    def _key_recorder(self):
        """data.record_trained_keys: one small JSON file per micro-batch under the run's directory. A
        step redone after a restart overwrites its file, so the files describe the final weights."""
        import json

        base = f"{self.experiment_path}/trained_keys/rank{self.rank}"
        self.storage_fs.create_dir(base, recursive=True)
        micro = [0, 0]  # (step, micro-batches recorded in it)

        def record(epoch: int, keys: list[str]) -> None:
            step = self.state.step + 1  # the step this micro-batch belongs to
            index = micro[1] if micro[0] == step else 0
            micro[:] = [step, index + 1]
            with self.storage_fs.open_output_stream(f"{base}/step{step:07d}_{index}.json") as f:
                f.write(json.dumps({"rank": self.rank, "step": step, "micro": index, "epoch": epoch, "keys": keys}).encode())

        return record

    # -- the loop ---------------------------------------------------------------------------------

    def train_step(self, batches, window: WindowMetrics) -> dict[str, torch.Tensor | float]:
        """One optimizer step over grad_accum micro-batches; returns this rank's scalars.

        Nothing is read back to the host per micro-batch: loss terms, counts and the grad norm stay on
        the device and are summed there (read once per log step by ``WindowMetrics``). The one host
        read per step is the non-finite flag, taken from the global grad norm: a non-finite loss on any
        rank makes that rank's gradients, hence the all-reduced norm, non-finite, so every rank sees the
        same flag without a collective of its own. (Reading it one step late would save that sync but
        would apply a poisoned update first.)
        """
        model, accum, step = self.model, self.section.grad_accum, self.state.step
        model.train()
        step_start, t0 = time.perf_counter(), time.perf_counter()
        micro_batches = [next(batches) for _ in range(accum)]
        wait = time.perf_counter() - t0
        window.data_wait += wait
        self.task.prepare_step(micro_batches)
        # The task's loss is either a mean per micro-batch (averaged over the step here) or already its
        # share of the step's total (LM: normalized by the step's global token counts).
        scale = 1.0 if self.task.loss_sums_over_step else 1.0 / accum
        scalars: dict[str, torch.Tensor] = {}
        samples = tokens = 0
        autocast = self.device.type == "cuda" and not self.sharded  # FSDP2's policy casts when sharded
        for i, batch in enumerate(micro_batches):
            set_micro_batch_sync(model, is_last=i == accum - 1)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = self.task.forward(model, batch, step)
            (out["loss"] * scale).backward()
            out.update(self.task.after_backward(model, batch, out, step, scale))
            for k, v in out.items():
                if isinstance(v, torch.Tensor) and v.numel() == 1:
                    term = v.detach().float().reshape(()) * scale
                    scalars[k] = scalars[k] + term if k in scalars else term
            n_samples, n_tokens = self.task.count(batch)
            samples, tokens = samples + n_samples, tokens + n_tokens
        self.maybe_fail("step", step + 1)
        grad_norm = clip_grad_norm(self.params, self.section.optim.grad_clip)
        finite = bool(torch.isfinite(grad_norm))  # the step's one host sync (see above)
        applied = self.guard.check(finite, step + 1, scalars["loss"] if finite else float(scalars["loss"]))
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        scalars.update(self.task.after_optimizer_step(model, step, applied))
        scalars["lr"] = self.scheduler.get_last_lr()[0]
        scalars["grad_norm"] = grad_norm.detach().float()
        self.scheduler.step()
        self.state.advance()
        window.add_step(scalars, samples, tokens)
        self.step_timings.append((wait, time.perf_counter() - step_start, step_start))
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
        # One system-metrics monitor per node (its GPUs, CPU, memory), into the stage's run.
        context = ray.train.get_context()
        self.system_metrics = None
        if context.get_local_rank() == 0:
            self.system_metrics = start_system_metrics(self.run.tracking_uri, self.run.mlflow_run_id,
                                                       node_id=f"node{context.get_node_rank()}")

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
            self.report_metrics(report)

    def log(self, step: int, total: int) -> None:
        window = self.window
        metrics = mean_across_ranks(window.means())
        metrics.update(self.task.replica_checks(self.model))
        metrics.update(window.summary(self.world, self.flops_per_token, self.peak_flops))
        epoch = self.stream.epoch if self.stream is not None else self.state.epoch
        metrics.update(global_batch_size=self.global_batch, nonfinite_skipped=self.guard.skipped, epoch=epoch)
        metrics.update(self.stream.data_metrics() if self.stream is not None else {})  # collective
        self.state.metrics = metrics
        if self.rank == 0:
            self.logger.log_metrics(metrics, step)
            self._print(progress_line(self.task.stage, step, total, metrics))
        window.reset()

    def end(self) -> dict:
        if self.stream is not None:
            self.stream.close()  # no read-ahead past the last step
        self.wait_for_checkpoints()  # the final checkpoint is registered before the run ends
        self.saver.close()
        self.logger.flush()  # the run's metrics are on the server before the driver reads or closes it
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
        """Start an asynchronous sharded save of this step and report it (every rank, same calls).

        The save runs in the background (``ckpt.AsyncSaver``: shards straight into the run's storage,
        each rank's COMPLETE marker last) while training goes on; a new save first waits for the
        previous one. The report is made now, in Ray Train's asynchronous mode: Ray's upload thread
        waits for this rank's save to commit (``checkpoint_upload_fn``; nothing is copied) and then
        registers it, so the checkpoint counts from the moment every rank has committed it, whatever
        the training loop is doing by then.
        """
        step = self.state.step
        self.state.nonfinite_skipped = self.guard.skipped
        if self.stream is not None:  # the checkpoint pulls the data state from the stream that owns it
            self.state.data = self.stream.state_dict()
            self.state.epoch, self.state.batches_in_epoch = self.stream.epoch, self.stream.batches_in_epoch
        if self.saver.future is not None:
            # A new save waits for the previous one to be committed and registered: a save cut off
            # later always leaves the previous checkpoint as the one to resume from.
            self.wait_for_checkpoints()
        directory = self.saver.start(
            step, self.model, self.optimizers, self.scheduler, self.state,
            ignore_frozen=self.task.ignore_frozen, before_complete=lambda: self.maybe_fail("save", step),
        )
        written = self.saver.future

        def committed(checkpoint: ray.train.Checkpoint, _name: str) -> ray.train.Checkpoint:
            written.result()  # re-raises a failed save in the training thread (via Ray)
            return checkpoint

        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint(directory, filesystem=self.storage_fs),
            checkpoint_dir_name=directory.rsplit("/", 1)[-1],
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=False, checkpoint_upload_fn=committed,
        )

    def report_metrics(self, metrics: dict[str, float]) -> None:
        """A report without checkpoint (Tune reads these). Ray Train keeps reports in order, so one made
        while a save is in flight would wait for that save: such a log step skips its Ray report instead
        (its metrics still go to MLflow). Collective: the ranks agree on it with one tiny all-reduce."""
        if ckpt.all_ranks_agree(self.saver.idle(), self.device):
            ray.train.report(metrics)

    def wait_for_checkpoints(self) -> None:
        """Until the last save is committed by this rank and registered by Ray Train."""
        self.saver.wait()
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    def maybe_fail(self, phase: str, step: int) -> None:
        """Fault injection (config.cluster.fault_injection): the chosen rank exits hard, once per run.

        A marker in the run's storage directory makes it happen the first time only, so the restarted
        worker group runs through.
        """
        fault = self.config.cluster.fault_injection
        if (fault.stage, fault.fail_at_step, fault.rank, fault.phase) != (self.task.stage, step, self.rank, phase):
            return
        if phase == "step":
            # A crash between saves: let the save in flight commit and register first, so where the
            # run resumes does not depend on timing. (phase "save" kills a save in flight instead.)
            self.wait_for_checkpoints()
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
        if self.system_metrics is not None:
            self.system_metrics.finish()
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
