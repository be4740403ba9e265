"""MLflow as the dashboard of record, on the driver: one parent run per pipeline with the stages' runs
nested under it, the data each stage read as dataset inputs, each stage's export as an MLflow 3
LoggedModel (its architecture, parameter counts, final metrics, export and checkpoint URIs; registered
as a model version with ``tracking.register_as``), and the driver node's system metrics (``system/*``).

A rerun of the same run name reopens its parent run (found by its tags), as the stage runs are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import struct

from orchestration.config import Config
from orchestration.storage import filesystem

log = logging.getLogger(__name__)

PIPELINE = "pipeline"


def _client(config: Config):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=config.tracking_uri)


def open_pipeline_run(config: Config) -> str | None:
    """Create (or reopen) the parent run named ``run_name``; None when tracking is off."""
    if not config.tracking.enabled:
        return None
    from orchestration.train.tracking import RUN_NAME_TAG, STAGE_TAG, _experiment_id, git_commit, ray_job_tags

    client = _client(config)
    experiment_id = _experiment_id(client, config)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{config.run_name}' and "
                               f"tags.`{STAGE_TAG}` = '{PIPELINE}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment_id, run_name=config.run_name, tags={
        RUN_NAME_TAG: config.run_name, STAGE_TAG: PIPELINE, "mlflow.source.git.commit": git_commit(), **ray_job_tags(),
    })
    return run.info.run_id


def close_pipeline_run(config: Config, run_id: str | None, failed: bool = False) -> None:
    if run_id is not None:
        _client(config).set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def log_data_inputs(config: Config, run_id: str | None, stage: str, plan) -> None:
    """One MLflow dataset input per source of the stage's epoch plan: its units, their total size, and a
    digest of the unit list (the same data gives the same digest)."""
    if run_id is None or plan is None:
        return
    from mlflow.entities import Dataset, DatasetInput, InputTag

    by_source: dict[str, list] = {}
    for unit in plan.units:
        by_source.setdefault(unit.source, []).append(unit)
    inputs = []
    for source, units in sorted(by_source.items()):
        listing = json.dumps(sorted((u.uri, str(getattr(u, "row_groups", None)), str(getattr(u, "records", None)), u.size)
                                    for u in units))
        digest = hashlib.sha256(listing.encode()).hexdigest()[:16]
        profile = {"units": len(units), "size": sum(u.size for u in units), "format": units[0].format}
        if getattr(plan, "counted_by", {}).get(source):  # stats files, parquet footers or estimated (data/counting.py)
            profile["counted_by"] = plan.counted_by[source]
        location = units[0].uri.rsplit("/", 1)[0]
        inputs.append(DatasetInput(
            Dataset(name=source, digest=digest, source_type="vilau-shards", source=json.dumps({"uri": location}),
                    profile=json.dumps(profile)),
            tags=[InputTag("mlflow.data.context", f"{stage}-training")],
        ))
    _client(config).log_inputs(run_id, datasets=inputs)


def export_parameter_count(config: Config, export_path: str) -> dict[str, int]:
    """Parameters per safetensors file of an export (local or S3), read from the files' headers only."""
    counts: dict[str, int] = {}
    fs, root = filesystem(export_path, config.data.s3)
    try:
        files = [p for p in fs.find(root) if p.endswith(".safetensors")]
    except FileNotFoundError:
        return counts
    for path in files:
        with fs.open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        n = 0
        for name, entry in header.items():
            if name != "__metadata__":
                size = 1
                for dim in entry["shape"]:
                    size *= dim
                n += size
        counts[path[len(root):].lstrip("/")] = n
    return counts


def architecture(config: Config, stage: str) -> dict[str, str]:
    """The resolved model config of a stage (the preset with every override), as flat params."""
    from orchestration.data.tower_data import tower_config

    resolved = {"tower": dataclasses.asdict(tower_config(config))}
    if stage == "lm":
        from orchestration.data.lm_data import lm_config

        resolved["lm"] = dataclasses.asdict(lm_config(config))
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}", v)
        else:
            flat[prefix] = str(node)[:6000]

    walk("arch", resolved)
    return flat


def log_stage_model(config: Config, result) -> str | None:
    """The stage's export as a LoggedModel of its run (READY), with the architecture and parameter counts
    as params, the final metrics, and the export/checkpoint URIs as tags; registered as a version of
    ``tracking.register_as`` (``<name>-<stage>``) when set. Also logs the architecture on the run."""
    if result.mlflow_run_id is None:
        return None
    from mlflow.entities import Param

    from orchestration.train.tracking import _experiment_id

    client = _client(config)
    params = architecture(config, result.stage)
    counts = export_parameter_count(config, result.export_path)
    params["params.total"] = str(sum(counts.values()))
    params.update({f"params.{name}": str(n) for name, n in counts.items()})
    run = client.get_run(result.mlflow_run_id)
    new = [Param(k, v) for k, v in params.items() if k not in run.data.params]
    for i in range(0, len(new), 100):
        client.log_batch(result.mlflow_run_id, params=new[i:i + 100])
    model = client.create_logged_model(
        _experiment_id(client, config), name=f"{config.run_name}-{result.stage}", source_run_id=result.mlflow_run_id,
        model_type=f"vilau-{result.stage}", params=params,
        tags={"vilau.export_uri": result.export_path, "vilau.checkpoint_uri": str(result.checkpoint_path),
              "vilau.steps": str(result.steps_done)},
    )
    for key, value in sorted(result.metrics.items()):
        if isinstance(value, (int, float)):  # under final/: the run's own histories keep one value per step
            client.log_metric(result.mlflow_run_id, f"final/{key}", float(value), step=result.steps_done,
                              model_id=model.model_id)
    client.finalize_logged_model(model.model_id, "READY")
    if config.tracking.register_as:
        name = f"{config.tracking.register_as}-{result.stage}"
        try:
            client.get_registered_model(name)
        except Exception:  # not registered yet
            client.create_registered_model(name)
        client.create_model_version(name, source=f"models:/{model.model_id}", run_id=result.mlflow_run_id,
                                    model_id=model.model_id, tags={"vilau.export_uri": result.export_path})
    log.info("MLflow: %s export is LoggedModel %s (%s)", result.stage, model.model_id, result.export_path)
    return model.model_id
