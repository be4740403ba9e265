"""Explicit resume: what rerunning a run name does, decided before Ray starts.

Each stage records the config it trains with (``run_config.json`` in its run directory under
``cluster.storage_path``). Rerunning the same run name:

- with the same config resumes from the latest checkpoint (a re-submitted job must just continue);
- with more ``steps`` continues to the new count (fewer: the finished run re-exports);
- with any other difference that changes what is trained (model, data, loss weights, optimizer, seed)
  is refused, listing the changed fields and the two ways on: ``--resume`` (continue with the new
  values: sound for training settings, not for the data or the model, which need a new run) or
  ``--fresh`` / a new ``run_name`` (start over).

Settings that do not change what is trained (where things are logged, cluster sizing, timeouts,
logging and checkpoint cadence) never block a resume.
"""

from __future__ import annotations

import json
import logging
from typing import Literal

from orchestration.config import STAGE_SECTIONS, Config, flatten_config
from orchestration.storage import filesystem, join

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
ResumeMode = Literal["auto", "resume", "fresh"]

# Fields that never block a resume: where things go, how the cluster is used, how often we log and save.
FREE = (
    "run_name", "output_dir", "cluster.", "tracking.", "tune.", "data.s3.", "data.actor_start_timeout_s",
    "data.batch_timeout_s", "data.record_trained_keys", "data.decode_batch_size", "data.tokenizer_actors",
    "data.tokenizer_actor_gpus", "data.tokenizer_batch_size", "data.synthetic.make_if_missing", "data.eval_path",
    "model.allow_random_init",
)
FREE_IN_STAGE = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "generate_samples",
                 "max_nonfinite_in_a_row")
# What a stage does not depend on at all.
OTHER_STAGE = {
    "tower": ("lm_train.", "data.lm_sources.", "data.cache_dir", "data.seq_len", "data.pack_window", "model.lm",
              "model.lm_path", "model.rope_scaling", "model.tower_checkpoint"),
    "lm": ("tower_train.", "data.tower_sources."),
}
# Changes --resume cannot make sound: the data (its plan and the saved positions) and the model's shape.
NEEDS_NEW_RUN = ("data.", "model.", "seed")


def run_config_path(config: Config, run_name: str) -> str:
    return join(config.cluster.storage_path, run_name, RUN_CONFIG)


def trained_fields(config: Config, stage: str) -> dict[str, str]:
    """The flattened config (secrets redacted) without the fields that never block a resume."""
    free_in_stage = tuple(f"{STAGE_SECTIONS[stage]}.{k}" for k in FREE_IN_STAGE)
    return {k: v for k, v in flatten_config(config).items()
            if not k.startswith(FREE + OTHER_STAGE[stage] + free_in_stage)}


def recorded_fields(config: Config, run_name: str) -> dict[str, str] | None:
    fs, path = filesystem(run_config_path(config, run_name), config.data.s3)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())["fields"]


def record_run_config(config: Config, stage: str, run_name: str) -> None:
    """Called when a stage starts: what later reruns of this run name are compared with."""
    fs, path = filesystem(run_config_path(config, run_name), config.data.s3)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(json.dumps({"stage": stage, "fields": trained_fields(config, stage)}, indent=1).encode())


def differences(recorded: dict[str, str], current: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    keys = sorted(set(recorded) | set(current))
    return [(k, recorded.get(k), current.get(k)) for k in keys if recorded.get(k) != current.get(k)]


def resume_problems(config: Config, stages: tuple[str, ...], mode: ResumeMode) -> list[str]:
    """Why rerunning this run name with this config cannot go on as asked (empty: it can)."""
    problems = []
    for stage in stages:
        if stage not in STAGE_SECTIONS:
            continue
        run_name = f"{config.run_name}-{stage}"
        try:
            recorded = recorded_fields(config, run_name)
        except Exception as exc:  # storage unreachable (credentials, endpoint, permissions): say where
            problems.append(f"cluster.storage_path: cannot read {run_config_path(config, run_name)} "
                            f"({type(exc).__name__}: {exc})")
            continue
        if recorded is None or mode == "fresh":
            continue
        changed = differences(recorded, trained_fields(config, stage))
        if not changed:
            continue
        listed = "; ".join(f"{k}: {old} -> {new}" for k, old, new in changed)
        unsound = [k for k, _, _ in changed if k.startswith(NEEDS_NEW_RUN)]
        if mode == "resume" and not unsound:
            log.info("%s: resuming with changed %s", run_name, listed)
            continue
        where = run_config_path(config, run_name)
        if mode == "resume":
            problems.append(f"run_name: {run_name} was trained on other data or another model ({listed}); --resume "
                            f"cannot continue it soundly: start over with --fresh or a new run_name")
        else:
            problems.append(f"run_name: {run_name} exists ({where}) with another config ({listed}); rerun with "
                            f"--resume to continue it with the new values, or --fresh (or a new run_name) to start over")
    return problems


def start_fresh(config: Config, stages: tuple[str, ...]) -> list[str]:
    """--fresh: remove each stage's run directory (checkpoints, data plan, export) under
    cluster.storage_path, and retire its MLflow run so that a new one is opened. Returns what was removed."""
    removed = []
    for stage in stages:
        if stage not in STAGE_SECTIONS:
            continue
        run_name = f"{config.run_name}-{stage}"
        fs, path = filesystem(join(config.cluster.storage_path, run_name), config.data.s3)
        if fs.exists(path):
            fs.rm(path, recursive=True)
            removed.append(join(config.cluster.storage_path, run_name))
        if config.tracking.enabled:
            from orchestration.train.tracking import retire_run

            retire_run(config, run_name)
    return removed
