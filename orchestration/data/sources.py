"""From the config's sources to a Ray dataset of normalized records (read stage of both pipelines)."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from orchestration.config import Config, SourceSection
from orchestration.data.mixture import plan_reads
from orchestration.data.records import FORMAT_KIND, KIND_IMAGE_TEXT, NORMALIZED_SCHEMA, ReadUnit, read_unit_tables
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


class ShardDatasource(Datasource):
    """One Ray Data read task per planned shard, yielding NORMALIZED_SCHEMA tables.

    A real datasource (rather than a map over a list of shards) keeps one task per shard when Ray Data
    fuses the decode stage into the reads: a map would be bundled up to the decode batch size, putting
    many shards, one after another, into a single task.
    """

    def __init__(self, units: list[ReadUnit], s3: S3Settings | None):
        self.units, self.s3 = units, s3

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_name(self) -> str:
        return "Shards"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        # Always one task per shard: a shard is the unit of reading and of ordering.
        return [
            ReadTask(
                functools.partial(read_unit_tables, unit, self.s3),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[unit.uri]),
                schema=NORMALIZED_SCHEMA,
                per_task_row_limit=per_task_row_limit,
            )
            for unit in self.units
        ]


def read_dataset(units: list[ReadUnit], s3: S3Settings | None, rows_per_block: int) -> ray.data.Dataset:
    """Normalized records of the planned shards: one read task per shard, in plan order.

    When a source references its media (MMC4, OpenVid, ShareGPT4V), blocks are cut to
    ``rows_per_block`` records (streaming, no shuffle): an index that is one big file (ShareGPT4V's
    JSON, OpenVid's CSV) would otherwise be a single block, fetched and decoded by a single task.
    Shards with inline images (COYO) stay one block per shard: their records are cheap to decode, and
    more, smaller tasks cost more than they parallelize (half the stage-1 throughput here).
    """
    ds = ray.data.read_datasource(ShardDatasource(units, s3), override_num_blocks=len(units))
    if any(FORMAT_KIND[unit.format] != KIND_IMAGE_TEXT for unit in units):
        ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    return ds


def plan_sources(config: Config, sources: dict[str, SourceSection], field: str, kinds=None) -> tuple[list[ReadUnit], dict[str, float]]:
    resolved = resolve_sources(config, sources, field, kinds)
    units = plan_reads(resolved, s3_settings(config), config.data.shuffle_seed)
    return units, {name: s["weight"] for name, s in resolved.items()}
