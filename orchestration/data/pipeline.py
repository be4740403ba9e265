"""The data plane's public API: what the training loops and jobs import.

Stage 1 (vision tower)
    build_tower_dataset(config, split="train") -> ray.data.Dataset
        pixels uint8 [3, S, S]   resized (shorter side, bicubic) + centre-cropped to the tower's size
        caption str              tokenized by the consumer: with_text_tokens(tower, batch) adds
                                 text_tokens int64 [ctx] (the tower's text tokenizer)
    build_eval_split(config) -> dict of numpy: pixels, text_tokens, labels, class_prompt_tokens,
        class_names, captions

Stage 2 (LLM)
    ensure_lm_tokenizer(config) -> str   path of the LLM tokenizer (lm_path's, or a BPE trained here)
    build_lm_dataset(config, tower_path) -> ray.data.Dataset of packed rows (vilau_model.sequence
        ROW_SCHEMA: input_ids/labels/position_ids/segment_ids int32 [L], codes int16 [L, D],
        is_visual bool [L]); read from data.cache_dir when it holds a matching cache
    write_lm_cache(config, tower_path) -> manifest   (what jobs/tokenize_data.py runs)

Training (exactly once per epoch, see epochs.py)
    training_plan(config, stage, tower_path) -> EpochPlan     on the driver: list + size the units once
    rank_dataset(config, stage, plan, epoch, rank, world, position, tokenizer_files) -> ray.data.Dataset
        on each Ray Train worker: its share of the epoch, in order, without what it already trained,
        with the position columns (sample_ids, call_start, keys, skipped) that BatchStream consumes.
    No dataset goes through Ray Train's streaming_split: every worker builds its own, so a restarted
    worker group rebuilds every piece of the pipeline (nothing lives on a lost node).

Counting (driver-side builds)
    skip_counts(group) -> {reason: distinct n}; data_stats(group); mixture_shares(config, stage)
    torch_dtypes(stage) -> the training columns' dtypes (for iter_torch_batches of "lm" rows)
    timed_batches(iterable) -> (batch, seconds waited) pairs, for the data-wait metric

Skip counts are kept per group: "tower" for build_tower_dataset, "lm" for build_lm_dataset, "eval"
for build_eval_split (each builder takes ``stats_group=`` to use another). The training loop counts
from the rows it consumes instead (stats.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from orchestration.config import Config
from orchestration.data.cache import CacheMismatchError, build_lm_dataset, read_manifest, write_lm_cache
import ray

from orchestration.data.epochs import DataPosition, EpochPlan
from orchestration.data.lm_data import LM_GROUP, ensure_lm_tokenizer, lm_samples_from_records, plan_lm_data, pool_wait_error
from orchestration.resource_plan import rank_data_limits
from orchestration.data.mixture import mixture_report
from orchestration.data.sources import ensure_data
from orchestration.data.stats import data_stats, reset_stats, skip_counts
from orchestration.data.records import LM_CACHE
from orchestration.data.tower_data import (
    TOWER_GROUP,
    build_eval_split,
    build_tower_dataset,
    plan_tower_data,
    with_text_tokens,
)

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
    "pool_wait_error",
    "read_manifest",
    "reset_stats",
    "run_tokenize_job",
    "skip_counts",
    "rank_dataset",
    "timed_batches",
    "torch_dtypes",
    "training_plan",
    "with_text_tokens",
    "write_lm_cache",
]


def torch_dtypes(stage: str) -> dict:
    """The training columns' torch dtypes ("tower": after ``with_text_tokens``; "lm": the dataset's
    columns, e.g. for ``iter_torch_batches``), integer LM columns widened to int64 as
    vilau_model.sequence.collate_rows does."""
    import torch

    if stage == "tower":
        return {"pixels": torch.uint8, "text_tokens": torch.int64}
    if stage == "lm":
        from vilau_model.sequence import ROW_COLUMNS

        return {name: (torch.bool if name == "is_visual" else torch.int64) for name in ROW_COLUMNS}
    raise ValueError(f"stage must be 'tower' or 'lm', got {stage!r}")


def training_plan(config: Config, stage: str, tower_path: str | None = None) -> EpochPlan:
    """The epoch plan of a stage's training data (driver side, once per run): data.tower_sources for
    "tower"; for "lm" the tokenized cache when data.cache_dir holds a matching one, else data.lm_sources."""
    if stage == "tower":
        return plan_tower_data(config)
    if stage != "lm":
        raise ValueError(f"stage must be 'tower' or 'lm', got {stage!r}")
    if config.data.cache_dir:
        from orchestration.data.cache import cache_plan, check_manifest, fingerprint
        from orchestration.data.lm_data import tower_source

        manifest = read_manifest(config.data.cache_dir, config)
        if manifest is not None:
            tokenizer_path = ensure_lm_tokenizer(config)
            check_manifest(manifest, fingerprint(config, tower_source(config, tower_path), tokenizer_path), config.data.cache_dir)
            return cache_plan(config, manifest)
    return plan_lm_data(config)


def rank_dataset(
    config: Config,
    stage: str,
    plan: EpochPlan,
    *,
    epoch: int,
    rank: int,
    world: int,
    position: DataPosition | None = None,
    tokenizer_files: dict[str, bytes] | None = None,
    fault_dir: str | None = None,
) -> ray.data.Dataset:
    """One training rank's share of one epoch (see epochs.py), with the position columns.
    ``fault_dir``: the run's folder, where unreadable shards are recorded (``unreadable_shards/``) so
    that a restart does not read into them again."""
    args = dict(plan=plan, epoch=epoch, rank=rank, world=world, position=position)
    pool_gpus = 0.0
    if stage == "tower":
        ds = build_tower_dataset(config, stats_group=None, track=True, fault_dir=fault_dir, **args)
    elif plan.units and plan.units[0].format == LM_CACHE:
        from orchestration.data.cache import cache_rank_dataset

        ds = cache_rank_dataset(config, track=True, **args)
    else:
        from orchestration.data.lm_data import tokenize_dataset, tower_source

        ds = tokenize_dataset(
            config, tower_source(config, config.model.tower_checkpoint), None, None,
            tokenizer_files=tokenizer_files, track=True, fault_dir=fault_dir, **args,
        )
        pool_gpus = config.data.tokenizer_actors * config.data.tokenizer_actor_gpus
    # One of `world` executors side by side: bounded to this rank's share, not sized to the whole cluster.
    ds.context.execution_options.resource_limits = rank_data_limits(config, world, pool_gpus)
    return ds


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
    also tokens). Counts come from the pipeline's stats group (default: the stage's): records
    decoded, times the samples a record gives in that stage (``lm_samples_from_records``)."""
    sources = config.data.lm_sources if stage == "lm" else config.data.tower_sources
    weights = {n: s.weight for n, s in sources.items()}
    stats = data_stats(group or (LM_GROUP if stage == "lm" else TOWER_GROUP))
    if stage != "lm":
        return mixture_report(weights, stats["samples"])
    return mixture_report(weights, lm_samples_from_records(config, stats["samples"]), stats["tokens"])


def run_tokenize_job(config: Config, tower_path: str | None = None, force: bool = False) -> dict:
    """jobs/tokenize_data.py: write the tokenized cache, return its manifest. The job joins Ray first
    (orchestration.cluster.init_ray): the data package never imports the launch layer."""
    return write_lm_cache(config, tower_path, force=force)
