"""The stage-2 tokenization actor pool and the tokenized cache, on a real local Ray instance."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestration.config import load_config
from orchestration.data.pipeline import (
    CacheMismatchError,
    build_lm_dataset,
    data_stats,
    ensure_lm_tokenizer,
    torch_dtypes,
    write_lm_cache,
)
from orchestration.data.synthetic import make_synthetic_dataset
from vilau_model.config import get_tower_config
from vilau_model.sequence import IGNORE_INDEX, ROW_SCHEMA
from vilau_model.vision_tower import UnifiedVisionTower

SEQ_LEN = 1024
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """A few records per format (the pool encodes every image and frame, so keep it small)."""
    out = tmp_path_factory.mktemp("tokenize_shards")
    return str(out), make_synthetic_dataset(out, samples=12, seed=5, eval_samples=4, shard_size=4, video_samples=6)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenize_outputs")


@pytest.fixture(scope="module")
def make_config(small_shards, outputs):
    def make(*overrides):
        return load_config(
            None,
            [f"data.root={small_shards[0]}", f"output_dir={outputs}", f"data.seq_len={SEQ_LEN}", "data.pack_window=16",
             # shares 2:1:1:1 of trained samples (a COYO pair gives two): every record once
             "data.lm_sources.coyo.weight=2.0", "data.lm_sources.openvid.weight=1.0", *overrides],
        )

    return make


def _digest(row: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(row):
        h.update(f"{name}:{row[name].dtype}:{row[name].shape}".encode())
        h.update(np.ascontiguousarray(row[name]).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def one_actor_rows(ray_session, make_config):
    return build_lm_dataset(make_config("data.tokenizer_actors=1"), stats_group="pool-1").take_all()


def test_rows_have_the_packed_row_format(one_actor_rows, make_config):
    tokenizer_dir = ensure_lm_tokenizer(make_config())
    assert (Path(tokenizer_dir) / "tokenizer.json").is_file()
    depth = get_tower_config("tiny").code_depth
    shapes = {"L": SEQ_LEN, "D": depth}
    assert one_actor_rows
    for row in one_actor_rows:
        assert sorted(row) == sorted(ROW_SCHEMA)
        for name, (dtype, dims) in ROW_SCHEMA.items():
            assert row[name].dtype == dtype and row[name].shape == tuple(shapes[d] for d in dims), name
        supervised = row["labels"] != IGNORE_INDEX
        assert (row["labels"][supervised] == row["input_ids"][supervised]).all()
        assert (row["segment_ids"][supervised] > 0).all()
        codes = row["codes"][row["is_visual"]]
        assert codes.size and codes.min() >= 0 and codes.max() < get_tower_config("tiny").codebook_size
        assert not row["codes"][~row["is_visual"]].any()
    # Every generation sample keeps its prompt (lm_train.caption_dropout is 0.1, drawn at batch time):
    # no segment starts [BOS, <im_start>] / [BOS, <vi_start>].
    from vilau_model.tokenizer import IM_START, VI_START, load_tokenizer

    starts = set(load_tokenizer(tokenizer_dir).convert_tokens_to_ids([IM_START, VI_START]))
    generation = 0
    for row in one_actor_rows:
        for segment in set(row["segment_ids"].tolist()) - {0}:
            at = np.flatnonzero(row["segment_ids"] == segment)
            first_supervised = at[row["labels"][at] != IGNORE_INDEX][0]
            if row["input_ids"][first_supervised] in starts:  # a generation sample: [BOS, prompt, visual]
                generation += 1
                assert first_supervised > at[0] + 1, "a generation prompt was dropped in the rows"
    assert generation > 0 and make_config().lm_train.caption_dropout > 0
    # Every sample kind made it into rows: samples per source were counted by the pool.
    stats = data_stats("pool-1")
    assert set(stats["tokens"]) == {"coyo", "mmc4", "openvid", "sharegpt4v"}
    assert stats["skipped"] == {}


def test_two_actors_give_the_same_rows_as_one(one_actor_rows, make_config):
    two = build_lm_dataset(make_config("data.tokenizer_actors=2"), stats_group="pool-2").take_all()
    assert sorted(map(_digest, two)) == sorted(map(_digest, one_actor_rows))
    assert data_stats("pool-2")["tokens"] == data_stats("pool-1")["tokens"]


def test_cache_round_trip_and_mismatched_manifest(one_actor_rows, make_config, s3_server, s3_overrides, tmp_path):
    cache_dir = "s3://vilau-test/tokenized"  # the S3 case; a local directory takes the same path
    config = make_config(f"data.cache_dir={cache_dir}", *s3_overrides)
    manifest = write_lm_cache(config, force=True)
    assert manifest["rows"] == len(one_actor_rows) and manifest["files"]
    assert manifest["fingerprint"]["tower"]["init"] == "seed-0"
    assert {s: m["target_share"] for s, m in manifest["mixture"].items()} == {"coyo": 0.4, "mmc4": 0.2, "openvid": 0.2, "sharegpt4v": 0.2}
    assert s3_server.secret_access_key not in json.dumps(manifest)  # the recorded config is redacted

    cached = build_lm_dataset(config, stats_group="from-cache")
    rows = cached.take_all()
    assert [_digest(r) for r in rows] == [_digest(r) for r in one_actor_rows]  # identical, in the same order
    assert data_stats("from-cache")["samples"] == {}  # read from the cache: nothing was decoded or encoded

    # Training reads the cache in record ranges: every rank gets a share even of a one-file cache, and the
    # ranges read every row once.
    from orchestration.data.cache import cache_plan
    from orchestration.data.records import read_unit_tables
    from orchestration.storage import S3Settings

    plan = cache_plan(config, manifest)
    assert sum(u.size for u in plan.units) == manifest["rows"] and len(plan.units) >= 2
    assert all(plan.rank_units(0, rank, 2) for rank in range(2))
    s3 = S3Settings.from_config(config.data.s3)
    read = [t for u in plan.units for t in read_unit_tables(u, s3)]
    assert sum(t.num_rows for t in read) == manifest["rows"]
    assert sorted(tuple(r["input_ids"]) for t in read for r in t.to_pylist()) == \
        sorted(tuple(np.asarray(r["input_ids"]).tolist()) for r in one_actor_rows)

    # A training loop's view: torch batches with every column typed.
    batch = next(iter(cached.iter_torch_batches(batch_size=2, dtypes=torch_dtypes("lm"))))
    assert batch["codes"].shape == (2, SEQ_LEN, 4) and batch["is_visual"].dtype == torch.bool

    with pytest.raises(CacheMismatchError, match=r"rows\.seq_len: cache has 1024, this run has 512"):
        build_lm_dataset(make_config(f"data.cache_dir={cache_dir}", *s3_overrides, "data.seq_len=512"))

    torch.manual_seed(123)
    tower_path = tmp_path / "tower.safetensors"
    UnifiedVisionTower(get_tower_config("tiny")).save(str(tower_path))
    with pytest.raises(CacheMismatchError) as err:
        build_lm_dataset(config, str(tower_path))
    message = str(err.value)
    assert cache_dir in message and "tower.checkpoint_sha256: cache has (absent)" in message
    assert "tower.init" in message and "jobs/tokenize_data.py" in message

    with pytest.raises(CacheMismatchError):  # writing over a mismatched cache needs --force
        write_lm_cache(config, str(tower_path))


def test_tokenize_job_parses_its_arguments():
    result = subprocess.run([sys.executable, str(REPO / "jobs" / "tokenize_data.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "data.cache_dir" in result.stdout


def test_stage2_resume_trains_the_rest_of_the_epoch_exactly_once(ray_session, make_config):
    """Packed rows name their samples: resuming after some rows leaves out exactly the samples those
    rows held (the rest is packed anew, but no sample is lost or trained twice)."""
    from orchestration.data.epochs import DataPosition
    from orchestration.data.pipeline import rank_dataset, training_plan

    config = make_config("data.tokenizer_actors=1", "data.pack_window=8", "data.shuffle_window_shards=2")
    plan = training_plan(config, "lm")
    files = {}  # the workers get the tokenizer as bytes
    for path in Path(ensure_lm_tokenizer(config)).iterdir():
        files[path.name] = path.read_bytes()

    def rows(position=None):
        ds = rank_dataset(config, "lm", plan, epoch=1, rank=0, world=1, position=position, tokenizer_files=files)
        return [(int(r["call_start"]), json.loads(r["sample_ids"]), json.loads(r["keys"])) for r in ds.take_all()]

    full = rows()
    samples = [i for _, ids, _ in full for i in ids]
    assert len(samples) == len(set(samples)) > 20
    consumed = len(full) // 2
    position = DataPosition(epoch=1)
    for call_start, ids, _ in full[:consumed]:
        position.consume(call_start, ids)
    rest = rows(DataPosition.from_state(position.state()))
    trained = [i for _, ids, _ in full[:consumed] for i in ids]
    resumed = [i for _, ids, _ in rest for i in ids]
    assert not set(trained) & set(resumed)
    assert sorted(trained + resumed) == sorted(samples)
    assert sorted(k for *_, keys in full for k in keys) == sorted(
        [k for *_, keys in full[:consumed] for k in keys] + [k for *_, keys in rest for k in keys]
    )


def test_clips_train_both_directions_as_pairs_do():
    """An OpenVid clip gives [video, caption] (understanding) and [caption, video] (generation) samples
    under ``image_text_task: both``, and the epoch plan counts 2 samples per clip."""
    from types import SimpleNamespace

    from orchestration.data.lm_data import TokenizePool, lm_samples_per_record
    from vilau_model.sequence import VideoCaptionSample, VideoSample

    assert lm_samples_per_record(load_config(None)) == {"coyo": 2, "mmc4": 1, "openvid": 2, "sharegpt4v": 1}
    one_way = load_config(None, ["data.lm_sources.openvid.image_text_task=generation"])
    assert lm_samples_per_record(one_way)["openvid"] == 1
    codes = np.zeros((8, 2, 2, 4), np.int16)
    record = {"kind": "video", "source": "openvid", "text": "a red circle moving left"}
    for task, kinds in (("both", [VideoCaptionSample, VideoSample]), ("understanding", [VideoCaptionSample]),
                        ("generation", [VideoSample])):
        pool = SimpleNamespace(image_text_tasks={"openvid": task})  # samples() reads only the tasks
        samples = TokenizePool.samples(pool, record, codes)
        assert [type(s) for s in samples] == kinds and all(s.text == record["text"] for s in samples)
