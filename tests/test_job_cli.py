"""The command line every job shares: --help lists every key, --print-config round-trips, typos get a suggestion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.config import ConfigError, load_config
from orchestration.job_cli import config_keys_help

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_section_and_key_with_its_comment():
    text = config_keys_help()
    for line in ("tower_train.steps = 100", "data.actor_start_timeout_s = 600.0", "cluster.gpu_memory_gib = null",
                 "lm_train.optim.lr = 0.001", "model.rope_scaling.factor = 2.0"):
        assert line in text
    assert "# Memory of one GPU of the training nodes (GiB)" in text


def test_unknown_keys_get_the_nearest_known_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["tower_train.setps=3", "data.lm_sources.x.formt=mmc4", "cluster.zzzz=1"])
    message = str(err.value)
    assert "tower_train.setps: unknown key (got 3); did you mean tower_train.steps?" in message
    assert "did you mean data.lm_sources.x.format?" in message
    assert "cluster.zzzz: unknown key (got 1)\n" in message + "\n"  # nothing close: no guess


@pytest.mark.parametrize("job", ["pretrain.py", "plan.py", "tune_loss_weights.py"])
def test_print_config_gives_yaml_that_loads_back(job, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / job), "--print-config", "tower_train.steps=7",
                           "data.s3.secret_access_key=hunter2"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "hunter2" not in proc.stdout + proc.stderr  # secrets redacted
    # and the user is told that a secret on the command line stays in the process arguments
    assert "data.s3.secret_access_key given on the command line" in proc.stderr
    path = tmp_path / "resolved.yaml"
    path.write_text(proc.stdout)
    assert load_config(path).tower_train.steps == 7


def test_generation_outputs_go_to_a_new_folder_each_run(tmp_path):
    from orchestration.train.lm import fresh_output_folder

    first, second = fresh_output_folder(str(tmp_path / "gen")), fresh_output_folder(str(tmp_path / "gen"))
    assert Path(first).name == "gen-0001" and Path(second).name == "gen-0002"
    (Path(first) / "prompt00_sample00.png").write_bytes(b"earlier")
    assert fresh_output_folder(str(tmp_path / "gen")).endswith("gen-0003")
    assert (Path(first) / "prompt00_sample00.png").read_bytes() == b"earlier"
