"""How many records each source holds, for the epoch plan: counted where a count exists, estimated last.

Per shard, in this order:

1. **Stats files.** img2dataset writes ``<shard>_stats.json`` beside each shard it crawls (``00042.parquet``
   or ``00042.tar`` with ``00042_stats.json``: ``count`` samples tried, ``successes`` downloaded,
   ``failed_to_download``, ``failed_to_resize``, ...). ``successes`` is what the shard gives to train:
   a webdataset tar holds only those, and a parquet shard's other rows carry no image (the reader drops
   them), so it is the shard's size in records. Read for the image-text formats only, and only when the
   shard's own file is beside it; a shard of more than ``unit_rows`` records, whose row groups the plan
   must cut into units, still needs its footer.
2. **Parquet footers** for the parquet shards without a stats file: exact rows and row groups.
3. **Estimates** for the rest: a source that is one index file is counted whole (its records are cut
   into ranges anyway); the shards of a source of several are estimated from their bytes at the density
   of its first shard (counted in a Ray task), as before.

Stats files and footers are read by a pool of threads on the driver over pyarrow filesystems (local or
S3): on S3 two requests a file (pyarrow's HEAD, then one ranged GET: a footer is read with the last
64 KiB of its file). The listing is one request per page of the source's directory, stats files included.
Every source's plan says which way it was counted (`SourceCount.method`).
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray

from orchestration.data.records import (
    INDEX_SUFFIXES,
    UNREADABLE_FOOTER,
    ShardError,
    count_records,
    footer_row_groups,
    with_retries,
)
from orchestration.storage import S3Settings, is_s3, list_files, pyarrow_filesystem, strip_scheme

log = logging.getLogger(__name__)

STATS_SUFFIX = "_stats.json"  # img2dataset's per-shard statistics file
STATS_FORMATS = ("coyo_parquet", "coyo_webdataset")  # the formats img2dataset writes
IO_THREADS = 64  # concurrent small reads (footers, stats files): latency-bound on S3, not CPU-bound

FROM_STATS = "counted from stats files"
FROM_FOOTERS = "parquet footers"
COUNTED = "counted"  # a source that is one index file, read whole
ESTIMATED = "estimated"

# A piece of a source: (uri, row-group range, record range, records); see mixture.plan_units.
Piece = tuple[str, "tuple[int, int] | None", "tuple[int, int | None] | None", int]


@dataclass
class SourceCount:
    pieces: list[Piece]
    shards: dict[str, int]  # how many shards were sized each way (FROM_STATS, FROM_FOOTERS, COUNTED, ESTIMATED)

    @property
    def estimated(self) -> bool:
        return self.shards.get(ESTIMATED, 0) > 0

    @property
    def method(self) -> str:
        """How the source was counted, as the plan says it: one way, or each way with its shard count."""
        used = [(m, n) for m, n in self.shards.items() if n]
        if len(used) == 1:
            return used[0][0]
        return ", ".join(f"{m} ({n} shard{'' if n == 1 else 's'})" for m, n in used)


def list_source(fmt: str, path: str, s3: S3Settings | None) -> tuple[list[tuple[str, int]], dict[str, tuple[str, int]]]:
    """(shards as (uri, bytes), sorted; {shard uri: (its stats file's uri, bytes)}) of one source: one
    listing of its directory, never of the media trees beside it."""
    if not is_s3(path) and os.path.isfile(path):
        return [(path, os.path.getsize(path))], {}
    suffixes = INDEX_SUFFIXES[fmt] + ((STATS_SUFFIX,) if fmt in STATS_FORMATS else ())
    try:
        files = list_files(path, s3, suffixes, with_sizes=True)
    except FileNotFoundError:
        raise ShardError(f"{path}: no such directory for a {fmt} source") from None
    stats = {uri: size for uri, size in files if uri.endswith(STATS_SUFFIX)}
    shards = [(uri, size) for uri, size in files if not uri.endswith(STATS_SUFFIX)]
    if not shards:
        raise ShardError(f"{path}: no {fmt} shards ({'/'.join(INDEX_SUFFIXES[fmt])} files) found")
    beside = {}
    for uri, _ in shards:
        stem = next(uri[: -len(s)] for s in INDEX_SUFFIXES[fmt] if uri.endswith(s))
        if stem + STATS_SUFFIX in stats:
            beside[uri] = (stem + STATS_SUFFIX, stats[stem + STATS_SUFFIX])
    return shards, beside


def _open(fs: pafs.FileSystem, uri: str):
    """A file opened for random access (on S3 one HEAD request; reads are ranged GETs)."""
    return fs.open_input_file(strip_scheme(uri) if is_s3(uri) else os.path.abspath(uri))


def read_footer(fs: pafs.FileSystem, uri: str) -> list[int]:
    """Rows of each row group of a parquet shard, from its footer. A shard whose footer cannot be read
    (not parquet, truncated) is planned as UNREADABLE_FOOTER, one unit of no records: the read stage
    then meets it, counts it as unreadable_shard and records it (records.parquet_row_groups)."""
    def read() -> list[int]:
        with _open(fs, uri) as f:
            return footer_row_groups(f, uri)

    return with_retries(read, uri)


def read_successes(fs: pafs.FileSystem, uri: str) -> int | None:
    """``successes`` of an img2dataset stats file; None when it is not one (then the shard is counted
    another way)."""
    try:
        with _open(fs, uri) as f:
            stats = json.loads(with_retries(f.read, uri))
        successes = stats["successes"]
        return int(successes) if isinstance(successes, int) and successes >= 0 else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: not an img2dataset stats file (%s); counting its shard another way", uri, exc)
        return None


def parallel(fn, items: list, threads: int = IO_THREADS) -> list:
    """``fn(*item)`` for every item, by a pool of threads, in order."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(threads, len(items)), thread_name_prefix="count") as pool:
        return list(pool.map(lambda item: fn(*item), items))


# A source that is one index file (an OpenVid CSV, a ShareGPT4V JSON) is cut into record ranges, at
# least this many: ranks and windows then get every source in its share, not one rank the whole OpenVid
# index and another none. (Its count is exact: the file is counted for the density estimate anyway.)
MIN_UNITS_PER_SOURCE = 16


def record_ranges(records: int, max_rows: int) -> list[tuple[tuple[int, int | None] | None, int]]:
    """One file of ``records`` records as [(record range, records)]: at least MIN_UNITS_PER_SOURCE
    ranges of at most ``max_rows`` (the last one open-ended), or the whole file (None) when small."""
    per_unit = min(max_rows, max(1, -(-records // MIN_UNITS_PER_SOURCE)))
    if records <= per_unit:
        return [(None, max(records, 1))]
    starts = range(0, records, per_unit)
    return [((start, start + per_unit if start + per_unit < records else None), min(per_unit, records - start)) for start in starts]


def split_row_groups(groups: list[int], target_rows: int) -> list[tuple[tuple[int, int], int]]:
    """Consecutive row groups cut into ranges of about ``target_rows`` rows: [((start, stop), rows)]."""
    out, start, rows = [], 0, 0
    for i, n in enumerate(groups):
        rows += n
        if rows >= target_rows:
            out.append(((start, i + 1), rows))
            start, rows = i + 1, 0
    if start < len(groups):
        out.append(((start, len(groups)), rows))
    return out


def count_sources(sources: dict[str, dict], s3: S3Settings | None, unit_rows: int) -> dict[str, SourceCount]:
    """{name: SourceCount} for ``sources`` ({name: {"format", "path" (resolved)}}): the pieces the plan
    is made of (a parquet shard of more than ``unit_rows`` rows cut at row groups, a single index file
    cut into record ranges) and how each was counted."""
    listed = {name: list_source(sources[name]["format"], sources[name]["path"], s3) for name in sorted(sources)}
    filesystems: dict[bool, pafs.FileSystem] = {}

    def fs_for(uri: str) -> pafs.FileSystem:
        remote = is_s3(uri)
        if remote not in filesystems:
            filesystems[remote] = pyarrow_filesystem(uri, s3)[0]
        return filesystems[remote]

    # 1. Stats files, wherever a crawl left them.
    stats_items = [(shard, uri) for name in listed for shard, (uri, _) in listed[name][1].items()]
    successes = dict(zip((shard for shard, _ in stats_items),
                         parallel(lambda _shard, uri: read_successes(fs_for(uri), uri), stats_items)))
    parquet = {uri for name in listed if sources[name]["format"] == "coyo_parquet" for uri, _ in listed[name][0]}
    # A parquet shard bigger than a unit is cut at its row groups, which only its footer gives.
    from_stats = {shard: n for shard, n in successes.items() if n is not None and (shard not in parquet or n <= unit_rows)}

    # 2. Parquet footers of the parquet shards left.
    footer_items = [(uri,) for name in listed for uri, _ in listed[name][0] if uri in parquet and uri not in from_stats]
    groups = dict(zip((u for u, in footer_items), parallel(lambda uri: read_footer(fs_for(uri), uri), footer_items)))

    # 3. The rest: counted when the source is one file, else estimated at its first shard's density.
    rest = {name: [(u, b) for u, b in listed[name][0] if u not in from_stats and u not in groups] for name in listed}
    sampled = {name: files[0] for name, files in rest.items() if files}
    counts = ray.get([_count_remote.remote(sources[n]["format"], uri, s3) for n, (uri, _) in sampled.items()]) if sampled else []
    counted = dict(zip(sampled, counts))

    out: dict[str, SourceCount] = {}
    for name, (shards, _) in listed.items():
        pieces: list[Piece] = []
        ways = {FROM_STATS: 0, FROM_FOOTERS: 0, COUNTED: 0, ESTIMATED: 0}
        density = counted[name] / max(sampled[name][1], 1) if name in sampled else 0.0
        for uri, size in shards:
            if uri in from_stats:
                pieces.append((uri, None, None, max(from_stats[uri], 1)))
                ways[FROM_STATS] += 1
            elif uri in groups and groups[uri] == UNREADABLE_FOOTER:
                # One record: the placeholder the reader leaves where the shard breaks, so that the shard
                # is read (and its fault counted and recorded) in every epoch like any other unit.
                pieces.append((uri, (0, 1), None, 1))
                ways[FROM_FOOTERS] += 1
            elif uri in groups:
                pieces.extend((uri, row_range, None, rows) for row_range, rows in split_row_groups(groups[uri], unit_rows))
                ways[FROM_FOOTERS] += 1
            elif len(shards) == 1:
                pieces.extend((uri, None, r, n) for r, n in record_ranges(counted[name], unit_rows))
                ways[COUNTED] += 1
            else:
                pieces.append((uri, None, None, max(round(size * density), 1)))
                ways[ESTIMATED] += 1
        out[name] = SourceCount(pieces, ways)
        log.info("planning: source %s (%d shards): %d records, %s", name, len(shards),
                 sum(p[-1] for p in pieces), out[name].method)
    return out


@ray.remote(num_cpus=0.5)
def _count_remote(fmt: str, uri: str, s3: S3Settings | None) -> int:
    return count_records(fmt, uri, s3)
