"""Shards with 20% bad records: every bad record skipped and counted by reason exactly as the writer's
manifest says, every good record delivered (through the real Ray pipelines)."""

import json
from collections import Counter
from pathlib import Path

from orchestration.config import load_config
from orchestration.data.lm_data import decoded_dataset
from orchestration.data.pipeline import build_tower_dataset, data_stats, skip_counts
from orchestration.data.synthetic import FORMATS

PATHS = {
    "coyo_parquet": "coyo/parquet",
    "coyo_webdataset": "coyo/webdataset",
    "mmc4": "mmc4",
    "openvid": "openvid",
    "sharegpt4v": "sharegpt4v",
}


def _expected(manifest, formats):
    counts, keys = Counter(), {}
    for fmt in formats:
        for key, reason in manifest["formats"][fmt]["bad"].items():
            counts[reason] += 1
            keys.setdefault(reason, []).append(key)
    return dict(counts), {reason: sorted(k) for reason, k in keys.items()}


def test_every_bad_record_counted_every_good_one_delivered(ray_session, corrupt_data, tmp_path):
    root, manifest = corrupt_data
    assert manifest["corrupt_fraction"] == 0.2
    # Weights are shares of trained samples; a COYO pair or an OpenVid clip gives two (both ways): weight 2 reads every record once.
    sources = ", ".join(f"{f}: {{format: {f}, path: {p}, weight: {2 if f.startswith('coyo') or f == 'openvid' else 1}}}" for f, p in PATHS.items())
    config = load_config(None, [f"data.root={root}", f"output_dir={tmp_path}", f"data.lm_sources={{{sources}}}"])

    rows = decoded_dataset(config, stats_group="corrupt-lm").take_all()

    counts, keys = _expected(manifest, FORMATS)
    stats = data_stats("corrupt-lm")
    assert stats["skipped"] == counts  # exactly the writer's reasons, nothing else
    assert {r: sorted(k) for r, k in stats["skipped_keys"].items()} == keys
    # An MMC4 document that lost one of several images keeps the others (its missing one is counted).
    kept = _mmc4_kept_without_an_image(root, manifest)
    assert kept, "the corrupt set has no multi-image document with a missing image"
    for fmt in FORMATS:
        delivered = [r["key"] for r in rows if r["source"] == fmt]
        bad = {k: v for k, v in manifest["formats"][fmt]["bad"].items() if fmt != "mmc4" or k not in kept}
        assert len(delivered) == len(set(delivered)) == manifest["formats"][fmt]["records"] - len(bad), fmt
        assert not set(delivered) & set(bad), f"{fmt}: a bad record was delivered"
        assert stats["samples"][fmt] == len(delivered)
    for row in rows:
        if row["key"] in kept:
            assert row["num_images"] == kept[row["key"]] - 1 == len(row["media_slots"]) and row["notes"], row["key"]


def _mmc4_kept_without_an_image(root, manifest) -> dict[str, int]:
    """{document key: its images} of the MMC4 documents that miss one of two or more images."""
    missing = {k for k, reason in manifest["formats"]["mmc4"]["bad"].items() if reason == "missing_file"}
    out = {}
    for name in manifest["formats"]["mmc4"]["files"]:
        for line in (Path(root) / name).read_text().splitlines():
            doc = json.loads(line)
            key = doc["url"].rsplit("/", 1)[-1]
            if key in missing and len(doc["image_info"]) > 1:
                out[key] = len(doc["image_info"])
    return out


def test_tower_pipeline_skips_the_same_records(ray_session, corrupt_data, tmp_path):
    root, manifest = corrupt_data
    config = load_config(None, [f"data.root={root}", f"output_dir={tmp_path}"])  # tiny preset: both COYO layouts
    rows = build_tower_dataset(config, with_keys=True, stats_group="corrupt-tower").take_all()

    counts, _ = _expected(manifest, ("coyo_parquet", "coyo_webdataset"))
    assert skip_counts("corrupt-tower") == counts
    bad = manifest["formats"]["coyo_parquet"]["bad"]
    for fmt in ("coyo_parquet", "coyo_webdataset"):
        delivered = sorted(r["key"] for r in rows if r["source"] == fmt)
        assert len(delivered) == manifest["samples"] - len(bad) and not set(delivered) & set(bad)
