"""From the config's sources to a Ray dataset of normalized records (read stage of both pipelines)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
import ray

from orchestration.config import Config, SourceSection
from orchestration.data.mixture import plan_reads
from orchestration.data.records import FORMAT_KIND, ReadUnit, read_unit_tables
from orchestration.data.synthetic import ensure_synthetic_dataset
from orchestration.storage import S3Settings, is_s3

log = logging.getLogger(__name__)


def s3_settings(config: Config) -> S3Settings:
    return S3Settings.from_config(config.data.s3)


def ensure_data(config: Config) -> None:
    """Write the synthetic shards under data.root when the config asks for them and none are there.

    Only a local root that does not exist yet (or is empty) is filled: real data is never overwritten.
    """
    synthetic = config.data.synthetic
    root = config.data.root
    if not synthetic.make_if_missing or is_s3(root):
        return
    if os.path.isdir(root) and os.listdir(root) and not (Path(root) / "manifest.json").is_file():
        return  # something else lives there
    ensure_synthetic_dataset(
        root,
        samples=synthetic.samples,
        seed=synthetic.seed,
        corrupt_fraction=synthetic.corrupt_fraction,
        eval_samples=synthetic.eval_samples,
    )


def resolve_sources(config: Config, sources: dict[str, SourceSection], field: str, kinds: tuple[str, ...] | None = None) -> dict[str, dict]:
    """{name: {format, path, weight, media_root}} with paths resolved under data.root."""
    if not sources:
        raise ValueError(f"data.{field}: no sources configured")
    resolved = {}
    for name, source in sources.items():
        if kinds is not None and FORMAT_KIND[source.format] not in kinds:
            raise ValueError(
                f"data.{field}.{name}.format: {source.format} gives {FORMAT_KIND[source.format]} records; "
                f"this stage takes {', '.join(kinds)}"
            )
        resolved[name] = {
            "format": source.format,
            "path": config.resolve_path(source.path),
            "weight": source.weight,
            "media_root": config.resolve_path(source.media_root) if source.media_root else None,
        }
    return resolved


def _read_units(batch: pa.Table, s3: S3Settings | None):
    for text in batch.column("unit").to_pylist():
        yield from read_unit_tables(ReadUnit.from_json(text), s3)


def read_dataset(units: list[ReadUnit], s3: S3Settings | None) -> ray.data.Dataset:
    """Normalized records of the planned shards: one read task per shard, in plan order."""
    items = [{"unit": unit.to_json()} for unit in units]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(_read_units, fn_kwargs={"s3": s3}, batch_size=1, batch_format="pyarrow")


def plan_sources(config: Config, sources: dict[str, SourceSection], field: str, kinds=None) -> tuple[list[ReadUnit], dict[str, float]]:
    resolved = resolve_sources(config, sources, field, kinds)
    units = plan_reads(resolved, s3_settings(config), config.data.shuffle_seed)
    return units, {name: s["weight"] for name, s in resolved.items()}
