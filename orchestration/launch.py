"""Driver side of training: Ray, the TorchTrainer of each stage, and the whole pretraining pipeline.

    init_ray(config)                      start a local instance, or join a cluster / `ray job submit`
    fit_tower(config) -> StageResult      stage 1 on Ray Train (also what the Tune sweep runs per trial)
    fit_lm(config, tower) -> StageResult  stage 2 on Ray Train, tower frozen
    pretrain(config) -> (tower, lm)       synthetic data if missing, stage 1, tokenization, stage 2

Each stage is one Ray Train run named ``<run_name>-<stage>`` under ``cluster.storage_path``; running
it again with the same name resumes from its latest checkpoint (a finished run just re-exports).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from orchestration.config import Config, StageSection
from orchestration.storage import is_s3, pyarrow_filesystem
from orchestration.train.tracking import RunInfo, close_run, open_run

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

    @property
    def loss_terms(self) -> dict[str, float]:
        return {k: v for k, v in self.metrics.items() if k == "loss" or k.startswith("loss_")}

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("reports")
        out["final_loss_terms"] = self.loss_terms
        return out


# ---------------------------------------------------------------- Ray


def init_ray(config: Config) -> None:
    """Join the configured cluster, the cluster a `ray job submit` runs in (``RAY_ADDRESS``), or start a
    local instance. On a cluster whose nodes do not share a disk, node-local paths are refused here,
    before any worker starts."""
    import ray

    if ray.is_initialized():
        return
    if config.cluster.address or os.environ.get("RAY_ADDRESS"):
        # cluster.address wins; else Ray reads RAY_ADDRESS (set inside `ray job submit`, or exported).
        ray.init(address=config.cluster.address) if config.cluster.address else ray.init()
        from orchestration.cluster_checks import check_cluster_paths, cluster_shape

        try:
            check_cluster_paths(config, cluster_shape())
        except Exception:
            ray.shutdown()
            raise
    else:
        # A new local instance ("local": not a `ray start` cluster that may run here). More logical
        # CPUs than cores: Ray Data and Ray Train deadlock on a 2-core machine otherwise.
        ray.init(address="local", num_cpus=config.cluster.local_num_cpus, include_dashboard=False)


def stage_run_name(config: Config, stage: str) -> str:
    return f"{config.run_name}-{stage}"


def _storage(config: Config) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for RunConfig; S3 honours data.s3 (endpoint, keys)."""
    path = config.cluster.storage_path
    if is_s3(path):
        fs, inner = pyarrow_filesystem(path, config.data.s3)
        return inner, fs
    return os.path.abspath(path), None


def _uri(config: Config, fs_path: str) -> str:
    """A path on the storage filesystem as the user writes it (s3://... or a local path)."""
    return f"s3://{fs_path}" if is_s3(config.cluster.storage_path) else fs_path


def build_trainer(
    config: Config,
    section: StageSection,
    train_fn: Callable[[dict], Any],
    datasets: dict,
    run: RunInfo,
    callbacks: list | None = None,
    loop_config: dict | None = None,
):
    """The TorchTrainer of one stage, from the cluster section of the config."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cluster = config.cluster
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = 1
    storage_path, storage_fs = _storage(config)
    return TorchTrainer(
        train_fn,
        train_loop_config={"config": config, "run": run, **(loop_config or {})},
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=section.keep_checkpoints),
            callbacks=callbacks,
        ),
        datasets=datasets,
    )


def run_stage(
    config: Config,
    stage: str,
    section: StageSection,
    train_fn: Callable[[dict], Any],
    datasets: dict,
    *,
    run_name: str | None = None,
    callbacks: list | None = None,
    stats_group: str | None = None,
    loop_config: dict | None = None,
) -> StageResult:
    """Open (or reopen) the MLflow run, fit the TorchTrainer, close the run, collect the result."""
    init_ray(config)
    run_name = run_name or stage_run_name(config, stage)
    mlflow_run_id = open_run(config, stage, run_name)
    trainer = build_trainer(
        config, section, train_fn, datasets, RunInfo(run_name, config.tracking_uri, mlflow_run_id), callbacks,
        loop_config,
    )
    try:
        result = trainer.fit()
    except BaseException:
        close_run(config, mlflow_run_id, failed=True)
        raise
    summary = result.return_value or {}
    record_step_history(config, mlflow_run_id, summary.get("history", []))
    close_run(config, mlflow_run_id)
    return StageResult(
        run_name=run_name,
        stage=stage,
        steps_done=summary.get("steps_done", 0),
        metrics=summary.get("final_metrics", dict(result.metrics or {})),
        checkpoint_path=_uri(config, result.checkpoint.path) if result.checkpoint else None,
        export_path=_uri(config, summary.get("export_fs_path", "")),
        mlflow_run_id=mlflow_run_id,
        rows_skipped=_rows_skipped(stats_group),
        history=summary.get("history", []),
        reports=summary.get("reports", []),
    )


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


def _rows_skipped(group: str | None) -> dict[str, int]:
    if group is None:
        return {}
    from orchestration.data.stats import skip_counts

    return skip_counts(group)


# ---------------------------------------------------------------- the stages


def fit_tower(
    config: Config,
    *,
    datasets: dict | None = None,
    run_name: str | None = None,
    callbacks: list | None = None,
) -> StageResult:
    """Stage 1: train the vision tower on ``data.tower_sources`` (or the given ``{"train": Dataset}``).

    ``result.reports`` holds every report of rank 0 (loss terms at each log step, ``eval/*`` metrics at
    each eval step); ``callbacks`` are Ray Train callbacks (e.g. Tune's TuneReportCallback).
    """
    from orchestration.train.tower import tower_worker

    init_ray(config)
    if datasets is None:
        from orchestration.data.tower_data import build_tower_dataset

        datasets = {"train": build_tower_dataset(config)}
    return run_stage(
        config, TOWER, config.tower_train, tower_worker, datasets,
        run_name=run_name, callbacks=callbacks, stats_group="tower",
    )


def fit_lm(
    config: Config,
    tower_path: str | None = None,
    *,
    datasets: dict | None = None,
    run_name: str | None = None,
    callbacks: list | None = None,
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
    if datasets is None:
        from orchestration.data.cache import build_lm_dataset

        datasets = {"train": build_lm_dataset(config, tower_path)}
    return run_stage(
        config, LM, config.lm_train, lm_worker, datasets, run_name=run_name, callbacks=callbacks,
        stats_group="lm", loop_config={"tokenizer_files": tokenizer_files},
    )


def pretrain(config: Config) -> tuple[StageResult, StageResult]:
    """The whole pipeline: shards if missing, stage 1, tokenization through the actor pool, stage 2."""
    from orchestration.data.synthetic import ensure_synthetic_dataset

    if config.data.synthetic.make_if_missing and "://" not in config.data.root:
        s = config.data.synthetic
        ensure_synthetic_dataset(config.data.root, samples=s.samples, seed=s.seed,
                                 corrupt_fraction=s.corrupt_fraction, eval_samples=s.eval_samples)
    tower = fit_tower(config)
    lm = fit_lm(config, tower.export_path)
    return tower, lm


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
        "tracking_uri": config.tracking_uri,
        "stages": {"tower": tower.summary(), "lm": lm.summary()},
    }


def mlflow_ui_command(config: Config) -> str:
    uri = config.tracking_uri
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


# ---------------------------------------------------------------- job entry points


def job_parser(description: str):
    """The arguments every job takes: ``[--config F] [section.key=value ...] [--summary-json PATH]``."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML preset (default: jobs/configs/tiny.yaml)")
    parser.add_argument("--summary-json", default=None, metavar="PATH", help="write a JSON summary of the run here")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def load_job_config(args) -> Config:
    from orchestration.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return load_config(args.config, args.overrides)  # fails here, before Ray starts, on a bad config


def write_summary(path: str | None, summary: dict[str, Any]) -> None:
    if not path:
        return
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=1, default=str)


def where_things_are(config: Config, results: list[StageResult]) -> str:
    """What a user reads at the end of a job: checkpoints, exports, MLflow runs and how to view them."""
    lines = []
    for r in results:
        lines += [
            f"{r.stage}: {r.steps_done} steps, final " + ", ".join(f"{k}={v:.4f}" for k, v in r.loss_terms.items()),
            f"  checkpoint  {r.checkpoint_path}",
            f"  export      {r.export_path}",
            f"  MLflow run  {r.mlflow_run_id} (experiment {config.tracking.experiment!r})",
        ]
        if r.rows_skipped:
            lines.append(f"  rows skipped {r.rows_skipped}")
    if config.tracking.enabled:
        lines += [f"MLflow store: {config.tracking_uri}", f"view the runs: {mlflow_ui_command(config)}"]
    return "\n".join(lines)
