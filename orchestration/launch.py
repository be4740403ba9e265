"""Driver side of training: Ray, the TorchTrainer of each stage, and the whole pretraining pipeline.

    fit_tower(config) -> StageResult      stage 1 on Ray Train (also what the Tune sweep runs per trial)
    fit_lm(config, tower) -> StageResult  stage 2 on Ray Train, tower frozen
    pretrain(config) -> (tower, lm)       synthetic data if missing, stage 1, tokenization, stage 2

Each stage is one Ray Train run named ``<run_name>-<stage>`` under ``cluster.storage_path``; running
it again with the same name resumes from its latest checkpoint (a finished run just re-exports).

The end of a stage runs outside its worker group: once every worker has returned, a Ray task writes the
consolidated export from the final sharded checkpoint (orchestration/train/export.py), and for stage 2
another task, with its own resources, generates samples and the generation score
(orchestration/train/samples.py). No training rank waits for either.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from orchestration.cluster import init_ray, run_storage, storage_uri
from orchestration.config import Config, StageSection
from orchestration.resource_plan import ResourceWaitError, worker_bundle, worker_start_attempts
from orchestration.train.tracking import RunInfo, close_run, open_run, record_failure

log = logging.getLogger(__name__)

TOWER, LM = "tower", "lm"


@dataclass
class StageResult:
    """What a finished stage leaves behind (all paths are local paths or s3:// URIs)."""

    run_name: str
    stage: str
    steps_done: int
    metrics: dict[str, float]  # the last logged metrics (loss terms, throughput, eval, rows skipped)
    checkpoint_path: str | None  # the latest sharded checkpoint (resume point)
    export_path: str  # consolidated weights, loadable without Ray
    mlflow_run_id: str | None
    rows_skipped: dict[str, int] = field(default_factory=dict)
    history: list[list[int]] = field(default_factory=list)  # [[first_step, last_step]] per (re)start
    reports: list[dict[str, Any]] = field(default_factory=list)  # rank 0's reports since the last (re)start
    timings: dict[str, float] = field(default_factory=dict)  # seconds: fit, first report, end of run
    workers_finished_at: float | None = None  # time.time() when rank 0 left the training function
    end_of_run_started_at: float | None = None  # time.time() when the export task started

    @property
    def loss_terms(self) -> dict[str, float]:
        return {k: v for k, v in self.metrics.items() if k == "loss" or k.startswith("loss_")}

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("reports")
        out["final_loss_terms"] = self.loss_terms
        return out


def stage_run_name(config: Config, stage: str) -> str:
    return f"{config.run_name}-{stage}"


def build_trainer(
    config: Config,
    section: StageSection,
    train_fn: Callable[[dict], Any],
    run: RunInfo,
    callbacks: list | None = None,
    loop_config: dict | None = None,
):
    """The TorchTrainer of one stage, from the cluster section of the config."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cluster = config.cluster
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = 1
    storage_path, storage_fs = run_storage(config)
    return TorchTrainer(
        train_fn,
        train_loop_config={"config": config, "run": run, **(loop_config or {})},
        torch_config=TorchConfig(timeout_s=cluster.process_group_timeout_s),
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            # A worker group that cannot be placed fails after cluster.worker_start_timeout_s (Ray Train
            # alone retries forever); run_stage names what it asked for.
            failure_config=FailureConfig(max_failures=cluster.max_failures,
                                         controller_failure_limit=worker_start_attempts(config)),
            checkpoint_config=CheckpointConfig(num_to_keep=section.keep_checkpoints),
            callbacks=callbacks,
        ),
    )


def run_stage(
    config: Config,
    stage: str,
    section: StageSection,
    train_fn: Callable[[dict], Any],
    *,
    run_name: str | None = None,
    callbacks: list | None = None,
    loop_config: dict | None = None,
    end_of_run: Callable[["StageResult", RunInfo], dict[str, float]] | None = None,
    console=None,
    data_plan=None,
) -> StageResult:
    """Open (or reopen) the MLflow run, fit the TorchTrainer, run the end of the stage (export,
    samples) as Ray tasks once the worker group has finished, close the run, collect the result."""
    init_ray(config)
    run_name = run_name or stage_run_name(config, stage)
    from orchestration.resume import record_run_config

    record_run_config(config, stage, run_name)  # what a rerun of this run name is compared with
    mlflow_run_id = open_run(config, stage, run_name)
    from orchestration.pipeline_tracking import log_data_inputs, log_stage_model

    log_data_inputs(config, mlflow_run_id, stage, data_plan)
    run = RunInfo(run_name, config.tracking_uri, mlflow_run_id)
    progress = console.progress(stage, section.steps) if console is not None else None
    if progress is not None:
        callbacks = [*(callbacks or []), progress.callback()]
    trainer = build_trainer(config, section, train_fn, run, callbacks, loop_config)
    started = time.perf_counter()
    try:
        try:
            result = trainer.fit()
        except Exception as exc:
            raise worker_start_error(config, stage, exc) or exc
        finally:
            if progress is not None:
                progress.close()
        fit_s = time.perf_counter() - started
        summary = result.return_value or {}
        storage_path, _ = run_storage(config)
        stage_result = StageResult(
            run_name=run_name,
            stage=stage,
            steps_done=summary.get("steps_done", 0),
            metrics=summary.get("final_metrics", dict(result.metrics or {})),
            checkpoint_path=storage_uri(config, result.checkpoint.path) if result.checkpoint else None,
            export_path=storage_uri(config, f"{storage_path}/{run_name}/export"),
            mlflow_run_id=mlflow_run_id,
            rows_skipped=_rows_skipped(summary.get("final_metrics", {})),
            history=summary.get("history", []),
            reports=summary.get("reports", []),
            timings={"fit_s": fit_s},
        )
        if progress is not None and progress.first_report_s is not None:
            stage_result.timings["first_report_s"] = progress.first_report_s
        stage_result.workers_finished_at = summary.get("finished_at")
        if end_of_run is not None:
            if stage_result.checkpoint_path is None:
                raise RuntimeError(f"[{stage}] the run finished without a checkpoint to export")
            started = time.perf_counter()
            stage_result.metrics.update(end_of_run(stage_result, run))
            stage_result.timings["end_of_run_s"] = time.perf_counter() - started
            log_stage_model(config, stage_result)  # the export, findable from the run: a LoggedModel
    except BaseException as exc:
        record_failure(config, mlflow_run_id, exc)  # the run says why it failed
        raise
    record_step_history(config, mlflow_run_id, stage_result.history)
    close_run(config, mlflow_run_id)
    for what, seconds in stage_result.timings.items():
        log.info("timing: %s %s %.1f s", stage, what, seconds)
    return stage_result


def worker_start_error(config: Config, stage: str, exc: Exception) -> ResourceWaitError | None:
    """Ray Train's "the worker group could not start" (a placement group that never got its resources),
    said as what the stage asked for and the fields that size it; None for any other failure."""
    if "WorkerGroupStartupTimeout" not in f"{type(exc).__name__} {exc!r} {exc}":
        return None
    c = config.cluster
    return ResourceWaitError(
        f"[{stage}] the training worker group ({c.num_workers} x {worker_bundle(config)}) could not be placed "
        f"within cluster.worker_start_timeout_s={c.worker_start_timeout_s:g}: the cluster lacks these resources "
        "or other work holds them (fields: cluster.num_workers, cluster.cpus_per_worker, cluster.use_gpu; "
        "`python jobs/plan.py` shows what each stage asks for)"
    )


def _remote(fn: Callable, **resources):
    import ray

    return ray.remote(fn).options(**resources)


def tower_end_of_run(config: Config) -> Callable[[StageResult, RunInfo], dict[str, float]]:
    """Stage 1's end, as a Ray task after the worker group: export from the checkpoint, codebook plot."""
    from orchestration.train.export import finish_tower_stage

    def end(result: StageResult, run: RunInfo) -> dict[str, float]:
        import ray

        task = _remote(finish_tower_stage, num_cpus=1)
        out = ray.get(task.remote(config, result.checkpoint_path, result.export_path, run, result.steps_done))
        result.end_of_run_started_at = out["started_at"]
        return out["metrics"]

    return end


def lm_end_of_run(config: Config, tokenizer_files: dict[str, bytes]) -> Callable[[StageResult, RunInfo], dict[str, float]]:
    """Stage 2's end: the export (a Ray task), then samples and the generation score (another Ray task,
    with a GPU when the cluster trains on GPUs)."""
    from orchestration.train.export import finish_lm_export
    from orchestration.train.samples import generation_resources, run_generation_eval

    def end(result: StageResult, run: RunInfo) -> dict[str, float]:
        import ray

        started = time.perf_counter()
        export = _remote(finish_lm_export, num_cpus=1)
        out = ray.get(export.remote(config, result.checkpoint_path, result.export_path, tokenizer_files,
                                    config.model.tower_checkpoint))
        result.end_of_run_started_at = out["started_at"]
        result.timings["export_s"] = time.perf_counter() - started
        if config.lm_train.generate_samples == 0:
            return out["metrics"]
        started = time.perf_counter()
        generation = _remote(run_generation_eval, **generation_resources(config))
        metrics = ray.get(generation.remote(config, result.export_path, run.tracking_uri, run.mlflow_run_id,
                                            result.steps_done))
        result.timings["generation_s"] = time.perf_counter() - started
        return {**out["metrics"], **metrics}

    return end


def record_step_history(config: Config, run_id: str | None, history: list[list[int]]) -> None:
    """Show (re)starts in the MLflow run: tag ``vilau.step_history`` ("1-3,4-12": the steps each
    start of the worker group applied, in the lineage of the final weights) and metric ``restarts``
    (starts that resumed from a checkpoint: after a lost node or worker, or a rerun of the job)."""
    if run_id is None or not history:
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=config.tracking_uri)
    client.set_tag(run_id, "vilau.step_history", ",".join(f"{first}-{last}" for first, last in history))
    client.log_metric(run_id, "restarts", len(history) - 1, step=history[-1][1])


def _rows_skipped(metrics: dict) -> dict[str, int]:
    """Distinct records the run dropped, by reason, as the training loop counted them (``rows_skipped/*``)."""
    return {k.split("/", 1)[1]: int(v) for k, v in metrics.items() if k.startswith("rows_skipped/")}


DATA_PLAN = "data_plan.json"


def publish_data_plan(config: Config, run_name: str, plan) -> None:
    """Write the stage's epoch plan into the run's storage directory, where every worker reads it
    (Trainer.batches). A rerun of the same run keeps the plan it started with, so resuming continues
    the same epochs even if shards were added meanwhile."""
    import pyarrow.fs as pafs

    storage_path, storage_fs = run_storage(config)
    fs = storage_fs or pafs.LocalFileSystem()
    path = f"{storage_path.rstrip('/')}/{run_name}/{DATA_PLAN}"
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        log.info("keeping the data plan of the earlier attempt at %s", path)
        return
    fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(plan.to_json().encode())


# ---------------------------------------------------------------- before Ray


def preflight(config: Config, stages: tuple[str, ...], resume: str = "auto"):
    """What every job checks and prepares before it asks Ray for anything. Every problem is reported at
    once, each naming its field, as one ConfigError: the data folder (generated shards only where no
    user data can be: sources.ensure_data); the stages' sources, weight paths and tracking server
    (orchestration/preflight.py); what each stage will ask Ray for, held against the cluster, and on
    GPUs each stage's per-GPU memory peak against cluster.gpu_memory_gib (run_plan). A job that joins
    a cluster joins it here to read its nodes (that takes nothing); a local instance is planned
    without starting it. Returns the run plan."""
    from orchestration.config import ConfigError
    from orchestration.data.sources import ensure_data
    from orchestration.preflight import config_problems
    from orchestration.resume import resume_problems, start_fresh
    from orchestration.resource_plan import joins_a_cluster
    from orchestration.run_plan import plan_run

    started = time.perf_counter()
    problems = []
    try:
        ensure_data(config)
    except ConfigError as exc:
        problems.append(str(exc))
    # Join the cluster first (joining takes nothing): its own check refuses paths on one node's disk, the
    # likeliest mistake on a first cluster run, and its nodes are what the plan is held against.
    joined = True
    if joins_a_cluster(config) and not config.cluster.cluster_yaml:
        try:
            init_ray(config)
        except ConfigError as exc:
            problems.append(str(exc))
            joined = False
    problems += config_problems(config, stages)
    problems += resume_problems(config, stages, resume)
    plan = None
    if joined:
        plan = plan_run(config, stages, memory=bool(config.cluster.use_gpu and config.cluster.gpu_memory_gib))
        problems += plan.problems
    if problems:
        raise ConfigError("the run cannot start:\n  " + "\n  ".join(problems))
    if resume == "fresh":  # destructive, so only once everything else is known to be fine
        for removed in start_fresh(config, stages):
            log.info("--fresh: removed %s", removed)
    log.info("timing: preflight (%s) %.1f s", "+".join(stages), time.perf_counter() - started)
    return plan


# ---------------------------------------------------------------- the stages


def fit_tower(
    config: Config,
    *,
    run_name: str | None = None,
    callbacks: list | None = None,
    console=None,
) -> StageResult:
    """Stage 1: train the vision tower on ``data.tower_sources``.

    ``result.reports`` holds every report of rank 0 (loss terms at each log step, ``eval/*`` metrics at
    each eval step); ``callbacks`` are Ray Train callbacks (e.g. Tune's TuneReportCallback).
    """
    from orchestration.train.tower import tower_worker

    from orchestration.data.pipeline import training_plan

    init_ray(config)
    # The workers build their own shares of each epoch from this plan.
    plan = training_plan(config, TOWER)
    publish_data_plan(config, run_name or stage_run_name(config, TOWER), plan)
    return run_stage(
        config, TOWER, config.tower_train, tower_worker,
        run_name=run_name, callbacks=callbacks, end_of_run=tower_end_of_run(config), console=console, data_plan=plan,
    )


def fit_lm(
    config: Config,
    tower_path: str | None = None,
    *,
    run_name: str | None = None,
    callbacks: list | None = None,
    console=None,
) -> StageResult:
    """Stage 2: train the LLM + projector + depth transformer over the frozen tower exported at
    ``tower_path`` (default: ``model.tower_checkpoint``)."""
    from orchestration.train.lm import lm_worker

    init_ray(config)
    tower_path = tower_path or config.model.tower_checkpoint
    if not tower_path:
        raise ValueError("stage 2 needs a stage-1 tower export: pass tower_path or set model.tower_checkpoint")
    config = config.model_copy(update={"model": config.model.model_copy(update={"tower_checkpoint": tower_path})})
    from orchestration.data.lm_data import directory_files, ensure_lm_tokenizer

    # The tokenizer travels to the workers as bytes (they may run on machines without output_dir).
    tokenizer_files = directory_files(ensure_lm_tokenizer(config))
    from orchestration.data.pipeline import read_manifest, training_plan, write_lm_cache

    if config.data.cache_dir and read_manifest(config.data.cache_dir, config) is None:
        # At scale the frozen tower encodes on the GPUs: through one cluster-wide pool, now, while no
        # training worker holds them; the training ranks then read code shards only.
        log.info("tokenizing the stage-2 mix once into %s (%d pool actors)", config.data.cache_dir, config.data.tokenizer_actors)
        if console is not None:
            console.print(f"[lm] tokenizing the stage-2 mix once into {config.data.cache_dir}")
        write_lm_cache(config, tower_path)

    # The workers build their own shares of each epoch from this plan.
    plan = training_plan(config, LM, tower_path)
    publish_data_plan(config, run_name or stage_run_name(config, LM), plan)
    return run_stage(
        config, LM, config.lm_train, lm_worker, run_name=run_name, callbacks=callbacks,
        loop_config={"tokenizer_files": tokenizer_files},
        end_of_run=lm_end_of_run(config, tokenizer_files), console=console, data_plan=plan,
    )


def pretrain(config: Config, console=None) -> tuple[StageResult, StageResult]:
    """The whole pipeline: shards if missing, stage 1, tokenization through the actor pool, stage 2.
    With a ``JobConsole``, each stage shows its progress and a line about its data."""
    from orchestration.pipeline_tracking import close_pipeline_run, open_pipeline_run
    from orchestration.train.tracking import start_system_metrics

    started = time.perf_counter()
    init_ray(config)
    log.info("timing: ray init %.1f s", time.perf_counter() - started)
    # One parent MLflow run for the pipeline; the stages' runs nest under it.
    parent = open_pipeline_run(config)
    if parent is not None:
        config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"parent_run_id": parent})})
    monitor = start_system_metrics(config.tracking_uri, parent)
    try:
        tower = fit_tower(config, console=console)
        if console is not None:
            console.print(data_line(TOWER, tower))
        lm = fit_lm(config, tower.export_path, console=console)
        if console is not None:
            console.print(data_line(LM, lm))
    except BaseException:
        close_pipeline_run(config, parent, failed=True)
        raise
    finally:
        if monitor is not None:
            monitor.finish()
    close_pipeline_run(config, parent)
    return tower, lm


def data_line(stage: str, result: StageResult) -> str:
    """One line about what the data pipeline delivered to a stage, from the training loop's own counts:
    samples trained, each source's realized share, faults by reason (each record once per epoch it was met)."""
    metrics = result.metrics
    shares = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("mixture_share/")}
    line = f"[{stage} data] {int(metrics.get('samples_trained', 0))} samples trained"
    if shares:
        line += " (" + ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items())) + ")"
    skipped = result.rows_skipped
    line += f", {sum(skipped.values())} records skipped" + (f" {dict(sorted(skipped.items()))}" if skipped else "")
    return line


def pretrain_summary(config: Config, tower: StageResult, lm: StageResult) -> dict[str, Any]:
    return {
        "run_name": config.run_name,
        "steps_done": {"tower": tower.steps_done, "lm": lm.steps_done},
        "final_loss_terms": {"tower": tower.loss_terms, "lm": lm.loss_terms},
        "checkpoint_path": {"tower": tower.checkpoint_path, "lm": lm.checkpoint_path},
        "export_path": {"tower": tower.export_path, "lm": lm.export_path},
        "mlflow_run_id": {"tower": tower.mlflow_run_id, "lm": lm.mlflow_run_id},
        "rows_skipped": {"tower": tower.rows_skipped, "lm": lm.rows_skipped},
        "data_wait_share": {
            "tower": tower.metrics.get("data_wait_share_steady"), "lm": lm.metrics.get("data_wait_share_steady"),
        },
        "evaluation": {r.stage: {k: v for k, v in r.metrics.items() if k.startswith("eval/")} for r in (tower, lm)},
        "timings": {"tower": tower.timings, "lm": lm.timings},
        "tracking_uri": config.tracking_uri,
        "stages": {"tower": tower.summary(), "lm": lm.summary()},
    }
