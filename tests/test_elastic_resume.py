"""Elastic resume of the epoch plan (orchestration/data/epochs.py) without Ray: the ranks of a world
are stopped mid-epoch, and a world of another size continues the epoch from their saved positions:
what any rank finished stays finished, partly read windows continue from the recorded offsets, the
rest is dealt evenly over the new ranks, and the whole epoch trains the same multiset of records as
one uninterrupted pass (copies of an up-weighted source included). Real shards, read by mix_window."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestration.data.epochs import DataPosition, EpochPlan, mix_window, part_id, split_part_id
from orchestration.data.counting import record_ranges
from orchestration.data.mixture import mix_order, plan_units
from orchestration.data.records import read_unit_tables


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> EpochPlan:
    """COYO parquet (exact sizes: read lazily) and a ShareGPT4V index up-weighted to ~3 passes (read as
    drawn), several windows per rank."""
    root = tmp_path_factory.mktemp("elastic")
    coyo = []
    for shard in range(6):
        path = root / "coyo" / f"{shard:05d}.parquet"
        path.parent.mkdir(exist_ok=True)
        keys = [f"c{shard}-{i:02d}" for i in range(24)]
        pq.write_table(pa.table({"key": keys, "jpg": [b"x"] * 24, "caption": keys}), path, row_group_size=5)
        coyo.append((str(path), (0, 5), None, 24))
    chat = root / "share" / "chat.json"
    chat.parent.mkdir()
    chat.write_text(json.dumps([{"id": f"s{i:02d}", "image": f"{i}.jpg", "conversations": []} for i in range(40)]))
    sources = {"coyo": {"format": "coyo_parquet", "path": str(root / "coyo"), "weight": 1.0},
               "share": {"format": "sharegpt4v", "path": str(chat), "weight": 0.6}}
    pieces = {"coyo": coyo, "share": [(str(chat), None, r, n) for r, n in record_ranges(40, 10)]}
    return EpochPlan(tuple(plan_units(sources, pieces, estimated=False)), seed=5, window_units=2, buffer_rows=8)


def _read(plan: EpochPlan, rank: int, world: int, position: DataPosition | None = None, epoch: int = 0):
    """(key, sample id, parts done) of a rank's epoch from ``position`` on, in its order."""
    return [(key, sid, done) for w in plan.windows(epoch, rank, world, position) for t in mix_window(w, None, chunk_rows=7)
            for key, sid, done in zip(t.column("key").to_pylist(), t.column("sample_id").to_pylist(),
                                      t.column("done_parts").to_pylist())]


def _train(position: DataPosition, rows, n: int) -> list[str]:
    """Stage 1's consumption: each record one sample, its own call."""
    for _, sid, _ in rows[:n]:
        position.consume(part_id(sid), [part_id(sid)])
    return [key for key, _, _ in rows[:n]]


def test_windows_of_exact_sizes_are_drawn_first_and_read_from_the_first_row_due(plan):
    """The lazy read (order drawn from footer sizes, only the rows due read) gives the same order as
    reading each record as it is drawn."""
    window = next(w for w in plan.windows(0, 0, 2) if len(w.units) > 1)
    window = type(window)(**{**window.__dict__, "parts": tuple(p for p in window.parts if p[0].unit.source == "coyo")})
    cursors = {}

    def pull(i, j):
        chunk = window.parts[i][j]
        if (i, j) not in cursors:
            cursors[(i, j)] = (r for t in read_unit_tables(chunk.unit, None, start=chunk.start, stop=chunk.stop)
                               for r in t.column("key").to_pylist())
        return next(cursors[(i, j)], None)

    sizes = [[(c.size, c.pass_index) for c in part] for part in window.parts]
    eager = [key for _, key in mix_order(sizes, window.seed, window.buffer_rows, pull)]
    lazy = [k for t in mix_window(window, None, chunk_rows=5) for k in t.column("key").to_pylist()]
    assert lazy == eager and len(eager) > 10
    first = window.index << 32
    for at in (1, len(eager) // 3, len(eager) * 9 // 10):  # resumed inside the window, some records done above
        done = {first | o for o in range(at + 1, len(eager), 3)}
        late = type(window)(**{**window.__dict__, "skip_below": first | at, "skip_ids": frozenset(done)})
        assert [k for t in mix_window(late, None) for k in t.column("key").to_pylist()] == \
            [k for o, k in enumerate(eager) if o >= at and first | o not in done]


def test_an_epoch_continues_exactly_once_across_world_sizes(plan):
    """2 ranks stop mid-epoch, 3 ranks continue and stop, 2 ranks finish: together they train the
    multiset of one uninterrupted pass, and each new world's ranks get equal shares of what was left."""
    whole = Counter(k for r in range(2) for k, _, _ in _read(plan, r, 2))
    assert max(Counter(k for k in whole if k.startswith("s")).values()) == 1 and max(whole.values()) >= 2  # copies
    trained: Counter = Counter()

    positions = []
    for rank, n in ((0, 13), (1, 40)):  # unequal progress: one rank inside its first window, one further on
        position = DataPosition()
        trained.update(_train(position, _read(plan, rank, 2), n))
        positions.append(DataPosition.from_state(json.loads(json.dumps(position.state()))))  # via a checkpoint

    on3 = DataPosition.continued(positions)
    assert on3.history == [{"world": 2, "ranks": [{"frontier": p.frontier, "taken": sorted(p.taken)} for p in positions]}]
    shares = [_read(plan, rank, 3, on3) for rank in range(3)]
    left = sum(whole.values()) - sum(trained.values())
    assert sorted(len(s) for s in shares) == sorted(left * (k + 1) // 3 - left * k // 3 for k in range(3))
    assert Counter(k for s in shares for k, _, _ in s) + trained == whole  # nothing twice, nothing lost

    positions = []
    for rank, n in ((0, 5), (1, 0), (2, 11)):
        position = DataPosition.from_state(on3.state())
        trained.update(_train(position, shares[rank], n))
        positions.append(DataPosition.from_state(json.loads(json.dumps(position.state()))))
    on2 = DataPosition.continued(positions)
    assert len(on2.history) == 2
    for rank in range(2):
        position = DataPosition.from_state(on2.state())
        rest = _read(plan, rank, 2, position)
        trained.update(_train(position, rest, len(rest)))
        assert _read(plan, rank, 2, position) == []  # its position says it is done
    assert trained == whole


def test_partly_trained_records_keep_their_trained_parts_across_a_world_change(plan):
    """Stage 2 makes up to 4 samples of a record; a record with one of two parts trained continues
    on the new world with only the other part due, and a record with all parts trained is not read."""
    rows = _read(plan, 1, 2)
    position = DataPosition()
    for _, sid, _ in rows[:6]:
        position.consume(part_id(rows[0][1]), [part_id(sid, 0, 2), part_id(sid, 1, 2)])
    half, whole = rows[6], rows[7]
    position.consume(part_id(rows[0][1]), [part_id(half[1], 1, 2), part_id(whole[1], 0, 2), part_id(whole[1], 1, 2)])
    continued = DataPosition.continued([DataPosition(), position])
    after = {key: done for rank in range(3) for key, _, done in _read(plan, rank, 3, continued)}
    assert after[half[0]] == [1]
    assert whole[0] not in after and rows[0][0] not in after
    assert split_part_id(part_id(half[1], 1, 2)) == (half[1], 1, 2)


def test_an_untouched_epoch_is_planned_for_the_new_world():
    old = [DataPosition(epoch=3), DataPosition(epoch=3)]
    assert DataPosition.continued(old) == DataPosition(epoch=3)
    with pytest.raises(ValueError, match="different epochs"):
        DataPosition.continued([DataPosition(epoch=1), DataPosition(epoch=2)])


@pytest.mark.e2e
def test_a_run_killed_on_two_workers_finishes_its_epoch_on_three_exactly_once(ray_session, synthetic_data, tmp_path):
    """Stage 1 on real Ray: 2 workers (FSDP2 on gloo) die mid-epoch, the run is resubmitted on 3. The
    weights and optimizer are resharded by DCP, the epoch continues from both old ranks' positions, and
    the trained keys of the final weights' lineage are one uninterrupted pass: every record once."""
    from pathlib import Path

    from orchestration.config import load_config
    from orchestration.data.pipeline import training_plan
    from orchestration.launch import fit_tower

    def config(workers: int, max_failures: int):
        return load_config(None, [
            f"data.root={synthetic_data[0]}", f"output_dir={tmp_path}", f"cluster.storage_path={tmp_path / 'ray'}",
            "data.tower_sources={coyo: {format: coyo_parquet, path: coyo/parquet}}",  # 64 records, exact sizes
            "run_name=elastic", "tracking.enabled=false", "data.record_trained_keys=true",
            "tower_train.batch_size_per_worker=4", "tower_train.steps=6", "tower_train.checkpoint_every=2",
            "tower_train.log_every=2", "tower_train.eval_every=100", "tower_train.keep_checkpoints=5", f"cluster.num_workers={workers}",
            f"cluster.max_failures={max_failures}",
            # rank 1 dies after the backward pass of step 3: the step-2 checkpoint (16 of 64 records) is the latest
            "cluster.fault_injection.stage=tower", "cluster.fault_injection.fail_at_step=3",
            "cluster.fault_injection.rank=1",
            "cluster.fault_injection.record_restored_state=true",  # sums of what the 3 ranks restored
        ])

    with pytest.raises(Exception):
        fit_tower(config(2, 0))
    result = fit_tower(config(3, 0))
    # 48 records left, 16 for each of 3 ranks: steps 3-6 at 3 x 4 end the epoch exactly.
    assert result.steps_done == 6 and result.history == [[1, 2], [3, 6]]

    run_dir = Path(tmp_path / "ray").resolve() / result.run_name
    # DCP resharded the 2 ranks' FSDP2 shards onto 3: the restored model and optimizer tensors are the
    # step-2 checkpoint's, every one of them (sum and sum of squares of the whole tensor).
    restored = json.loads((run_dir / "restored_state_step0000002.json").read_text())
    saved = _tensor_sums(Path(restored["checkpoint"]), tmp_path / "saved.pt")
    assert set(restored["tensors"]) == set(saved) and any(k.endswith("/exp_avg_sq") for k in saved)
    for name, sums in saved.items():
        assert restored["tensors"][name] == pytest.approx(sums, rel=1e-9, abs=1e-12), name
    trained = [json.loads(p.read_text()) for p in run_dir.glob("trained_keys/rank*/step*.json")]
    lineage = sorted((r["step"], r["rank"]) for r in trained)
    assert lineage == sorted([(s, r) for s in (1, 2) for r in (0, 1)] + [(s, r) for s in range(3, 7) for r in range(3)])
    assert {r["epoch"] for r in trained} == {0}

    plan = training_plan(config(2, 0), "tower")
    one_pass = Counter(f"{source}/{key}" for rank in range(2) for w in plan.windows(0, rank, 2)
                       for t in mix_window(w, None)
                       for source, key in zip(t.column("source").to_pylist(), t.column("key").to_pylist()))
    assert sum(one_pass.values()) == 64
    assert Counter(k for r in trained for k in r["keys"]) == one_pass


def _tensor_sums(checkpoint_dir: Path, scratch: Path) -> dict[str, list[float]]:
    """[sum, sum of squares] in float64 of every tensor a DCP checkpoint holds, read without a process group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from orchestration.train.checkpoint import flat_tensors, tensor_digest

    dcp_to_torch_save(checkpoint_dir, scratch)
    return tensor_digest(flat_tensors(torch.load(scratch, weights_only=False)).items())


def test_the_batch_stream_takes_every_old_ranks_state_on_a_new_world():
    """BatchStream.load_state_dict with the states of a world of another size: the position continues
    the epoch from all of them, and the run's totals (samples per source, dropped records) stay whole
    over the new ranks: rank 0 carries the old ranks' sums."""
    import torch

    from orchestration.train.batch_stream import BatchStream

    def old_state(rank: int) -> dict:
        position = DataPosition(epoch=1, frontier=part_id(5 + rank), taken={part_id(5 + rank)})
        return {"position": position.state(), "batches_in_epoch": 3, "samples": {"coyo": 10 + rank},
                "skipped": {"decode_error": 1 + rank}, "skipped_epoch": {"decode_error": 1},
                "skipped_by_epoch": {"0": {"decode_error": rank}, "1": {"decode_error": 1}}}

    saved = {"world": 2, "ranks": [old_state(0), old_state(1)]}
    streams = [BatchStream(None, rank, 3, "tower", 4, {}, torch.device("cpu")) for rank in range(3)]
    for stream in streams:
        stream.load_state_dict(json.loads(json.dumps(saved)))  # as read from the checkpoint parts
    states = [s.state_dict() for s in streams]
    expected = DataPosition.continued([DataPosition.from_state(r["position"]) for r in saved["ranks"]])
    assert all(DataPosition.from_state(s["position"]) == expected for s in states)
    assert expected.epoch == 1 and expected.history[0]["world"] == 2 and states[0]["batches_in_epoch"] == 3
    assert states[0]["samples"] == {"coyo": 21} and states[1]["samples"] == states[2]["samples"] == {}
    assert states[0]["skipped"] == {"decode_error": 3} and states[0]["skipped_epoch"] == {"decode_error": 2}
    assert states[0]["skipped_by_epoch"] == {0: {"decode_error": 1}, 1: {"decode_error": 2}}
    assert states[2]["skipped"] == {} and states[2]["skipped_by_epoch"] == {}
    same = BatchStream(None, 0, 2, "tower", 4, {}, torch.device("cpu"))
    same.load_state_dict(old_state(0))  # the same world: this rank's own state, as it was
    assert json.loads(json.dumps(same.state_dict())) == old_state(0)
