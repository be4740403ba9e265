"""Stage-1 input: image-text pairs decoded to the tower's pixels and text token ids.

    read (one task per shard) -> decode + resize + centre crop + tower tokenizer (CPU map_batches)

Output columns: ``pixels`` uint8 [3, S, S] and ``text_tokens`` int64 [ctx] (S = the tower's image
size, ctx its text context length). Bad records are dropped and counted (stats group "tower").
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
from orchestration.data.decode import DECODE_ERROR, SkipRecord, decode_image, decode_record
from orchestration.data.records import KIND_IMAGE_TEXT, fs_and_path, read_bytes
from orchestration.data.sources import ensure_data, plan_sources, read_dataset, s3_settings
from orchestration.data.stats import Tally, in_chunks, stats_actor
from orchestration.storage import S3Settings, join
from vilau_model.config import VisionTowerConfig, get_tower_config

log = logging.getLogger(__name__)

TOWER_GROUP = "tower"


def tower_config(config: Config) -> VisionTowerConfig:
    return get_tower_config(config.model.tower, **config.model.tower_overrides(), tokenizer_path=config.model.tower_text_tokenizer)


@functools.lru_cache(maxsize=4)
def tower_text_tokenizer(tower: VisionTowerConfig):
    """The tower's own text tokenizer (what UnifiedVisionTower.tokenize uses), once per process."""
    from vilau_model.encoders import build_tokenizer

    return build_tokenizer(tower)


def tokenize_captions(tower: VisionTowerConfig, captions: list[str]) -> np.ndarray:
    """int64 [B, ctx] token ids from the tower's tokenizer."""
    return np.asarray(tower_text_tokenizer(tower)(captions), dtype=np.int64).reshape(len(captions), -1)


def decode_tower_chunk(table: pa.Table, tally: Tally, *, tower: VisionTowerConfig, s3: S3Settings | None, with_keys: bool) -> dict | None:
    """Normalized image-text records -> pixels + text_tokens; bad records dropped and counted."""
    pixels, captions, keys, sources = [], [], [], []
    for record in table.to_pylist():
        try:
            pixels.append(decode_record(record, tower.image_size, lambda uri: read_bytes(uri, s3))[0])
        except SkipRecord as skip:
            tally.skip(skip.reason, record["key"])
            continue
        except Exception:  # one bad record must not stop the epoch
            log.exception("record %s of source %s failed to decode", record["key"], record["source"])
            tally.skip(DECODE_ERROR, record["key"])
            continue
        captions.append(record["text"])
        keys.append(record["key"])
        sources.append(record["source"])
        tally.samples[record["source"]] += 1
    if not pixels:
        return None  # nothing to emit: an empty batch has no shapes for the tensor columns
    out = {"pixels": np.stack(pixels), "text_tokens": tokenize_captions(tower, captions)}
    if with_keys:
        out["key"] = np.asarray(keys, dtype=object)
        out["source"] = np.asarray(sources, dtype=object)
    return out


def decode_tower_block(block: pa.Table, *, rows: int, group: str, **kwargs):
    yield from in_chunks(block, rows, functools.partial(decode_tower_chunk, **kwargs), group)


def build_tower_dataset(config: Config, split: str = "train", *, with_keys: bool = False, stats_group: str = TOWER_GROUP) -> ray.data.Dataset:
    """Stage-1 training data from data.tower_sources (mixed by weight), or the eval split.

    Columns: pixels uint8 [3, S, S], text_tokens int64 [ctx]; with_keys adds the record ``key`` and
    ``source`` (strings; for tests and debugging, not for iter_torch_batches). The eval split also
    has ``labels`` int64.
    """
    if split == "eval":
        data = build_eval_split(config)
        rows = [{"pixels": p, "text_tokens": t, "labels": l} for p, t, l in zip(data["pixels"], data["text_tokens"], data["labels"])]
        return ray.data.from_items(rows)
    if split != "train":
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    ensure_data(config)
    stats_actor()  # created by the driver, so it outlives the decode tasks
    units, _ = plan_sources(config, config.data.tower_sources, "tower_sources", kinds=(KIND_IMAGE_TEXT,))
    # Whole blocks per call (worked through in decode_batch_size slices): a map with no batch size is
    # fused into the read tasks, saving a trip through the object store per shard.
    return read_dataset(units, s3_settings(config), config.data.decode_batch_size).map_batches(
        decode_tower_block,
        fn_kwargs={
            "rows": config.data.decode_batch_size,
            "group": stats_group,
            "tower": tower_config(config),
            "s3": s3_settings(config),
            "with_keys": with_keys,
        },
        batch_size=None,
        batch_format="pyarrow",
    )


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
    parquet_files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
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
                tally.skip(skip.reason, row["key"])
                continue
            captions.append(row["caption"])
            labels.append(row["label"])
            tally.samples["eval"] += 1
    tally.flush()
    return {
        "pixels": np.stack(pixels),
        "text_tokens": tokenize_captions(tower, captions),
        "labels": np.asarray(labels, dtype=np.int64),
        "class_names": class_names,
        "class_prompt_tokens": tokenize_captions(tower, [zero_shot_prompt(c) for c in class_names]),
        "captions": captions,
    }
