"""Readers for each dataset's public on-disk format, all yielding one normalized record schema.

A source is a directory (local or ``s3://``) of index shards in one format:

    coyo_parquet     *.parquet   img2dataset parquet: image bytes (jpg/png/webp column), key, caption
    coyo_webdataset  *.tar       img2dataset webdataset: KEY.jpg (or .png/.webp), KEY.txt, KEY.json
    mmc4             *.jsonl[.zip]  MMC4 documents; images by image_name under <path>/images
    openvid          *.csv       OpenVid-1M CSV (video, caption, ...); clips under <path>/videos
    sharegpt4v       *.json      LLaVA-style list (id, image, conversations); image paths relative to <path>

Every reader yields records of NORMALIZED_SCHEMA. COYO carries its image bytes inline (``media``);
the other formats reference files (``media_uris``) that the decode stage fetches, so the read stage
stays light and fetching runs in parallel. Readers stream: a shard is read through the filesystem
(pyarrow / fsspec file objects), never copied to local disk first.

Faults never stop a read. A line or entry of an index that is not a record of its format (an MMC4
line that is not JSON, a ShareGPT4V entry without ``id``) becomes a KIND_FAULT *placeholder* in the
record's place; so does the point where a shard stops being readable (a truncated tar or parquet, an
index that is not JSON/CSV): its readable records are kept, the rest of it is skipped, and the shard is
recorded in the run's `FaultLedger`, so that a restart reads up to that point and no further.
Placeholders keep every record's offset where it was: the epoch's order, its sample ids and the
resume position do not depend on whether a fault was met before. The decode stage drops and counts
them under their reason (stats.py) like any bad record. A transient error that outlasts its retries
re-opens the unit where it got to, after a longer wait (counted as ``retried``, a note on the next
record), up to REQUEUES times; past that it is an outage and the read task fails.

Every record has an *origin*, ``<unit>#<offset>`` (the shard, or its row-group range, and the record's
offset in it): the identity that counts use (keys are the datasets' own and may repeat).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import hashlib
import io
import itertools
import json
import logging
import os
import posixpath
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestration.data.stats import BAD_ENTRY, BAD_LINE, MISSING_ID, RETRIED, UNREADABLE_SHARD, mmc4_document_key, skip_entry
from orchestration.storage import S3Settings, filesystem, is_s3, join, list_files

log = logging.getLogger(__name__)

KIND_IMAGE_TEXT = "image_text"  # one image and its caption (COYO)
KIND_INTERLEAVED = "interleaved"  # sentences and images matched to sentences (MMC4)
KIND_VIDEO = "video"  # one clip and its caption (OpenVid-1M)
KIND_CONVERSATION = "conversation"  # a chat about (at most) one image (ShareGPT4V)
KIND_FAULT = "fault"  # a placeholder for a bad line/entry or a shard's unreadable rest; text: the reason

FORMAT_KIND = {
    "coyo_parquet": KIND_IMAGE_TEXT,
    "coyo_webdataset": KIND_IMAGE_TEXT,
    "mmc4": KIND_INTERLEAVED,
    "openvid": KIND_VIDEO,
    "sharegpt4v": KIND_CONVERSATION,
}
INDEX_SUFFIXES = {
    "coyo_parquet": (".parquet",),
    "coyo_webdataset": (".tar",),
    "mmc4": (".jsonl", ".jsonl.zip"),
    "openvid": (".csv",),
    "sharegpt4v": (".json",),
}
# Where referenced media live when the source does not say (the layouts the datasets ship in).
DEFAULT_MEDIA_DIR = {"mmc4": "images", "openvid": "videos", "sharegpt4v": ""}

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp")  # img2dataset's encode_format choices
IMAGE_EXTENSIONS = IMAGE_COLUMNS

NORMALIZED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the record key the dataset itself uses (see synthetic.py)
        ("source", pa.string()),  # the source's name in the config
        ("kind", pa.string()),  # one of the KIND_* values
        # caption; MMC4: JSON list of sentences; ShareGPT4V: JSON list of {"from", "value"} turns
        ("text", pa.string()),
        ("media", pa.list_(pa.binary())),  # inline media bytes (COYO); [] when referenced
        ("media_uris", pa.list_(pa.string())),  # referenced media files, local paths or s3:// URIs
        ("media_slots", pa.list_(pa.int32())),  # MMC4: the sentence each image belongs before
        ("origin", pa.string()),  # "<unit>#<offset>": which record this is (the identity counts use)
        ("notes", pa.list_(pa.string())),  # faults counted with this record, not dropping it (stats.skip_entry)
    ]
)
LM_CACHE = "lm_cache"  # the read units of the tokenized cache (cache.py): packed rows, no decoding
CHUNK_ROWS = 64  # records per yielded table: keeps a read task's memory bounded on big shards


class ShardError(RuntimeError):
    """A shard that cannot be opened or read, or is not in its format. The message names the file."""


class Fault:
    """What a format reader yields in place of a line/entry that is not a record (see the module doc)."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


REQUEUES = 3  # times a unit (or a media file) is queued again after its retries are spent
REQUEUE_DELAY_S = 2.0  # first wait before such a re-read; doubled each time
# Errors that mean "this shard cannot be read from here on" (not transient, not a bug in the reader).
UNREADABLE_ERRORS = (ShardError, OSError, ValueError, KeyError, EOFError, UnicodeDecodeError, tarfile.TarError,
                     zipfile.BadZipFile, csv.Error, pa.ArrowException)
_TRANSIENT_NAMES = ("ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError", "ReadTimeout",
                    "ConnectTimeout", "EndpointConnectionError", "IncompleteRead", "ResponseStreamingError",
                    "ProtocolError", "SlowDown", "ServiceUnavailable")


def is_transient(exc: BaseException) -> bool:
    """A connection dropped, a timeout, throttling: worth reading again later (the error or its causes)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, _PERMANENT):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)) or any(n in type(exc).__name__ for n in _TRANSIENT_NAMES):
            return True
        if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE):
            return True
        if any(n in str(exc) for n in ("SlowDown", "503 Service Unavailable", "Connection reset")):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def unit_key(unit: "ReadUnit") -> str:
    """The name of a unit's record sequence in origins and the ledger: its file, and for a row-group
    range of a parquet file that range (its offsets count from the range's first row). A record range
    of an index file (OpenVid CSV, ShareGPT4V JSON) counts offsets in the whole file."""
    if unit.format == "coyo_parquet" and unit.row_groups is not None:
        return f"{unit.uri}#rg{unit.row_groups[0]}-{unit.row_groups[1]}"
    return unit.uri


class FaultLedger:
    """The unreadable shards a run has met: one small JSON file per shard under
    ``<directory>/unreadable_shards/`` (written by whichever read task met it; no file is rewritten by
    two tasks), with how many of its records could be read. Loaded when a dataset is built: its read
    tasks then read a known shard up to that point only (a shard with nothing readable is not opened)."""

    SUBDIR = "unreadable_shards"

    def __init__(self, directory: str, s3: "S3Settings | None", known: dict[str, int] | None = None):
        self.directory, self.s3 = directory, s3
        self.known: dict[str, int] = dict(known or {})

    @property
    def folder(self) -> str:
        return join(self.directory, self.SUBDIR)

    @classmethod
    def load(cls, directory: str, s3: "S3Settings | None") -> "FaultLedger":
        ledger = cls(directory, s3)
        ledger.known = {entry["shard"]: int(entry["readable_records"]) for entry in ledger.entries()}
        return ledger

    def entries(self) -> list[dict]:
        fs, path = fs_and_path(self.folder, self.s3 if is_s3(self.folder) else None)
        try:
            names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".json"))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            try:
                out.append(json.loads(with_retries(lambda: fs.cat_file(name), name)))
            except (ValueError, FileNotFoundError):  # a half-written file: its shard is found again
                continue
        return out

    def record(self, key: str, readable: int, error: BaseException) -> None:
        if key in self.known:
            return
        self.known[key] = readable
        fs, path = fs_and_path(self.folder, self.s3 if is_s3(self.folder) else None)
        name = hashlib.sha256(key.encode()).hexdigest()[:24] + ".json"
        body = json.dumps({"shard": key, "readable_records": readable, "error": repr(error)[:2000],
                           "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        try:
            fs.makedirs(path, exist_ok=True)
            with_retries(lambda: fs.pipe_file(f"{path}/{name}", body), f"{self.folder}/{name}")
        except OSError as exc:  # the count still travels with the data; only the shortcut is lost
            log.warning("could not record unreadable shard %s in %s: %r", key, self.folder, exc)


_active_ledger: FaultLedger | None = None  # the ledger of the read task running in this process


@contextlib.contextmanager
def reading_with(ledger: FaultLedger | None):
    """Readers in this block consult and extend ``ledger`` (a read task runs one at a time per process)."""
    global _active_ledger
    before, _active_ledger = _active_ledger, ledger
    try:
        yield
    finally:
        _active_ledger = before


def _known_readable(key: str) -> int | None:
    return _active_ledger.known.get(key) if _active_ledger is not None else None


def _record_unreadable(key: str, readable: int, error: BaseException) -> None:
    log.warning("shard %s unreadable after %d records, the rest skipped: %r", key, readable, error)
    if _active_ledger is not None:
        _active_ledger.record(key, readable, error)


@dataclass(frozen=True)
class ReadUnit:
    """One shard of one source (or a range of a parquet shard's row groups), with its source's repeat
    factor (records taken per record in an epoch, see mixture.py) and its size in records (exact for
    parquet and counted index files, else estimated from its bytes; 1 when unknown)."""

    source: str
    format: str
    uri: str
    media_root: str
    repeat: float = 1.0
    row_groups: tuple[int, int] | None = None  # parquet: read only row groups [start, stop)
    # One file of many records (an OpenVid CSV or ShareGPT4V JSON index): read only its records
    # [start, stop) in file order (stop None: to the end), so that one file spreads over ranks.
    records: tuple[int, int | None] | None = None
    size: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ReadUnit":
        data = json.loads(text)
        data.pop("seed", None)  # plans written before the mixer drew copies by pass
        for name in ("row_groups", "records"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)

    @property
    def records_estimate(self) -> int:
        return max(self.size, 1)


# ---------------------------------------------------------------- filesystems and retries


@functools.lru_cache(maxsize=8)
def _fs_for(scheme: str, settings: S3Settings | None):
    """One fsspec filesystem per process and endpoint (s3fs clients are costly to make)."""
    fs, _ = filesystem("s3://bucket" if scheme == "s3" else ".", settings)
    return fs


def fs_and_path(uri: str, s3: S3Settings | None):
    fs = _fs_for("s3" if is_s3(uri) else "file", s3 if is_s3(uri) else None)
    return fs, (uri[len("s3://") :] if is_s3(uri) else os.path.abspath(uri))


_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def with_retries(fn: Callable, what: str, attempts: int = 4, base_delay: float = 0.2):
    """Call ``fn``; retry transient I/O errors (connection drops, throttling, 5xx) with backoff.

    s3fs and pyarrow retry inside a request already; this also covers a stream that breaks half-way.
    Missing files and permission errors are not transient and are raised at once.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except _PERMANENT:
            raise
        except (OSError, ConnectionError, TimeoutError) as exc:
            if attempt == attempts - 1:
                raise
            delay = base_delay * 2**attempt
            log.warning("%s: transient error %r, retrying in %.1fs", what, exc, delay)
            time.sleep(delay)


def read_bytes(uri: str, s3: S3Settings | None) -> bytes:
    """A whole (media) file. FileNotFoundError when it is not there."""
    fs, path = fs_and_path(uri, s3)
    return with_retries(lambda: fs.cat_file(path), uri)


def list_shards(fmt: str, path: str, s3: S3Settings | None) -> list[str]:
    """The index shards of a source, sorted. A missing directory or no shard at all is an error."""
    return [uri for uri, _ in list_shards_with_sizes(fmt, path, s3)]


def list_shards_with_sizes(fmt: str, path: str, s3: S3Settings | None) -> list[tuple[str, int]]:
    """(uri, bytes) of the index shards of a source, sorted. Only the source directory itself is listed
    (one request): the media trees beside the index (MMC4's images/, OpenVid's videos/, hundreds of
    millions of objects) are never listed; media are fetched by path when decoded."""
    try:
        if not is_s3(path) and os.path.isfile(path):
            files = [(path, os.path.getsize(path))]
        else:
            files = list_files(path, s3, INDEX_SUFFIXES[fmt], with_sizes=True)
    except FileNotFoundError:
        raise ShardError(f"{path}: no such directory for a {fmt} source") from None
    if not files:
        raise ShardError(f"{path}: no {fmt} shards ({'/'.join(INDEX_SUFFIXES[fmt])} files) found")
    return files


def media_root_for(fmt: str, source_path: str, media_root: str | None) -> str:
    if media_root is not None:
        return media_root
    base = source_path if not (not is_s3(source_path) and os.path.isfile(source_path)) else os.path.dirname(source_path)
    sub = DEFAULT_MEDIA_DIR.get(fmt, "")
    return join(base, sub) if sub else base


# ---------------------------------------------------------------- per-format record iterators


def _record(key, source, kind, text, media=(), uris=(), slots=()) -> dict:
    return {
        "key": str(key),
        "source": source,
        "kind": kind,
        "text": "" if text is None else str(text),
        "media": list(media),
        "media_uris": list(uris),
        "media_slots": [int(s) for s in slots],
        "origin": "",
        "notes": [],
    }


def _fault_record(unit: ReadUnit, reason: str, offset: int) -> dict:
    """The placeholder of a bad line/entry (or of a shard's unreadable rest) at ``offset``."""
    record = _record(f"{posixpath.basename(unit_key(unit))}@{offset}", unit.source, KIND_FAULT, reason)
    record["origin"] = f"{unit_key(unit)}#{offset}"
    return record


def _retried_note(unit: ReadUnit, offset: int, attempt: int, exc: BaseException) -> str:
    log.warning("%s: transient error at record %d past its retries (%r): reading it again (%d of %d)",
                unit.uri, offset, exc, attempt, REQUEUES)
    return skip_entry(RETRIED, unit.source, posixpath.basename(unit.uri), f"{unit_key(unit)}#{offset}/requeue{attempt}")


def _open_coyo_parquet(f, unit: ReadUnit) -> tuple[pq.ParquetFile, list[str]]:
    """The parquet file and its [key, image, caption] column names, or ShardError."""
    try:
        parquet = pq.ParquetFile(f)
    except Exception as exc:
        if is_transient(exc):
            raise
        raise ShardError(f"{unit.uri}: cannot open as parquet: {exc}") from exc
    names = parquet.schema_arrow.names
    image_col = next((c for c in IMAGE_COLUMNS if c in names), None)
    caption_col = "caption" if "caption" in names else ("text" if "text" in names else None)
    missing = [n for n, c in (("key", "key" if "key" in names else None), ("image (jpg/png/webp)", image_col), ("caption", caption_col)) if c is None]
    if missing:
        raise ShardError(f"{unit.uri}: not an img2dataset parquet shard: missing {', '.join(missing)} (columns: {names})")
    return parquet, ["key", image_col, caption_col]


def _row_groups(parquet: pq.ParquetFile, unit: ReadUnit) -> list[int] | None:
    return list(range(*unit.row_groups)) if unit.row_groups is not None else None


def _coyo_parquet(f, unit: ReadUnit) -> Iterator[dict]:
    parquet, columns = _open_coyo_parquet(f, unit)
    for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, columns=columns, row_groups=_row_groups(parquet, unit)):
        for key, image, caption in zip(*(batch.column(i).to_pylist() for i in range(3))):
            yield _record(key, unit.source, KIND_IMAGE_TEXT, caption, [image] if image else [])


def _row_slice(group_rows: list[int], start: int, stop: int | None) -> tuple[list[int], int, int | None]:
    """Which of a unit's row groups hold its records [start, stop): (their indices among the unit's
    groups, rows to skip in the first of them, rows to take (None: to the end))."""
    chosen, first, offset = [], 0, 0
    for i, rows in enumerate(group_rows):
        if offset + rows > start and (stop is None or offset < stop):
            if not chosen:
                first = start - offset
            chosen.append(i)
        offset += rows
    return chosen, first, None if stop is None else max(stop - start, 0)


def _parquet_batches(parquet: pq.ParquetFile, unit: ReadUnit, columns, batch_rows: int, start: int, stop: int | None) -> Iterator[pa.RecordBatch]:
    """The unit's rows [start, stop) of a parquet file, reading only the row groups that hold them."""
    groups = _row_groups(parquet, unit)
    if groups is None:
        groups = list(range(parquet.metadata.num_row_groups))
    if start == 0 and stop is None:
        yield from parquet.iter_batches(batch_size=batch_rows, columns=columns, row_groups=groups)
        return
    chosen, skip, take = _row_slice([parquet.metadata.row_group(g).num_rows for g in groups], start, stop)
    if not chosen or take == 0:
        return
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns, row_groups=[groups[i] for i in chosen]):
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        batch, skip = batch.slice(skip), 0
        if take is not None:
            batch = batch.slice(0, take)
            take -= batch.num_rows
        if batch.num_rows:
            yield batch
        if take == 0:
            return


def _coyo_parquet_tables(f, unit: ReadUnit, start: int = 0, stop: int | None = None) -> Iterator[pa.Table]:
    """The same records as `_coyo_parquet` (those in [start, stop) of the unit), built column-wise
    from Arrow (no Python object per image): COYO is the bulk of stage 1, and this is a third of its
    read cost."""
    parquet, columns = _open_coyo_parquet(f, unit)
    offset, key = start, unit_key(unit)
    for batch in _parquet_batches(parquet, unit, columns, CHUNK_ROWS, start, stop):
        n = batch.num_rows
        images = batch.column(1).cast(pa.binary())
        present = pc.fill_null(pc.greater(pc.binary_length(images), 0), False)
        offsets = np.concatenate([[0], np.cumsum(present.to_numpy(zero_copy_only=False))]).astype(np.int32)
        no_lists = np.zeros(n + 1, dtype=np.int32)
        yield pa.table(
            {
                "key": batch.column(0).cast(pa.string()),
                "source": pa.repeat(pa.scalar(unit.source, pa.string()), n),
                "kind": pa.repeat(pa.scalar(KIND_IMAGE_TEXT, pa.string()), n),
                "text": pc.fill_null(batch.column(2).cast(pa.string()), ""),
                "media": pa.ListArray.from_arrays(pa.array(offsets), images.filter(present)),
                "media_uris": pa.ListArray.from_arrays(pa.array(no_lists), pa.array([], pa.string())),
                "media_slots": pa.ListArray.from_arrays(pa.array(no_lists), pa.array([], pa.int32())),
                "origin": pa.array([f"{key}#{i}" for i in range(offset, offset + n)], pa.string()),
                "notes": pa.ListArray.from_arrays(pa.array(no_lists), pa.array([], pa.string())),
            },
            schema=NORMALIZED_SCHEMA,
        )
        offset += n


def _webdataset_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for consecutive members sharing a key, webdataset's grouping rule."""
    key, parts = None, {}
    for member in tar:
        if not member.isfile():
            continue
        directory, name = posixpath.split(member.name)
        if "." not in name:
            continue
        stem, ext = name.split(".", 1)
        sample_key = posixpath.join(directory, stem) if directory else stem
        if sample_key != key:
            if key is not None:
                yield key, parts
            key, parts = sample_key, {}
        parts[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
        yield key, parts


def _coyo_webdataset(f, unit: ReadUnit) -> Iterator[dict | Fault]:
    try:
        tar = tarfile.open(fileobj=f, mode="r|*")  # a stream: members are read in order, no seeking
    except tarfile.TarError as exc:
        raise ShardError(f"{unit.uri}: cannot open as a tar shard: {exc}") from exc
    for key, parts in _webdataset_samples(tar):
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if "txt" in parts:
            caption = parts["txt"].decode("utf-8", errors="replace")
        elif "json" in parts:
            try:
                caption = json.loads(parts["json"]).get("caption", "")
            except (ValueError, AttributeError) as exc:
                yield Fault(BAD_ENTRY, f"sample {key}: .json is not a JSON object: {exc}")
                continue
        else:
            yield Fault(BAD_ENTRY, f"sample {key} has no .txt or .json caption (members: {sorted(parts)})")
            continue
        yield _record(posixpath.basename(key), unit.source, KIND_IMAGE_TEXT, caption, [image] if image else [])


def _json_lines(f, uri: str) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, document or None, why not) of each non-blank line."""
    if uri.endswith(".zip"):  # MMC4 ships docs_shard_*_v2.jsonl.zip
        with zipfile.ZipFile(f) as archive:
            inner = [n for n in archive.namelist() if n.endswith(".jsonl")]
            if not inner:
                raise ShardError(f"{uri}: zip holds no .jsonl file")
            yield from _json_lines(archive.open(inner[0]), inner[0])
        return
    for number, line in enumerate(io.TextIOWrapper(f, encoding="utf-8"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line), ""
        except json.JSONDecodeError as exc:
            yield number, None, f"line {number} is not JSON: {exc}"


def _mmc4(f, unit: ReadUnit) -> Iterator[dict | Fault]:
    for number, doc, why in _json_lines(f, unit.uri):
        missing = [k for k in ("url", "text_list", "image_info") if k not in doc] if isinstance(doc, dict) else None
        if doc is None or missing is None or missing:
            yield Fault(BAD_LINE, why or f"line {number} is not an MMC4 document: missing {missing or 'everything'}")
            continue
        infos = doc["image_info"]
        if not isinstance(infos, list) or not all(isinstance(i, dict) and "image_name" in i for i in infos):
            yield Fault(BAD_LINE, f"line {number}: image_info is not a list of images with image_name")
            continue
        yield _record(
            mmc4_document_key(doc["url"]),
            unit.source,
            KIND_INTERLEAVED,
            json.dumps(doc["text_list"]),
            uris=[join(unit.media_root, info["image_name"]) for info in infos],
            slots=[info.get("matched_text_index", 0) for info in infos],
        )


def _openvid(f, unit: ReadUnit) -> Iterator[dict | Fault]:
    reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
    header = reader.fieldnames or []
    missing = [k for k in ("video", "caption") if k not in header]
    if missing:
        raise ShardError(f"{unit.uri}: not an OpenVid-1M CSV: missing column(s) {missing} (header: {header})")
    for row in reader:
        if not row.get("video") or row.get("caption") is None:
            yield Fault(BAD_LINE, f"row {reader.line_num} has no video or caption")
            continue
        yield _record(row["video"], unit.source, KIND_VIDEO, row["caption"], uris=[join(unit.media_root, row["video"])])


def _sharegpt4v(f, unit: ReadUnit) -> Iterator[dict | Fault]:
    try:
        entries = json.load(io.TextIOWrapper(f, encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ShardError(f"{unit.uri}: not valid JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise ShardError(f"{unit.uri}: expected a JSON list of conversations, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and "id" not in entry:
            yield Fault(MISSING_ID, f"entry {i} has no id")
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            yield Fault(BAD_ENTRY, f"entry {i} is not a ShareGPT4V record (needs id and conversations)")
            continue
        image = entry.get("image")
        yield _record(
            entry["id"],
            unit.source,
            KIND_CONVERSATION,
            json.dumps(entry["conversations"]),
            uris=[join(unit.media_root, image)] if image else [],
        )


_READERS = {
    "coyo_parquet": _coyo_parquet,
    "coyo_webdataset": _coyo_webdataset,
    "mmc4": _mmc4,
    "openvid": _openvid,
    "sharegpt4v": _sharegpt4v,
}


def _requeue(exc: Exception, attempt: int) -> bool:
    """After a failed read: True to read the unit again from where it got to (a transient error, with
    re-reads left; waits first), False for an unreadable shard; raises what is neither (an outage past
    its re-reads: the task fails and nothing is skipped; or a bug)."""
    if is_transient(exc):
        if attempt >= REQUEUES:
            raise exc
        time.sleep(REQUEUE_DELAY_S * 2**attempt)
        return True
    if isinstance(exc, UNREADABLE_ERRORS):
        return False
    raise exc


def _file_records(unit: ReadUnit, s3: S3Settings | None) -> Iterator[dict]:
    """Every record of the unit's file (or row-group range) in order, with origins; faults as
    placeholders; the unreadable rest of a shard as one placeholder (recorded in the active ledger);
    transient errors past their retries read on from where they struck (see the module doc)."""
    key = unit_key(unit)
    known = _known_readable(key)
    delivered, attempt, notes = 0, 0, []
    while known != 0:
        fs, path = fs_and_path(unit.uri, s3)
        try:
            with with_retries(lambda: fs.open(path, "rb"), unit.uri) as f:
                items = _READERS[unit.format](f, unit)
                for offset, item in enumerate(itertools.islice(items, known)):
                    if offset < delivered:
                        continue  # read before a transient error
                    if isinstance(item, Fault):
                        log.warning("%s: record %d skipped (%s): %s", unit.uri, offset, item.reason, item.detail)
                        item = _fault_record(unit, item.reason, offset)
                    else:
                        item["origin"] = f"{key}#{offset}"
                    item["notes"], notes = notes + item["notes"], []
                    delivered += 1
                    yield item
            break
        except Exception as exc:
            if _requeue(exc, attempt):
                attempt += 1
                notes.append(_retried_note(unit, delivered, attempt, exc))
                continue
            _record_unreadable(key, delivered, exc)
            known = delivered
            break
    if known is not None:
        yield _fault_record(unit, UNREADABLE_SHARD, known)


def iter_records(unit: ReadUnit, s3: S3Settings | None) -> Iterator[dict]:
    """The records of one shard (or of its record range), in file order, faults as KIND_FAULT
    placeholders (see the module doc)."""
    records = _file_records(unit, s3)
    yield from records if unit.records is None else itertools.islice(records, *unit.records)


def _parquet_unit_tables(unit: ReadUnit, s3: S3Settings | None, start: int, stop: int | None) -> Iterator[pa.Table]:
    """`_coyo_parquet_tables` with the faults handled as `_file_records` handles them. A shard whose
    footer cannot be read has nothing readable (recorded: it is not opened again); a damaged row group
    ends the unit's records there, met again by any read that reaches it."""
    key = unit_key(unit)
    known = _known_readable(key)
    at, attempt, notes, fault = start, 0, [], known if known == 0 else None
    while fault is None:
        fs, path = fs_and_path(unit.uri, s3)
        try:
            with with_retries(lambda: fs.open(path, "rb"), unit.uri) as f:
                for table in _coyo_parquet_tables(f, unit, at, stop):
                    if notes:
                        table = table.set_column(table.schema.get_field_index("notes"), "notes",
                                                 pa.array([notes] + [[]] * (table.num_rows - 1), pa.list_(pa.string())))
                        notes = []
                    at += table.num_rows
                    yield table
            break
        except Exception as exc:
            if _requeue(exc, attempt):
                attempt += 1
                notes.append(_retried_note(unit, at, attempt, exc))
                continue
            if at == 0:
                _record_unreadable(key, 0, exc)
            else:
                log.warning("%s: unreadable from record %d, the rest of this read skipped: %r", key, at, exc)
            fault = at
    if fault is not None and start <= fault and (stop is None or fault < stop):
        yield pa.Table.from_pylist([_fault_record(unit, UNREADABLE_SHARD, fault)], schema=NORMALIZED_SCHEMA)


def read_unit_tables(unit: ReadUnit, s3: S3Settings | None, chunk_rows: int = CHUNK_ROWS, start: int = 0,
                     stop: int | None = None) -> Iterator[pa.Table]:
    """The unit's records [start, stop) (in file order; stop None: to its end) as NORMALIZED_SCHEMA
    tables of up to chunk_rows rows (format "lm_cache": the tokenized cache's packed rows as they are
    stored). Each record once: how often a source's records are taken is the mixer's business
    (epochs.py reads a unit once per pass of its source). Faults come as placeholders (module doc)."""
    if unit.format == LM_CACHE:
        if unit.records is not None:  # a record range of a cache file: offsets are within the range
            first, last = unit.records
            start, stop = first + start, (last if stop is None else min(first + stop, last if last is not None else first + stop))
        fs, path = fs_and_path(unit.uri, s3)
        with with_retries(lambda: fs.open(path, "rb"), unit.uri) as f:
            for batch in _parquet_batches(pq.ParquetFile(f), unit, None, chunk_rows, start, stop):
                yield pa.Table.from_batches([batch])
        return
    if unit.format == "coyo_parquet":
        yield from _parquet_unit_tables(unit, s3, start, stop)
        return
    chunk: list[dict] = []
    for record in itertools.islice(iter_records(unit, s3), start, stop):
        chunk.append(record)
        if len(chunk) >= chunk_rows:
            yield pa.Table.from_pylist(chunk, schema=NORMALIZED_SCHEMA)
            chunk = []
    if chunk:
        yield pa.Table.from_pylist(chunk, schema=NORMALIZED_SCHEMA)


# ---------------------------------------------------------------- counting (for mixtures) and texts


UNREADABLE_FOOTER = [0]  # parquet_row_groups of a shard whose footer cannot be read: one empty row group


def parquet_row_groups(uri: str, s3: S3Settings | None) -> list[int]:
    """Rows of each row group of a parquet shard, from its footer (a ranged read, not the file).

    A shard whose footer cannot be read is planned as UNREADABLE_FOOTER, one unit of no records: the
    read stage then meets it, counts it as unreadable_shard and records it (one place handles every
    unreadable shard, found at planning or later)."""
    fs, path = fs_and_path(uri, s3)
    with with_retries(lambda: fs.open(path, "rb"), uri) as f:
        return footer_row_groups(f, uri)


def footer_row_groups(f, uri: str) -> list[int]:
    """Rows of each row group from an open parquet file's footer; UNREADABLE_FOOTER when it has none."""
    try:
        meta = pq.ParquetFile(f).metadata
    except Exception as exc:
        if is_transient(exc):
            raise
        log.warning("%s: parquet footer unreadable (%r): planned as a unit of no records", uri, exc)
        return list(UNREADABLE_FOOTER)
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def count_records(fmt: str, uri: str, s3: S3Settings | None) -> int:
    """Records in one shard, reading as little as the format allows (parquet: the footer only; an
    unreadable footer counts 0). Fault placeholders count: they hold their records' places."""
    if fmt == "coyo_parquet":
        return sum(parquet_row_groups(uri, s3))
    unit = ReadUnit(source="count", format=fmt, uri=uri, media_root="")
    return sum(1 for _ in iter_records(unit, s3))


def iter_texts(unit: ReadUnit, s3: S3Settings | None) -> Iterator[str]:
    """The plain texts of a shard (captions, sentences, conversation turns), e.g. to train a BPE on."""
    if unit.format == "coyo_parquet":  # read only the caption column, not the images
        fs, path = fs_and_path(unit.uri, s3)
        try:
            with with_retries(lambda: fs.open(path, "rb"), unit.uri) as f:
                parquet = pq.ParquetFile(f)
                column = "caption" if "caption" in parquet.schema_arrow.names else "text"
                for batch in parquet.iter_batches(batch_size=1024, columns=[column]):
                    yield from (t for t in batch.column(0).to_pylist() if t)
        except UNREADABLE_ERRORS as exc:
            if is_transient(exc):
                raise
            log.warning("%s: unreadable (%r): its texts are left out", unit.uri, exc)
        return
    for record in iter_records(unit, s3):
        if record["kind"] == KIND_FAULT:
            continue
        if record["kind"] == KIND_INTERLEAVED:
            yield from json.loads(record["text"])
        elif record["kind"] == KIND_CONVERSATION:
            yield from (turn.get("value", "") for turn in json.loads(record["text"]))
        elif record["text"]:
            yield record["text"]
