"""A credential in the environment of the node that runs a job reaches nothing the job leaves behind.

A one-node cluster (`ray start --head`, token auth on) whose environment holds random AWS keys, as an
instance profile or the node's own settings would give them; `ray job submit --working-dir .` runs a
4-step stage-1 job on it, with nothing in its runtime env. Then no byte of either key may be in:

- Ray's record of the job: the job API's JSON (what `ray job list` shows: entrypoint, runtime env,
  metadata) and the `ray job list` output itself;
- the job's stdout/stderr (`ray job logs`) and its console log file (where everything else goes);
- MLflow: every run's params, tags, metric names, dataset inputs, logged models, and every artifact
  file; nor any other file the run wrote (checkpoints, export, data plan, summary).

The job has the keys in its environment all along (its node's): the test shows they stay there.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import fresh_mlflow_db
from local_cluster import RAY, LocalCluster

pytestmark = pytest.mark.e2e


def _files_holding(folder: Path, needles: list[bytes]) -> list[str]:
    return [str(p) for p in sorted(folder.rglob("*")) if p.is_file() and any(n in p.read_bytes() for n in needles)]


def _mlflow_texts(tracking_uri: str) -> list[str]:
    """Everything MLflow holds about every run, as text: params, tags, metric names, dataset inputs,
    and the logged models' params and tags."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = client.search_experiments()
    texts = []
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert runs, "the job logged no MLflow run"
    for run in runs:
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(sorted(run.data.metrics))]
        texts += [json.dumps(d.dataset.to_dictionary() if hasattr(d.dataset, "to_dictionary") else str(d.dataset))
                  for d in run.inputs.dataset_inputs]
    for model in client.search_logged_models(experiment_ids=[e.experiment_id for e in experiments]):
        texts += [json.dumps(model.params), json.dumps(model.tags)]
    return texts


@pytest.fixture()
def keyed_node(tmp_path):
    """A one-node cluster whose environment holds random AWS keys; yields (cluster, keys)."""
    keys = {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
            "AWS_SECRET_ACCESS_KEY": "leak-canary-" + secrets.token_urlsafe(24)}
    base = Path(tempfile.mkdtemp(prefix="vsec-", dir="/tmp"))  # short: Ray's unix sockets live under it
    cluster = LocalCluster(base, hidden=[], node_env=keys)
    try:
        cluster.start_head(num_cpus=8)  # the head runs the job's tasks too: more logical CPUs than cores
        yield cluster, list(keys.values())
    finally:
        cluster.stop_all()
        shutil.rmtree(base, ignore_errors=True)


def test_keys_in_the_node_environment_reach_no_job_metadata_log_or_mlflow(
    keyed_node, synthetic_data, mlflow_db_template, tmp_path
):
    cluster, keys = keyed_node
    needles = [k.encode() for k in keys]
    out = tmp_path / "run"
    tracking_uri = fresh_mlflow_db(mlflow_db_template, out / "mlflow.db")
    cluster.submit("vilau-secret-canary", [
        "python", "jobs/train_vision_tower.py",
        f"data.root={synthetic_data[0]}", f"output_dir={out}", f"cluster.storage_path={out / 'ray'}",
        f"tracking.uri={tracking_uri}", "run_name=canary", "cluster.num_workers=1",
        "tower_train.steps=4", "tower_train.log_every=2", "tower_train.eval_every=4",
        "tower_train.checkpoint_every=4", "tower_train.batch_size_per_worker=8",
        "--summary-json", str(out / "summary.json"),
    ])
    info = cluster.wait_job("vilau-secret-canary", timeout=400)
    logs = cluster.job_logs("vilau-secret-canary")
    assert info["status"] == "SUCCEEDED", logs[-5000:]
    assert json.loads((out / "summary.json").read_text())["steps_done"] == 4

    # Ray's record of the job, through the API and as `ray job list` prints it.
    metadata = json.dumps(cluster.api("/api/jobs/"))
    assert "vilau-secret-canary" in metadata and "train_vision_tower.py" in metadata
    listed = subprocess.run([RAY, "job", "list"], env=cluster.client_env(), capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "vilau-secret-canary" in listed.stdout, listed.stderr[-2000:]
    for key in keys:
        assert key not in metadata, "a key in the job's metadata (job API)"
        assert key not in listed.stdout + listed.stderr, "a key in `ray job list`"

    # The job's stdout/stderr, and its console log file (it names it on its first line).
    console_log = Path(re.search(r"train_vision_tower: logs in (\S+\.log)", logs).group(1))
    assert "Reporting training result" in console_log.read_text(errors="replace")  # Ray's chatter went there
    for key in keys:
        assert key not in logs, "a key in the job's stdout/stderr"
        assert key.encode() not in console_log.read_bytes(), f"a key in the console log {console_log}"

    # MLflow: params, tags, metric names, datasets, models; then every file of the run, artifacts included.
    for text in _mlflow_texts(tracking_uri):
        assert not any(key in text for key in keys), f"a key in MLflow: {text[:300]}"
    artifacts = [p for p in (out / "mlartifacts").rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in artifacts) and any(p.suffix == ".png" for p in artifacts)
    assert _files_holding(out, needles) == []
