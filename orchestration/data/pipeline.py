"""The data plane's public API: what the training loops and jobs import.

Stage 1 (vision tower)
    build_tower_dataset(config, split="train") -> ray.data.Dataset
        pixels uint8 [3, S, S]   resized (shorter side, bicubic) + centre-cropped to the tower's size
        text_tokens int64 [ctx]  the tower's text tokenizer
    build_eval_split(config) -> dict of numpy: pixels, text_tokens, labels, class_prompt_tokens,
        class_names, captions

Stage 2 (LLM)
    ensure_lm_tokenizer(config) -> str   path of the LLM tokenizer (lm_path's, or a BPE trained here)
    build_lm_dataset(config, tower_path) -> ray.data.Dataset of packed rows (vilau_model.sequence
        ROW_SCHEMA: input_ids/labels/position_ids/segment_ids int32 [L], codes int16 [L, D],
        is_visual bool [L]); read from data.cache_dir when it holds a matching cache
    write_lm_cache(config, tower_path) -> manifest   (what jobs/tokenize_data.py runs)

Counting and streaming into Ray Train
    skip_counts(group) -> {reason: n}; data_stats(group); mixture_shares(config, stage)
    torch_dtypes(stage) -> the dtypes dict iter_torch_batches needs (every column named)
    train_data_config(...) -> ray.train.DataConfig that keeps stage-2 row order under streaming_split
    timed_batches(iterable) -> (batch, seconds waited) pairs, for the data-wait metric

Skip counts are kept per group: "tower" for build_tower_dataset, "lm" for build_lm_dataset, "eval"
for build_eval_split (each builder takes ``stats_group=`` to use another).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from orchestration.config import Config
from orchestration.data.cache import CacheMismatchError, build_lm_dataset, read_manifest, write_lm_cache
from orchestration.data.lm_data import LM_GROUP, ensure_lm_tokenizer
from orchestration.data.mixture import mixture_report
from orchestration.data.sources import ensure_data
from orchestration.data.stats import data_stats, reset_stats, skip_counts
from orchestration.data.tower_data import TOWER_GROUP, build_eval_split, build_tower_dataset

__all__ = [
    "CacheMismatchError",
    "LM_GROUP",
    "TOWER_GROUP",
    "build_eval_split",
    "build_lm_dataset",
    "build_tower_dataset",
    "data_stats",
    "ensure_data",
    "ensure_lm_tokenizer",
    "mixture_shares",
    "read_manifest",
    "reset_stats",
    "run_tokenize_job",
    "skip_counts",
    "timed_batches",
    "torch_dtypes",
    "train_data_config",
    "write_lm_cache",
]


def torch_dtypes(stage: str) -> dict:
    """The ``dtypes`` for ``iter_torch_batches`` ("tower" or "lm"); integer LM columns widened to
    int64 as vilau_model.sequence.collate_rows does."""
    import torch

    if stage == "tower":
        return {"pixels": torch.uint8, "text_tokens": torch.int64}
    if stage == "lm":
        from vilau_model.sequence import ROW_COLUMNS

        return {name: (torch.bool if name == "is_visual" else torch.int64) for name in ROW_COLUMNS}
    raise ValueError(f"stage must be 'tower' or 'lm', got {stage!r}")


def train_data_config(dataset_names: tuple[str, ...] = ("train",)):
    """A ray.train.DataConfig whose streaming_split keeps Ray Data's row order (Train otherwise applies
    the driver's default execution options, which do not). Needed for reproducible stage-2 rows."""
    import ray.train
    from ray.data import DataContext, ExecutionOptions

    defaults = DataContext.get_current().execution_options
    options = ExecutionOptions(
        resource_limits=defaults.resource_limits,
        exclude_resources=defaults.exclude_resources,
        preserve_order=True,
    )
    return ray.train.DataConfig(datasets_to_split=list(dataset_names), execution_options={n: options for n in dataset_names})


def timed_batches(batches: Iterable) -> Iterator[tuple[object, float]]:
    """Yield (batch, seconds spent waiting for it): the per-step data-wait time."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start


def mixture_shares(config: Config, stage: str = "lm", group: str | None = None) -> dict:
    """Per source: weight, target share, samples delivered so far and their realized share (stage 2
    also tokens). Counts come from the pipeline's stats group (default: the stage's)."""
    sources = config.data.lm_sources if stage == "lm" else config.data.tower_sources
    stats = data_stats(group or (LM_GROUP if stage == "lm" else TOWER_GROUP))
    return mixture_report({n: s.weight for n, s in sources.items()}, stats["samples"], stats["tokens"] if stage == "lm" else None)


def run_tokenize_job(config: Config, tower_path: str | None = None, force: bool = False) -> dict:
    """jobs/tokenize_data.py: join the cluster (or start a local Ray), write the tokenized cache, return
    its manifest."""
    from orchestration.launch import init_ray  # the one way every job joins Ray (RAY_ADDRESS included)

    init_ray(config)
    return write_lm_cache(config, tower_path, force=force)
