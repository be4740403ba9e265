"""MLflow errors during training are logged, retried, counted and never fatal: a tracking-server blip
must not kill the worker group (and spend one of its ``max_failures``)."""

from __future__ import annotations

import logging

from mlflow import MlflowClient

from conftest import fresh_mlflow_db
from orchestration.train.tracking import RunLogger


def test_tracking_errors_are_retried_counted_and_never_raised(tmp_path, mlflow_db_template, caplog):
    uri = fresh_mlflow_db(mlflow_db_template, tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    logger = RunLogger(uri, run_id, active=True)
    logger.retry_delays_s = (0.05, 0.05)

    logger.log_metrics({"loss": 1.0}, step=1)
    logger.flush()
    client.delete_run(run_id)  # the store now refuses every write to the run: a real MLflow error
    with caplog.at_level(logging.WARNING, logger="orchestration.train.tracking"):
        logger.log_metrics({"loss": 0.5, "lr": 1e-3}, step=2)
        logger.flush()  # does not raise
    assert logger.errors == 3  # the first try and two retries
    assert logger.dropped_metrics == 2
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2
    assert sum("gave up" in r.getMessage() for r in caplog.records) == 1

    client.restore_run(run_id)  # the server is back: logging goes on, with the count of errors
    logger.log_metrics({"loss": 0.25}, step=3)
    logger.flush()
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert history == {1: 1.0, 3: 0.25}
    assert client.get_metric_history(run_id, "tracking_errors")[-1].value == 3


def test_a_failed_artifact_upload_is_not_fatal_either(tmp_path, mlflow_db_template):
    uri = fresh_mlflow_db(mlflow_db_template, tmp_path / "mlflow.db")
    logger = RunLogger(uri, "0" * 32, active=True)  # no such run: the store refuses the upload
    logger.retry_delays_s = (0.05,)
    logger.log_text("x", "notes.txt")
    assert logger.errors == 2 and logger.dropped_metrics == 0
