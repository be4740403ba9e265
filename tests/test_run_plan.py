"""The plan of a run (jobs/plan.py, every job's preflight): what each stage asks Ray for, held against the
cluster before anything starts, and the deadlines on every wait for Ray resources."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestration.config import ConfigError, load_config
from orchestration.resource_plan import (
    Bundle,
    Capacity,
    ResourceWaitError,
    check_resources,
    cluster_capacity,
    plan_resources,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["model.allow_random_init=true"]


def paper(name: str, *overrides: str):
    return load_config(ROOT / "jobs" / "configs" / f"{name}.yaml", [*PAPER, *overrides])


def test_paper_presets_fit_cluster_yaml_and_tokenize_before_training():
    for name in ("vilau-256", "vilau-384"):
        config = paper(name)
        plan = plan_resources(config, ("tower", "lm"), cluster_capacity(config))
        assert plan.fits, plan.problems
        assert plan.capacity.total().gpu == 64
        names = [p.label for p in plan.phases]
        assert names.index("lm: tokenize into data.cache_dir") < names.index("lm: train")
        train = next(p for p in plan.phases if p.label == "lm: train")
        assert train.total().gpu == 64  # the training ranks read code shards only: no GPU asked beside them


def test_per_rank_pools_that_wait_on_the_trainers_gpus_are_refused_naming_the_fields():
    # Today's preset values: every rank tokenizes on the fly with 8 one-GPU actors.
    config = paper("vilau-384", "data.cache_dir=null", "data.tokenizer_actors=8")
    with pytest.raises(ConfigError) as err:
        check_resources(config, ("lm",))
    message = str(err.value)
    assert "576 GPUs of 64" in message
    for field in ("data.tokenizer_actors", "data.tokenizer_actor_gpus", "data.cache_dir", "cluster.num_workers"):
        assert field in message
    check_resources(config, ("tower",))  # stage 1 alone fits


def test_placement_is_per_node():
    # 2 nodes of 4 GPUs and 8 CPUs: 8 workers of {CPU 2, GPU 1} fit, {CPU 3, GPU 1} do not (CPUs per node),
    # although the cluster's totals (24 > 8 x 3 = 24) would say they do.
    nodes = Capacity("two nodes", [Bundle(12, 4), Bundle(12, 4)])
    fits = load_config(None, ["cluster.num_workers=8", "cluster.use_gpu=true", "cluster.cpus_per_worker=2"])
    assert plan_resources(fits, ("tower",), nodes).fits
    tight = load_config(None, ["cluster.num_workers=8", "cluster.use_gpu=true", "cluster.cpus_per_worker=3"])
    problems = plan_resources(tight, ("tower",), nodes).problems
    assert problems and "cluster.cpus_per_worker" in problems[0]


def run_job(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_a_job_refuses_the_hang_before_ray_starts(tmp_path):
    proc = run_job("pretrain.py", "--config", str(ROOT / "jobs" / "configs" / "vilau-384.yaml"), *PAPER,
                   "data.cache_dir=null", "data.tokenizer_actors=8", "cluster.gpu_memory_gib=null",
                   f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "lm: train, tokenizing on the fly" in proc.stderr and "data.tokenizer_actor_gpus" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Ray instance" not in proc.stdout + proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.usefixtures("ray_session")
def test_a_pool_without_its_resources_fails_within_its_deadline_naming_them(tiny_config, tmp_path):
    from orchestration.data.pipeline import write_lm_cache

    # A one-GPU tokenization pool on an instance without GPUs: Ray Data alone would wait forever.
    config = tiny_config(f"data.cache_dir={tmp_path / 'cache'}", "data.tokenizer_actor_gpus=1",
                         "data.actor_start_timeout_s=3")
    started = time.monotonic()
    with pytest.raises(ResourceWaitError) as err:
        write_lm_cache(config)
    waited = time.monotonic() - started
    message = str(err.value)
    assert "GPU 1" in message and "data.actor_start_timeout_s=3" in message and "data.tokenizer_actor_gpus" in message
    assert waited < 120  # a deadline, not a hang (generous: tokenizer training and Ray Data start-up come first)


def test_a_step_over_the_gpus_memory_is_refused_naming_the_fields():
    from orchestration.run_plan import memory_problems, plan_run, report_lines

    # The tiny preset held against GPUs of 1 MiB: the computed step (fake tensors, 2 fake ranks) cannot fit.
    config = load_config(None, ["cluster.use_gpu=true", "cluster.gpu_memory_gib=0.001", "cluster.cluster_yaml=cluster.yaml"])
    plan = plan_run(config, ("tower",))
    assert plan.memory["tower"].peak_bytes > 0.001 * 2**30
    assert len(plan.problems) == 1 and "cluster.gpu_memory_gib=0.001" in plan.problems[0]
    assert "tower_train.batch_size_per_worker" in plan.problems[0]
    assert "DOES NOT FIT:" in report_lines(config, plan)
    roomy = load_config(None, ["cluster.use_gpu=true", "cluster.gpu_memory_gib=80", "cluster.cluster_yaml=cluster.yaml"])
    assert memory_problems(roomy, plan.memory) == []
