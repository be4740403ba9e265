"""Mixing sources by weight: the read plan's units, each source's repeat factor, the weighted draw
order of a window, and realized shares.

Weights are shares: with weights {coyo: 2, mmc4: 1, ...} coyo makes up 2/(2+1+...) of the samples of
an epoch (``data.mix_by: tokens``: of the trained tokens; the plan then converts the weights with each
source's estimated tokens per sample). An epoch has as many samples as the sources' records give
together (N; a source whose records give several samples each, e.g. a COYO pair trained both ways in
stage 2, counts them all); source i gives share_i * N of them, so its *repeat factor* (records taken
per record in an epoch) is above 1 for a small source with a big weight and below 1 for a big source
with a small weight. With one source, or weights proportional to the sizes, every record is read once.

How a repeat factor is realized is epochs.py's: every source is its own stream of *passes* over its
units (a new seeded unit order per pass, passes one after another), so the copies of a record are a
pass apart, never side by side, and which records a partial pass takes changes with the epoch. Within
a read task, `mix_order` picks each next record's source from a seeded low-discrepancy weighted
sequence, so the shares hold at every prefix, not only on average.

Planning reads no media and parses no index shard on the driver: the source directories are listed
(one request each, never the media trees) and each shard's records are counted as counting.py says
(img2dataset's stats files, else parquet footers, else estimated from bytes; a big parquet shard
becomes several units of ``PARQUET_UNIT_ROWS`` rows' worth of row groups). `plan_units` is the pure part (sizes in, units and repeat factors out),
which bench_mixture.py drives with the public sources' sizes. What each source really delivered is
counted as it is trained and set against the targets by `mixture_report`.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow.parquet as pq
import ray

from orchestration.data.records import (
    ReadUnit,
    fs_and_path,
    iter_records,
    media_root_for,
    parquet_row_groups,
    with_retries,
)
from orchestration.storage import S3Settings

log = logging.getLogger(__name__)

PARQUET_UNIT_ROWS = 10_000  # a shard with more records is read as several units (row groups, record ranges)
ESTIMATE_TOLERANCE = 0.1  # a repeat factor this close to 1 that rests on estimated counts is taken as 1


def target_shares(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


@ray.remote(num_cpus=0.5)
def _row_groups_remote(uris: list[str], s3: S3Settings | None) -> list[list[int]]:
    return [parquet_row_groups(uri, s3) for uri in uris]


def parquet_footers(uris: list[str], s3: S3Settings | None, per_task: int = 64) -> list[list[int]]:
    """Rows per row group of each parquet shard (footers only), read in parallel Ray tasks."""
    chunks = [uris[i : i + per_task] for i in range(0, len(uris), per_task)]
    return [groups for part in ray.get([_row_groups_remote.remote(c, s3) for c in chunks]) for groups in part]


# A piece of a source: (uri, row-group range, record range, records). Records are exact for parquet
# (footers) and for a source that is one index file (counted); else estimated from bytes.
Piece = tuple[str, "tuple[int, int] | None", "tuple[int, int | None] | None", int]

CHARS_PER_TOKEN = 4.0  # text tokens per character, for the tokens-per-sample estimate of mix_by=tokens
PROFILE_RECORDS = 2000  # records of a sampled shard profiled for that estimate


def record_chars(record: dict) -> int:
    """Characters of text a record trains on (captions; MMC4 sentences; ShareGPT4V turns)."""
    from orchestration.data.records import KIND_CONVERSATION, KIND_INTERLEAVED

    if record["kind"] == KIND_INTERLEAVED:
        return sum(len(t) for t in json.loads(record["text"]))
    if record["kind"] == KIND_CONVERSATION:
        return sum(len(turn.get("value", "")) for turn in json.loads(record["text"]))
    return len(record["text"])


def profile_shard(fmt: str, uri: str, s3: S3Settings | None, limit: int = PROFILE_RECORDS) -> dict:
    """Mean text characters and media per record over the first ``limit`` records of a shard."""
    if fmt == "coyo_parquet":  # one image a record; the caption column of the first row group
        fs, path = fs_and_path(uri, s3)
        with with_retries(lambda: fs.open(path, "rb"), uri) as f:
            parquet = pq.ParquetFile(f)
            column = "caption" if "caption" in parquet.schema_arrow.names else "text"
            captions = parquet.read_row_group(0, columns=[column]).column(0).to_pylist()[:limit]
        return {"chars": float(np.mean([len(c or "") for c in captions])) if captions else 0.0, "media": 1.0}
    records = list(itertools.islice(iter_records(ReadUnit("profile", fmt, uri, ""), s3), limit))
    if not records:
        return {"chars": 0.0, "media": 0.0}
    return {"chars": float(np.mean([record_chars(r) for r in records])),
            "media": float(np.mean([len(r["media_uris"]) + len(r["media"]) for r in records]))}


@ray.remote(num_cpus=0.5)
def _profile_remote(fmt: str, uri: str, s3: S3Settings | None) -> dict:
    return profile_shard(fmt, uri, s3)


def tokens_per_sample(profile: dict, tokens_per_media: float) -> float:
    """Estimated tokens of one trained sample: its media's visual tokens, its text, BOS and EOS."""
    return profile["media"] * tokens_per_media + profile["chars"] / CHARS_PER_TOKEN + 2.0


def repeat_factors(records: dict[str, int], sources: dict[str, dict], estimated: bool, mix_by: str = "samples") -> dict[str, float]:
    """Each source's repeat factor: records taken per record in an epoch.

    ``sources[name]``: "weight", optional "samples_per_record" (default 1) and, for mix_by "tokens",
    "tokens_per_sample" (the weights are then shares of tokens: a sample's weight is its source's
    weight over its tokens). ``estimated``: some counts are estimates, so a factor within
    ESTIMATE_TOLERANCE of 1 is taken as 1 (every record read once)."""
    if mix_by not in ("samples", "tokens"):
        raise ValueError(f"data.mix_by must be 'samples' or 'tokens', got {mix_by!r}")
    if len(sources) == 1:
        return {name: 1.0 for name in sources}
    weights = {name: s["weight"] for name, s in sources.items()}
    if mix_by == "tokens":
        missing = [n for n, s in sources.items() if not s.get("tokens_per_sample")]
        if missing:
            raise ValueError(f"data.mix_by=tokens: no tokens-per-sample estimate for source(s) {missing}")
        weights = {n: w / sources[n]["tokens_per_sample"] for n, w in weights.items()}
    shares = target_shares(weights)
    samples = {name: records[name] * sources[name].get("samples_per_record", 1) for name in sources}
    total = sum(samples.values())
    repeat = {}
    for name in sources:
        # Rounded so that equal shares of equal sizes give exactly 1 (one pass, no float fuzz); within
        # the estimates' accuracy of 1, every record is read once.
        factor = round(shares[name] * total / max(samples[name], 1), 9)
        repeat[name] = 1.0 if abs(factor - 1.0) <= ESTIMATE_TOLERANCE and estimated else factor
    return repeat


def plan_units(sources: dict[str, dict], pieces: dict[str, list[Piece]], estimated: bool, mix_by: str = "samples") -> list[ReadUnit]:
    """The read units of sources already listed and sized (``pieces`` per source, see Piece): the pure
    part of `plan_reads`. ``sources[name]``: "format", "path", "media_root" and what
    `repeat_factors` reads. Sources with weight 0 are left out."""
    sources = {name: s for name, s in sources.items() if s["weight"] > 0}
    if not sources:
        raise ValueError("no source with a positive weight")
    records = {name: sum(p[-1] for p in pieces[name]) for name in sources}
    repeat = repeat_factors(records, sources, estimated, mix_by)
    if len(sources) > 1:
        log.info("mixture: records (%s) %s, repeat factors %s", "some estimated" if estimated else "exact", records, repeat)
    return [
        ReadUnit(
            source=name,
            format=sources[name]["format"],
            uri=uri,
            media_root=media_root_for(sources[name]["format"], sources[name]["path"], sources[name].get("media_root")),
            repeat=repeat[name],
            row_groups=row_range,
            records=record_range,
            size=size,
        )
        for name in sorted(sources)
        for uri, row_range, record_range, size in pieces[name]
    ]


def plan_reads(sources: dict[str, dict], s3: S3Settings | None, seed: int = 0, unit_rows: int = PARQUET_UNIT_ROWS,
               mix_by: str = "samples", counts: dict | None = None) -> list[ReadUnit]:
    """The read units of ``sources``: {name: {"format", "path" (resolved), "weight", "media_root",
    optional "samples_per_record" (default 1), for mix_by "tokens" "tokens_per_media" (visual tokens
    of one image or video in this stage)}}, in a fixed order (epochs.py orders them per epoch and
    pass). Sources with weight 0 are left out. (``seed`` is unused: the order is the epoch plan's.)
    ``counts``: the sources' `counting.count_sources` when the caller made them (else made here)."""
    sources = {name: dict(s) for name, s in sources.items() if s["weight"] > 0}
    if not sources:
        raise ValueError("no source with a positive weight")
    if counts is None:
        from orchestration.data.counting import count_sources

        counts = count_sources(sources, s3, unit_rows)
    pieces = {name: counts[name].pieces for name in sources}

    if mix_by == "tokens" and len(sources) > 1:
        names = sorted(sources)
        profiles = ray.get([_profile_remote.remote(sources[n]["format"], pieces[n][0][0], s3) for n in names])
        for name, profile in zip(names, profiles):
            if "tokens_per_media" not in sources[name]:
                raise ValueError(f"data.mix_by=tokens: source {name} has no tokens_per_media (this stage cannot weigh by tokens)")
            sources[name]["tokens_per_sample"] = tokens_per_sample(profile, sources[name]["tokens_per_media"])
        log.info("mixture by tokens: estimated tokens per sample (first shard of each source) %s",
                 {n: round(sources[n]["tokens_per_sample"], 1) for n in names})
    return plan_units(sources, pieces, any(counts[n].estimated for n in sources), mix_by)


# ---------------------------------------------------------------- the weighted draw order of a window


class Uniforms:
    """Seeded uniform floats in [0, 1), drawn from numpy in blocks (one call per few thousand picks)."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)
        self._block: list[float] = []
        self._next = 0

    def __call__(self) -> float:
        if self._next >= len(self._block):
            self._block, self._next = self._rng.random(4096).tolist(), 0
        self._next += 1
        return self._block[self._next - 1]


def source_sequence(weights: list[float], rand: Uniforms, block: int = 1024) -> Iterator[int]:
    """Source indices in proportion to ``weights`` (> 0), low-discrepancy: source i's k-th draw is at
    time (k + phase_i) / share_i (seeded phases), draws merged by time, so at every prefix of n draws
    each source has n * share_i of them to within a draw or two. Worked out a block at a time in numpy."""
    share = np.asarray(weights, float) / sum(weights)
    phase = np.asarray([rand() for _ in weights])
    taken = np.zeros(len(weights))
    spans = [np.arange(int(np.ceil(block * p)) + 4) for p in share]
    while True:
        times = np.concatenate([(taken[i] + spans[i] + phase[i]) / share[i] for i in range(len(share))])
        which = np.concatenate([np.full(len(spans[i]), i) for i in range(len(share))])
        order = which[np.argsort(times, kind="stable")[:block]]
        taken += np.bincount(order, minlength=len(share))
        yield from order.tolist()


def mix_order(parts: list[list[tuple[int, int]]], seed: int, buffer_rows: int,
              pull: Callable[[int, int], object | None]) -> Iterator[tuple[int, object]]:
    """The records of one read task's sources, mixed by weight, as (source index, record).

    ``parts[i]``: source i's chunks in its stream order, as (estimated records, pass). ``pull(i, j)``
    returns chunk j of source i's next record, or None once it has no more. Each source's weight is its
    chunks' estimated records, so all run out together; the next source comes from `source_sequence`
    (when one runs out, the rest continue by their weights). Within a source, the chunks of one pass
    are read side by side (the next record from a chunk picked with odds by its estimated rest), passes
    one after the other (so a record's copies are a pass apart), through the source's own shuffle
    buffer (its share of ``buffer_rows``), which empties at the end of each pass. Draws depend only on the seed and the chunks' real records,
    so a rerun gives the same order.
    """
    rand = Uniforms(seed)
    weights = [float(sum(size for size, _ in chunks)) for chunks in parts]
    total_weight = sum(weights) or 1.0
    caps = [max(1, round(buffer_rows * w / total_weight)) for w in weights]
    groups: list[list[list[int]]] = []  # per source: runs of consecutive chunks of one pass
    for chunks in parts:
        runs: list[list[int]] = []
        for j, (_, pass_index) in enumerate(chunks):
            if runs and chunks[runs[-1][-1]][1] == pass_index:
                runs[-1].append(j)
            else:
                runs.append([j])
        groups.append(runs)
    next_group = [0] * len(parts)
    reading: list[list[list[int]]] = [[] for _ in parts]  # per source: [chunk, estimated rest] being read
    buffers: list[list] = [[] for _ in parts]
    drained = [False] * len(parts)

    def next_record(i: int):
        """The source's next record of its current pass; None at the pass's end (the buffer empties
        before the next pass starts, so a record never meets its own copy there) or the source's."""
        chunks = reading[i]
        while True:
            if not chunks:
                if buffers[i] or next_group[i] >= len(groups[i]):
                    drained[i] = next_group[i] >= len(groups[i])
                    return None
                chunks.extend([j, max(parts[i][j][0], 1)] for j in groups[i][next_group[i]])
                next_group[i] += 1
            k = 0
            if len(chunks) > 1:
                point = rand() * sum(entry[1] for entry in chunks)
                while k < len(chunks) - 1 and point >= chunks[k][1]:
                    point -= chunks[k][1]
                    k += 1
            entry = chunks[k]
            record = pull(i, entry[0])
            if record is None:
                chunks.pop(k)
                continue
            if entry[1] > 1:
                entry[1] -= 1
            return record

    live = [i for i, w in enumerate(weights) if w > 0]
    while live:
        sequence = source_sequence([weights[i] for i in live], rand)
        for pick in sequence:
            i = live[pick]
            buffer = buffers[i]
            while not drained[i] and len(buffer) < caps[i]:
                record = next_record(i)
                if record is None:
                    break
                buffer.append(record)
            if not buffer:
                live.remove(i)
                break  # the others continue by their weights
            k = int(rand() * len(buffer))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield i, buffer.pop()


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
