"""Decoding: image bytes to RGB pixels at the tower's size, mp4 clips to 8 frames, records to samples.

Every way a record can be bad raises `SkipRecord(reason)`, the reason a name from stats.py's
vocabulary (listed and explained there; the synthetic writer uses it too). The Ray decode stages call
`decode_counted`, which drops the record and counts it under that reason.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

from orchestration.data.records import (
    KIND_CONVERSATION,
    KIND_IMAGE_TEXT,
    KIND_INTERLEAVED,
    KIND_VIDEO,
)
from orchestration.data.stats import (  # the vocabulary of reasons lives with the counting
    DECODE_ERROR,
    EMPTY_CAPTION,
    MISSING_FILE,
    NOT_AN_IMAGE,
    TRUNCATED_IMAGE,
    UNDECODABLE_VIDEO,
    ZERO_FRAMES,
    Tally,
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
    """The record's media bytes: inline, or fetched by URI (missing_file when a file is not there)."""
    if record["media"]:
        return list(record["media"])
    media = []
    for uri in record["media_uris"]:
        try:
            media.append(fetch(uri))
        except FileNotFoundError:
            raise SkipRecord(MISSING_FILE, uri) from None
    return media


def decode_record(record: dict, size: int, fetch: Callable[[str], bytes], num_frames: int = FRAMES_PER_VIDEO) -> np.ndarray:
    """Check a normalized record and decode its media: uint8 [N, 3, size, size].

    N is 1 for an image-text pair, the number of images of an MMC4 document (all must decode), 8 for a
    video, 0 or 1 for a conversation. Raises SkipRecord for a bad record.
    """
    require_text(record)
    kind = record["kind"]
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


def decode_counted(record: dict, size: int, fetch: Callable[[str], bytes], tally: Tally,
                   num_frames: int = FRAMES_PER_VIDEO) -> np.ndarray | None:
    """decode_record for the Ray decode stages: the pixels, counted as a sample of the record's source;
    or None for a bad record, counted as skipped under its reason (any other error as decode_error,
    logged: one bad record must not stop the epoch)."""
    try:
        pixels = decode_record(record, size, fetch, num_frames)
    except SkipRecord as skip:
        tally.skip(skip.reason, record["key"], record["source"])
        return None
    except Exception:
        log.exception("record %s of source %s failed to decode", record["key"], record["source"])
        tally.skip(DECODE_ERROR, record["key"], record["source"])
        return None
    tally.samples[record["source"]] += 1
    return pixels
