"""Every format read through Ray Data from local disk and from the S3-protocol server gives the same rows."""

import hashlib
import json

import numpy as np
import torch

from orchestration.config import load_config
from orchestration.data.lm_data import decoded_dataset
from orchestration.data.pipeline import build_tower_dataset, data_stats, mixture_shares, skip_counts, torch_dtypes, with_text_tokens
from orchestration.data.tower_data import tower_config
from orchestration.data.synthetic import FORMATS

SOURCES = {
    "coyo_parquet": "coyo/parquet",
    "coyo_webdataset": "coyo/webdataset",
    "mmc4": "mmc4",
    "openvid": "openvid",
    "sharegpt4v": "sharegpt4v",
}


def _config(root, tmp_path, overrides=(), sources=SOURCES):
    # Weights are shares of trained samples and a COYO pair or an OpenVid clip gives two (both ways): weight 2 reads
    # every record of every source once.
    entries = [f"{n}: {{format: {n}, path: {p}, weight: {2 if n.startswith('coyo') or n == 'openvid' else 1}}}" for n, p in sources.items()]
    lm_sources = [f"data.lm_sources={{{', '.join(entries)}}}"]
    return load_config(None, [f"data.root={root}", f"output_dir={tmp_path}", *lm_sources, *overrides])


def _rows_by_source(ds) -> dict[str, dict[str, tuple]]:
    out: dict[str, dict[str, tuple]] = {}
    for row in ds.take_all():
        digest = hashlib.sha256(row["pixels"]).hexdigest()
        entry = (row["kind"], row["text"], int(row["num_images"]), list(row["media_slots"]), digest)
        assert row["key"] not in out.setdefault(row["source"], {}), f"{row['source']}/{row['key']} delivered twice"
        out[row["source"]][row["key"]] = entry
    return out


def test_every_format_same_rows_local_and_s3(ray_session, synthetic_data, s3_synthetic_data, s3_overrides, tmp_path):
    local_root, manifest = synthetic_data
    s3_root, _ = s3_synthetic_data
    local = _rows_by_source(decoded_dataset(_config(local_root, tmp_path), stats_group="formats-local"))
    remote = _rows_by_source(decoded_dataset(_config(s3_root, tmp_path, s3_overrides), stats_group="formats-s3"))

    assert sorted(local) == sorted(FORMATS)
    for fmt in FORMATS:
        assert len(local[fmt]) == manifest["formats"][fmt]["records"], fmt  # clean shards: every record
        assert local[fmt] == remote[fmt], f"{fmt}: local and S3 rows differ"
    # Each kind carries what it should: 1 image, 1-3 images with their sentences, 8 frames, 1 image.
    assert {v[2] for v in local["coyo_parquet"].values()} == {1}
    assert {v[2] for v in local["openvid"].values()} == {8}
    assert all(1 <= v[2] <= 3 and len(v[3]) == v[2] for v in local["mmc4"].values())
    # The two COYO layouts hold the same records: same keys, captions and pixels.
    assert local["coyo_parquet"] == local["coyo_webdataset"]
    assert data_stats("formats-s3")["skipped"] == {}


def test_tower_dataset_columns_local_and_s3(ray_session, synthetic_data, s3_synthetic_data, s3_overrides, tiny_config, tmp_path):
    config = tiny_config()
    rows = build_tower_dataset(config, with_keys=True, stats_group="tower-local").take_all()
    s3_config = tiny_config(f"data.root={s3_synthetic_data[0]}", *s3_overrides)
    s3_rows = build_tower_dataset(s3_config, with_keys=True, stats_group="tower-s3").take_all()

    size, ctx = 32, 32  # the tiny tower: 32 px images, 32-token context
    assert rows[0]["pixels"].shape == (3, size, size) and rows[0]["pixels"].dtype == np.uint8
    assert isinstance(rows[0]["caption"], str) and "text_tokens" not in rows[0]  # the consumer tokenizes

    def keyed(rs):
        return {(r["source"], r["key"]): (r["pixels"].tobytes(), r["caption"]) for r in rs}

    assert keyed(rows) == keyed(s3_rows)
    assert len(rows) == 2 * synthetic_data[1]["samples"]  # both COYO layouts of the tiny preset
    shares = mixture_shares(config, "tower", group="tower-local")
    assert {n: s["share"] for n, s in shares.items()} == {"coyo_parquet": 0.5, "coyo_webdataset": 0.5}

    # What a training loop does with it: captions tokenized in its own process, torch batches, every column typed.
    tower = tower_config(config)
    batch = with_text_tokens(tower, next(iter(build_tower_dataset(config, stats_group="tower-torch").iter_batches(batch_size=8, batch_format="numpy"))))
    assert batch["text_tokens"].shape == (8, ctx) and batch["text_tokens"].dtype == np.int64
    tensors = {name: torch.as_tensor(batch[name]).to(dtype) for name, dtype in torch_dtypes("tower").items()}
    assert tuple(tensors["pixels"].shape) == (8, 3, size, size) and tensors["text_tokens"].dtype == torch.int64


def test_weights_set_the_realized_shares(ray_session, synthetic_data, tmp_path):
    sources = {"coyo_parquet": "coyo/parquet", "sharegpt4v": "sharegpt4v"}
    config = _config(
        synthetic_data[0], tmp_path, ["data.lm_sources.coyo_parquet.weight=3.0", "data.lm_sources.sharegpt4v.weight=1.0"], sources
    )
    rows = decoded_dataset(config, stats_group="weights").take_all()
    shares = mixture_shares(config, "lm", group="weights")
    assert shares["coyo_parquet"]["target_share"] == 0.75
    # Shares of trained samples: a COYO pair trains both ways in stage 2 (two samples per record).
    assert abs(shares["coyo_parquet"]["share"] - 0.75) < 0.06  # a seeded subset/repeat, not exact
    coyo_records = sum(r["source"] == "coyo_parquet" for r in rows)
    assert shares["coyo_parquet"]["samples"] == 2 * coyo_records
    assert shares["sharegpt4v"]["samples"] == len(rows) - coyo_records
    # Up-weighted COYO repeats records; down-weighted ShareGPT4V gives a subset without repeats.
    coyo = [r["key"] for r in rows if r["source"] == "coyo_parquet"]
    share = [r["key"] for r in rows if r["source"] == "sharegpt4v"]
    assert len(set(coyo)) < len(coyo) and len(set(share)) == len(share) < synthetic_data[1]["samples"]


def test_unreadable_shard_is_skipped_counted_and_recorded_by_name(ray_session, tmp_path):
    bad_dir = tmp_path / "bad" / "coyo" / "parquet"
    bad_dir.mkdir(parents=True)
    (bad_dir / "part-00007.parquet").write_bytes(b"PAR1 but not really parquet")
    config = load_config(
        None, [f"data.root={tmp_path / 'bad'}", f"output_dir={tmp_path}", "data.synthetic.make_if_missing=false",
               "data.tower_sources={coyo: {format: coyo_parquet, path: coyo/parquet}}"],
    )
    assert build_tower_dataset(config, stats_group="bad", fault_dir=str(tmp_path / "run")).take_all() == []
    assert skip_counts("bad") == {"unreadable_shard": 1}
    (entry,) = [json.loads(p.read_text()) for p in (tmp_path / "run" / "unreadable_shards").glob("*.json")]
    assert entry["shard"].startswith(str(bad_dir / "part-00007.parquet")) and entry["readable_records"] == 0
