"""Exactly once per epoch across a restart: stage 1 on 2 Ray Train workers, one killed mid-epoch by the
fault injection and the worker group restarted from the last checkpoint, trains the same multiset of
samples as an uninterrupted run, each sample once per epoch (data.record_trained_keys writes the keys
of every micro-batch; a step redone after the restart overwrites its file, so the files describe the
lineage of the final weights)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from orchestration.config import load_config

STEPS, FAIL_AT = 12, 6  # the synthetic tower set is 8 steps an epoch here: the run crosses into epoch 1


def _run(synthetic_data, out: Path, *extra: str):
    from orchestration.launch import fit_tower

    config = load_config(None, [
        f"data.root={synthetic_data[0]}",
        f"output_dir={out}",
        f"cluster.storage_path={out / 'ray'}",
        f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
        "run_name=once",
        f"tower_train.steps={STEPS}",
        "tower_train.batch_size_per_worker=8",
        "tower_train.log_every=4",
        "tower_train.checkpoint_every=4",
        "tower_train.eval_every=1000",
        "cluster.num_workers=2",
        "data.record_trained_keys=true",
        "tracking.enabled=false",  # the recorded keys are the evidence; no MLflow store to create twice
        *extra,
    ])
    return fit_tower(config), out / "ray" / "once-tower"


def _trained(run_dir: Path) -> dict[tuple[int, int, int], dict]:
    """(rank, step, micro-batch) -> the recorded micro-batch."""
    return {
        (r["rank"], r["step"], r["micro"]): r
        for r in (json.loads(p.read_text()) for p in run_dir.glob("trained_keys/rank*/step*.json"))
    }


@pytest.mark.e2e
def test_killed_worker_resumes_and_trains_every_sample_exactly_once_per_epoch(ray_session, synthetic_data, tmp_path):
    clean_result, clean_dir = _run(synthetic_data, tmp_path / "clean")
    killed_result, killed_dir = _run(
        synthetic_data, tmp_path / "killed", "cluster.max_failures=1", "cluster.fault_injection.stage=tower",
        f"cluster.fault_injection.fail_at_step={FAIL_AT}", "cluster.fault_injection.rank=1",
    )
    assert killed_result.history == [[1, 4], [5, STEPS]]  # restarted from the step-4 checkpoint
    assert (killed_dir / f"fault_injected_tower_step_step{FAIL_AT}").is_file()

    clean, killed = _trained(clean_dir), _trained(killed_dir)
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
