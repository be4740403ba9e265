"""The jobs as a user runs them: `python jobs/pretrain.py` with no arguments in a fresh directory (the
embedded default: synthetic shards, tiny tower, tokenization pool, tiny LM on 2 FSDP2 workers, local Ray,
MLflow on SQLite), then `jobs/generate.py` on what it trained, and a bad override failing fast."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local instance of its own
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.mark.e2e
def test_pretrain_with_no_arguments_then_generate(tmp_path):
    from mlflow import MlflowClient

    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "pretrain.py")], cwd=tmp_path, env=_env(),
        capture_output=True, text=True, timeout=1500,
    )
    wall = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    print(f"python jobs/pretrain.py (no arguments): {wall:.0f} s")

    outputs = tmp_path / "outputs"
    uri = f"sqlite:///{(outputs / 'mlflow.db').resolve()}"
    assert f"mlflow ui --backend-store-uri {uri}" in done.stdout
    # A readable console: progress, one data line per stage, the summary; Ray's chatter is in the log.
    console = done.stdout + done.stderr
    assert len(console.splitlines()) <= 150, console
    assert "Reporting training result" not in console and "(RayTrainWorker" not in console
    logs = list((outputs / "logs").glob("tiny-pretrain-*.log"))
    assert len(logs) == 1 and str(logs[0].resolve()) in done.stdout
    assert "Reporting training result" in logs[0].read_text(errors="replace")
    for stage in ("tower", "lm"):
        assert f"[{stage}] step" in done.stdout
        assert re.search(rf"\[{stage} data\] [1-9]\d* samples trained \(\w+ \d+%", done.stdout), done.stdout
    assert "zero-shot acc" in done.stdout and "(chance 0.062)" in done.stdout
    assert "generation score" in done.stdout and "understanding score" in done.stdout
    assert (tmp_path / "data" / "synthetic" / "manifest.json").is_file()
    assert (outputs / "ray" / "tiny-tower" / "export" / "tower.safetensors").is_file()
    assert (outputs / "ray" / "tiny-lm" / "export" / "llm" / "config.json").is_file()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("vilau-tiny")
    runs = {r.data.tags["vilau.stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"pipeline", "tower", "lm"} and all(r.info.status == "FINISHED" for r in runs.values())
    parent = runs.pop("pipeline")
    assert any(key.startswith("system/") for key in parent.data.metrics), parent.data.metrics  # MLflow's monitor
    models = {m.tags["vilau.export_uri"]: m for m in client.search_logged_models(experiment_ids=[experiment.experiment_id])}
    for stage, run in runs.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id  # nested under the pipeline's run
        loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
        assert loss[-1] < loss[0], (stage, loss)
        # From the dashboard to the weights: the export is a LoggedModel of the run, with its URI.
        export = str((outputs / "ray" / f"tiny-{stage}" / "export").resolve())
        model = models[export]
        assert model.source_run_id == run.info.run_id and str(model.status) in ("READY", "LoggedModelStatus.READY")
        assert int(model.params["params.total"]) > 0 and model.params["arch.tower.code_depth"]
        assert run.data.params["arch.tower.codebook_size"] != "None"
        assert {d.dataset.name for d in run.inputs.dataset_inputs}, stage  # the sources it read
        # Each node of the worker group logs its own system metrics (its GPUs where it has them).
        assert any(key.startswith("system/node0/") for key in run.data.metrics), (stage, run.data.metrics)
    # Both halves learn: the values beat chance (1/16) by a margin the default reaches on every seed tried.
    assert runs["tower"].data.metrics["eval/zero_shot_acc"] >= 5 / 16
    assert runs["lm"].data.metrics["eval/generation_score"] >= 2 / 16

    summary = tmp_path / "generate.json"
    gen = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "generate.py"), "--checkpoint", "outputs/ray/tiny-lm",
         "--prompt", "a red circle in the top left", "--out", "generated", "--summary-json", str(summary)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    files = json.loads(summary.read_text())["files"]
    assert len(files) == 1 and Path(files[0]).is_file() and files[0].endswith(".png")


def test_a_bad_override_fails_before_anything_starts(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_vision_tower.py"), "tower_train.optim.lr=-1"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    assert "tower_train.optim.lr" in done.stderr
    assert not (tmp_path / "outputs").exists()  # failed before Ray, MLflow or any output
