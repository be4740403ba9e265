"""Stage-1 input: image-text pairs decoded to the tower's pixels, with their captions.

    read (one task per shard) -> decode + resize + centre crop (CPU map_batches)

Output columns: ``pixels`` uint8 [3, S, S] and ``caption`` (str) (S = the tower's image size). Bad
records are dropped and counted (stats group "tower"). The consumer tokenizes the captions in its own
process (``with_text_tokens``: ``text_tokens`` int64 [ctx]): the tower's tokenizer comes with open_clip
and torch (~4 s and ~1 GB per process), which the many decode processes then never load.
"""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from orchestration.config import Config
from orchestration.data.decode import SkipRecord, decode_counted, decode_image
from orchestration.data.records import KIND_IMAGE_TEXT, fs_and_path, read_bytes
from orchestration.data.epochs import DataPosition, EpochPlan, part_id
from orchestration.data.sources import ensure_data, fault_ledger, plan_sources, rank_windows, read_dataset, s3_settings
from orchestration.data.stats import Tally, stats_actor
from orchestration.storage import S3Settings, join
from vilau_model.config import VisionTowerConfig, get_tower_config

log = logging.getLogger(__name__)

TOWER_GROUP = "tower"


def tower_config(config: Config) -> VisionTowerConfig:
    """The run's vision tower (the one mapping from the config, for the data pipeline and the trainer):
    the preset, or with ``model.init_from`` the export's tower, the run's explicit overrides on top (an
    unset ``model.tower_text_tokenizer`` keeps the preset's or the export's text tokenizer)."""
    overrides = config.model.tower_overrides()
    if config.model.tower_text_tokenizer:
        overrides["tokenizer_path"] = config.model.tower_text_tokenizer
    if config.model.init_from:
        from orchestration.released import export_tower_config

        return export_tower_config(config.model.init_from, **overrides)
    return get_tower_config(config.model.tower, **overrides)


@functools.lru_cache(maxsize=4)
def tower_text_tokenizer(tower: VisionTowerConfig):
    """The tower's own text tokenizer (what UnifiedVisionTower.tokenize uses), once per process."""
    from vilau_model.encoders import build_tokenizer

    return build_tokenizer(tower)


def tokenize_captions(tower: VisionTowerConfig, captions: list[str]) -> np.ndarray:
    """int64 [B, ctx] token ids from the tower's tokenizer."""
    if not captions:  # a batch of carrier rows only (dropped records, nothing to train)
        return np.zeros((0, tower.context_length), dtype=np.int64)
    return np.asarray(tower_text_tokenizer(tower)(captions), dtype=np.int64).reshape(len(captions), -1)


def with_text_tokens(tower: VisionTowerConfig, batch: dict) -> dict:
    """A decoded batch with ``text_tokens`` int64 [B, ctx]: its ``caption`` column through the tower's
    tokenizer, in this process."""
    return {**batch, "text_tokens": tokenize_captions(tower, [str(c) for c in batch["caption"]])}


def decode_tower_block(block: pa.Table, *, rows: int, group: str | None, tower: VisionTowerConfig, s3: S3Settings | None, with_keys: bool, track: bool):
    """Normalized records (with sample ids) -> pixels + caption, in slices of ``rows`` records;
    bad records dropped. With ``track`` each row also carries its position columns (TRACK_COLUMNS):
    the dropped records travel with the next good row (or the block's last one; a block with no good
    row yields one carrier row with no sample id)."""
    tally = Tally(group)
    held = None  # the last output, kept back so that the block's trailing drops can join it
    for start in range(0, block.num_rows, rows):
        out = _decode_tower_slice(block.slice(start, rows), tally, tower, s3, with_keys, track)
        if out is None:
            continue
        if held is not None:
            yield held
        held = out
    trailing = tally.take_skipped()
    if track and trailing:
        if held is None:
            held = _carrier_row(tower, with_keys)
        held["skipped"][-1] = json.dumps(json.loads(held["skipped"][-1]) + trailing)
        trailing = []
    tally.flush(trailing)
    if held is not None:
        yield held


def _decode_tower_slice(table: pa.Table, tally: Tally, tower, s3, with_keys: bool, track: bool) -> dict | None:
    pixels, captions, keys, sources, ids, skipped = [], [], [], [], [], []
    for record in table.to_pylist():
        decoded = decode_counted(record, tower.image_size, lambda uri: read_bytes(uri, s3), tally)
        if decoded is None:
            continue
        pixels.append(decoded[0])
        captions.append(record["text"])
        keys.append(record["key"])
        sources.append(record["source"])
        ids.append(record.get("sample_id", -1))
        # The drops before this record, and the faults noted on it (counted when its row is trained).
        tally.skipped.extend(record.get("notes") or [])
        skipped.append(tally.take_skipped() if track else [])
    if not pixels:
        return None  # nothing to emit: an empty batch has no shapes for the tensor columns
    out = {"pixels": np.stack(pixels), "caption": np.asarray(captions, dtype=object)}
    if with_keys:
        out["key"] = np.asarray(keys, dtype=object)
        out["source"] = np.asarray(sources, dtype=object)
    if track:
        pids = [part_id(i) for i in ids]
        out.update(track_columns([[p] for p in pids], pids, [[f"{s}/{k}"] for s, k in zip(sources, keys)], skipped))
    return out


def track_columns(sample_ids: list[list[int]], call_starts: list[int], keys: list[list[str]], skipped: list[list[str]]) -> dict:
    """The position columns of output rows (see orchestration/data/epochs.py). Lists travel as JSON
    strings: one Arrow type whatever their lengths (Ray would make equal-length lists a tensor)."""

    def objects(values):
        return np.asarray([json.dumps(list(v)) for v in values], dtype=object)

    return {
        "sample_ids": objects(sample_ids),
        "call_start": np.asarray(call_starts, dtype=np.int64),
        "keys": objects(keys),
        "skipped": objects(skipped),
    }


def _carrier_row(tower: VisionTowerConfig, with_keys: bool) -> dict:
    """A row with no sample: it only carries dropped records to the training loop."""
    out = {"pixels": np.zeros((1, 3, tower.image_size, tower.image_size), np.uint8), "caption": np.asarray([""], dtype=object)}
    if with_keys:
        out["key"] = np.asarray([""], dtype=object)
        out["source"] = np.asarray([""], dtype=object)
    out.update(track_columns([[]], [-1], [[]], [[]]))
    return out


def build_tower_dataset(
    config: Config,
    split: str = "train",
    *,
    with_keys: bool = False,
    stats_group: str | None = TOWER_GROUP,
    plan: EpochPlan | None = None,
    epoch: int = 0,
    rank: int = 0,
    world: int = 1,
    position: DataPosition | None = None,
    track: bool = False,
    fault_dir: str | None = None,
) -> ray.data.Dataset:
    """Stage-1 training data from data.tower_sources (mixed by weight), or the eval split.

    Columns: pixels uint8 [3, S, S], caption (str; ``with_text_tokens`` adds its tokens); with_keys
    adds the record ``key`` and ``source`` (strings; for tests and debugging). The eval split has
    text_tokens int64 [ctx] and ``labels`` int64 instead of captions.

    By default the whole of epoch 0 in its order; a training rank passes the driver's ``plan``, its
    ``epoch``, ``rank``/``world`` and resume ``position`` and gets its share of that epoch, with the
    position columns (``track``: sample_ids, call_start, keys, skipped) its BatchStream consumes.
    ``fault_dir``: where unreadable shards are recorded and looked up (the run's folder; records.py).
    """
    if split == "eval":
        data = build_eval_split(config)
        rows = [{"pixels": p, "text_tokens": t, "labels": l} for p, t, l in zip(data["pixels"], data["text_tokens"], data["labels"])]
        return ray.data.from_items(rows)
    if split != "train":
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if plan is None:
        plan = plan_tower_data(config)
    if stats_group is not None:
        stats_actor()  # created by the driver, so it outlives the decode tasks
    windows, formats = rank_windows(plan, epoch, rank, world, position)
    # Whole blocks per call (worked through in decode_batch_size slices): a map with no batch size is
    # fused into the read tasks, saving a trip through the object store per window.
    ledger = fault_ledger(config, fault_dir)
    return read_dataset(windows, s3_settings(config), config.data.decode_batch_size, formats, ledger).map_batches(
        decode_tower_block,
        fn_kwargs={
            "rows": config.data.decode_batch_size,
            "group": stats_group,
            "tower": tower_config(config),
            "s3": s3_settings(config),
            "with_keys": with_keys,
            "track": track,
        },
        batch_size=None,
        batch_format="pyarrow",
    )


def plan_tower_data(config: Config) -> EpochPlan:
    """Stage 1's epoch plan (lists the sources' index shards; run once on the driver)."""
    ensure_data(config)
    return plan_sources(config, config.data.tower_sources, "tower_sources", kinds=(KIND_IMAGE_TEXT,))


def build_eval_split(config: Config, stats_group: str = "eval") -> dict:
    """The labelled eval split, decoded in this process (it is small).

    Returns numpy arrays ``pixels`` uint8 [N, 3, S, S], ``text_tokens`` int64 [N, ctx], ``labels``
    int64 [N], ``class_prompt_tokens`` int64 [C, ctx] (zero-shot prompts), and the lists
    ``class_names`` and ``captions``.
    """
    from orchestration.data.scenes import zero_shot_prompt

    ensure_data(config)
    tower = tower_config(config)
    s3 = s3_settings(config)
    root = config.resolve_path(config.data.eval_path)
    fs, path = fs_and_path(root, s3)
    # the held-back clips beside the images (clips.parquet) are the stage-2 understanding score's
    parquet_files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and not p.endswith("/clips.parquet"))
    if not parquet_files:
        raise FileNotFoundError(f"{root}: no eval parquet found (data.eval_path)")
    class_names = json.loads(read_bytes(join(root, "classes.json"), s3))
    tally = Tally(stats_group)
    pixels, captions, labels = [], [], []
    for file in parquet_files:
        with fs.open(file, "rb") as f:
            table = pq.read_table(f, columns=["jpg", "key", "caption", "label"])
        for row in table.to_pylist():
            try:
                pixels.append(decode_image(row["jpg"], tower.image_size))
            except SkipRecord as skip:
                tally.skip(skip.reason, row["key"], "eval")
                continue
            captions.append(row["caption"])
            labels.append(row["label"])
            tally.samples["eval"] += 1
    tally.flush(tally.take_skipped())
    return {
        "pixels": np.stack(pixels),
        "text_tokens": tokenize_captions(tower, captions),
        "labels": np.asarray(labels, dtype=np.int64),
        "class_names": class_names,
        "class_prompt_tokens": tokenize_captions(tower, [zero_shot_prompt(c) for c in class_names]),
        "captions": captions,
    }
