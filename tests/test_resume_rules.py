"""Rerunning a run name: the same config resumes, more steps continue, other changes are refused before
Ray starts (naming the fields), --resume continues training-setting changes, --fresh starts over."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from orchestration.config import load_config
from orchestration.resume import record_run_config, resume_problems, run_config_path, start_fresh

ROOT = Path(__file__).resolve().parents[1]


def test_the_resume_matrix(tmp_path, synthetic_data):
    data_root, _ = synthetic_data
    base = [f"data.root={data_root}", f"output_dir={tmp_path / 'out'}", f"cluster.storage_path={tmp_path / 'out' / 'ray'}",
            "tracking.enabled=false"]

    def config(*overrides):
        return load_config(None, [*base, *overrides])

    first = config()
    for stage in ("tower", "lm"):
        record_run_config(first, stage, f"{first.run_name}-{stage}")
    both = ("tower", "lm")

    assert resume_problems(config(), both, "auto") == []  # the same config resumes
    assert resume_problems(config("tower_train.steps=500", "lm_train.steps=90", "cluster.num_workers=1",
                                  "tower_train.log_every=1"), both, "auto") == []  # more steps continue

    problems = resume_problems(config("tower_train.w_recon=2.0"), both, "auto")
    assert len(problems) == 1 and "tiny-tower" in problems[0]
    assert "tower_train.w_recon: 1.0 -> 2.0" in problems[0] and "--resume" in problems[0] and "--fresh" in problems[0]
    assert resume_problems(config("tower_train.w_recon=2.0"), both, "resume") == []  # a training setting: sound

    moved = config(f"data.root={tmp_path / 'elsewhere'}")
    problems = resume_problems(moved, both, "auto")
    assert len(problems) == 2 and all("data.root" in p for p in problems)  # both stages read data.root
    problems = resume_problems(moved, both, "resume")
    assert len(problems) == 2 and all("cannot continue it soundly" in p for p in problems)
    assert resume_problems(moved, both, "fresh") == []

    removed = start_fresh(moved, both)
    assert len(removed) == 2 and not Path(run_config_path(first, "tiny-tower")).exists()
    assert resume_problems(moved, both, "auto") == []  # nothing left to resume: a new run


def test_a_changed_rerun_is_refused_by_the_job_before_ray_starts(tmp_path, synthetic_data):
    data_root, _ = synthetic_data
    out = tmp_path / "out"
    storage = f"cluster.storage_path={out / 'ray'}"
    config = load_config(None, [f"data.root={data_root}", f"output_dir={out}", storage])
    record_run_config(config, "tower", "tiny-tower")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train_vision_tower.py"), f"data.root={data_root}", f"output_dir={out}", storage,
         "tower_train.w_recon=2.0"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "tower_train.w_recon: 1.0 -> 2.0" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "logs").exists()  # refused before the job's console (and Ray) started
