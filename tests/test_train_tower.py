"""Stage 1 on a real local Ray instance: 2 CPU workers with FSDP2, a worker killed mid-run, every sample
trained exactly once per epoch across that restart, a rerun of the finished run over a damaged latest
checkpoint, what the MLflow run holds, and a slow export under a short process-group timeout.

One killed run and one clean run are shared by the tests of this module (a Ray Train fit costs tens
of seconds here).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import S3_TEST_KEY, S3_TEST_SECRET, fresh_mlflow_db
from orchestration.config import REDACTED, load_config

# The session's synthetic tower set is 8 steps an epoch at 2 x 8 samples: 12 steps cross into epoch 1,
# and rank 1 dies mid-epoch (after the backward pass of step 5), when the step-4 checkpoint is the latest.
STEPS, FAIL_AT = 12, 5
CREDENTIALS = (S3_TEST_KEY, S3_TEST_SECRET)


def _config(synthetic_data, out: Path, s3_overrides: list[str], *extra: str, kill: bool = True):
    fault = ["cluster.fault_injection.stage=tower", f"cluster.fault_injection.fail_at_step={FAIL_AT}",
             "cluster.fault_injection.rank=1"]
    return load_config(None, [
        f"data.root={synthetic_data[0]}",
        f"output_dir={out}",
        f"cluster.storage_path={out / 'ray'}",
        f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
        *s3_overrides,  # fake S3 credentials in the config: they must never reach MLflow
        "run_name=t",
        # the settings the loss-falls bound below was calibrated with (tiny.yaml trains longer, softmax)
        "tower_train.contrastive=sigmoid",
        "tower_train.optim.lr=2e-3",
        "tower_train.batch_size_per_worker=8",
        "tower_train.log_every=1",
        "tower_train.checkpoint_every=2",
        "tower_train.eval_every=3",
        "cluster.num_workers=2",
        # each micro-batch's sample keys, per rank and step (a redone step overwrites its file)
        "data.record_trained_keys=true",
        *(fault if kill else []),
        *extra,
    ])


@pytest.fixture(scope="module")
def killed_run(ray_session, synthetic_data, s3_overrides, tmp_path_factory, mlflow_db_template):
    """12 steps, checkpoints every 2; rank 1 exits hard after the backward pass of step 5."""
    from orchestration.launch import fit_tower

    out = tmp_path_factory.mktemp("tower_run")
    fresh_mlflow_db(mlflow_db_template, out / "mlflow.db")
    config = _config(synthetic_data, out, s3_overrides, f"tower_train.steps={STEPS}", "cluster.max_failures=1")
    return config, fit_tower(config)


# The clean run's export is deliberately slow under a short process-group timeout: the delay only has to
# outlast the timeout, since a rank held in a collective while rank 0 exported would time out first.
PROCESS_GROUP_TIMEOUT_S, EXPORT_DELAY_S = 10, 12


@pytest.fixture(scope="module")
def clean_run(ray_session, synthetic_data, tmp_path_factory):
    """The killed run's settings without the failure, whose export takes longer than a rank may wait in
    a collective."""
    from orchestration.launch import fit_tower

    out = tmp_path_factory.mktemp("clean_run")
    config = _config(
        synthetic_data, out, [], f"tower_train.steps={STEPS}", f"tower_train.eval_every={STEPS}",
        f"cluster.process_group_timeout_s={PROCESS_GROUP_TIMEOUT_S}",
        f"cluster.fault_injection.export_delay_s={EXPORT_DELAY_S}",
        "tracking.enabled=false", kill=False,  # the recorded keys are the evidence here
    )
    return config, fit_tower(config)


def _mlflow(config):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=config.tracking_uri)


def _optimizer_steps(checkpoint_dir: str, tmp_path: Path) -> set[int]:
    """Adam's step counters in a sharded checkpoint, read back without Ray or a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint_dir, tmp_path / "full.pt")
    state = torch.load(tmp_path / "full.pt", weights_only=False)["optim"]["state"]
    return {int(v["step"]) for v in state.values()}


@pytest.mark.e2e
def test_killed_worker_is_restarted_and_the_run_resumes_without_repeating_a_step(killed_run, tmp_path):
    config, result = killed_run
    assert result.steps_done == STEPS
    # Restarted from the step-4 checkpoint: steps 1-4 from the first worker group, 5-12 from the second.
    assert result.history == [[1, 4], [5, STEPS]]
    run_dir = Path(config.cluster.storage_path).resolve() / result.run_name
    assert (run_dir / f"fault_injected_tower_step_step{FAIL_AT}").is_file()
    final = json.loads((Path(result.checkpoint_path) / "train_state.json").read_text())
    assert final["step"] == STEPS and final["history"] == [[1, 4], [5, STEPS]]
    assert _optimizer_steps(result.checkpoint_path, tmp_path) == {STEPS}  # every Adam step applied once
    steps_logged = [m.step for m in _mlflow(config).get_metric_history(result.mlflow_run_id, "loss")]
    assert sorted(steps_logged) == list(range(1, STEPS + 1))  # step 5 died before it was logged


def _trained(run_dir: Path) -> dict[tuple[int, int, int], dict]:
    """(rank, step, micro-batch) -> the recorded micro-batch."""
    return {
        (r["rank"], r["step"], r["micro"]): r
        for r in (json.loads(p.read_text()) for p in run_dir.glob("trained_keys/rank*/step*.json"))
    }


@pytest.mark.e2e
def test_the_killed_run_trains_every_sample_exactly_once_per_epoch(killed_run, clean_run, synthetic_data):
    """The lineage of the killed run's final weights trains the same samples at each step as an
    uninterrupted run, each sample once per epoch."""
    config, killed_result = killed_run
    clean_config, clean_result = clean_run
    clean = _trained(Path(clean_config.cluster.storage_path).resolve() / clean_result.run_name)
    killed = _trained(Path(config.cluster.storage_path).resolve() / killed_result.run_name)

    assert sorted(clean) == sorted(killed) == [(r, s, 0) for r in (0, 1) for s in range(1, STEPS + 1)]
    per_epoch = {}
    for name, trained in (("clean", clean), ("killed", killed)):
        epochs: dict[int, Counter] = {}
        for record in trained.values():
            epochs.setdefault(record["epoch"], Counter()).update(record["keys"])
        assert sorted(epochs) == [0, 1], name
        for epoch, keys in epochs.items():
            assert max(keys.values()) == 1, f"{name}: a sample trained twice in epoch {epoch}"
        assert len(epochs[0]) == 2 * synthetic_data[1]["samples"], f"{name}: epoch 0 is not every sample"
        per_epoch[name] = epochs
    # The same samples in each epoch, and the same samples at each step, as without the failure.
    assert per_epoch["clean"] == per_epoch["killed"]
    assert {k: sorted(v["keys"]) for k, v in clean.items()} == {k: sorted(v["keys"]) for k, v in killed.items()}


@pytest.mark.e2e
def test_a_slow_export_runs_after_the_worker_group_under_a_short_process_group_timeout(clean_run):
    """The end of a run never holds a rank in a collective: the export runs as its own Ray task after
    every worker of the group has returned. (Exporting on rank 0 while the other ranks waited in a
    barrier, as the trainer once did, fails this run with a gloo timeout.)"""
    from orchestration.train.outputs import load_tower_export

    _, result = clean_run
    assert result.steps_done == STEPS and result.history == [[1, STEPS]]
    # The export started after rank 0 had left the training function, and took longer than a rank
    # may wait in a collective.
    assert result.workers_finished_at is not None and result.end_of_run_started_at is not None
    assert result.end_of_run_started_at >= result.workers_finished_at
    assert result.timings["end_of_run_s"] >= EXPORT_DELAY_S > PROCESS_GROUP_TIMEOUT_S
    assert os.path.isfile(os.path.join(result.export_path, "tower.safetensors"))
    assert load_tower_export(result.export_path) is not None
    assert "codebook_dead_codes" in result.metrics


@pytest.mark.e2e
def test_tower_loss_falls_on_two_fsdp_workers_and_the_export_loads_without_ray(killed_run):
    config, result = killed_run
    history = {m.step: m.value for m in _mlflow(config).get_metric_history(result.mlflow_run_id, "loss")}
    assert history[STEPS] < 0.8 * history[1], history
    assert result.metrics["global_batch_size"] == 16  # 8 per worker x 2 workers x 1 accumulation
    # The EMA codebook (a buffer FSDP2 does not shard) stays identical on both ranks at every log step.
    divergence = _mlflow(config).get_metric_history(result.mlflow_run_id, "codebook_rank_divergence")
    assert len(divergence) >= STEPS - 1 and all(m.value == 0.0 for m in divergence)

    from orchestration.train.outputs import load_tower_export

    tower = load_tower_export(result.export_path).eval()
    images = torch.rand(2, 3, 32, 32)
    codes = tower.encode_codes(images)
    assert codes.shape == (2, 8, 8, 4)
    assert tower.decode_codes(codes).shape == images.shape


@pytest.mark.e2e
def test_mlflow_run_holds_params_metrics_images_and_no_credentials(killed_run, tmp_path):
    config, result = killed_run
    client = _mlflow(config)
    run = client.get_run(result.mlflow_run_id)
    params, tags = run.data.params, run.data.tags
    assert params["tower_train.w_contra"] == "1.0" and params["cluster.num_workers"] == "2"
    assert params["data.s3.secret_access_key"] == REDACTED
    assert tags["vilau.stage"] == "tower" and tags["vilau.run_name"] == "t-tower"
    assert len(tags["mlflow.source.git.commit"]) >= 7
    assert "ray.job_id" not in tags  # a local instance's job id (always 01000000) tells runs apart from nothing
    expected = {
        "loss", "loss_contrastive", "loss_recon", "loss_pixel", "loss_commitment", "lr", "grad_norm",
        "samples_per_s", "tokens_per_s", "data_wait_share", "step_time_s", "global_batch_size",
        "codebook_usage", "codebook_perplexity", "codebook_restarts", "nonfinite_skipped",
        "eval/psnr", "eval/ssim", "eval/zero_shot_acc", "eval/i2t_recall_at_1",
    }
    assert expected <= set(run.data.metrics), expected - set(run.data.metrics)

    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path), tracking_uri=config.tracking_uri)
    files = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
    assert "config.yaml" in files and "codebook_usage.png" in files
    assert {"reconstructions/step_0000003.png", "reconstructions/step_0000012.png"} <= set(files)
    assert REDACTED in (Path(local) / "config.yaml").read_text()

    # No credential anywhere: params, tags, metric names, every artifact byte.
    texts = list(params.items()) + list(tags.items()) + [(k, "") for k in run.data.metrics]
    blobs = [(Path(local) / f).read_bytes() for f in files]
    for secret in CREDENTIALS:
        assert not any(secret in k or secret in v for k, v in texts), secret
        assert not any(secret.encode() in b for b in blobs), secret


@pytest.mark.e2e
def test_rerun_of_finished_run_resumes_past_a_damaged_latest_checkpoint(killed_run, synthetic_data, s3_overrides):
    """The latest checkpoint loses one rank's part (as if its save was cut off): the rerun refuses it,
    resumes from the one before, and runs on to the new step count. The rerun also turns on activation
    checkpointing and 2-step gradient accumulation: checkpoints do not depend on either. (It changes the
    killed run's directory, so it stays the module's last test.)"""
    from orchestration.launch import fit_tower

    config, first = killed_run
    latest = Path(first.checkpoint_path)
    (latest / "COMPLETE.rank1").unlink()
    shard = latest / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    out = Path(config.output_dir)
    again = _config(
        synthetic_data, out, s3_overrides, f"tower_train.steps={STEPS + 2}", "cluster.max_failures=0",
        "tower_train.activation_checkpointing=true", "tower_train.grad_accum=2",
    )
    result = fit_tower(again)
    assert result.steps_done == STEPS + 2
    # from the checkpoint before the damaged one (step 10), and step 5 is not killed again
    assert result.history == [[1, 4], [5, STEPS - 2], [STEPS - 1, STEPS + 2]]
    assert result.mlflow_run_id == first.mlflow_run_id  # the same MLflow run continues
    assert result.metrics["global_batch_size"] == 32  # 8 per worker x 2 workers x 2 accumulation
    assert os.path.isfile(os.path.join(result.export_path, "tower.safetensors"))
