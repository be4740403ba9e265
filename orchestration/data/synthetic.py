"""Synthetic shards in each dataset's real on-disk format.

The embedded default and the tests train on these. Images are generated scenes (see `scenes.py`) whose
captions describe them. With ``corrupt_fraction > 0`` bad records of the kinds a real crawl has are mixed
in, and ``manifest.json`` lists exactly which records are bad and why, so readers can be checked against it.

Layout under the output directory::

    manifest.json                      record counts per format, the bad records and their reasons
    coyo/parquet/part-00000.parquet    img2dataset parquet: jpg bytes, key, caption, url, width, height,
                                       status, ... plus COYO's metadata columns (id, text, clip_similarity_*, ...)
    coyo/webdataset/00000.tar          img2dataset webdataset: KEY.jpg, KEY.txt, KEY.json
    mmc4/docs_shard_00000_v2.jsonl     MMC4 documents: url, text_list, image_info[], similarity_matrix
    mmc4/images/<image_name>           the documents' images, beside the jsonl
    openvid/OpenVid-1M.csv             OpenVid-1M's CSV with its real header
    openvid/videos/<video>             the clips, real mp4 (H.264) files
    sharegpt4v/sharegpt4v_instruct.json  LLaVA-style list: id, image, conversations[{from, value}]
    sharegpt4v/images/<file>.jpg
    eval/eval.parquet                  held-back labelled split: jpg, caption, label, class_name
    eval/clips.parquet                 held-back labelled clips (OpenVid-style): mp4 bytes, key, caption,
                                       label, class_name (the moving shape's class)
    eval/classes.json                  class names, index = label
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from orchestration.data import scenes
from orchestration.data.stats import (  # why a record is bad: the decoders' vocabulary
    EMPTY_CAPTION,
    MISSING_FILE,
    NOT_AN_IMAGE,
    TRUNCATED_IMAGE,
    UNDECODABLE_VIDEO,
    ZERO_FRAMES,
)


IMAGE_SIZE = 64
VIDEO_FPS = 8
OPENVID_HEADER = [
    "video",
    "caption",
    "aesthetic score",
    "motion score",
    "temporal consistency score",
    "camera motion",
    "frame",
    "fps",
    "seconds",
]

FORMATS = ("coyo_parquet", "coyo_webdataset", "mmc4", "openvid", "sharegpt4v")


@dataclass
class FormatManifest:
    records: int = 0
    files: list[str] = field(default_factory=list)
    bad: dict[str, str] = field(default_factory=dict)  # record key -> reason


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _corrupt_image(good: bytes, reason: str, rng: np.random.Generator) -> bytes:
    if reason == TRUNCATED_IMAGE:
        # A download cut short inside the image data: the header stays whole (cut before the
        # start-of-scan marker, a small JPEG is no longer recognized as one at all).
        start_of_scan = good.find(b"\xff\xda")
        return good[: start_of_scan + (len(good) - start_of_scan) // 2] if start_of_scan > 0 else good[: len(good) // 2]
    if reason == NOT_AN_IMAGE:
        return b"<html><body>404 Not Found</body></html>" + rng.bytes(16)
    return good


def _pick_reason(rng: np.random.Generator, fraction: float, reasons: tuple[str, ...]) -> str | None:
    if fraction <= 0 or rng.random() >= fraction:
        return None
    return reasons[int(rng.integers(len(reasons)))]


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int = VIDEO_FPS) -> None:
    """Encode uint8 [T,H,W,3] frames as an H.264 mp4. T may be 0 (a container with no frames)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = (frames.shape[1], frames.shape[2]) if len(frames) else (IMAGE_SIZE, IMAGE_SIZE)
        stream.pix_fmt = "yuv420p"
        container.start_encoding()  # writes the header even when no frame follows
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------- COYO (img2dataset output)


def _coyo_records(n: int, rng: np.random.Generator, corrupt_fraction: float) -> tuple[list[dict], dict[str, str]]:
    records, bad = [], {}
    for i in range(n):
        pixels, caption, _ = scenes.render_scene(rng, IMAGE_SIZE)
        key = f"{i:09d}"
        image = jpeg_bytes(pixels)
        reason = _pick_reason(rng, corrupt_fraction, (TRUNCATED_IMAGE, NOT_AN_IMAGE, EMPTY_CAPTION))
        if reason == EMPTY_CAPTION:
            caption = ""
        elif reason is not None:
            image = _corrupt_image(image, reason, rng)
        if reason is not None:
            bad[key] = reason
        records.append(
            {
                "jpg": image,
                "key": key,
                "caption": caption,
                "url": f"https://images.example.com/coyo/{key}.jpg",
                "width": IMAGE_SIZE,
                "height": IMAGE_SIZE,
                "original_width": IMAGE_SIZE * 4,
                "original_height": IMAGE_SIZE * 4,
                "status": "success",
                "error_message": None,
                "sha256": None,
                # COYO-700M's own columns, carried through img2dataset's save_additional_columns.
                "id": int(rng.integers(1 << 40)),
                "text": caption,
                "image_phash": f"{int(rng.integers(1 << 62)):016x}",
                "text_length": len(caption),
                "word_count": len(caption.split()),
                "num_tokens_bert": len(caption.split()) + 2,
                "num_tokens_gpt": len(caption.split()) + 1,
                "num_faces": 0,
                "clip_similarity_vitb32": float(rng.uniform(0.25, 0.4)),
                "clip_similarity_vitl14": float(rng.uniform(0.25, 0.4)),
                "nsfw_score_opennsfw2": float(rng.uniform(0, 0.05)),
                "nsfw_score_gantman": float(rng.uniform(0, 0.05)),
                "watermark_score": float(rng.uniform(0, 0.2)),
                "aesthetic_score_laion_v2": float(rng.uniform(4, 6)),
            }
        )
    return records, bad


def _write_coyo_parquet(records: list[dict], out: Path, shard_size: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for shard, start in enumerate(range(0, len(records), shard_size)):
        path = out / f"part-{shard:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(records[start : start + shard_size]), path)
        files.append(str(path))
    return files


def _add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_coyo_webdataset(records: list[dict], out: Path, shard_size: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for shard, start in enumerate(range(0, len(records), shard_size)):
        path = out / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for record in records[start : start + shard_size]:
                key = record["key"]
                meta = {k: v for k, v in record.items() if k != "jpg"}
                _add_tar_member(tar, f"{key}.jpg", record["jpg"])
                _add_tar_member(tar, f"{key}.txt", record["caption"].encode())
                _add_tar_member(tar, f"{key}.json", json.dumps(meta).encode())
        files.append(str(path))
    return files


# ---------------------------------------------------------------- MMC4


def _write_mmc4(n: int, rng: np.random.Generator, corrupt_fraction: float, out: Path, shard_size: int) -> FormatManifest:
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    manifest = FormatManifest(records=n)
    documents = []
    for i in range(n):
        doc_key = f"mmc4-{i:06d}"
        num_sentences = int(rng.integers(3, 7))
        num_images = int(rng.integers(1, min(3, num_sentences) + 1))
        matched = sorted(rng.choice(num_sentences, size=num_images, replace=False).tolist())
        text_list, image_info = [], []
        for s in range(num_sentences):
            if s in matched:
                pixels, caption, _ = scenes.render_scene(rng, IMAGE_SIZE)
                name = f"{doc_key}-{len(image_info)}.jpg"
                text_list.append(f"Here we see {caption[len('a photo of '):]}.")
                image_info.append(
                    {
                        "image_name": name,
                        "raw_url": f"https://images.example.com/mmc4/{name}",
                        "matched_text_index": s,
                        "matched_sim": float(rng.uniform(0.2, 0.35)),
                    }
                )
                (images_dir / name).write_bytes(jpeg_bytes(pixels))
            else:
                text_list.append(f"Sentence {s} of document {i} talks about simple shapes.")
        reason = _pick_reason(rng, corrupt_fraction, (MISSING_FILE, TRUNCATED_IMAGE))
        if reason == MISSING_FILE:
            (images_dir / image_info[0]["image_name"]).unlink()
        elif reason == TRUNCATED_IMAGE:
            path = images_dir / image_info[0]["image_name"]
            path.write_bytes(_corrupt_image(path.read_bytes(), reason, rng))
        if reason is not None:
            manifest.bad[doc_key] = reason
        similarity = rng.uniform(0.1, 0.2, size=(num_images, num_sentences))
        for row, info in enumerate(image_info):
            similarity[row, info["matched_text_index"]] = info["matched_sim"]
        documents.append(
            {
                "url": f"https://www.example.com/articles/{doc_key}",
                "text_list": text_list,
                "image_info": image_info,
                "similarity_matrix": similarity.round(4).tolist(),
                "could_have_url_duplicate": 0,
            }
        )
    for shard, start in enumerate(range(0, n, shard_size)):
        path = out / f"docs_shard_{shard:05d}_v2.jsonl"
        with open(path, "w") as f:
            for doc in documents[start : start + shard_size]:
                f.write(json.dumps(doc) + "\n")
        manifest.files.append(str(path))
    return manifest


# ---------------------------------------------------------------- OpenVid-1M


def _write_openvid(n: int, rng: np.random.Generator, corrupt_fraction: float, out: Path) -> FormatManifest:
    videos_dir = out / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    manifest = FormatManifest(records=n)
    rows = []
    for i in range(n):
        name = f"openvid_{i:06d}.mp4"
        # Some clips are shorter than the 8 frames a sample takes, so readers must pad them.
        num_frames = int(rng.integers(5, 20))
        frames, caption = scenes.render_clip(rng, num_frames, IMAGE_SIZE)
        reason = _pick_reason(rng, corrupt_fraction, (MISSING_FILE, ZERO_FRAMES, UNDECODABLE_VIDEO))
        path = videos_dir / name
        if reason is None:
            write_mp4(path, frames)
        elif reason == ZERO_FRAMES:
            write_mp4(path, frames[:0])
        elif reason == UNDECODABLE_VIDEO:
            path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + rng.bytes(512))
        if reason is not None:
            manifest.bad[name] = reason
        rows.append(
            [
                name,
                caption,
                round(float(rng.uniform(4, 6)), 4),
                round(float(rng.uniform(0, 10)), 4),
                round(float(rng.uniform(0.9, 1.0)), 4),
                "static",
                num_frames,
                VIDEO_FPS,
                round(num_frames / VIDEO_FPS, 4),
            ]
        )
    csv_path = out / "OpenVid-1M.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(OPENVID_HEADER)
        writer.writerows(rows)
    manifest.files.append(str(csv_path))
    return manifest


# ---------------------------------------------------------------- ShareGPT4V


def _write_sharegpt4v(n: int, rng: np.random.Generator, corrupt_fraction: float, out: Path) -> FormatManifest:
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    manifest = FormatManifest(records=n)
    entries = []
    for i in range(n):
        pixels, caption, _ = scenes.render_scene(rng, IMAGE_SIZE)
        sample_id = f"sharegpt4v-{i:06d}"
        image_name = f"{sample_id}.jpg"
        answer = f"The image shows {caption[len('a photo of '):]}, drawn on a plain light background."
        reason = _pick_reason(rng, corrupt_fraction, (MISSING_FILE, TRUNCATED_IMAGE, EMPTY_CAPTION))
        image = jpeg_bytes(pixels)
        if reason == EMPTY_CAPTION:
            answer = ""
        elif reason == TRUNCATED_IMAGE:
            image = _corrupt_image(image, reason, rng)
        if reason != MISSING_FILE:
            (images_dir / image_name).write_bytes(image)
        if reason is not None:
            manifest.bad[sample_id] = reason
        entries.append(
            {
                "id": sample_id,
                # LLaVA convention: the image path is relative to the dataset's image folder.
                "image": f"images/{image_name}",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe this image in detail."},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    path = out / "sharegpt4v_instruct.json"
    path.write_text(json.dumps(entries, indent=1))
    manifest.files.append(str(path))
    return manifest


# ---------------------------------------------------------------- eval split


def _write_eval(n: int, rng: np.random.Generator, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    names = scenes.class_names()
    for i in range(n):
        pixels, caption, label = scenes.render_scene(rng, IMAGE_SIZE)
        rows.append({"jpg": jpeg_bytes(pixels), "key": f"eval-{i:06d}", "caption": caption, "label": label, "class_name": names[label]})
    path = out / "eval.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    (out / "classes.json").write_text(json.dumps(names))
    return str(path)


def _write_eval_clips(n: int, rng: np.random.Generator, out: Path) -> str:
    """Held-back clips (8 frames, as training takes them), labelled by the class of the moving shape."""
    import tempfile

    names = scenes.class_names()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            frames, caption = scenes.render_clip(rng, 8, IMAGE_SIZE)
            class_name = " ".join(caption.split()[1:3])  # "a <colour> <shape> moving <direction>"
            path = Path(tmp) / f"clip-{i:06d}.mp4"
            write_mp4(path, frames)
            rows.append({"mp4": path.read_bytes(), "key": f"eval-clip-{i:06d}", "caption": caption,
                         "label": names.index(class_name), "class_name": class_name})
    path = out / "clips.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


# ---------------------------------------------------------------- entry point


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    samples: int = 64,
    seed: int = 0,
    corrupt_fraction: float = 0.0,
    eval_samples: int = 64,
    shard_size: int = 32,
    video_samples: int | None = None,
    eval_clips: int = 16,
) -> dict:
    """Write every format under ``out_dir`` and return the manifest (also saved as manifest.json).

    ``samples`` records per format (MMC4 documents, OpenVid clips and ShareGPT4V entries included;
    ``video_samples`` can make the clips fewer, since they take longest to encode).
    """
    if samples <= 0:
        raise ValueError(f"samples must be positive, got {samples}")
    if not 0.0 <= corrupt_fraction < 1.0:
        raise ValueError(f"corrupt_fraction must be in [0, 1), got {corrupt_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Marks the folder as ours while it fills (the manifest, written last, replaces the mark): a run
    # killed half-way may regenerate here, and nothing else may (see synthetic_folder_state).
    (out / IN_PROGRESS_MARK).write_text("generated shards being written by vilau\n")
    # One generator per format, so adding records to one format leaves the others unchanged.
    rngs = {name: np.random.default_rng([seed, i]) for i, name in enumerate(FORMATS + ("eval",))}

    coyo_records, coyo_bad = _coyo_records(samples, rngs["coyo_parquet"], corrupt_fraction)
    formats = {
        "coyo_parquet": FormatManifest(samples, _write_coyo_parquet(coyo_records, out / "coyo" / "parquet", shard_size), coyo_bad),
        "coyo_webdataset": FormatManifest(
            samples, _write_coyo_webdataset(coyo_records, out / "coyo" / "webdataset", shard_size), dict(coyo_bad)
        ),
        "mmc4": _write_mmc4(samples, rngs["mmc4"], corrupt_fraction, out / "mmc4", shard_size),
        "openvid": _write_openvid(video_samples or samples, rngs["openvid"], corrupt_fraction, out / "openvid"),
        "sharegpt4v": _write_sharegpt4v(samples, rngs["sharegpt4v"], corrupt_fraction, out / "sharegpt4v"),
    }
    eval_path = _write_eval(eval_samples, rngs["eval"], out / "eval")
    # a generator of their own: the held-back images stay what they were before clips were added
    clips_path = _write_eval_clips(eval_clips, np.random.default_rng([seed, len(FORMATS) + 1]), out / "eval") if eval_clips else None
    manifest = {
        "generator": GENERATOR,
        "seed": seed,
        "samples": samples,
        "corrupt_fraction": corrupt_fraction,
        "image_size": IMAGE_SIZE,
        "eval": {"records": eval_samples, "file": os.path.relpath(eval_path, out), "classes": scenes.class_names(),
                 "clips": eval_clips, "clips_file": os.path.relpath(clips_path, out) if clips_path else None},
        "formats": {
            name: {
                "records": m.records,
                "files": [os.path.relpath(f, out) for f in m.files],
                "bad": m.bad,
            }
            for name, m in formats.items()
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (out / IN_PROGRESS_MARK).unlink(missing_ok=True)
    return manifest


# Who wrote a manifest.json: only folders whose manifest says so are ever (re)generated into.
GENERATOR = "vilau.synthetic"
IN_PROGRESS_MARK = ".vilau-synthetic-in-progress"


def synthetic_folder_state(out_dir: str | os.PathLike) -> str:
    """What a folder is to the generator: "absent" (missing or empty), "complete" (a synthetic
    manifest), "partial" (a generation that did not finish) or "foreign" (anything else: never written to)."""
    out = Path(out_dir)
    if not out.exists():
        return "absent"
    if not out.is_dir():
        return "foreign"
    if not any(out.iterdir()):
        return "absent"
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            return "foreign"
        # Manifests written before the generator field have exactly this shape.
        if isinstance(data, dict) and (data.get("generator") == GENERATOR or {"seed", "samples", "formats", "eval"} <= data.keys()):
            return "complete"
        return "foreign"
    return "partial" if (out / IN_PROGRESS_MARK).is_file() else "foreign"


def ensure_synthetic_dataset(out_dir: str | os.PathLike, **kwargs) -> dict:
    """Make the dataset unless a complete one is already there. Refuses (ValueError) a folder that
    holds anything the generator did not write: generated shards would overwrite real ones."""
    state = synthetic_folder_state(out_dir)
    if state == "complete":
        return json.loads((Path(out_dir) / "manifest.json").read_text())
    if state == "foreign":
        raise ValueError(f"{out_dir} holds files that are not generated shards (no synthetic manifest.json)")
    return make_synthetic_dataset(out_dir, **kwargs)
