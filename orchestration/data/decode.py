"""Decoding: image bytes to RGB pixels at the tower's size, mp4 clips to 8 frames, records to samples.

Every way a record can be bad raises `SkipRecord(reason)`, the reason a name from stats.py's
vocabulary (listed and explained there; the synthetic writer uses it too). The Ray decode stages call
`decode_counted`, which drops the record and counts it under that reason (the readers' fault
placeholders included), and reads a record again when its media fetch fails transiently past its
retries (counted as ``retried``). An MMC4 document that misses some of its images keeps the others:
each missing one is a note on the record (counted with it, see stats.py).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

import time

from orchestration.data import records as records_module
from orchestration.data.records import (
    KIND_CONVERSATION,
    KIND_FAULT,
    KIND_IMAGE_TEXT,
    KIND_INTERLEAVED,
    KIND_VIDEO,
    is_transient,
)
from orchestration.data.stats import (  # the vocabulary of reasons lives with the counting
    DECODE_ERROR,
    EMPTY_CAPTION,
    RETRIED,
    MISSING_FILE,
    NOT_AN_IMAGE,
    TRUNCATED_IMAGE,
    UNDECODABLE_VIDEO,
    ZERO_FRAMES,
    Tally,
    skip_entry,
)

log = logging.getLogger(__name__)
FRAMES_PER_VIDEO = 8  # VILA-U: a video is 8 frames


class SkipRecord(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------- images


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic, as CLIP/SigLIP preprocess), then the centre ``size`` square."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_chw(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def decode_image(data: bytes | None, size: int) -> np.ndarray:
    """Image bytes -> uint8 [3, size, size] RGB."""
    if not data:
        raise SkipRecord(MISSING_FILE, "record has no image bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:  # no image format recognizes the bytes
        raise SkipRecord(NOT_AN_IMAGE, str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:  # recognized, but cut short inside its header
        raise SkipRecord(TRUNCATED_IMAGE, str(exc)) from None
    try:
        # JPEG only: let libjpeg decode at a reduced scale (never below size) when the source is big.
        image.draft("RGB", (size, size))
        image = image.convert("RGB")  # forces the full decode; truncated data fails here
    except (OSError, SyntaxError, ValueError) as exc:
        raise SkipRecord(TRUNCATED_IMAGE, str(exc)) from None
    return to_chw(resize_center_crop(image, size))


# ---------------------------------------------------------------- video


def frame_indices(total: int, num_frames: int = FRAMES_PER_VIDEO) -> list[int]:
    """Evenly spaced frame positions, as VILA's loader picks them (np.linspace, floored).

    A clip shorter than ``num_frames`` gives all its frames; `decode_video` pads the rest.
    """
    if total <= 0:
        return []
    if total < num_frames:
        return list(range(total))
    return np.linspace(0, total - 1, num_frames, dtype=int).tolist()


def decode_video(data: bytes | None, size: int, num_frames: int = FRAMES_PER_VIDEO) -> np.ndarray:
    """mp4 bytes -> uint8 [num_frames, 3, size, size]: evenly spaced frames, resized and centre-cropped.

    Short clips are padded with black frames at the end, as VILA-U's video loader pads them.
    """
    if not data:
        raise SkipRecord(MISSING_FILE, "record has no video bytes")
    try:
        container = av.open(io.BytesIO(data))
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise SkipRecord(UNDECODABLE_VIDEO, str(exc)) from None
    with container:
        if not container.streams.video:
            raise SkipRecord(ZERO_FRAMES, "container has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"

        def small(frame) -> np.ndarray:
            return to_chw(resize_center_crop(frame.to_image(), size))

        try:
            if stream.frames > 0:
                # The container states the frame count: convert only the chosen frames, stop after the last.
                wanted = frame_indices(stream.frames, num_frames)
                kept: dict[int, np.ndarray] = {}
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        kept[i] = small(frame)
                    if i >= wanted[-1]:
                        break
                chosen = [kept[i] for i in wanted if i in kept]
            else:
                # No count in the header: shrink every frame as it comes, then choose.
                everything = [small(frame) for frame in container.decode(stream)]
                chosen = [everything[i] for i in frame_indices(len(everything), num_frames)]
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            raise SkipRecord(UNDECODABLE_VIDEO, str(exc)) from None
    if not chosen:
        raise SkipRecord(ZERO_FRAMES, "no frame decoded")
    out = np.zeros((num_frames, 3, size, size), dtype=np.uint8)
    out[: len(chosen)] = np.stack(chosen)
    return out


# ---------------------------------------------------------------- records


def require_text(record: dict) -> None:
    """Raise empty_caption when the record has nothing to learn from."""
    kind, text = record["kind"], record["text"]
    if kind == KIND_INTERLEAVED:
        empty = not any(s.strip() for s in json.loads(text))
    elif kind == KIND_CONVERSATION:
        turns = json.loads(text)
        answers = [t.get("value", "") for t in turns if t.get("from") in ("gpt", "assistant")]
        empty = not answers or not any(a.strip() for a in answers)
    else:
        empty = not text.strip()
    if empty:
        raise SkipRecord(EMPTY_CAPTION)


def record_media(record: dict, fetch: Callable[[str], bytes]) -> list[bytes]:
    """The record's media bytes: inline, or fetched by URI (missing_file when a file is not there).

    An MMC4 document keeps the images that are there: each missing one is left out with its slot
    (``record["media_slots"]`` updated) and noted in ``record["notes"]``; only a document with none
    left is dropped."""
    if record["media"]:
        return list(record["media"])
    media, slots, missing = [], [], []
    for i, uri in enumerate(record["media_uris"]):
        try:
            media.append(fetch(uri))
            if record["kind"] == KIND_INTERLEAVED:
                slots.append(record["media_slots"][i])
        except FileNotFoundError:
            if record["kind"] != KIND_INTERLEAVED:
                raise SkipRecord(MISSING_FILE, uri) from None
            missing.append((i, uri))
    if missing:
        if not media:
            raise SkipRecord(MISSING_FILE, ", ".join(uri for _, uri in missing))
        record["media_slots"] = slots
        origin = record.get("origin") or f"{record['source']}/{record['key']}"
        record["notes"] = list(record.get("notes") or []) + [
            skip_entry(MISSING_FILE, record["source"], record["key"], f"{origin}/image{i}") for i, _ in missing
        ]
    return media


def decode_record(record: dict, size: int, fetch: Callable[[str], bytes], num_frames: int = FRAMES_PER_VIDEO) -> np.ndarray:
    """Check a normalized record and decode its media: uint8 [N, 3, size, size].

    N is 1 for an image-text pair, the number of images of an MMC4 document that are there (all of
    those must decode), 8 for a video, 0 or 1 for a conversation. Raises SkipRecord for a bad record
    (a reader's fault placeholder: its reason).
    """
    kind = record["kind"]
    if kind == KIND_FAULT:
        raise SkipRecord(record["text"], record.get("origin", ""))
    require_text(record)
    media = record_media(record, fetch)
    if kind == KIND_VIDEO:
        if len(media) != 1:
            raise SkipRecord(MISSING_FILE, "a video record needs exactly one clip")
        return decode_video(media[0], size, num_frames)
    if kind in (KIND_IMAGE_TEXT, KIND_INTERLEAVED) and not media:
        raise SkipRecord(MISSING_FILE, "record has no image")
    if not media:  # a text-only conversation
        return np.zeros((0, 3, size, size), dtype=np.uint8)
    return np.stack([decode_image(m, size) for m in media])


def dropped_part(record: dict) -> int:
    """The part id a dropped record's drop completes (epochs.part_id of all its samples), -1 without
    a sample id (a driver-side build)."""
    from orchestration.data.epochs import part_id

    sample_id = record.get("sample_id")
    return part_id(int(sample_id)) if sample_id is not None and sample_id >= 0 else -1


def decode_counted(record: dict, size: int, fetch: Callable[[str], bytes], tally: Tally,
                   num_frames: int = FRAMES_PER_VIDEO, requeue_delay_s: float | None = None) -> np.ndarray | None:
    """decode_record for the Ray decode stages: the pixels, counted as a sample of the record's source;
    or None for a bad record, counted as skipped under its reason (any other error as decode_error,
    logged: one bad record must not stop the epoch). A media fetch that keeps failing transiently past
    its retries is tried again after a longer wait, up to records.REQUEUES times, in place (the order
    the position relies on stays), each noted as ``retried``; past that the error stops the task (an
    outage, not bad data). ``record["notes"]`` then holds the faults to count with the record."""
    delay = records_module.REQUEUE_DELAY_S if requeue_delay_s is None else requeue_delay_s
    origin = record.get("origin") or ""
    retried = []
    attempt = 0
    while True:
        try:
            pixels = decode_record(record, size, fetch, num_frames)
            break
        except SkipRecord as skip:
            tally.skipped.extend(list(record.get("notes") or []) + retried)
            tally.skip(skip.reason, record["key"], record["source"], origin, dropped_part(record))
            return None
        except Exception as exc:
            if is_transient(exc):
                if attempt >= records_module.REQUEUES:
                    raise
                attempt += 1
                log.warning("record %s of source %s: transient error past its retries (%r): reading it again (%d of %d)",
                            record["key"], record["source"], exc, attempt, records_module.REQUEUES)
                retried.append(skip_entry(RETRIED, record["source"], record["key"], f"{origin}/requeue{attempt}"))
                time.sleep(delay * 2 ** (attempt - 1))
                continue
            log.exception("record %s of source %s failed to decode", record["key"], record["source"])
            tally.skipped.extend(list(record.get("notes") or []) + retried)
            tally.skip(DECODE_ERROR, record["key"], record["source"], origin, dropped_part(record))
            return None
    record["notes"] = list(record.get("notes") or []) + retried
    tally.samples[record["source"]] += 1
    return pixels
