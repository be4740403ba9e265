"""Epoch order and data position (orchestration/data/epochs.py) on the real Ray pipeline: a new order
every epoch, the same order for the same seed, every good record once per epoch across ranks, batches
drawn from many shards, and a resumed share that leaves out (and never decodes) what was trained."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter

from orchestration.config import load_config
from orchestration.data.epochs import DataPosition, EpochPlan
from orchestration.data.pipeline import build_tower_dataset, data_stats, training_plan

SHARD_SIZE = 32  # the synthetic writer's records per shard


def _config(root, tmp_path, *extra):
    return load_config(None, [f"data.root={root}", f"output_dir={tmp_path}", "data.shuffle_seed=7", *extra])


def _rows(config, plan, epoch, rank=0, world=1, position=None, group=None):
    ds = build_tower_dataset(config, plan=plan, epoch=epoch, rank=rank, world=world, position=position,
                             track=True, stats_group=group)
    rows = [
        {"key": (json.loads(r["keys"]) or [None])[0], "ids": json.loads(r["sample_ids"]), "start": int(r["call_start"]),
         "skipped": json.loads(r["skipped"])}
        for r in ds.take_all()
    ]
    carried = [e for r in rows if r["key"] is None for e in r["skipped"]]  # blocks with no good record
    rows = [r for r in rows if r["key"] is not None]
    if carried:
        rows[-1]["skipped"] = rows[-1]["skipped"] + carried
    return rows


def _good_keys(manifest) -> Counter:
    good = Counter()
    for fmt in ("coyo_parquet", "coyo_webdataset"):
        bad = manifest["formats"][fmt]["bad"]
        good.update(f"{fmt}/{i:09d}" for i in range(manifest["samples"]) if f"{i:09d}" not in bad)
    return good


def test_epochs_shuffle_reproducibly_and_deliver_every_good_record_once(ray_session, corrupt_data, tmp_path):
    root, manifest = corrupt_data
    config = _config(root, tmp_path)
    plan = training_plan(config, "tower")
    again = EpochPlan.from_json(training_plan(config, "tower").to_json())  # a second run, same seed
    assert again == plan

    good = _good_keys(manifest)
    orders = {}
    for epoch in (0, 1):
        shares = [_rows(config, plan, epoch, rank, 2) for rank in (0, 1)]
        keys = [r["key"] for share in shares for r in share]
        assert Counter(keys) == good, f"epoch {epoch}: not every good record exactly once"
        skipped = Counter(e for share in shares for r in share for e in r["skipped"])
        assert sum(skipped.values()) == 2 * len(manifest["formats"]["coyo_parquet"]["bad"])  # each bad one once
        assert all(n == 1 for n in skipped.values())
        orders[epoch] = [[r["key"] for r in share] for share in shares]
        assert orders[epoch] == [[r["key"] for r in _rows(config, again, epoch, rank, 2)] for rank in (0, 1)]
        # A batch of 8 draws from several shards of both layouts (not one shard after another).
        first = orders[epoch][0][:8]
        assert len({(k.split("/")[0], int(k.split("/")[1]) // SHARD_SIZE) for k in first}) >= 2
    assert orders[0] != orders[1]
    assert orders[0][0][:16] != orders[1][0][:16]
    # Another seed, another order.
    other = _config(root, tmp_path, "data.shuffle_seed=8")
    assert [r["key"] for r in _rows(other, training_plan(other, "tower"), 0)] != [r["key"] for r in _rows(config, plan, 0)]


def test_resumed_share_skips_trained_rows_before_decoding(ray_session, corrupt_data, tmp_path):
    root, _ = corrupt_data
    config = _config(root, tmp_path, "data.shuffle_window_shards=1", "data.shuffle_buffer_rows=8")
    plan = training_plan(config, "tower")
    full = _rows(config, plan, 1, group="resume-full")
    assert len(plan.windows(1, 0, 1)) == len(plan.units) > 1
    trained = 40  # past the first window: a whole window and part of the next are done
    position = DataPosition(epoch=1)
    for row in full[:trained]:
        position.consume(row["start"], row["ids"])
    rest = _rows(config, plan, 1, position=DataPosition.from_state(position.state()), group="resume-rest")
    assert [r["key"] for r in rest] == [r["key"] for r in full[trained:]]
    # Decoded: only the rest (samples are counted at decode time), never the trained rows again.
    assert sum(data_stats("resume-rest")["samples"].values()) == len(full) - trained
    assert sum(data_stats("resume-full")["samples"].values()) == len(full)


def test_a_big_parquet_shard_is_read_as_several_row_group_tasks(ray_session, synthetic_data, tmp_path):
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestration.data.mixture import plan_reads
    from orchestration.data.sources import epoch_plan, resolve_sources

    shards = sorted(glob.glob(f"{synthetic_data[0]}/coyo/parquet/*.parquet"))
    big = tmp_path / "big" / "coyo" / "parquet"
    big.mkdir(parents=True)
    merged = pa.concat_tables([pq.read_table(s) for s in shards])
    pq.write_table(merged, big / "part-00000.parquet", row_group_size=8)
    config = load_config(None, [f"data.root={tmp_path / 'big'}", f"output_dir={tmp_path}", "data.synthetic.make_if_missing=false",
                                "data.tower_sources={coyo: {format: coyo_parquet, path: coyo/parquet}}",
                                "data.shuffle_window_shards=1"])
    units = plan_reads(resolve_sources(config, config.data.tower_sources, "tower_sources"), None, 0, unit_rows=24)
    assert [u.row_groups for u in units] == [(0, 3), (3, 6), (6, 8)] and sum(u.size for u in units) == merged.num_rows
    plan = epoch_plan(config, units)
    assert len(plan.windows(0, 0, 1)) == 3  # one read task per row-group range
    keys = [r["key"] for r in _rows(config, plan, 0)]
    assert sorted(keys) == sorted(f"coyo/{k}" for k in merged.column("key").to_pylist())


def test_batch_stream_counts_each_bad_record_once_per_epoch(ray_session, corrupt_data, tmp_path):
    """Three epochs through the training loop's stream: every epoch counts each bad record once (its
    reason, as integers), the run counts the epochs' sum, and every epoch trains every good record once."""
    import torch

    from orchestration.data.pipeline import rank_dataset, torch_dtypes, with_text_tokens
    from orchestration.data.tower_data import tower_config
    from orchestration.train.batch_stream import BatchStream

    root, manifest = corrupt_data
    config = _config(root, tmp_path)
    plan = training_plan(config, "tower")
    trained: dict[int, Counter] = {}

    def record(epoch, keys):
        trained.setdefault(epoch, Counter()).update(keys)

    stream = BatchStream(lambda epoch, position: rank_dataset(config, "tower", plan, epoch=epoch, rank=0, world=1, position=position),
                         0, 1, "tower", 4, torch_dtypes("tower"), torch.device("cpu"),
                         recorder=record, host_batch=functools.partial(with_text_tokens, tower_config(config)))
    good = _good_keys(manifest)
    per_epoch = sum(good.values()) // 4
    for _ in range(3 * per_epoch):
        batch = next(stream)
    stream.close()
    assert batch["pixels"].shape == (4, 3, 32, 32) and batch["pixels"].dtype == torch.uint8
    assert batch["text_tokens"].shape == (4, 32) and batch["text_tokens"].dtype == torch.int64  # tokenized in the reader
    assert sorted(trained) == [0, 1, 2] and all(trained[e] <= good and max(trained[e].values()) == 1 for e in trained)
    assert sum(trained[0].values()) == per_epoch * 4  # all but the last partial batch
    bad = Counter(reason for fmt in ("coyo_parquet", "coyo_webdataset") for reason in manifest["formats"][fmt]["bad"].values())
    counts = stream.data_metrics()
    assert counts["mixture_share/coyo_parquet"] == counts["mixture_share/coyo_webdataset"] == 0.5
    # The position and the counts travel in the checkpoint's per-rank state: small integers, no key sets.
    state = stream.state_dict()
    by_epoch = state["skipped_by_epoch"]
    assert by_epoch[0] == by_epoch[1] == dict(bad), by_epoch  # epoch 2 is cut before its last partial batch
    run = Counter()
    for epoch_counts in by_epoch.values():
        run.update(epoch_counts)
    assert {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("rows_skipped/")} == dict(run) == state["skipped"]
    assert {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("rows_skipped_epoch/")} == by_epoch[2]
    assert state["position"]["epoch"] == 2
    # ... and come back.
    restored = BatchStream(None, 0, 1, "tower", 4, torch_dtypes("tower"), torch.device("cpu"))
    restored.load_state_dict(state)
    assert restored.state_dict() == state and restored.data_metrics() == counts


def test_one_big_index_file_is_read_as_record_ranges_spread_over_the_ranks(ray_session, synthetic_data, tmp_path):
    """ShareGPT4V and OpenVid come as one index file each (a JSON list, a CSV): read whole, one rank
    would get all of a source and another none. The plan cuts such a file into record ranges, which
    together read every record once, and both ranks get their share of every source."""
    from orchestration.data.counting import MIN_UNITS_PER_SOURCE
    from orchestration.data.records import iter_records
    from orchestration.data.sources import rank_windows

    root, manifest = synthetic_data
    config = _config(root, tmp_path, "data.lm_sources={sharegpt4v: {format: sharegpt4v, path: sharegpt4v}, "
                                     "openvid: {format: openvid, path: openvid}}")
    plan = training_plan(config, "lm")
    for source in ("sharegpt4v", "openvid"):
        units = [u for u in plan.units if u.source == source]
        assert len({u.uri for u in units}) == 1 and len(units) >= MIN_UNITS_PER_SOURCE, units
        keys = [r["key"] for u in units for r in iter_records(u, None)]
        whole = [r["key"] for r in iter_records(dataclasses.replace(units[0], records=None), None)]
        assert sorted(keys) == sorted(whole) and len(whole) == manifest["samples"]  # each record once
    for rank in (0, 1):
        windows, _ = rank_windows(plan, 0, rank, 2, None)
        assert {u.source for w in windows for u in w.units} == {"sharegpt4v", "openvid"}, rank


def test_mix_by_tokens_weighs_each_source_by_its_estimated_tokens(ray_session, synthetic_data, tmp_path):
    """data.mix_by: tokens makes the weights shares of trained tokens: a clip (8 frames of image
    tokens) costs several pairs' tokens, so equal weights give the clips far fewer samples than by samples."""
    root, _ = synthetic_data
    sources = ("data.lm_sources={coyo: {format: coyo_parquet, path: coyo/parquet}, "
               "openvid: {format: openvid, path: openvid, image_text_task: generation}}")
    repeat = {mix: {u.source: u.repeat for u in training_plan(_config(root, tmp_path, sources, f"data.mix_by={mix}"), "lm").units}
              for mix in ("samples", "tokens")}
    # By samples: a pair gives 2 samples, a clip trained one way 1, so coyo is read 0.75 times and openvid 1.5 times.
    assert repeat["samples"] == {"coyo": 0.75, "openvid": 1.5}
    assert repeat["tokens"]["openvid"] < repeat["samples"]["openvid"] / 3
    assert repeat["tokens"]["coyo"] > repeat["samples"]["coyo"]
