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


@pytest.mark.parametrize("job", ["pretrain.py", "plan.py", "tune_loss_weights.py", "generate.py", "make_synthetic_data.py"])
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
    from orchestration.train.generation import fresh_output_folder

    first, second = fresh_output_folder(str(tmp_path / "gen")), fresh_output_folder(str(tmp_path / "gen"))
    assert Path(first).name == "gen-0001" and Path(second).name == "gen-0002"
    (Path(first) / "prompt00_sample00.png").write_bytes(b"earlier")
    assert fresh_output_folder(str(tmp_path / "gen")).endswith("gen-0003")
    assert (Path(first) / "prompt00_sample00.png").read_bytes() == b"earlier"


def _job_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "jobs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_data_job_never_writes_into_a_folder_of_real_files(tmp_path, capsys):
    """Pointed (by --out or by the config's data.root) at a folder that holds anything but a generation,
    the job refuses, naming what pointed it there, and leaves the files byte-identical."""
    real = tmp_path / "mydata" / "coyo" / "webdataset"
    real.mkdir(parents=True)
    (real / "00000.tar").write_bytes(b"a real shard")
    job = _job_module("make_synthetic_data.py")
    for argv, field in ((["--out", str(tmp_path / "mydata")], "--out"), ([f"data.root={tmp_path / 'mydata'}"], "data.root")):
        with pytest.raises(SystemExit) as exc:
            job.main(argv + ["--samples", "8"])
        assert str(exc.value).startswith(f"error: {field}: "), exc.value
    assert (real / "00000.tar").read_bytes() == b"a real shard"
    assert sorted(p.name for p in (tmp_path / "mydata").rglob("*")) == ["00000.tar", "coyo", "webdataset"]


def test_the_generate_job_loads_without_ray():
    """jobs/generate.py runs where there is no Ray cluster: importing it (and its export loaders) loads
    neither Ray nor the training loop."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('g', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(sorted({n.split('.')[0] for n in sys.modules if n == 'ray' or n.startswith('ray.')} | "
            "({'trainer'} if 'orchestration.train.trainer' in sys.modules else set())))")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "jobs" / "generate.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
