"""Synthetic shards: every format written as the public dataset ships it, readable by the real libraries."""

import csv
import json
import os
import subprocess
import sys
import tarfile

import av
import pyarrow.parquet as pq

from orchestration.data.synthetic import OPENVID_HEADER
from orchestration.storage import filesystem, list_files, pyarrow_filesystem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_writes_all_four_formats(tmp_path):
    out = tmp_path / "shards"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "jobs", "make_synthetic_data.py"), "--out", str(out), "--samples", "64"],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(result.stdout)
    assert set(summary["formats"]) == {"coyo_parquet", "coyo_webdataset", "mmc4", "openvid", "sharegpt4v"}

    # COYO parquet (img2dataset layout) reads with pyarrow.
    table = pq.ParquetDataset(str(out / "coyo" / "parquet")).read()
    assert table.num_rows == 64
    for column in ("jpg", "key", "caption", "url", "width", "height", "text", "clip_similarity_vitb32", "aesthetic_score_laion_v2"):
        assert column in table.column_names
    # COYO webdataset tars list KEY.jpg / KEY.txt / KEY.json triples.
    names = []
    for tar_path in sorted((out / "coyo" / "webdataset").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            names += tar.getnames()
    assert len(names) == 3 * 64
    assert {n.rsplit(".", 1)[1] for n in names} == {"jpg", "txt", "json"}
    # MMC4 documents with images beside them.
    docs = [json.loads(line) for p in sorted((out / "mmc4").glob("*.jsonl")) for line in open(p)]
    assert len(docs) == 64
    for doc in docs:
        assert set(doc) >= {"url", "text_list", "image_info", "similarity_matrix"}
        for info in doc["image_info"]:
            assert set(info) == {"image_name", "raw_url", "matched_text_index", "matched_sim"}
            assert (out / "mmc4" / "images" / info["image_name"]).is_file()
    # ShareGPT4V: LLaVA-style list.
    entries = json.loads((out / "sharegpt4v" / "sharegpt4v_instruct.json").read_text())
    assert len(entries) == 64 and [t["from"] for t in entries[0]["conversations"]] == ["human", "gpt"]
    # OpenVid: the real header, and every mp4 decodes to the frame count the CSV states.
    with open(out / "openvid" / "OpenVid-1M.csv", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == OPENVID_HEADER
        rows = list(reader)
    assert len(rows) == 64
    for row in rows:
        record = dict(zip(OPENVID_HEADER, row))
        with av.open(str(out / "openvid" / "videos" / record["video"])) as container:
            assert sum(1 for _ in container.decode(video=0)) == int(record["frame"])


def test_corrupt_fraction_is_recorded_in_the_manifest(corrupt_data):
    root, manifest = corrupt_data
    reasons = set()
    for name, fmt in manifest["formats"].items():
        assert 0 < len(fmt["bad"]) < fmt["records"], name
        reasons |= set(fmt["bad"].values())
    assert reasons == {"truncated_image", "not_an_image", "empty_caption", "missing_file", "zero_frames", "undecodable_video"}
    # The manifest is exact: a missing file really is missing, an empty caption really is empty.
    table = pq.ParquetDataset(os.path.join(root, "coyo", "parquet")).read().to_pylist()
    by_key = {row["key"]: row for row in table}
    for key, reason in manifest["formats"]["coyo_parquet"]["bad"].items():
        if reason == "empty_caption":
            assert by_key[key]["caption"] == ""
    for video, reason in manifest["formats"]["openvid"]["bad"].items():
        assert os.path.exists(os.path.join(root, "openvid", "videos", video)) == (reason != "missing_file")


def test_shards_read_back_from_s3(s3_synthetic_data, s3_server, synthetic_data):
    uri, manifest = s3_synthetic_data
    local_root = synthetic_data[0]
    remote = list_files(uri, s3_server)
    local = list_files(local_root)
    assert [r[len(uri):] for r in remote] == [l[len(local_root):] for l in local]

    # pyarrow through the storage helper (what Ray Data uses) gives the same table as the local read.
    fs, path = pyarrow_filesystem(f"{uri}/coyo/parquet", s3_server)
    remote_table = pq.ParquetDataset(path, filesystem=fs).read()
    assert remote_table.equals(pq.ParquetDataset(os.path.join(local_root, "coyo", "parquet")).read())

    # fsspec (s3fs) gives the same bytes for a video and a tar.
    fs, _ = filesystem(uri, s3_server)
    for relative in ("openvid/videos/openvid_000000.mp4", "coyo/webdataset/00000.tar"):
        with fs.open(f"{uri}/{relative}"[len("s3://"):], "rb") as f:
            assert f.read() == open(os.path.join(local_root, relative), "rb").read()
