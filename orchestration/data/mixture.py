"""Mixing sources by weight: the read plan's units and how often each record is taken; realized shares.

Weights are shares: with weights {coyo: 2, mmc4: 1, ...} coyo makes up 2/(2+1+...) of the samples of
an epoch. An epoch has as many samples as the sources' records give together (N; a source whose
records give several samples each, e.g. a COYO pair trained both ways in stage 2, counts them all);
source i gives share_i * N of them, so a small source with a big weight repeats its records and a big
source with a small weight gives a seeded subset (`records.copies` decides per record key, so the choice does not
depend on scheduling). With one source, or weights proportional to the sizes, every record is read
once and nothing is counted up front.

Planning reads no media and parses no index shard on the driver: the source directories are listed
(one request each, never the media trees), parquet record counts come from the footers (and a big
parquet shard becomes several units of ``PARQUET_UNIT_ROWS`` rows' worth of row groups), and the
records of other formats are estimated from their byte sizes at the density of one sampled shard per
source (read in a Ray task). Shard order and mixing along the epoch are epochs.py's (per epoch); what
each source really delivered is counted as it is trained and set against the targets by
`mixture_report`.
"""

from __future__ import annotations

import logging

import ray

from orchestration.data.records import ReadUnit, count_records, list_shards_with_sizes, media_root_for, parquet_row_groups
from orchestration.storage import S3Settings

log = logging.getLogger(__name__)

PARQUET_UNIT_ROWS = 10_000  # a shard with more records is read as several units (row groups, record ranges)
# A source that is one index file (an OpenVid CSV, a ShareGPT4V JSON) is cut into record ranges, at
# least this many: ranks and windows then get every source in its share, not one rank the whole OpenVid
# index and another none. (Its count is exact: the file is counted for the density estimate anyway.)
MIN_UNITS_PER_SOURCE = 16
ESTIMATE_TOLERANCE = 0.1  # a repeat factor this close to 1 that rests on estimated counts is taken as 1


def target_shares(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


@ray.remote(num_cpus=0.5)
def _row_groups_remote(uris: list[str], s3: S3Settings | None) -> list[list[int]]:
    return [parquet_row_groups(uri, s3) for uri in uris]


@ray.remote(num_cpus=0.5)
def _count_remote(fmt: str, uri: str, s3: S3Settings | None) -> int:
    return count_records(fmt, uri, s3)


def parquet_footers(uris: list[str], s3: S3Settings | None, per_task: int = 64) -> list[list[int]]:
    """Rows per row group of each parquet shard (footers only), read in parallel Ray tasks."""
    chunks = [uris[i : i + per_task] for i in range(0, len(uris), per_task)]
    return [groups for part in ray.get([_row_groups_remote.remote(c, s3) for c in chunks]) for groups in part]


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


def plan_reads(sources: dict[str, dict], s3: S3Settings | None, seed: int, unit_rows: int = PARQUET_UNIT_ROWS) -> list[ReadUnit]:
    """The read units of ``sources``: {name: {"format", "path" (resolved), "weight", "media_root",
    optional "samples_per_record" (default 1)}}, in a fixed order (epochs.py permutes them per epoch).
    Sources with weight 0 are left out."""
    sources = {name: s for name, s in sources.items() if s["weight"] > 0}
    if not sources:
        raise ValueError("no source with a positive weight")
    listed = {name: list_shards_with_sizes(sources[name]["format"], sources[name]["path"], s3) for name in sorted(sources)}

    # Parquet footers: record counts (exact) and row groups, for every parquet shard at once.
    parquet = [uri for name in sorted(listed) if sources[name]["format"] == "coyo_parquet" for uri, _ in listed[name]]
    groups = dict(zip(parquet, parquet_footers(parquet, s3))) if parquet else {}

    # Other formats: records estimated from bytes, at the density of the source's first shard (exact
    # for a source that is one index file).
    sampled = {name: listed[name][0] for name in listed if sources[name]["format"] != "coyo_parquet"}
    counts = ray.get([_count_remote.remote(sources[n]["format"], uri, s3) for n, (uri, _) in sampled.items()])
    counts_by_source = dict(zip(sampled, counts))
    density = {n: counts_by_source[n] / max(size, 1) for n, (_, size) in sampled.items()}

    # (uri, row groups, record range, records) per unit
    pieces: dict[str, list[tuple[str, tuple[int, int] | None, tuple[int, int | None] | None, int]]] = {}
    for name, files in listed.items():
        pieces[name] = []
        for uri, size in files:
            if uri in groups:
                for row_range, rows in split_row_groups(groups[uri], unit_rows):
                    pieces[name].append((uri, row_range, None, rows))
            elif len(files) == 1:
                pieces[name].extend((uri, None, r, n) for r, n in record_ranges(counts_by_source[name], unit_rows))
            else:
                pieces[name].append((uri, None, None, max(round(size * density[name]), 1)))

    shares = target_shares({name: s["weight"] for name, s in sources.items()})
    repeat = {name: 1.0 for name in sources}
    if len(sources) > 1:
        records = {name: sum(p[-1] for p in unit_pieces) for name, unit_pieces in pieces.items()}
        samples = {name: records[name] * sources[name].get("samples_per_record", 1) for name in records}
        total = sum(samples.values())
        for name in sources:
            # Rounded so that equal shares of equal sizes give exactly 1 (no float fuzz in `copies`);
            # within the estimates' accuracy of 1, every record is read once.
            factor = round(shares[name] * total / samples[name], 9)
            repeat[name] = 1.0 if abs(factor - 1.0) <= ESTIMATE_TOLERANCE and density else factor
        log.info("mixture: records (parquet exact, others estimated) %s, repeat factors %s", records, repeat)
    return [
        ReadUnit(
            source=name,
            format=sources[name]["format"],
            uri=uri,
            media_root=media_root_for(sources[name]["format"], sources[name]["path"], sources[name].get("media_root")),
            repeat=repeat[name],
            seed=seed,
            row_groups=row_range,
            records=record_range,
            size=size,
        )
        for name in sorted(pieces)
        for uri, row_range, record_range, size in pieces[name]
    ]


def mixture_report(weights: dict[str, float], samples: dict[str, int], tokens: dict[str, int] | None = None) -> dict:
    """Per source: weight, target share, samples delivered and their share (and tokens, if counted)."""
    shares = target_shares({n: w for n, w in weights.items() if w > 0})
    total = sum(samples.get(n, 0) for n in shares) or 1
    total_tokens = sum((tokens or {}).get(n, 0) for n in shares) or 1
    report = {}
    for name in shares:
        entry = {
            "weight": weights[name],
            "target_share": round(shares[name], 4),
            "samples": samples.get(name, 0),
            "share": round(samples.get(name, 0) / total, 4),
        }
        if tokens:
            entry["tokens"] = tokens.get(name, 0)
            entry["token_share"] = round(tokens.get(name, 0) / total_tokens, 4)
        report[name] = entry
    return report
