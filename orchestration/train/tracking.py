"""MLflow tracking: the driver opens one run per stage, rank 0 of the workers logs into it.

The driver creates (or, for a rerun of the same run name, reopens) the MLflow run and logs the
resolved config as params (secrets redacted) and tags; the run id travels to the workers so that a
restarted worker group keeps logging into the same run. Only rank 0 logs metrics and artifacts.

The default store is SQLite under ``output_dir`` with artifacts in ``output_dir/mlartifacts``; on a
cluster, point ``tracking.uri`` at an MLflow server (every node must reach it).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestration.config import REDACTED, Config, config_to_yaml, flatten_config

log = logging.getLogger(__name__)

# MLflow 3's usage telemetry runs background threads in every process that logs; in a training worker
# they compete with the loop for the GIL (measured: +40% step time for the tiny tower on CPU) and try
# to reach the internet from the cluster. Off unless the user turns it on explicitly.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

RUN_NAME_TAG = "vilau.run_name"
STAGE_TAG = "vilau.stage"
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD")


@dataclass
class RunInfo:
    """What the driver tells the workers about the run: its name and where to log."""

    run_name: str
    tracking_uri: str
    mlflow_run_id: str | None


SYSTEM_METRICS_INTERVAL_S = 5.0


def start_system_metrics(tracking_uri: str, run_id: str | None, node_id: str | None = None):
    """MLflow's system-metrics monitor (CPU, memory, disk, network; every GPU through NVML where there is
    one) for this node, logging into ``run_id`` (as ``system/<node_id>/...`` with a node id) until
    ``.finish()`` or the run ends; None when tracking is off or it cannot start."""
    if run_id is None:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, samples_before_logging=1,
                                       node_id=node_id, tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception as exc:  # a monitor is never worth failing a run over
        log.warning("system metrics are off: %s", exc)
        return None


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def secret_values(config: Config) -> set[str]:
    """Every credential this process knows about (config secrets and AWS environment variables)."""
    found = {os.environ[k] for k in _SECRET_ENV if os.environ.get(k)}
    s3 = config.data.s3
    for secret in (s3.access_key_id, s3.secret_access_key):
        if secret is not None and secret.get_secret_value():
            found.add(secret.get_secret_value())
    return {v for v in found if len(v) >= 4}


def scrub(text: str, secrets: set[str]) -> str:
    """Redact any known credential that slipped into a string (belt and braces: params are already
    redacted by the config dumper)."""
    for value in secrets:
        text = text.replace(value, REDACTED)
    return text


def git_commit() -> str:
    if os.environ.get("VILAU_GIT_COMMIT"):
        return os.environ["VILAU_GIT_COMMIT"]
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"  # e.g. a `ray job submit` working dir has no .git


def ray_job_tags() -> dict[str, str]:
    tags = {}
    try:
        import ray

        # A local instance numbers its first job 01000000 every time: only a cluster's job id tells runs apart.
        if ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
            tags["ray.job_id"] = ray.get_runtime_context().get_job_id()
    except Exception:  # tags are best effort; never fail a run over them
        pass
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config:
        submission = json.loads(job_config).get("metadata", {}).get("job_submission_id")
        if submission:
            tags["ray.job_submission_id"] = submission
    return tags


def _experiment_id(client, config: Config) -> str:
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if config.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in config.tracking_uri:
        # Absolute, so the driver and the Ray workers (other working directories) agree on it.
        location = (Path(config.output_dir).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(config.tracking.experiment, artifact_location=location)
    except Exception:  # created concurrently by another stage or trial
        return client.get_experiment_by_name(config.tracking.experiment).experiment_id


def open_run(config: Config, stage: str, run_name: str) -> str | None:
    """Create or reopen the MLflow run of ``run_name``; returns its id (None if tracking is off)."""
    if not config.tracking.enabled:
        return None
    from mlflow.entities import Param, RunTag

    if "://" not in config.output_dir:  # an S3 output_dir needs no directory made
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    client = _client(config.tracking_uri)
    experiment_id = _experiment_id(client, config)
    secrets = secret_values(config)
    params = {k: scrub(v, secrets)[:6000] for k, v in flatten_config(config).items()}
    tags = {
        STAGE_TAG: stage,
        RUN_NAME_TAG: run_name,
        "mlflow.source.git.commit": git_commit(),
        "mlflow.runName": run_name,
        **ray_job_tags(),
    }
    if config.tracking.parent_run_id:  # a Tune trial: nest under the sweep's parent run
        tags["mlflow.parentRunId"] = config.tracking.parent_run_id
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        old = existing[0].data.params
        changed = sorted(k for k, v in params.items() if k in old and old[k] != v)
        params = {k: v for k, v in params.items() if k not in old}
        tags["vilau.resumed"] = "true"
        if changed:  # MLflow params are immutable: keep the first values, record what changed
            tags["vilau.params_changed_on_resume"] = ",".join(changed)[:5000]
        config_name = f"config_resumed_{len(client.list_artifacts(run_id))}.yaml"
    else:
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        config_name = "config.yaml"
    items = list(params.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
    client.log_batch(run_id, tags=[RunTag(k, scrub(str(v), secrets)) for k, v in tags.items()])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, config_name)
        Path(path).write_text(scrub(config_to_yaml(config), secrets))
        client.log_artifact(run_id, path)
    return run_id


def run_id_of(config: Config, run_name: str) -> str | None:
    """The id of the latest MLflow run of ``run_name``, if there is one."""
    client = _client(config.tracking_uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def retire_run(config: Config, run_name: str) -> None:
    """--fresh: the MLflow runs of ``run_name`` keep their history under a retired name, so that the next
    open_run creates a new run instead of reopening an old one."""
    import time

    client = _client(config.tracking_uri)
    experiment_id = _experiment_id(client, config)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for run in client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'"):
        client.set_tag(run.info.run_id, RUN_NAME_TAG, f"{run_name}@retired-{stamp}")
        client.set_tag(run.info.run_id, "vilau.retired_by_fresh_start", stamp)


def close_run(config: Config, run_id: str | None, failed: bool = False) -> None:
    if run_id is None:
        return
    _client(config.tracking_uri).set_terminated(run_id, status="FAILED" if failed else "FINISHED")


ERROR_TAG = "vilau.last_error"


def error_line(error: BaseException, limit: int = 2000) -> str:
    """``Type: message`` of what went wrong, without Ray's wrapping (a task error carries the user's
    exception as its cause) and without the remote traceback that Ray puts in the message."""
    cause = error
    for _ in range(5):  # RayTaskError(TrainingFailedError(...)) and the like
        inner = getattr(cause, "cause", None)
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    message = str(cause).strip()
    if "Traceback (most recent call last)" in message:  # a remote traceback: its last line says what failed
        message = message.rsplit("\n", 1)[-1].strip()
    text = f"{type(cause).__name__}: {message}" if message else type(cause).__name__
    return text[:limit]


def record_failure(config: Config, run_id: str | None, error: BaseException) -> None:
    """An error ends the run FAILED, tagged ``vilau.last_error`` with what went wrong (credentials
    scrubbed); a later attempt that reopens the run and finishes it leaves the tag: the run shows it
    recovered. A run stopped from outside (SystemExit, KeyboardInterrupt: ASHA stopping a trial, Ctrl-C)
    ends KILLED, with no error."""
    if run_id is None:
        return
    client = _client(config.tracking_uri)
    if not isinstance(error, Exception):
        client.set_terminated(run_id, status="KILLED")
        return
    client.set_tag(run_id, ERROR_TAG, scrub(error_line(error), secret_values(config)))
    client.set_terminated(run_id, status="FAILED")


class RunLogger:
    """Rank 0's handle on the run: metrics, images, files. A no-op everywhere else.

    Metrics are logged asynchronously (MLflow's own queue and thread): a log step never waits for a
    round trip to the tracking server, which on a cluster would stall rank 0 and, at the next
    collective, every rank. ``flush`` waits for them.

    A tracking error during training is never fatal (a tracking-server blip must not spend one of the
    worker group's ``max_failures``): it is logged, the call is retried ``len(retry_delays_s)`` times
    (synchronously, after those pauses), and then given up. ``errors`` counts the failed calls and
    ``dropped_metrics`` the metric values given up; once there is an error, every metric batch also
    carries ``tracking_errors``."""

    retry_delays_s = (1.0, 2.0, 4.0)

    def __init__(self, tracking_uri: str, run_id: str | None, active: bool):
        self.run_id = run_id
        self.active = active and run_id is not None
        self._client = _client(tracking_uri) if self.active else None
        self._pending: list = []  # (RunOperations, metrics) of metric batches not yet known to be logged
        self.errors = 0
        self.dropped_metrics = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {k: v for k, v in metrics.items() if v is not None}
        if self.errors:
            values["tracking_errors"] = self.errors
        batch = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(batch), 1000):
            part = batch[i : i + 1000]
            try:
                operation = self._client.log_batch(self.run_id, metrics=part, synchronous=False)
            except Exception as exc:  # refused before it was queued
                self._retry(f"{len(part)} metrics at step {step}", exc,
                            lambda part=part: self._client.log_batch(self.run_id, metrics=part), len(part))
                continue
            self._pending.append((operation, part))
        if len(self._pending) > 64:  # long done by now; bounds what a long run holds
            self.flush()

    def flush(self) -> None:
        """Wait until every metric logged so far is on the tracking server (or given up, see above)."""
        pending, self._pending = self._pending, []
        for operation, part in pending:
            try:
                operation.wait()
            except Exception as exc:
                self._retry(f"{len(part)} metrics", exc,
                            lambda part=part: self._client.log_batch(self.run_id, metrics=part), len(part))

    def _retry(self, what: str, error: Exception, call, metric_count: int = 0) -> None:
        import time

        self.errors += 1
        for attempt, delay in enumerate(self.retry_delays_s, start=1):
            log.warning("MLflow: logging %s failed (%s); retry %d/%d in %.1f s",
                        what, error, attempt, len(self.retry_delays_s), delay)
            time.sleep(delay)
            try:
                call()
                return
            except Exception as exc:
                self.errors += 1
                error = exc
        self.dropped_metrics += metric_count
        log.error("MLflow: gave up logging %s after %d retries (%s); training goes on",
                  what, len(self.retry_delays_s), error)

    def _call(self, what: str, call) -> None:
        try:
            call()
        except Exception as exc:
            self._retry(what, exc, call)

    def log_image(self, image, artifact_file: str) -> None:
        if self.active:
            self._call(artifact_file, lambda: self._client.log_image(self.run_id, image, artifact_file=artifact_file))

    def log_figure(self, figure, artifact_file: str) -> None:
        if self.active:
            self._call(artifact_file, lambda: self._client.log_figure(self.run_id, figure, artifact_file=artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.active:
            self._call(artifact_file, lambda: self._client.log_text(self.run_id, text, artifact_file=artifact_file))

    def log_dict(self, data: dict, artifact_file: str) -> None:
        if self.active:
            self._call(artifact_file, lambda: self._client.log_dict(self.run_id, data, artifact_file=artifact_file))
