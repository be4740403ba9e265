"""Ray Tune sweep of the vision tower's loss weights (w_contra, w_recon).

Each trial is a full stage-1 Ray Train run. With Train V2, Tune runs a *driver function* per trial that
builds and fits the TorchTrainer; a Train callback forwards every report (with its tower evaluation)
to Tune, where ASHA compares trials on one objective and stops the weak ones early.

Objective (higher is better), computed from the evaluation a report carries::

    objective = zero_shot_accuracy + psnr_weight * min(psnr, 50) / 50

Zero-shot accuracy (0..1) measures the contrastive side, PSNR the reconstruction side; PSNR is capped
at 50 dB (visually lossless) so a perfect reconstruction cannot swamp the sum.

MLflow: one parent run per sweep; each trial's stage-1 run is its child (tracking.parent_run_id), with
its weights and metrics; the parent gets the best weights and a plot of weights vs objective. The sweep
resumes after an interruption (Tuner.restore), and so does each trial's Train run (same run name).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from orchestration.config import Config, build_config, config_to_dict, config_to_yaml

logger = logging.getLogger(__name__)

OBJECTIVE = "objective"
PSNR_CAP_DB = 50.0


def objective(metrics: dict[str, Any], psnr_weight: float) -> float | None:
    """The sweep objective from one report's metrics; None when the report carries no evaluation."""
    accuracy, psnr = metrics.get("eval/zero_shot_acc"), metrics.get("eval/psnr")
    if accuracy is None or psnr is None:
        return None
    return float(accuracy) + psnr_weight * min(float(psnr), PSNR_CAP_DB) / PSNR_CAP_DB


def sweep_name(config: Config) -> str:
    return config.tune.name or f"{config.run_name}-sweep"


def _search(config: Config):
    """(param_space, search_alg, num_samples) for the configured search method."""
    from ray import tune

    ranges = {"w_contra": config.tune.w_contra, "w_recon": config.tune.w_recon}
    if config.tune.search == "grid":
        space = {name: tune.grid_search(r.values or [r.low, r.high]) for name, r in ranges.items()}
        return space, None, 1  # every grid point once
    sample = {name: (tune.loguniform if r.log else tune.uniform)(r.low, r.high) for name, r in ranges.items()}
    if config.tune.search == "random":
        return sample, None, config.tune.num_samples
    from ray.tune.search.optuna import OptunaSearch

    return sample, OptunaSearch(seed=config.seed), config.tune.num_samples


def _trial_config(base: dict[str, Any], params: dict[str, Any], trial_id: str, parent_run_id: str | None) -> Config:
    overrides = [
        f"tower_train.w_contra={params['w_contra']}",
        f"tower_train.w_recon={params['w_recon']}",
        f"run_name={base['run_name']}-{trial_id}",
        f"cluster.num_workers={base['tune']['workers_per_trial']}",
    ]
    if parent_run_id:
        overrides.append(f"tracking.parent_run_id={parent_run_id}")
    return build_config(base, overrides)


def _make_report_callback(psnr_weight: float):
    """A Train callback that forwards each report to Tune with the objective added."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            value = objective(first, psnr_weight)
            if value is None:
                return  # reports without an evaluation carry nothing ASHA can compare
            first[OBJECTIVE] = value
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return ObjectiveReportCallback()


def _fit_tower_task(config: Config, callback) -> None:
    from orchestration.launch import fit_tower

    fit_tower(config, callbacks=[callback])


class InjectedTrialFailure(RuntimeError):
    """The failure cluster.fault_injection.trial_index asks for (tests only)."""


def _maybe_fail_trial(config: Config, trial_id: str, trial_dir: str) -> None:
    """Fault injection for Tune trials (config.cluster.fault_injection.trial_index): the chosen trial
    raises in its first ``trial_failures`` attempts. Attempts are counted by marker files in the trial's
    own directory, so a retry (or a resumed sweep) sees the earlier ones."""
    fault = config.cluster.fault_injection
    if fault.trial_index is None or not trial_id.endswith(f"_{fault.trial_index:05d}"):
        return
    os.makedirs(trial_dir, exist_ok=True)
    attempts = len([f for f in os.listdir(trial_dir) if f.startswith("fault_injected_attempt")])
    if attempts >= fault.trial_failures:
        return
    open(os.path.join(trial_dir, f"fault_injected_attempt{attempts + 1}"), "w").close()
    raise InjectedTrialFailure(f"injected failure of trial {trial_id} (attempt {attempts + 1} of {fault.trial_failures} that fail)")


def _record_trial_failure(config: Config, error: BaseException) -> None:
    """The trial's MLflow run ends FAILED with the error, also when the trial failed before its Train
    run opened one (it is created then, under the sweep's parent run)."""
    if not config.tracking.enabled:
        return
    from orchestration.launch import TOWER, stage_run_name
    from orchestration.train.tracking import open_run, record_failure, run_id_of

    run_name = stage_run_name(config, TOWER)
    run_id = run_id_of(config, run_name) or open_run(config, TOWER, run_name)
    record_failure(config, run_id, error)


def _run_trial(params: dict[str, Any], base: dict[str, Any], parent_run_id: str | None) -> None:
    """The Tune driver function: one stage-1 Train run with this trial's weights."""
    import ray
    from ray import tune

    context = tune.get_context()
    trial_id = context.get_trial_id()
    config = _trial_config(base, params, trial_id, parent_run_id)
    try:
        _maybe_fail_trial(config, trial_id, context.get_trial_dir())
        callback = _make_report_callback(config.tune.psnr_weight)  # must be made inside the Tune session
        # The trial runs inside a placement group that captures child tasks; the Train run and its data
        # pipeline ask for their own resources, so they are started from a task outside that group.
        fit = ray.remote(_fit_tower_task).options(num_cpus=0, scheduling_strategy="DEFAULT")
        ray.get(fit.remote(config, callback))
    except Exception as exc:
        try:
            _record_trial_failure(config, exc)
        except Exception:  # the trial's own error is what Tune must see, not a tracking hiccup
            logger.exception("could not record the failure of trial %s in MLflow", trial_id)
        raise


@dataclass
class TrialSummary:
    trial_id: str
    w_contra: float
    w_recon: float
    objective: float | None
    zero_shot_accuracy: float | None
    psnr: float | None
    evaluations: int
    stopped_early: bool
    status: str
    retries: int = 0  # times Tune restarted the trial after a failure (tune.trial_max_failures)
    error: str | None = None  # what the trial's last failure was (None: it finished)


@dataclass
class SweepSummary:
    name: str
    path: str
    parent_run_id: str | None
    best: TrialSummary | None
    trials: list[TrialSummary]

    def table(self) -> str:
        header = (f"{'trial':<14}{'w_contra':>9}{'w_recon':>9}{'objective':>11}{'zero-shot':>11}{'psnr':>8}"
                  f"{'evals':>7}{'retries':>9}  status")
        lines = [header, "-" * len(header)]
        for t in sorted(self.trials, key=lambda t: -(t.objective or -math.inf)):
            fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
            status = t.status + (" (stopped early)" if t.stopped_early else "")
            if t.error:
                first_line = t.error.strip().splitlines()[0] if t.error.strip() else t.error
                status += f": {first_line[:200]}"
            lines.append(
                f"{t.trial_id:<14}{t.w_contra:>9.3g}{t.w_recon:>9.3g}{fmt(t.objective, '>11.4f')}"
                f"{fmt(t.zero_shot_accuracy, '>11.3f')}{fmt(t.psnr, '>8.2f')}{t.evaluations:>7}{t.retries:>9}  {status}"
            )
        if self.best:
            lines.append(f"best: w_contra={self.best.w_contra:.4g} w_recon={self.best.w_recon:.4g} objective={self.best.objective:.4f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "mlflow_parent_run_id": self.parent_run_id,
            "best": vars(self.best) if self.best else None,
            "trials": [vars(t) for t in self.trials],
        }


def _summarise(result_grid, max_evaluations: int, secrets: set[str] = frozenset()) -> list[TrialSummary]:
    from orchestration.train.tracking import error_line, scrub

    # Tune's own record of each trial (its failure count is on the Trial, not on the Result).
    analysis = getattr(result_grid, "_experiment_analysis", None)
    failures = {os.path.basename(t.path or ""): t.num_failures for t in (analysis.trials if analysis else [])}
    trials = []
    for result in result_grid:
        history = result.metrics_dataframe
        evaluations = 0 if history is None or OBJECTIVE not in history else int(history[OBJECTIVE].notna().sum())
        best_row = None
        if evaluations:
            best_row = history.loc[history[OBJECTIVE].idxmax()]
        params = result.config or {}
        trials.append(
            TrialSummary(
                trial_id=str((result.metrics or {}).get("trial_id") or os.path.basename(result.path or "?")),
                w_contra=float(params.get("w_contra", float("nan"))),
                w_recon=float(params.get("w_recon", float("nan"))),
                objective=float(best_row[OBJECTIVE]) if best_row is not None else None,
                zero_shot_accuracy=float(best_row["eval/zero_shot_acc"]) if best_row is not None else None,
                psnr=float(best_row["eval/psnr"]) if best_row is not None else None,
                evaluations=evaluations,
                stopped_early=result.error is None and evaluations < max_evaluations,
                status="error" if result.error else "done",
                # the failure that ended an errored trial was not retried
                retries=max(0, failures.get(os.path.basename(result.path or "?"), 0) - (1 if result.error else 0)),
                error=scrub(error_line(result.error), secrets) if result.error else None,
            )
        )
    return trials


def _parent_run(config: Config) -> str | None:
    """The sweep's MLflow parent run, created once and found again by its tags when the sweep resumes
    (MLflow itself is the record: nothing is kept on the driver's disk, which a cluster job may not
    have again)."""
    if not config.tracking.enabled:
        return None
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.tracking.experiment)
    earlier = client.search_runs(
        [experiment_id], filter_string=f"tags.stage = 'tune' and tags.sweep = '{sweep_name(config)}'",
        order_by=["attributes.start_time ASC"], max_results=1,
    )
    if earlier:
        return earlier[0].info.run_id
    run = client.create_run(experiment_id, run_name=sweep_name(config), tags={"stage": "tune", "sweep": sweep_name(config)})
    client.log_text(run.info.run_id, config_to_yaml(config), "config.yaml")
    for key, value in {
        "search": config.tune.search,
        "num_samples": config.tune.num_samples,
        "psnr_weight": config.tune.psnr_weight,
        "tower_steps": config.tower_train.steps,
        "eval_every": config.tower_train.eval_every,
    }.items():
        client.log_param(run.info.run_id, key, value)
    return run.info.run_id


def _log_sweep_result(config: Config, parent_run_id: str, summary: SweepSummary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)
    scored = [t for t in summary.trials if t.objective is not None]
    if summary.best:
        client.log_param(parent_run_id, "best_w_contra", summary.best.w_contra)
        client.log_param(parent_run_id, "best_w_recon", summary.best.w_recon)
        client.log_metric(parent_run_id, "best_objective", summary.best.objective)
    client.log_text(parent_run_id, summary.table(), "summary.txt")
    client.log_dict(parent_run_id, summary.to_dict(), "summary.json")
    figure, axis = plt.subplots(figsize=(5, 4))
    points = axis.scatter([t.w_contra for t in scored], [t.w_recon for t in scored], c=[t.objective for t in scored], cmap="viridis", s=80)
    figure.colorbar(points, label="objective")
    axis.set_xlabel("w_contra")
    axis.set_ylabel("w_recon")
    axis.set_title("loss weights vs objective")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights_vs_objective.png")
        figure.savefig(path, dpi=100, bbox_inches="tight")
        client.log_artifact(parent_run_id, path)
    plt.close(figure)
    client.set_terminated(parent_run_id)


def run_sweep(config: Config) -> SweepSummary:
    """Run (or resume) the sweep and return its summary."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from orchestration.cluster import init_ray, run_storage, storage_uri

    init_ray(config)
    # The data-stats actor is created (and so owned) by this driver: owned by a trial, it would die
    # with the first trial that ASHA stops while later trials still count into it.
    from orchestration.data.stats import stats_actor

    stats_actor()
    name = sweep_name(config)
    storage, storage_fs = run_storage(config)  # local, or S3 with data.s3's endpoint and keys
    sweep_dir = f"{storage.rstrip('/')}/{name}"
    parent_run_id = _parent_run(config)
    base = config_to_dict(config, redact=False)
    trainable = tune.with_parameters(_run_trial, base=base, parent_run_id=parent_run_id)
    # The driver only waits on its TorchTrainer; the Train workers ask for their own resources.
    trainable = tune.with_resources(trainable, {"CPU": 0.1})

    evaluations = max(1, config.tower_train.steps // config.tower_train.eval_every)
    if tune.Tuner.can_restore(sweep_dir, storage_filesystem=storage_fs):
        logger.info("resuming sweep %s from %s", name, storage_uri(config, sweep_dir))
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage_fs)
    else:
        space, search_alg, num_samples = _search(config)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=OBJECTIVE,
                mode="max",
                search_alg=search_alg,
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=evaluations,
                    grace_period=min(config.tune.grace_period, evaluations),
                    reduction_factor=config.tune.reduction_factor,
                ),
                num_samples=num_samples,
                max_concurrent_trials=config.tune.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, storage_filesystem=storage_fs,
                # A failed trial is restarted; its Train run resumes from the trial's latest checkpoint.
                failure_config=tune.FailureConfig(max_failures=config.tune.trial_max_failures),
            ),
        )
    result_grid = tuner.fit()
    from orchestration.train.tracking import secret_values

    trials = _summarise(result_grid, evaluations, secret_values(config))
    scored = [t for t in trials if t.objective is not None]
    best = max(scored, key=lambda t: t.objective) if scored else None
    summary = SweepSummary(name=name, path=storage_uri(config, sweep_dir), parent_run_id=parent_run_id, best=best, trials=trials)
    if parent_run_id:
        _log_sweep_result(config, parent_run_id, summary)
    return summary


def write_summary_json(summary: SweepSummary, path: str) -> None:
    with open(path, "w") as f:
        json.dump(summary.to_dict(), f, indent=1)
