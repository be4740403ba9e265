"""Stage 2 on a real local Ray instance: the unified LM on 2 CPU workers with FSDP2 over a frozen
tower, checkpoints and export on S3 (the local S3-protocol server), a worker that dies half-way
through a checkpoint save, the rerun of that killed run, and the Ray-free export generating an image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

STEPS, CHECKPOINT_EVERY = 6, 3


def _saved_state(fs, checkpoint_dir: str, local: Path) -> dict:
    """A sharded checkpoint's model and optimizer state from its DCP files on S3, read without Ray or a
    process group: ``{"model": {fqn: tensor}, "optim": {"state": {fqn: {...}}, ...}}``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    local.mkdir(parents=True)
    for path in fs.ls(checkpoint_dir):
        name = Path(path).name
        if name == ".metadata" or name.endswith(".distcp"):
            fs.get(path, str(local / name))
    dcp_to_torch_save(local, local / "full.pt")
    return torch.load(local / "full.pt", weights_only=False)


def _sums(state: dict) -> dict[str, list[float]]:
    """[sum, sum of squares] in float64 of every tensor of a nested state dict, by its path."""
    from orchestration.train.checkpoint import flat_tensors, tensor_digest

    return tensor_digest(flat_tensors(state).items())


@pytest.fixture(scope="module")
def tower_export(tmp_path_factory) -> str:
    """A stage-1 export of a seeded tiny tower (stage 1 itself is covered by test_train_tower)."""
    from orchestration.train.outputs import save_tower_export
    from vilau_model.config import get_tower_config
    from vilau_model.vision_tower import UnifiedVisionTower

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tower_export")
    save_tower_export(UnifiedVisionTower(get_tower_config("tiny")), str(directory))
    return str(directory)


@pytest.mark.e2e
def test_stage2_killed_mid_save_rerun_resumes_loss_falls_and_export_generates(
    ray_session, tiny_config, tower_export, s3_overrides, s3_server, tmp_path
):
    from mlflow import MlflowClient
    from ray.train import TrainingFailedError

    from conftest import S3_BUCKET
    from orchestration.launch import fit_lm
    from orchestration.storage import filesystem
    from orchestration.train.generation import generate_to_files

    storage = f"s3://{S3_BUCKET}/runs-{tmp_path.name}"
    config = tiny_config(
        *s3_overrides,
        f"cluster.storage_path={storage}",
        "run_name=t",
        f"lm_train.steps={STEPS}",
        "lm_train.batch_size_per_worker=2",
        "lm_train.log_every=1",
        f"lm_train.checkpoint_every={CHECKPOINT_EVERY}",
        "lm_train.generate_samples=1",
        "lm_train.optim.lr=3e-3",
        "cluster.num_workers=2",
        "cluster.max_failures=0",
        # rank 0 writes its shards of the final checkpoint and dies before the save completes
        "cluster.fault_injection.stage=lm",
        f"cluster.fault_injection.fail_at_step={STEPS}",
        "cluster.fault_injection.phase=save",
        "cluster.fault_injection.rank=0",
        # after the restore, rank 0 writes sums of every tensor it holds, for comparison with the files
        "cluster.fault_injection.record_restored_state=true",
    )
    with pytest.raises(TrainingFailedError):
        fit_lm(config, tower_export)
    fs, run_dir = filesystem(f"{storage}/t-lm", s3_server)
    assert fs.isfile(f"{run_dir}/fault_injected_lm_save_step{STEPS}")
    def complete(directory: str) -> bool:
        return {".metadata", "COMPLETE.rank0", "COMPLETE.rank1"} <= {Path(p).name for p in fs.ls(directory)}

    checkpoints = [p for p in fs.ls(run_dir) if Path(p).name.startswith("checkpoint_step")]
    # Saves are written straight to storage: the cut-off save of step 6 left an incomplete directory.
    assert sorted(Path(p).name.split("_")[1] for p in checkpoints if complete(p)) == ["step0000003"]
    (saved_dir,) = [p for p in checkpoints if complete(p)]
    saved = _saved_state(fs, saved_dir, tmp_path / "saved")

    # Rerunning the killed run resumes from the checkpoint before the cut-off save.
    result = fit_lm(config, tower_export)
    assert result.steps_done == STEPS
    assert result.history == [[1, CHECKPOINT_EVERY], [CHECKPOINT_EVERY + 1, STEPS]]
    # What the rerun held right after its restore is what the step-3 checkpoint's files hold: every
    # model and optimizer tensor (sum and sum of squares of the whole tensor), none missing or extra.
    fs.invalidate_cache()  # s3fs remembers the listings made before the rerun wrote new files
    restored = json.loads(fs.cat_file(f"{run_dir}/restored_state_step{CHECKPOINT_EVERY:07d}.json"))
    assert restored["checkpoint"].rstrip("/").endswith(Path(saved_dir).name) and restored["step"] == CHECKPOINT_EVERY
    expected = _sums(saved)
    assert set(restored["tensors"]) == set(expected)
    assert any(k.startswith("optim/state/") and k.endswith("/exp_avg_sq") for k in expected)
    for name, (total, squares) in expected.items():
        assert restored["tensors"][name] == pytest.approx([total, squares], rel=1e-9, abs=1e-12), name
    # Adam's step counters: 3 restored + 3 taken after the restore, none taken twice, in the final weights.
    final = _saved_state(fs, result.checkpoint_path.replace("s3://", "", 1), tmp_path / "final")
    assert {int(v["step"]) for v in final["optim"]["state"].values()} == {STEPS}
    assert {int(v["step"]) for v in saved["optim"]["state"].values()} == {CHECKPOINT_EVERY}

    client = MlflowClient(tracking_uri=config.tracking_uri)

    def history(name: str) -> list[float]:
        """Per step, the value of the final lineage (the rerun logged steps 4-6 again)."""
        points = sorted(client.get_metric_history(result.mlflow_run_id, name), key=lambda m: (m.step, m.timestamp))
        return list({m.step: m.value for m in points}.values())

    # A step's total loss depends on its mix of text and image targets, so compare the first and last
    # two steps; the text CE alone falls step by step.
    loss, loss_text = history("loss"), history("loss_text")
    assert len(loss) == STEPS
    assert sum(loss[-2:]) < sum(loss[:2]), loss
    assert loss_text[-1] < loss_text[0], loss_text
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["vilau.stage"] == "lm" and run.info.status == "FINISHED"
    assert {"loss_text", "loss_image", "tokens_per_s", "samples_per_s", "grad_norm", "lr"} <= set(run.data.metrics)
    # The generation score (one image per class prompt, classified by the tower) and its sample grid:
    # the score is the share of the 16 generated images that the tower put in their prompt's class, as
    # the per-image table beside it lists them.
    assert run.data.metrics["eval/generation_chance"] == pytest.approx(1 / 16)
    samples = [a.path for a in client.list_artifacts(result.mlflow_run_id, "samples")]
    assert f"samples/generation_step_{STEPS:07d}.png" in samples
    table = Path(client.download_artifacts(result.mlflow_run_id, f"samples/generation_step_{STEPS:07d}.tsv",
                                           dst_path=str(tmp_path / "tsv"))).read_text().splitlines()[1:]
    rows = [line.split("\t") for line in table]
    assert len(rows) == 16 and len({prompted for prompted, _ in rows}) == 16, rows
    matches = sum(prompted == classified for prompted, classified in rows)
    assert run.data.metrics["eval/generation_score"] == pytest.approx(matches / 16)
    assert result.metrics["eval/generation_score"] == run.data.metrics["eval/generation_score"]
    # The understanding score (answers about the held-back images) beside it, with its chance levels: the
    # share of images whose answer named their true class, as its per-image table lists them.
    assert run.data.metrics["eval/understanding_chance"] == pytest.approx(1 / 16)
    assert run.data.metrics["eval/understanding_shape_chance"] == pytest.approx(1 / 4)
    assert result.metrics["eval/understanding_score"] == run.data.metrics["eval/understanding_score"]
    answers = Path(client.download_artifacts(result.mlflow_run_id, f"samples/understanding_step_{STEPS:07d}.tsv",
                                             dst_path=str(tmp_path / "tsv"))).read_text().splitlines()[2:]
    named = [line.split("\t")[:2] for line in answers]
    assert len(named) >= 16, answers[:5]
    right = sum(true == said for true, said in named)
    assert run.data.metrics["eval/understanding_score"] == pytest.approx(right / len(named))

    # The export (on S3) loads and generates without Ray.
    assert result.export_path.startswith(f"{storage}/t-lm/")
    fs, export = filesystem(result.export_path, s3_server)
    fs.get(export + "/", str(tmp_path / "export"), recursive=True)
    files = generate_to_files(str(tmp_path / "export"), ["a red circle in the top left"], str(tmp_path / "gen"))
    assert len(files) == 1 and Image.open(files[0]).size == (32, 32)
