"""Mixing sources by weight, and the read plan: which shards are read, how often, in which order.

Weights are shares: with weights {coyo: 2, mmc4: 1, ...} coyo makes up 2/(2+1+...) of the samples of
an epoch. An epoch has as many samples as the sources have records together (N); source i gives
share_i * N of them, so a small source with a big weight repeats its records and a big source with a
small weight gives a seeded subset (`records.copies` decides per record key, so the choice does not
depend on scheduling). With one source, or weights proportional to the sizes, every record is read
once and nothing is counted up front.

Shards are shuffled with the seed, then the shards of all sources are interleaved so that each
source's share holds along the epoch, not only at its end. What each source really delivered
(after bad records are dropped) is counted by the decode stage; `mixture_report` sets it against the
target shares.
"""

from __future__ import annotations

import logging

import numpy as np
import ray

from orchestration.data.records import ReadUnit, count_records, list_shards, media_root_for
from orchestration.storage import S3Settings

log = logging.getLogger(__name__)


def target_shares(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


@ray.remote(num_cpus=0.5)
def _count_remote(fmt: str, uri: str, s3: S3Settings | None) -> int:
    return count_records(fmt, uri, s3)


def count_shards(shards: list[tuple[str, str]], s3: S3Settings | None) -> list[int]:
    """Record counts of (format, uri) shards, counted in parallel Ray tasks."""
    return ray.get([_count_remote.remote(fmt, uri, s3) for fmt, uri in shards])


def plan_reads(sources: dict[str, dict], s3: S3Settings | None, seed: int) -> list[ReadUnit]:
    """The read plan for ``sources``: {name: {"format", "path" (resolved), "weight", "media_root"}}.

    Sources with weight 0 are left out.
    """
    sources = {name: s for name, s in sources.items() if s["weight"] > 0}
    if not sources:
        raise ValueError("no source with a positive weight")
    rng = np.random.default_rng(seed)
    shards: dict[str, list[str]] = {}
    for name in sorted(sources):
        files = list_shards(sources[name]["format"], sources[name]["path"], s3)
        shards[name] = [files[i] for i in rng.permutation(len(files))]

    shares = target_shares({name: s["weight"] for name, s in sources.items()})
    if len(sources) == 1:
        repeat = {name: 1.0 for name in sources}
        sizes = {name: [1] * len(files) for name, files in shards.items()}  # order only
    else:
        flat = [(sources[name]["format"], uri) for name in sorted(shards) for uri in shards[name]]
        counts = iter(count_shards(flat, s3))
        sizes = {name: [next(counts) for _ in shards[name]] for name in sorted(shards)}
        total = sum(sum(v) for v in sizes.values())
        repeat = {}
        for name in sources:
            records = sum(sizes[name])
            if records == 0:
                raise ValueError(f"source {name!r} ({sources[name]['path']}) has no records")
            # Rounded so that equal shares of equal sizes give exactly 1 (no float fuzz in `copies`).
            repeat[name] = round(shares[name] * total / records, 9)
        log.info("mixture: records %s, repeat factors %s", {n: sum(v) for n, v in sizes.items()}, repeat)

    # Interleave: each shard is placed at the middle of the span of its source's share it covers.
    placed = []
    for name, files in shards.items():
        expected = [n * repeat[name] for n in sizes[name]]
        span = sum(expected) or 1.0
        done = 0.0
        for uri, e in zip(files, expected):
            placed.append(((done + e / 2) / span, name, uri))
            done += e
    placed.sort()
    return [
        ReadUnit(
            source=name,
            format=sources[name]["format"],
            uri=uri,
            media_root=media_root_for(sources[name]["format"], sources[name]["path"], sources[name].get("media_root")),
            repeat=repeat[name],
            seed=seed,
        )
        for _, name, uri in placed
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
