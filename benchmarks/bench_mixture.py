"""The data mixture at the public sources' sizes: realized shares over every prefix, copies of a record,
and ranks without a source, for the project's planner and mixer against the design they replaced.

Size-only descriptions of the stage-2 sources (no files are read; records are simulated as ids):

    coyo        coyo_parquet  70,000 shards x 10,000 rows (one unit each)      weight 2, 2 samples a record
    mmc4        mmc4          100M documents in 23,000 jsonl shards (sizes estimated from bytes; the
                              simulated shards really hold up to +-5% more or fewer)            weight 1
    openvid     openvid       one CSV of 1M clips (record ranges of 10,000)                    weight 1
    sharegpt4v  sharegpt4v    one JSON list of 1.2M entries (record ranges of 10,000)          weight 1

64 ranks, the first 1% of epoch 0 on every rank. Both designs use the real planner
(`mixture.plan_units`, with `counting.split_row_groups` / `counting.record_ranges` making the units):

    mixer     (today) epochs.EpochPlan.windows + mixture.mix_order: per-source streams of seeded passes,
              a weighted low-discrepancy source sequence per window, per-source shuffle buffers.
    baseline  (the design before it, re-implemented here at the id level) units dealt to ranks by
              size x repeat, windows of 8 units read side by side (a unit picked uniformly), every
              record emitted floor(repeat) times side by side plus once more for a hashed share of keys,
              one shuffle buffer of 512.

Printed per design, then as RESULT lines for the mixer:

    mixture_max_share_error  max |realized - target share of samples| over sources, ranks and every
                             prefix of >= 1000 samples (goal <= 0.02)
    min_copy_gap             fewest draws between two copies of one record on one rank (goal >= 10000)
    ranks_without_a_source   ranks with no unit of some source in the epoch (goal 0), and
                             ..._in_first_part: ranks whose simulated first 1% lacks some source

Run:  python benchmarks/bench_mixture.py [--ranks 64] [--fraction 0.01] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import heapq
import math
import time

import numpy as np

from orchestration.data.epochs import EpochPlan, _seed
from orchestration.data.counting import record_ranges, split_row_groups
from orchestration.data.mixture import Uniforms, mix_order, plan_units, target_shares

SEED = 0
WINDOW_UNITS, BUFFER_ROWS = 8, 512  # the config's defaults (data.shuffle_window_shards / shuffle_buffer_rows)
SOURCES = {
    "coyo": {"format": "coyo_parquet", "path": "s3://b/coyo", "weight": 2.0, "samples_per_record": 2},
    "mmc4": {"format": "mmc4", "path": "s3://b/mmc4", "weight": 1.0},
    "openvid": {"format": "openvid", "path": "s3://b/openvid", "weight": 1.0},
    "sharegpt4v": {"format": "sharegpt4v", "path": "s3://b/sharegpt4v", "weight": 1.0},
}
NAMES = sorted(SOURCES)
MIN_PREFIX_SAMPLES = 1000


def public_pieces(rng: np.random.Generator) -> tuple[dict, dict[str, int]]:
    """The sources' units as the planner would list them (uri, row groups, record range, records), and
    the real record count of each estimated unit (uri -> records)."""
    pieces: dict[str, list] = {}
    pieces["coyo"] = [(f"coyo/{i:06d}.parquet", rg, None, n) for i in range(70_000)
                      for rg, n in split_row_groups([1000] * 10, 10_000)]
    per_shard = 100_000_000 // 23_000
    pieces["mmc4"] = [(f"mmc4/docs_shard_{i:05d}_v2.jsonl", None, None, per_shard) for i in range(23_000)]
    pieces["openvid"] = [("openvid/OpenVid-1M.csv", None, r, n) for r, n in record_ranges(1_000_000, 10_000)]
    pieces["sharegpt4v"] = [("sharegpt4v/share-captioner.json", None, r, n) for r, n in record_ranges(1_200_000, 10_000)]
    real = {uri: int(round(n * rng.uniform(0.95, 1.05))) for uri, _, _, n in pieces["mmc4"]}
    return pieces, real


def build_plan(rng) -> tuple[EpochPlan, dict[str, int]]:
    pieces, real = public_pieces(rng)
    units = plan_units(SOURCES, pieces, estimated=True)
    return EpochPlan(tuple(units), SEED, WINDOW_UNITS, BUFFER_ROWS), real


def unit_ids(plan: EpochPlan) -> dict:
    return {u: i for i, u in enumerate(plan.units)}


def real_records(unit, real: dict[str, int]) -> int:
    return real.get(unit.uri, unit.size) if unit.records is None else unit.size


# ---------------------------------------------------------------- the mixer (today's code)


def mixer_rank(plan: EpochPlan, ids: dict, real: dict[str, int], rank: int, world: int, fraction: float):
    """(source index per draw, record id per draw) of the rank's first ``fraction`` of epoch 0."""
    draws = plan.source_draws(0, rank, world)
    limit = math.ceil(sum(draws.values()) * fraction)
    index_of = [NAMES.index(n) for n in sorted(draws)]  # a window's parts are its rank's sources, by name
    sources, records = [], []
    for window in plan.windows(0, rank, world):
        cursors = [[c.start for c in part] for part in window.parts]
        ends = [[min(real_records(c.unit, real), c.stop if c.stop is not None else 1 << 24) for c in part] for part in window.parts]
        bases = [[ids[c.unit] << 24 for c in part] for part in window.parts]

        def pull(i, j, cursors=cursors, ends=ends, bases=bases):
            at = cursors[i][j]
            if at >= ends[i][j]:
                return None
            cursors[i][j] = at + 1
            return bases[i][j] | at

        sizes = [[(c.size, c.pass_index) for c in part] for part in window.parts]
        for i, record in mix_order(sizes, window.seed, window.buffer_rows, pull):
            sources.append(index_of[i])
            records.append(record)
            if len(records) >= limit:
                return np.asarray(sources, np.int8), np.asarray(records, np.int64)
    return np.asarray(sources, np.int8), np.asarray(records, np.int64)


# ---------------------------------------------------------------- the baseline (the design it replaced)


def baseline_assignment(plan: EpochPlan, world: int) -> list[list]:
    """Units in epoch order, each to the rank with the least size x repeat so far (ties: lowest rank)."""
    ranks: list[list] = [[] for _ in range(world)]
    heap = [(0.0, r) for r in range(world)]
    for unit in plan.epoch_units(0):
        load, r = heapq.heappop(heap)
        ranks[r].append(unit)
        heapq.heappush(heap, (load + max(unit.size, 1) * unit.repeat, r))
    return ranks


def baseline_copies(unit, records: int) -> np.ndarray:
    """floor(repeat) copies of every record, one more for a seeded share of them (the old code hashed
    (seed, source, key); a seeded draw per unit has the same statistics and is independent of the epoch
    likewise)."""
    whole = math.floor(unit.repeat)
    extra = np.random.default_rng(_seed("copies", SEED, unit.uri, unit.records)).random(records) < unit.repeat - whole
    return whole + extra.astype(np.int64)


def baseline_rank(units: list, ids: dict, real: dict[str, int], rank: int, world: int, fraction: float):
    limit = math.ceil(sum(max(u.size, 1) * u.repeat for u in units) * fraction)
    sources, records = [], []
    for index, start in enumerate(range(0, len(units), WINDOW_UNITS)):
        window = units[start : start + WINDOW_UNITS]
        rand = Uniforms(_seed("window", SEED, 0, rank, world, index))

        def stream(unit):
            records = real_records(unit, real)
            ids_in_order = (ids[unit] << 24) | np.arange(records, dtype=np.int64)
            return iter(np.repeat(ids_in_order, baseline_copies(unit, records)).tolist())  # copies side by side

        streams = [stream(u) for u in window]
        source_of = [NAMES.index(u.source) for u in window]
        active = list(range(len(window)))
        buffer: list[tuple[int, int]] = []
        while active or buffer:
            if active and len(buffer) < BUFFER_ROWS:
                choice = int(rand() * len(active))
                record = next(streams[active[choice]], None)
                if record is None:
                    active.pop(choice)
                else:
                    buffer.append((source_of[active[choice]], record))
                continue
            j = int(rand() * len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            source, record = buffer.pop()
            sources.append(source)
            records.append(record)
            if len(records) >= limit:
                return np.asarray(sources, np.int8), np.asarray(records, np.int64)
    return np.asarray(sources, np.int8), np.asarray(records, np.int64)


# ---------------------------------------------------------------- measures


def max_share_error(sources: np.ndarray) -> float:
    """Max |realized - target| share of samples over sources and every prefix of >= 1000 samples."""
    if not len(sources):
        return 1.0
    targets = target_shares({n: SOURCES[n]["weight"] for n in NAMES})
    per_draw = np.asarray([SOURCES[n].get("samples_per_record", 1) for n in NAMES], np.int64)[sources]
    total = np.cumsum(per_draw)
    keep = total >= MIN_PREFIX_SAMPLES
    if not keep.any():
        return 1.0
    worst = 0.0
    for i, name in enumerate(NAMES):
        mine = np.cumsum(np.where(sources == i, per_draw, 0))
        worst = max(worst, float(np.abs(mine[keep] / total[keep] - targets[name]).max()))
    return worst


def min_copy_gap(records: np.ndarray) -> int | None:
    """Fewest draws between two copies of one record (None: no record drawn twice)."""
    order = np.argsort(records, kind="stable")
    same = records[order][1:] == records[order][:-1]
    if not same.any():
        return None
    return int((order[1:][same] - order[:-1][same]).min())


def measure(name: str, per_rank) -> dict:
    started = time.perf_counter()
    errors, gaps, missing, draws = [], [], 0, 0
    for sources, records in per_rank:
        errors.append(max_share_error(sources))
        gap = min_copy_gap(records)
        if gap is not None:
            gaps.append(gap)
        missing += len(set(sources.tolist())) < len(NAMES)
        draws += len(records)
    out = {"share_error": max(errors), "min_copy_gap": min(gaps) if gaps else None, "missing": missing, "draws": draws,
           "seconds": time.perf_counter() - started}
    print(f"{name:9s} max share error {out['share_error']:.4f}  min copy gap {out['min_copy_gap']}  "
          f"ranks missing a source {missing}  draws {draws:,}  ({out['seconds']:.1f} s)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--fraction", type=float, default=0.01, help="share of the epoch simulated on every rank")
    parser.add_argument("--results", default=None, help="append a dated entry to this RESULTS.md")
    args = parser.parse_args()
    world = args.ranks

    t0 = time.perf_counter()
    plan, real = build_plan(np.random.default_rng(1))
    repeat = {u.source: u.repeat for u in plan.units}
    print(f"plan: {len(plan.units):,} units, repeat factors {({n: round(r, 3) for n, r in sorted(repeat.items())})} "
          f"({time.perf_counter() - t0:.1f} s)")
    ids = unit_ids(plan)

    baseline = baseline_assignment(plan, world)
    without = [r for r in range(world) if {u.source for u in baseline[r]} != set(NAMES)]
    print(f"baseline: ranks without some source in the whole epoch: {len(without)}")
    old = measure("baseline", (baseline_rank(baseline[r], ids, real, r, world, args.fraction) for r in range(world)))

    lacking = [r for r in range(world) if set(plan.source_draws(0, r, world)) != set(NAMES)]
    print(f"mixer: ranks without some source in the whole epoch: {len(lacking)}")
    new = measure("mixer", (mixer_rank(plan, ids, real, r, world, args.fraction) for r in range(world)))

    print(f"RESULT mixture_max_share_error={new['share_error']:.4f}")
    print(f"RESULT min_copy_gap={new['min_copy_gap']}")
    print(f"RESULT ranks_without_a_source={len(lacking)}")
    print(f"RESULT ranks_without_a_source_in_first_part={new['missing']}")
    print(f"RESULT baseline_mixture_max_share_error={old['share_error']:.4f}")
    print(f"RESULT baseline_min_copy_gap={old['min_copy_gap']}")
    print(f"RESULT baseline_ranks_without_a_source={len(without)}")
    print(f"RESULT baseline_ranks_without_a_source_in_first_part={old['missing']}")
    if args.results:
        with open(args.results, "a") as f:
            f.write(
                f"\n## bench_mixture ({datetime.date.today()}, {world} ranks, first {args.fraction:.0%} of an epoch)\n\n"
                "| design | max share error | min copy gap | ranks without a source: epoch / first part |\n|---|---|---|---|\n"
                f"| baseline | {old['share_error']:.4f} | {old['min_copy_gap']} | {len(without)} / {old['missing']} |\n"
                f"| mixer | {new['share_error']:.4f} | {new['min_copy_gap']} | {len(lacking)} / {new['missing']} |\n"
            )
    failed = [name for name, ok in (("share error", new["share_error"] <= 0.02),
                                    ("copy gap", new["min_copy_gap"] is None or new["min_copy_gap"] >= 10_000),
                                    ("ranks missing a source", new["missing"] + len(lacking) == 0)) if not ok]
    if failed:
        raise SystemExit(f"mixer misses its goals: {', '.join(failed)}")


if __name__ == "__main__":
    main()
