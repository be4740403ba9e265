"""The mixer (orchestration/data/mixture.py, epochs.py) without Ray: shares hold at every prefix, a
record's copies are a pass apart (never side by side), each pass reads every record once, a position
saved mid-pass continues exactly, and epochs differ."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestration.data.epochs import DataPosition, EpochPlan, mix_window, part_id
from orchestration.data.counting import record_ranges
from orchestration.data.mixture import Uniforms, mix_order, plan_units, repeat_factors, source_sequence
from orchestration.data.records import ReadUnit


def _units(sizes: dict[str, list[int]], weights: dict[str, float], estimated: bool = False) -> list[ReadUnit]:
    sources = {n: {"format": "coyo_parquet", "path": f"/data/{n}", "weight": weights[n]} for n in sizes}
    pieces = {n: [(f"/data/{n}/{i:05d}.parquet", (0, 1), None, size) for i, size in enumerate(sizes[n])] for n in sizes}
    return plan_units(sources, pieces, estimated)


def _simulate(plan: EpochPlan, epoch: int, rank: int = 0, world: int = 1, real: dict | None = None):
    """(source, record id) per draw of a rank's epoch, records as (uri, offset): mix_window's order at
    the id level. ``real``: a unit's true record count where it differs from its (estimated) size."""
    out = []
    for window in plan.windows(epoch, rank, world):
        cursors = [[c.start for c in part] for part in window.parts]

        def pull(i, j, window=window, cursors=cursors):
            chunk = window.parts[i][j]
            end = (real or {}).get(chunk.unit.uri, chunk.unit.size)
            if chunk.stop is not None:
                end = min(end, chunk.stop)
            if cursors[i][j] >= end:
                return None
            cursors[i][j] += 1
            return chunk.unit.source, (chunk.unit.uri, cursors[i][j] - 1)

        sizes = [[(c.size, c.pass_index) for c in part] for part in window.parts]
        out.extend(record for _, record in mix_order(sizes, window.seed, window.buffer_rows, pull))
    return out


def test_source_sequence_holds_the_shares_at_every_prefix():
    weights = [2.0, 1.0, 1.0, 0.5]
    share = np.asarray(weights) / sum(weights)
    picks = np.fromiter((x for _, x in zip(range(20_000), source_sequence(weights, Uniforms(3)))), int)
    counts = np.cumsum(np.eye(len(weights), dtype=int)[picks], axis=0)
    n = np.arange(1, len(picks) + 1)[:, None]
    assert np.abs(counts - n * share).max() < 2  # within two draws of its share at every prefix
    other = [x for _, x in zip(range(200), source_sequence(weights, Uniforms(4)))]
    assert other != picks[:200].tolist()  # seeded: another seed, another sequence


def test_a_window_mixes_by_weight_at_every_prefix_and_drains_every_chunk():
    parts = [[(300, 0), (200, 0)], [(100, 0)], [(60, 0), (60, 1)]]
    cursors: dict = {}

    def pull(i, j):
        at = cursors.get((i, j), 0)
        if at >= parts[i][j][0]:
            return None
        cursors[(i, j)] = at + 1
        return (i, j, at)

    order = list(mix_order(parts, seed=5, buffer_rows=32, pull=pull))
    assert Counter(r for _, r in order) == Counter((i, j, k) for i, p in enumerate(parts) for j, (n, _) in enumerate(p) for k in range(n))
    sources = np.asarray([i for i, _ in order])
    totals = np.asarray([sum(n for n, _ in p) for p in parts]) / sum(n for p in parts for n, _ in p)
    for i, target in enumerate(totals):
        realized = np.cumsum(sources == i) / np.arange(1, len(sources) + 1)
        assert np.abs(realized[100:] - target).max() < 0.02, i
    # Source 2's second pass starts after its first is read (passes one after the other).
    third = [r for i, r in order if i == 2]
    assert max(k for k, r in enumerate(third) if r[1] == 0) < min(k for k, r in enumerate(third) if r[1] == 1) + 32


def test_upsampled_copies_are_a_pass_apart_and_each_pass_reads_every_record_once():
    # Equal weights: "small" (2 units of 40 records) is read 8 times, "big" (1200 records) in part.
    plan = EpochPlan(tuple(_units({"big": [100] * 12, "small": [40, 40]}, {"big": 1.0, "small": 1.0})), 7, 2, 16)
    repeat = {u.source: u.repeat for u in plan.units}
    assert repeat["small"] == 8.0 and repeat["big"] == pytest.approx(640 / 1200)
    draws = _simulate(plan, 0)
    small = [r for s, r in draws if s == "small"]
    assert Counter(Counter(small).values()) == {8: 80}  # 8 passes: every record exactly 8 times
    positions: dict = {}
    gaps = []
    for at, record in enumerate(small):
        if record in positions:
            gaps.append(at - positions[record])
        positions[record] = at
    # A record's copies are in different passes, passes one after the other (a source's buffer empties
    # between them): a pass (80 records) apart on average, never side by side. (Only what the shuffle
    # buffer can move a record shortens a gap: at real sizes, bench_mixture.py, never below 10,000.)
    assert min(gaps) > 1 and abs(np.mean(gaps) - 80) < 4, (min(gaps), np.mean(gaps))
    big = Counter(r for s, r in draws if s == "big")
    assert max(big.values()) == 1 and len(big) == 640  # a partial pass: 640 of 1200 records, none twice


def test_estimated_sizes_never_drop_or_repeat_a_record():
    """Chunks end at the unit's real end: a unit with more or fewer records than estimated is still
    read exactly once per pass."""
    units = _units({"a": [50] * 6, "b": [30] * 4}, {"a": 300.0, "b": 125.0}, estimated=True)
    plan = EpochPlan(tuple(units), 1, 2, 8)
    assert {u.repeat for u in units} == {1.0}  # weights as the (estimated) sizes: one pass each
    real = {u.uri: u.size + (7 if i % 2 else -9) for i, u in enumerate(units)}
    draws = _simulate(plan, 0, real=real)
    assert Counter(r for _, r in draws) == Counter((u.uri, k) for u in units for k in range(real[u.uri]))


def test_every_rank_gets_every_source_in_its_share():
    units = _units({"big": [1000] * 40, "small": [500] * 8}, {"big": 1.0, "small": 1.0})
    plan = EpochPlan(tuple(units), 0, 4, 64)
    for rank in range(4):
        draws = plan.source_draws(0, rank, 4)
        assert set(draws) == {"big", "small"} and draws["small"] == draws["big"], (rank, draws)
        sources = np.asarray([s == "small" for s, _ in _simulate(plan, 0, rank, 4)])
        realized = np.cumsum(sources) / np.arange(1, len(sources) + 1)
        assert np.abs(realized[1000:] - 0.5).max() < 0.02


def test_epochs_differ_and_a_partial_pass_takes_other_records():
    plan = EpochPlan(tuple(_units({"big": [50] * 10, "small": [25]}, {"big": 1.0, "small": 1.0})), 2, 2, 16)
    first, second = _simulate(plan, 0), _simulate(plan, 1)
    assert first != second
    assert first == _simulate(EpochPlan.from_json(plan.to_json()), 0)  # the same plan, the same order
    big = [{r for s, r in draws if s == "big"} for draws in (first, second)]
    assert len(big[0]) == len(big[1]) == 262 and big[0] != big[1]  # half the draws from big: another subset each epoch


def test_mix_by_tokens_makes_the_weights_shares_of_tokens():
    sources = {"short": {"weight": 1.0, "tokens_per_sample": 100.0}, "long": {"weight": 1.0, "tokens_per_sample": 400.0}}
    repeat = repeat_factors({"short": 1000, "long": 1000}, sources, estimated=False, mix_by="tokens")
    tokens = {n: 1000 * repeat[n] * sources[n]["tokens_per_sample"] for n in sources}
    assert tokens["short"] == pytest.approx(tokens["long"])
    assert repeat_factors({"short": 1000, "long": 1000}, sources, estimated=False) == {"short": 1.0, "long": 1.0}
    with pytest.raises(ValueError, match="tokens"):
        repeat_factors({"a": 1, "b": 1}, {"a": {"weight": 1.0}, "b": {"weight": 1.0}}, estimated=False, mix_by="tokens")


def test_a_position_saved_mid_pass_continues_exactly(tmp_path):
    """Real shards read by mix_window: a position taken mid-epoch (inside a window, in the middle of a
    pass of the up-weighted source) resumes with exactly the rest of the epoch, in the same order."""
    coyo = []
    for shard in range(4):
        path = tmp_path / "coyo" / f"{shard:05d}.parquet"
        path.parent.mkdir(exist_ok=True)
        keys = [f"c{shard}-{i:02d}" for i in range(24)]
        pq.write_table(pa.table({"key": keys, "jpg": [b"x"] * 24, "caption": keys}), path, row_group_size=5)
        coyo.append((str(path), (0, 5), None, 24))
    chat = tmp_path / "share" / "chat.json"
    chat.parent.mkdir()
    chat.write_text(json.dumps([{"id": f"s{i:02d}", "image": f"{i}.jpg", "conversations": []} for i in range(20)]))
    sources = {"coyo": {"format": "coyo_parquet", "path": str(tmp_path / "coyo"), "weight": 1.0},
               "share": {"format": "sharegpt4v", "path": str(chat), "weight": 1.0}}
    pieces = {"coyo": coyo, "share": [(str(chat), None, r, n) for r, n in record_ranges(20, 10_000)]}
    plan = EpochPlan(tuple(plan_units(sources, pieces, estimated=False)), 11, 2, 8)

    def read(position=None):
        return [(key, sid) for w in plan.windows(1, 0, 1, position) for t in mix_window(w, None, chunk_rows=7)
                for key, sid in zip(t.column("key").to_pylist(), t.column("sample_id").to_pylist())]

    full = read()
    draws = plan.source_draws(1, 0, 1)
    assert draws == {"coyo": 58, "share": 58}  # equal weights: 116 draws, coyo a partial pass, share 2.9 passes
    assert Counter(Counter(k for k, _ in full if k.startswith("s")).values()) == {3: 18, 2: 2}
    coyo_keys = Counter(k for k, _ in full if k.startswith("c"))
    assert len(coyo_keys) == 58 and set(coyo_keys.values()) == {1}
    assert len(plan.windows(1, 0, 1)) > 2
    for trained in (37, 101):  # inside a window, in a pass of "share"
        position = DataPosition(epoch=1)
        for _, sid in full[:trained]:
            position.consume(part_id(sid), [part_id(sid)])
        assert read(DataPosition.from_state(position.state())) == full[trained:]
