"""What every job checks before Ray starts: generated shards are written only where no user data can be."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.config import ConfigError, load_config
from orchestration.data.sources import ensure_data
from orchestration.data.synthetic import IN_PROGRESS_MARK, synthetic_folder_state

ROOT = Path(__file__).resolve().parents[1]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def real_folder(tmp_path: Path) -> Path:
    """A user's data folder: one real webdataset shard, no manifest."""
    folder = tmp_path / "real"
    shard = folder / "coyo" / "webdataset" / "00000.tar"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(os.urandom(4096))
    return folder


def config_for(root: Path, tmp_path: Path, *extra: str):
    return load_config(None, [f"data.root={root}", f"output_dir={tmp_path / 'out'}", "data.synthetic.samples=8",
                              "data.synthetic.eval_samples=8", *extra])


def test_the_default_job_refuses_a_folder_of_real_data_before_ray_starts(tmp_path):
    folder = real_folder(tmp_path)
    before = tree_digest(folder)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pretrain.py"), f"data.root={folder}", f"output_dir={out}",
         f"cluster.storage_path={out / 'ray'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "data.root" in proc.stderr and str(folder) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree_digest(folder) == before  # byte-identical, nothing added
    assert not (out / "ray").exists() and not (out / "logs").exists()  # no stage, no job console: Ray never started
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_generated_shards_go_only_where_no_user_data_can_be(tmp_path):
    # Absent: generated, and the manifest says who wrote it.
    fresh = tmp_path / "fresh"
    ensure_data(config_for(fresh, tmp_path))
    assert synthetic_folder_state(fresh) == "complete" and not (fresh / IN_PROGRESS_MARK).exists()
    digest = tree_digest(fresh)
    ensure_data(config_for(fresh, tmp_path))  # complete: reused as it is
    assert tree_digest(fresh) == digest

    # A generation killed half-way (our mark, no manifest) may be redone.
    partial = tmp_path / "partial"
    (partial / "coyo").mkdir(parents=True)
    (partial / IN_PROGRESS_MARK).write_text("")
    (partial / "coyo" / "half-written.parquet").write_bytes(b"PAR1")
    ensure_data(config_for(partial, tmp_path))
    assert synthetic_folder_state(partial) == "complete"

    # Anything else is refused, naming the field, and left untouched.
    for folder in (real_folder(tmp_path), tmp_path / "foreign-manifest"):
        if folder.name == "foreign-manifest":
            folder.mkdir()
            (folder / "manifest.json").write_text('{"shards": ["a.tar"]}')
        before = tree_digest(folder)
        with pytest.raises(ConfigError, match=r"^data\.root: .*make_if_missing=false"):
            ensure_data(config_for(folder, tmp_path))
        assert tree_digest(folder) == before

    # Told not to generate: nothing is checked or written, the user's folder is simply read.
    folder = tmp_path / "real"
    ensure_data(config_for(folder, tmp_path, "data.synthetic.make_if_missing=false"))
    assert not (folder / "manifest.json").exists()


def test_every_problem_is_reported_at_once_before_ray_starts_each_naming_its_field(tmp_path, synthetic_data):
    data_root, _ = synthetic_data
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "pretrain.py"), f"data.root={data_root}", f"output_dir={out}",
         "data.tower_sources.coyo.path=no/such/folder", f"model.tower_checkpoint={tmp_path / 'missing-export'}",
         "tracking.uri=http://127.0.0.1:1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr
    assert "data.tower_sources.coyo.path:" in err and "no/such/folder" in err
    assert "model.tower_checkpoint:" in err and "missing-export" in err
    assert "tracking.uri: no MLflow server answers at http://127.0.0.1:1" in err
    assert "Traceback" not in err and not out.exists()
