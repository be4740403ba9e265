"""Checks a job runs before Ray starts, each naming the field it checks: the sources of the stages it
runs exist and hold their format's files, the weight paths exist, the tracking server answers.
``launch.preflight`` runs them all and reports every problem at once, with the resource plan's.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from orchestration.config import Config
from orchestration.data.records import ShardError, list_shards
from orchestration.storage import S3Settings, is_s3

TRACKING_ANSWER_S = 5.0
STAGE_SOURCES = {"tower": ("tower_sources",), "tune": ("tower_sources",), "lm": ("lm_sources",)}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def source_problems(config: Config, stages: tuple[str, ...]) -> list[str]:
    """Each source of the stages: its directory exists and holds index files of its format."""
    problems = []
    s3 = S3Settings.from_config(config.data.s3)
    groups = sorted({g for stage in stages for g in STAGE_SOURCES.get(stage, ())})
    if "lm_sources" in groups and _cache_complete(config):
        groups.remove("lm_sources")  # stage 2 reads the tokenized cache, not the sources
    for group in groups:
        for name, source in getattr(config.data, group).items():
            try:
                list_shards(source.format, config.resolve_path(source.path), s3)
            except (ShardError, OSError) as exc:
                problems.append(f"data.{group}.{name}.path: {exc}")
    return problems


def _cache_complete(config: Config) -> bool:
    if not config.data.cache_dir:
        return False
    from orchestration.data.cache import read_manifest

    try:
        return read_manifest(config.data.cache_dir, config) is not None
    except Exception:  # unreachable cache storage: the sources are what will be read
        return False


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(("~", ".")) or value.endswith(WEIGHT_SUFFIXES)


def weight_problems(config: Config, stages: tuple[str, ...]) -> list[str]:
    """Every local weight or tokenizer path the stages load exists (URIs are read where they run)."""
    m = config.model
    fields = [("model.tower_pretrained", m.tower_pretrained), ("model.tower_text_tokenizer", m.tower_text_tokenizer)]
    if "lm" in stages:
        fields += [("model.lm_path", m.lm_path), ("model.tower_checkpoint", m.tower_checkpoint)]
    if "tower" in stages or "tune" in stages:
        t = config.tower_train
        fields += [("tower_train.perceptual_weights_path", t.perceptual_weights_path),
                   ("tower_train.frechet_weights_path", t.frechet_weights_path)]
    problems = []
    for field, value in fields:
        if not value or is_s3(value) or "://" in value:
            continue
        if field == "model.tower_pretrained" and not _looks_like_path(value):
            continue  # an open_clip pretrained tag, resolved by open_clip
        if not os.path.exists(os.path.expanduser(value)):
            problems.append(f"{field}: {value} does not exist")
    return problems


def tracking_problems(config: Config) -> list[str]:
    """An MLflow server in tracking.uri answers its health check within TRACKING_ANSWER_S seconds."""
    uri = config.tracking.uri
    if not config.tracking.enabled or not uri or not uri.startswith(("http://", "https://")):
        return []
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=TRACKING_ANSWER_S) as response:
            if response.status == 200:
                return []
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = str(getattr(exc, "reason", exc))
    return [f"tracking.uri: no MLflow server answers at {uri} within {TRACKING_ANSWER_S:g} s ({reason})"]


def config_problems(config: Config, stages: tuple[str, ...]) -> list[str]:
    return source_problems(config, stages) + weight_problems(config, stages) + tracking_problems(config)
