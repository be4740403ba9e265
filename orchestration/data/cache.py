"""The tokenized-shard cache: stage-2 rows written once, read by later epochs and runs.

Layout under data.cache_dir (a local directory or s3:// prefix):

    rows/*.parquet   packed rows (vilau_model.sequence ROW_SCHEMA columns, Ray tensor columns)
    manifest.json    written last: the fingerprint of everything the rows depend on, the row count,
                     the realized mixture, the skipped records and unreadable shards, and the
                     (redacted) config that made it
    unreadable_shards/  the shards found unreadable while tokenizing (records.FaultLedger): a rerun of
                     the job after a failure reads them only up to where they broke (--force clears it)

The fingerprint holds the frozen tower's identity (sha256 of the stage-1 export, or preset + seed),
the LLM tokenizer's sha256, the sources (resolved paths, weights, tasks), row length and code depth,
shuffle seed, pack window, and the sequence builder's settings. A run whose fingerprint differs is
refused, naming each field that differs: rows made with another tower or tokenizer would train the
LLM on codes or ids that mean something else.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from orchestration.config import Config, config_to_dict
from orchestration.data.lm_data import (
    LM_GROUP,
    TowerSource,
    directory_files,
    ensure_lm_tokenizer,
    files_sha256,
    lm_samples_from_records,
    lm_config,
    pool_wait_error,
    tokenize_dataset,
    tower_source,
)
from orchestration.data.mixture import mixture_report, parquet_footers
from orchestration.data.epochs import EpochPlan, part_id
from orchestration.data.records import LM_CACHE, FaultLedger, ReadUnit, fs_and_path
from orchestration.data.sources import epoch_plan, rank_windows, read_dataset, resolve_sources, s3_settings
from orchestration.data.tower_data import track_columns
from orchestration.data.stats import data_stats, reset_stats
from orchestration.storage import join, pyarrow_filesystem

log = logging.getLogger(__name__)

# 2: clips give a [video, text] sample besides [text, video]; 3: every generation prompt kept (caption
# dropout moved to batch time)
CACHE_FORMAT_VERSION = 3
MANIFEST = "manifest.json"
ROWS_DIR = "rows"


class CacheMismatchError(ValueError):
    """The cache was made by a different tower, tokenizer or data config than this run's."""


def fingerprint(config: Config, tower: TowerSource, tokenizer_path: str) -> dict:
    """Everything the cached rows depend on (secrets never included)."""
    from vilau_model.sequence import ROW_COLUMNS

    s3 = s3_settings(config)
    lm = lm_config(config)
    sources = resolve_sources(config, config.data.lm_sources, "lm_sources")
    for name, source in sources.items():
        source["image_text_task"] = config.data.lm_sources[name].image_text_task
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "tower": {
            **tower.identity(s3),
            "image_size": tower.config.image_size,
            "code_depth": tower.config.code_depth,
            "codebook_size": tower.config.codebook_size,
        },
        "tokenizer_sha256": files_sha256(directory_files(tokenizer_path)),
        "rows": {"seq_len": config.data.seq_len, "code_depth": tower.config.code_depth, "columns": list(ROW_COLUMNS)},
        "sources": sources,
        "shuffle_seed": config.data.shuffle_seed,
        "mix_by": config.data.mix_by,
        "pack_window": config.data.pack_window,
        "builder": {
            "frames_per_video": lm.frames_per_video,
            "max_images_per_doc": lm.max_images_per_doc,
        },
    }


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def fingerprint_differences(cached: dict, expected: dict) -> list[str]:
    """'field: cache has X, this run has Y' for each differing field."""
    a, b = _flatten(cached), _flatten(expected)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key, missing), b.get(key, missing)
        if left != right:
            show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            lines.append(f"{key}: cache has {show(left)}, this run has {show(right)}")
    return lines


def check_manifest(manifest: dict, expected: dict, cache_dir: str) -> None:
    differences = fingerprint_differences(manifest.get("fingerprint", {}), expected)
    if differences:
        raise CacheMismatchError(
            f"the tokenized cache at {cache_dir} was made with different settings than this run, so it is "
            "not used:\n  " + "\n  ".join(differences) + "\nre-run jobs/tokenize_data.py with this config (--force to "
            "overwrite), or point data.cache_dir elsewhere"
        )


def read_manifest(cache_dir: str, config: Config) -> dict | None:
    fs, path = fs_and_path(join(cache_dir, MANIFEST), s3_settings(config))
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


class CacheDatasource(Datasource):
    """The cache's parquet files, one read task each, in the manifest's order.

    (Ray Data 2.60's own read_parquet spends ~11 s per read in its v2 file listing here, more than
    reading a small cache takes; this plain reader has no such fixed cost.)
    """

    def __init__(self, uris: list[str], s3):
        self.uris, self.s3 = uris, s3

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_name(self) -> str:
        return "TokenizedCache"

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(_read_cache_file, uri, self.s3),
                BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[uri]),
                per_task_row_limit=per_task_row_limit,
            )
            for uri in self.uris
        ]


def _read_cache_file(uri: str, s3):
    fs, path = fs_and_path(uri, s3)
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=64):
            yield pa.Table.from_batches([batch])


def read_cache(config: Config, manifest: dict) -> ray.data.Dataset:
    """The cached rows as a Ray dataset, in the order they were written."""
    rows = join(config.data.cache_dir, ROWS_DIR)
    uris = [join(rows, name) for name in manifest["files"]]
    ds = ray.data.read_datasource(CacheDatasource(uris, s3_settings(config)), override_num_blocks=len(uris))
    ds.context.execution_options.preserve_order = True
    return ds


def write_lm_cache(config: Config, tower_path: str | None = None, *, force: bool = False, stats_group: str = "lm-cache") -> dict:
    """Tokenize data.lm_sources through the actor pool into data.cache_dir; returns the manifest.

    A matching cache is left as it is. A mismatched one is refused unless ``force``, which replaces it.
    """
    cache_dir = config.data.cache_dir
    if not cache_dir:
        raise ValueError("data.cache_dir: set where the tokenized shards go, e.g. data.cache_dir=outputs/tokenized")
    s3 = s3_settings(config)
    tokenizer_path = ensure_lm_tokenizer(config)
    tower = tower_source(config, tower_path)
    expected = fingerprint(config, tower, tokenizer_path)
    existing = read_manifest(cache_dir, config)
    if existing is not None and not force:
        check_manifest(existing, expected, cache_dir)
        log.info("tokenized cache at %s is up to date (%d rows)", cache_dir, existing["rows"])
        return existing

    fs, root = fs_and_path(cache_dir, s3)
    # The manifest goes first: a half-written cache is never "complete". The ledger of unreadable
    # shards stays for a rerun after a failure; --force (other data, or shards repaired) starts it over.
    for stale in (MANIFEST, ROWS_DIR) + ((FaultLedger.SUBDIR,) if force else ()):
        if fs.exists(f"{root}/{stale}"):
            fs.rm(f"{root}/{stale}", recursive=True)
    reset_stats(stats_group)
    ds = tokenize_dataset(config, tower, tokenizer_path, stats_group, fault_dir=cache_dir)
    rows_uri = join(cache_dir, ROWS_DIR)
    pa_fs, rows_path = pyarrow_filesystem(rows_uri, s3)
    try:
        ds.write_parquet(rows_path, filesystem=pa_fs)
    except Exception as exc:
        raise pool_wait_error(config, exc) or exc

    files = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/{ROWS_DIR}") if p.endswith(".parquet"))
    rows = 0
    for name in files:
        with fs.open(f"{root}/{ROWS_DIR}/{name}", "rb") as f:
            rows += pq.ParquetFile(f).metadata.num_rows
    stats = data_stats(stats_group)
    weights = {n: s.weight for n, s in config.data.lm_sources.items()}
    manifest = {
        "fingerprint": expected,
        "rows": rows,
        "files": files,
        "mixture": mixture_report(weights, lm_samples_from_records(config, stats["samples"]), stats["tokens"]),
        "skipped": stats["skipped"],
        "unreadable_shards": sorted((e["shard"], e["readable_records"]) for e in FaultLedger(cache_dir, s3).entries()),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ray_version": ray.__version__,
        "config": config_to_dict(config, redact=True),
    }
    with fs.open(f"{root}/{MANIFEST}", "wb") as f:
        f.write(json.dumps(manifest, indent=1, default=str).encode())
    log.info("wrote %d tokenized rows to %s", rows, cache_dir)
    return manifest


def cache_plan(config: Config, manifest: dict) -> EpochPlan:
    """The epoch plan over the cache's rows: each file cut into record ranges (rows counted from the
    footers, read in parallel), at least CACHE_UNITS_PER_RANK per training rank over the whole cache, so
    that every rank gets a share even of a cache of a few files (a small run writes one)."""
    rows_dir = join(config.data.cache_dir, ROWS_DIR)
    uris = [join(rows_dir, name) for name in manifest["files"]]
    counts = [sum(groups) for groups in parquet_footers(uris, s3_settings(config))]
    if sum(counts) != manifest["rows"]:  # a footer that cannot be read counts 0 rows (records.parquet_row_groups)
        raise ValueError(f"the tokenized cache at {config.data.cache_dir} is damaged: its manifest lists "
                         f"{manifest['rows']} rows, its files' footers {sum(counts)}; re-run jobs/tokenize_data.py --force")
    per_unit = max(1, -(-sum(counts) // max(16, CACHE_UNITS_PER_RANK * config.cluster.num_workers)))
    units = [
        ReadUnit(source="cache", format=LM_CACHE, uri=uri, media_root="", records=(start, min(start + per_unit, n)),
                 size=min(start + per_unit, n) - start)
        for uri, n in zip(uris, counts) for start in range(0, n, per_unit)
    ]
    return epoch_plan(config, units)


CACHE_UNITS_PER_RANK = 4


def _cache_track_columns(batch: dict) -> dict:
    ids = [part_id(i) for i in batch.pop("sample_id").tolist()]
    batch.pop("done_parts", None)
    batch.update(track_columns([[i] for i in ids], ids, [[f"cache/{i}"] for i in ids], [[] for _ in ids]))
    return batch


def cache_rank_dataset(config: Config, plan: EpochPlan, *, track: bool = False, **rank_args) -> ray.data.Dataset:
    """A training rank's share of an epoch of the cached rows (epochs.py), in its order."""
    windows, formats = rank_windows(plan, rank_args.get("epoch", 0), rank_args.get("rank", 0), rank_args.get("world", 1), rank_args.get("position"))
    ds = read_dataset(windows, s3_settings(config), config.data.decode_batch_size, formats)
    if track:
        return ds.map_batches(_cache_track_columns, batch_size=None, batch_format="numpy")
    return ds.drop_columns(["sample_id", "done_parts"])


def build_lm_dataset(config: Config, tower_path: str | None = None, *, stats_group: str | None = LM_GROUP) -> ray.data.Dataset:
    """Stage-2 packed rows: from data.cache_dir when it holds a matching cache, else tokenized on the fly.

    tower_path: the stage-1 export (safetensors file or directory, local or s3://); None = the
    model.tower_checkpoint, or without one the preset initialised from config.seed. A cache made with
    other settings raises CacheMismatchError naming every field that differs.
    """
    tokenizer_path = ensure_lm_tokenizer(config)
    tower = tower_source(config, tower_path)
    cache_dir = config.data.cache_dir
    if cache_dir:
        manifest = read_manifest(cache_dir, config)
        if manifest is not None:
            check_manifest(manifest, fingerprint(config, tower, tokenizer_path), cache_dir)
            return read_cache(config, manifest)
        log.warning("no tokenized cache at %s yet (jobs/tokenize_data.py writes one); tokenizing on the fly", cache_dir)
    return tokenize_dataset(config, tower, tokenizer_path, stats_group)


__all__ = [
    "CacheMismatchError",
    "build_lm_dataset",
    "check_manifest",
    "fingerprint",
    "read_cache",
    "read_manifest",
    "write_lm_cache",
]
