"""Decoding and reading, record by record (no Ray): what the pipelines are built from."""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestration.data.decode import SkipRecord, decode_image, decode_video, frame_indices, resize_center_crop
from orchestration.data.records import (
    KIND_FAULT,
    FaultLedger,
    ReadUnit,
    iter_records,
    read_unit_tables,
    reading_with,
    with_retries,
)
from orchestration.data.stats import BAD_ENTRY, BAD_LINE, MISSING_ID, UNREADABLE_SHARD
from orchestration.data.synthetic import (
    NOT_AN_IMAGE,
    TRUNCATED_IMAGE,
    UNDECODABLE_VIDEO,
    ZERO_FRAMES,
    jpeg_bytes,
    write_mp4,
)


def _frames(n: int, size: int = 64) -> np.ndarray:
    # Frame t is filled with the grey level 20 * (t + 1), so a decoded frame tells which one it is.
    return np.stack([np.full((size, size, 3), 20 * (t + 1), dtype=np.uint8) for t in range(n)])


def test_image_resize_and_centre_crop_keep_the_middle():
    wide = np.zeros((40, 80, 3), dtype=np.uint8)
    wide[:, 20:60] = 255  # a white middle square on black sides
    out = decode_image(jpeg_bytes(wide, quality=95), 20)
    assert out.shape == (3, 20, 20) and out.dtype == np.uint8
    assert out.min() > 200  # only the white middle survives the crop
    tall = resize_center_crop(Image.new("RGB", (30, 90)), 16)
    assert tall.size == (16, 16)


def test_bad_images_are_classified():
    good = jpeg_bytes(np.full((64, 64, 3), 128, dtype=np.uint8))
    with pytest.raises(SkipRecord) as err:
        decode_image(good[: len(good) // 2], 32)
    assert err.value.reason == TRUNCATED_IMAGE
    with pytest.raises(SkipRecord) as err:
        decode_image(b"<html>404</html>", 32)
    assert err.value.reason == NOT_AN_IMAGE


def test_video_takes_evenly_spaced_frames_and_pads_short_clips(tmp_path):
    assert frame_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 15]
    assert frame_indices(5, 8) == [0, 1, 2, 3, 4]

    write_mp4(tmp_path / "long.mp4", _frames(11))
    clip = decode_video((tmp_path / "long.mp4").read_bytes(), 32)
    assert clip.shape == (8, 3, 32, 32)
    levels = clip.reshape(8, -1).mean(axis=1)
    expected = [20 * (i + 1) for i in frame_indices(11, 8)]
    np.testing.assert_allclose(levels, expected, atol=4)  # H.264 is lossy

    write_mp4(tmp_path / "short.mp4", _frames(5))
    clip = decode_video((tmp_path / "short.mp4").read_bytes(), 32)
    levels = clip.reshape(8, -1).mean(axis=1)
    np.testing.assert_allclose(levels[:5], [20, 40, 60, 80, 100], atol=4)
    assert (clip[5:] == 0).all()  # padded with black frames


def test_bad_videos_are_classified(tmp_path):
    write_mp4(tmp_path / "empty.mp4", np.zeros((0, 64, 64, 3), dtype=np.uint8))
    with pytest.raises(SkipRecord) as err:
        decode_video((tmp_path / "empty.mp4").read_bytes(), 32)
    assert err.value.reason == ZERO_FRAMES
    with pytest.raises(SkipRecord) as err:
        decode_video(b"\x00\x00\x00\x18ftypmp42" + bytes(512), 32)
    assert err.value.reason == UNDECODABLE_VIDEO


def test_unreadable_shards_become_one_counted_placeholder_and_are_recorded_by_name(tmp_path):
    """A shard in the wrong format is not a crash: one unreadable_shard placeholder where its records
    stop, and the ledger names the file and why; a second read (ledger loaded) does not open it."""
    bad_parquet = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"url": ["x"], "caption": ["y"]}), bad_parquet)
    not_a_tar = tmp_path / "00000.tar"
    not_a_tar.write_bytes(b"this is not a tar file" * 100)
    csv_file = tmp_path / "OpenVid-1M.csv"
    csv_file.write_text("name,text\na.mp4,hello\n")
    cases = {
        ReadUnit("s", "coyo_parquet", str(bad_parquet), ""): "part-00000.parquet: not an img2dataset parquet shard: missing key",
        ReadUnit("s", "coyo_webdataset", str(not_a_tar), ""): "00000.tar",
        ReadUnit("s", "openvid", str(csv_file), ""): "OpenVid-1M.csv: not an OpenVid-1M CSV: missing column",
    }
    ledger = FaultLedger(str(tmp_path / "run"), None)
    with reading_with(ledger):
        for unit in cases:
            (record,) = list(iter_records(unit, None))
            assert (record["kind"], record["text"], record["origin"]) == (KIND_FAULT, UNREADABLE_SHARD, f"{unit.uri}#0")
    recorded = {e["shard"]: e for e in FaultLedger(str(tmp_path / "run"), None).entries()}
    assert set(recorded) == {u.uri for u in cases}
    for unit, message in cases.items():
        assert recorded[unit.uri]["readable_records"] == 0 and message in recorded[unit.uri]["error"], recorded[unit.uri]
        os.remove(unit.uri)  # a restart reads the ledger and never opens these again
    with reading_with(FaultLedger.load(str(tmp_path / "run"), None)):
        assert [r["text"] for u in cases for r in iter_records(u, None)] == [UNREADABLE_SHARD] * 3


def test_bad_lines_and_entries_are_placeholders_in_their_place(tmp_path):
    doc = {"url": "https://x/a", "text_list": ["t"], "image_info": []}
    jsonl = tmp_path / "docs_shard_00000_v2.jsonl"
    jsonl.write_text(json.dumps(doc) + "\n{not json\n" + json.dumps({"url": "u"}) + "\n\n" + json.dumps(doc) + "\n")
    got = [(r["kind"], r["text"] if r["kind"] == KIND_FAULT else r["key"], r["origin"])
           for r in iter_records(ReadUnit("m", "mmc4", str(jsonl), ""), None)]
    assert got == [("interleaved", "a", f"{jsonl}#0"), (KIND_FAULT, BAD_LINE, f"{jsonl}#1"),
                   (KIND_FAULT, BAD_LINE, f"{jsonl}#2"), ("interleaved", "a", f"{jsonl}#3")]
    entries = [{"id": "a", "conversations": []}, {"conversations": []}, "text", {"id": "b", "conversations": []}]
    index = tmp_path / "sharegpt4v.json"
    index.write_text(json.dumps(entries))
    got = [r["text"] if r["kind"] == KIND_FAULT else r["key"] for r in iter_records(ReadUnit("s", "sharegpt4v", str(index), ""), None)]
    assert got == ["a", MISSING_ID, BAD_ENTRY, "b"]
    # A record range counts offsets in the whole file: the placeholders keep the others in place.
    ranged = ReadUnit("s", "sharegpt4v", str(index), "", records=(1, 3))
    assert [r["origin"] for r in iter_records(ranged, None)] == [f"{index}#1", f"{index}#2"]


def test_a_truncated_tar_keeps_its_readable_records_and_a_restart_reads_no_further(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(6):
            for ext, data in (("jpg", bytes(3000)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    unit = ReadUnit("coyo", "coyo_webdataset", str(path), "")
    with reading_with(FaultLedger(str(tmp_path / "run"), None)):
        first = [(r["key"], r["kind"]) for r in iter_records(unit, None)]
    readable = len(first) - 1
    assert 0 < readable < 6 and first[-1] == (f"00000.tar@{readable}", KIND_FAULT)
    (entry,) = FaultLedger(str(tmp_path / "run"), None).entries()
    assert entry["readable_records"] == readable
    with reading_with(FaultLedger.load(str(tmp_path / "run"), None)):
        assert [(r["key"], r["kind"]) for r in iter_records(unit, None)] == first
        # split at record offsets, the placeholder is in exactly one piece
        pieces = [[r["origin"] for t in read_unit_tables(unit, None, start=a, stop=b) for r in t.to_pylist()]
                  for a, b in ((0, 2), (2, None))]
    assert pieces[0] + pieces[1] == [f"{path}#{i}" for i in range(readable + 1)]


def test_webdataset_groups_members_by_key(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for key, caption in (("000000001", "a red circle"), ("000000002", "")):
            for ext, data in (("jpg", b"jpegbytes"), ("txt", caption.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    records = list(iter_records(ReadUnit("coyo", "coyo_webdataset", str(path), ""), None))
    assert [(r["key"], r["text"], r["media"]) for r in records] == [
        ("000000001", "a red circle", [b"jpegbytes"]),
        ("000000002", "", [b"jpegbytes"]),
    ]


def test_transient_errors_are_retried_but_missing_files_are_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return b"ok"

    assert with_retries(flaky, "s3://bucket/x", base_delay=0.001) == b"ok" and len(calls) == 3

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://bucket/y")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        with_retries(missing, "s3://bucket/y", base_delay=0.001)
    assert len(calls) == 1


def test_columnar_parquet_reader_matches_the_record_reader(tmp_path):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"key": ["1", "2", "3", "4"], "jpg": [b"abc", None, b"", b"def"], "caption": ["x", None, "z", "w"]}), path)
    unit = ReadUnit("coyo", "coyo_parquet", str(path), "", repeat=2.5)  # records once each: passes are the mixer's
    columnar = pa.concat_tables(list(read_unit_tables(unit, None))).to_pylist()
    assert columnar == list(iter_records(unit, None))
    once = list(iter_records(ReadUnit("coyo", "coyo_parquet", str(path), ""), None))
    assert [(r["key"], r["text"], r["media"]) for r in once] == [("1", "x", [b"abc"]), ("2", "", []), ("3", "z", []), ("4", "w", [b"def"])]


def test_a_record_range_reads_only_its_records_in_every_layout(tmp_path):
    """The mixer splits units at record offsets (a window holds every source in its share): [start,
    stop) of a unit gives exactly those records, for parquet row-group ranges and line-based shards."""
    path = tmp_path / "part-00000.parquet"
    keys = [f"{i:03d}" for i in range(50)]
    pq.write_table(pa.table({"key": keys, "jpg": [b"x"] * 50, "caption": keys}), path, row_group_size=8)
    groups = ReadUnit("coyo", "coyo_parquet", str(path), "", row_groups=(1, 5))  # rows 8..39
    jsonl = tmp_path / "docs_shard_0_v2.jsonl"
    jsonl.write_text("".join(json.dumps({"url": f"https://x/{k}", "text_list": [k], "image_info": []}) + "\n" for k in keys))
    lines = ReadUnit("mmc4", "mmc4", str(jsonl), "")
    for unit, whole in ((groups, keys[8:40]), (lines, keys)):
        for start, stop in ((0, None), (3, 11), (7, 8), (10, None), (30, 45), (40, 40), (60, None)):
            got = [r["key"] for t in read_unit_tables(unit, None, chunk_rows=5, start=start, stop=stop) for r in t.to_pylist()]
            assert got == whole[start:stop], (unit.format, start, stop)


def test_decoding_tower_records_never_loads_torch_or_the_tower_tokenizer():
    """The many Ray Data processes that decode stage-1 records stay light: the captions are tokenized
    by the trainer (with_text_tokens), so a decode process imports neither torch nor open_clip."""
    script = textwrap.dedent('''
        import io, sys
        import numpy as np, pyarrow as pa
        from PIL import Image
        from orchestration.data.epochs import STREAM_SCHEMA
        from orchestration.data.tower_data import decode_tower_block
        from vilau_model.config import get_tower_config

        jpeg = io.BytesIO()
        Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(jpeg, format="JPEG")
        record = {"key": "k0", "source": "coyo", "kind": "image_text", "text": "a red circle", "media": [jpeg.getvalue()],
                  "media_uris": [], "media_slots": [], "sample_id": 0, "done_parts": []}
        block = pa.Table.from_pylist([record], schema=STREAM_SCHEMA)
        out = list(decode_tower_block(block, rows=8, group=None, tower=get_tower_config("tiny"), s3=None, with_keys=False, track=True))
        assert out[0]["pixels"].shape == (1, 3, 32, 32) and list(out[0]["caption"]) == ["a red circle"], out
        print(sorted(m for m in ("torch", "open_clip", "transformers") if m in sys.modules))
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_media_fetch_failing_past_its_retries_is_queued_again_not_counted_as_bad():
    from orchestration.data.decode import decode_counted
    from orchestration.data.stats import RETRIED, Tally, parse_skip_entry

    record = {"key": "k", "source": "share", "kind": "conversation", "origin": "index.json#4", "notes": [],
              "text": json.dumps([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red circle"}]),
              "media": [], "media_uris": ["s3://b/k.jpg"], "media_slots": [], "sample_id": 5}
    image = jpeg_bytes(_frames(1)[0])
    failures = {"left": 2}

    def flaky(uri):
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionResetError("connection reset by peer")
        return image

    tally = Tally(None)
    pixels = decode_counted(dict(record), 32, flaky, tally, requeue_delay_s=0.001)
    assert pixels.shape == (1, 3, 32, 32) and tally.skipped == [] and tally.samples == {"share": 1}
    kept = dict(record)
    failures["left"] = 2
    decode_counted(kept, 32, flaky, Tally(None), requeue_delay_s=0.001)
    assert [parse_skip_entry(n).reason for n in kept["notes"]] == [RETRIED, RETRIED]

    def down(uri):
        raise ConnectionResetError("connection reset by peer")

    with pytest.raises(ConnectionResetError):  # an outage stops the task: nothing is dropped as bad data
        decode_counted(dict(record), 32, down, tally, requeue_delay_s=0.001)
    assert tally.skipped == []


def test_a_missing_image_costs_an_mmc4_document_only_that_image(tmp_path):
    from orchestration.data.decode import decode_counted
    from orchestration.data.stats import MISSING_FILE, Tally, parse_skip_entry

    for i in (0, 2):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(_frames(1)[0]))
    record = {"key": "doc", "source": "mmc4", "kind": "interleaved", "origin": "shard.jsonl#7", "notes": [],
              "text": json.dumps(["one", "two", "three", "four"]), "media": [],
              "media_uris": [str(tmp_path / f"{i}.jpg") for i in range(3)], "media_slots": [0, 1, 3], "sample_id": 9}
    tally = Tally(None)
    pixels = decode_counted(record, 32, lambda uri: Path(uri).read_bytes(), tally)
    assert pixels.shape == (2, 3, 32, 32) and record["media_slots"] == [0, 3] and tally.skipped == []
    (note,) = [parse_skip_entry(n) for n in record["notes"]]
    assert (note.reason, note.origin, note.done) == (MISSING_FILE, "shard.jsonl#7/image1", -1)
    gone = dict(record, media_uris=[str(tmp_path / "1.jpg")], media_slots=[1], notes=[])
    assert decode_counted(gone, 32, lambda uri: Path(uri).read_bytes(), tally) is None  # no image left: dropped
    (drop,) = [parse_skip_entry(e) for e in tally.skipped]
    assert (drop.reason, drop.origin, drop.done) == (MISSING_FILE, "shard.jsonl#7", 9 << 4)
