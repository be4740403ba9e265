"""The Ray Tune sweep of the loss weights: ASHA, MLflow parent/child runs, resuming an interrupted sweep."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from orchestration.config import load_config
from orchestration.tune import OBJECTIVE, _search, objective, run_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_objective_combines_accuracy_and_capped_psnr():
    assert objective({"loss": 1.0}, psnr_weight=1.0) is None
    assert objective({"eval/zero_shot_acc": 0.5, "eval/psnr": 25.0}, psnr_weight=1.0) == pytest.approx(1.0)
    # A perfect reconstruction (inf dB) counts as the 50 dB cap, not infinity.
    assert objective({"eval/zero_shot_acc": 0.0, "eval/psnr": float("inf")}, psnr_weight=2.0) == pytest.approx(2.0)


def test_search_spaces():
    grid, alg, samples = _search(load_config(None, ["tune.w_contra.values=[0,1,2]"]))
    assert grid["w_contra"] == {"grid_search": [0.0, 1.0, 2.0]} and alg is None and samples == 1
    space, alg, samples = _search(load_config(None, ["tune.search=random", "tune.num_samples=5"]))
    assert alg is None and samples == 5 and 0.5 <= space["w_recon"].sample() <= 2.0
    _, alg, _ = _search(load_config(None, ["tune.search=optuna"]))
    assert type(alg).__name__ == "OptunaSearch"


def _sweep_overrides(config_factory, cluster_address):
    # The good weights come first in the grid, so later, weaker trials meet a rung that is already set
    # and ASHA stops them. w_recon = 0 leaves the decoder untrained: a clearly worse objective.
    return [
        "run_name=sweep",
        "tower_train.steps=12",
        "tower_train.eval_every=4",
        "tower_train.log_every=4",
        "tower_train.checkpoint_every=4",
        "tower_train.batch_size_per_worker=8",
        "tune.search=grid",
        "tune.w_contra.values=[1.0, 0.0]",
        "tune.w_recon.values=[1.0, 0.0]",
        "tune.max_concurrent_trials=2",
        "tune.workers_per_trial=1",
        "tune.grace_period=1",
        f"cluster.address={cluster_address}",
    ]


def _finished_trials(sweep_dir: str) -> dict[str, str]:
    """Trial dir -> its result.json text, for trials whose last result says done."""
    done = {}
    for path in glob.glob(os.path.join(sweep_dir, "*", "result.json")):
        text = open(path).read()
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        if lines and lines[-1].get("done"):
            done[os.path.dirname(path)] = text
    return done


def _trial_statuses(sweep_dir: str) -> list[str]:
    """Each trial's status in the sweep state on disk (the newest experiment_state file)."""
    latest = max(glob.glob(os.path.join(sweep_dir, "experiment_state-*.json")), key=os.path.getmtime)
    with open(latest) as f:
        trial_data = json.load(f)["trial_data"]
    return [json.loads(trial_json)["status"] for trial_json, _ in trial_data]


@pytest.mark.e2e
def test_interrupted_sweep_resumes_and_completes(ray_session, tiny_config, tmp_path):
    config = tiny_config()
    address = ray_session.get_runtime_context().gcs_address
    overrides = [
        f"data.root={config.data.root}",
        f"output_dir={config.output_dir}",
        f"cluster.storage_path={config.cluster.storage_path}",
        f"tracking.uri={config.tracking_uri}",
        *_sweep_overrides(tiny_config, address),
    ]
    sweep_dir = os.path.join(config.cluster.storage_path, "sweep-sweep")

    # First attempt: killed as soon as one trial has finished and the sweep state has recorded it.
    env = dict(os.environ, TUNE_GLOBAL_CHECKPOINT_S="1", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "first_attempt.log"
    log = open(log_path, "wb")  # a file, not a pipe: an unread pipe fills up and blocks the job
    first = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "jobs", "tune_loss_weights.py"), *overrides],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    finished_before = {}
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and first.poll() is None:
            finished_before = _finished_trials(sweep_dir)
            states = glob.glob(os.path.join(sweep_dir, "experiment_state-*.json"))
            if finished_before and states and "TERMINATED" in open(max(states, key=os.path.getmtime)).read():
                break
            time.sleep(1)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log.close()
        output = log_path.read_text(errors="replace")
    assert finished_before, f"no trial finished before the deadline:\n{output[-3000:]}"
    # The first attempt died of the kill (not of its own accord), with trials left unfinished on disk.
    assert first.returncode == -signal.SIGKILL, (first.returncode, output[-3000:])
    statuses = _trial_statuses(sweep_dir)
    assert 1 <= statuses.count("TERMINATED") < 4, statuses
    # The last grid point (trial 3) can only start once two others have ended: it had not finished.
    assert not any("_00003_" in os.path.basename(d) for d in finished_before), finished_before

    # Second attempt: the same command resumes the sweep and completes it. Trial 3 fails once at its
    # start (a transient failure): Tune retries it and it finishes.
    resumed = load_config(None, [*overrides, "cluster.fault_injection.trial_index=3",
                                 "cluster.fault_injection.trial_failures=1"])
    summary = run_sweep(resumed)
    assert len(summary.trials) == 4
    assert all(t.status == "done" and t.error is None for t in summary.trials), summary.table()
    retried = {t.trial_id.rsplit("_", 1)[-1]: t.retries for t in summary.trials}
    assert retried == {"00000": 0, "00001": 0, "00002": 0, "00003": 1}, summary.table()
    # Trials finished before the interruption were not run again.
    for trial_dir, text in finished_before.items():
        assert open(os.path.join(trial_dir, "result.json")).read() == text
    # ASHA stopped at least one trial before its last evaluation.
    assert any(t.stopped_early for t in summary.trials), summary.table()
    assert summary.best is not None and summary.best.objective == max(t.objective for t in summary.trials if t.objective is not None)

    # MLflow: the parent run holds the best weights and the plot; each trial is a child run.
    client = mlflow.MlflowClient(tracking_uri=resumed.tracking_uri)
    parent = client.get_run(summary.parent_run_id)
    assert float(parent.data.params["best_w_contra"]) == summary.best.w_contra
    assert float(parent.data.params["best_w_recon"]) == summary.best.w_recon
    assert "best_objective" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(summary.parent_run_id)}
    assert {"weights_vs_objective.png", "summary.json"} <= artifacts
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{summary.parent_run_id}'"
    )
    weights = {(float(c.data.params["tower_train.w_contra"]), float(c.data.params["tower_train.w_recon"])) for c in children}
    assert weights == {(1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.0, 0.0)}
    # The retried trial's run records the failure it recovered from; no other run has an error, and
    # none ended FAILED. (Stopped trials' runs end KILLED; Tune also stops a trial at its last report.)
    index = {c.info.run_id: c.data.tags["vilau.run_name"].split("-")[1].rsplit("_", 1)[-1] for c in children}
    errors = {index[c.info.run_id]: c.data.tags.get("vilau.last_error") for c in children}
    assert errors["00003"].startswith("InjectedTrialFailure: injected failure of trial"), errors
    assert not any(errors[i] for i in ("00000", "00001", "00002")), errors
    statuses = {index[c.info.run_id]: c.info.status for c in children}
    assert "FAILED" not in statuses.values(), statuses
    assert OBJECTIVE not in parent.data.params


def test_a_trial_that_always_fails_is_retried_and_shows_its_error(ray_session, tiny_config, tmp_path):
    """A trial made to fail at its start in every attempt: Tune retries it tune.trial_max_failures times,
    then the sweep summary and the trial's MLflow run (FAILED, under the sweep's parent) carry its error.
    (It fails before its Train run starts: this sweep trains nothing.)"""
    config = tiny_config(
        "run_name=failing", "tune.search=grid", "tune.w_contra.values=[1.0]", "tune.w_recon.values=[1.0]",
        "tune.trial_max_failures=1", "cluster.fault_injection.trial_index=0",
        "cluster.fault_injection.trial_failures=1000",
    )
    summary = run_sweep(config)
    assert len(summary.trials) == 1
    trial = summary.trials[0]
    assert trial.status == "error" and trial.objective is None and summary.best is None
    assert trial.retries == 1, summary.table()
    assert trial.error.startswith("InjectedTrialFailure: injected failure of trial"), trial.error
    assert "attempt 2 of 1000" in trial.error  # the last attempt's error, after the one retry
    row = [line for line in summary.table().splitlines() if line.startswith(trial.trial_id)]
    assert row and "error: InjectedTrialFailure: injected failure" in row[0], summary.table()

    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)
    table = open(client.download_artifacts(summary.parent_run_id, "summary.txt", dst_path=str(tmp_path))).read()
    assert "error: InjectedTrialFailure: injected failure" in table  # the sweep's parent run keeps the summary
    parent = client.get_run(summary.parent_run_id)
    (child,) = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{summary.parent_run_id}'"
    )
    assert child.info.status == "FAILED"
    assert child.data.tags["vilau.last_error"] == trial.error
