"""Bad records, bad shards and per-source counts: the vocabulary of reasons, and how counts leave the
data workers.

Every way data can be bad has one name, used by the readers (records.py), the decoders (decode.py),
the tokenization pool, the synthetic writer's manifest and the MLflow metrics ``rows_skipped/<reason>``:

    not_an_image       the bytes are not an image PIL recognizes (an HTML error page, random bytes)
    truncated_image    a recognized image whose pixel data cannot be decoded (cut short or damaged)
    empty_caption      no text to learn from (blank caption, all-empty sentences or answers)
    missing_file       a referenced image/video file is not there, or the record has no image (an MMC4
                       document that loses one of several images keeps the rest: counted, not dropped)
    zero_frames        a video container that holds no video frames
    undecodable_video  bytes that are not a video container, or a stream that fails to decode
    decode_error       anything else that goes wrong on one record (logged with the record key)
    too_long           the sequence builder kept no supervised token
    bad_line           a line of a JSON-lines or CSV index that is not a record of its format
    missing_id         a ShareGPT4V entry without an ``id``
    bad_entry          any other index entry that is not a record of its format
    unreadable_shard   a shard that cannot be opened or read on (truncated tar or parquet, an index
                       that is not JSON/CSV): its readable records are kept, the rest is skipped, and the
                       shard is recorded in the run's storage so that a restart does not read into it again
    retried            a read that kept failing with transient errors past its retries and was queued
                       again (not bad data: the record is delivered once the read succeeds)

How counts travel:

- **With the data** (training): each output row carries the entries counted next to it (``skipped``:
  `skip_entry` strings). An entry names the record by its *origin* (unit and offset in it, see
  records.py; never by a URL segment) and, for a dropped record, the part id that its drop completes:
  the training loop adds it to the data position like a trained sample, so a restart never reads (and
  counts) it again. Counts per reason are integers kept with the position and all-reduced at log steps
  (`SkipCounts`; no key sets travel).
- **Into a named actor** (driver-side builds: tests, the tokenized cache, benchmarks), when a build is
  given a stats ``group``: `DataStats` keeps distinct skipped origins per reason and samples/tokens per
  source. It restarts if its node dies (``max_restarts=-1``); counts of that group start over then.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import NamedTuple

TRUNCATED_IMAGE = "truncated_image"
NOT_AN_IMAGE = "not_an_image"
EMPTY_CAPTION = "empty_caption"
MISSING_FILE = "missing_file"
ZERO_FRAMES = "zero_frames"
UNDECODABLE_VIDEO = "undecodable_video"
DECODE_ERROR = "decode_error"
TOO_LONG = "too_long"
BAD_LINE = "bad_line"
MISSING_ID = "missing_id"
BAD_ENTRY = "bad_entry"
UNREADABLE_SHARD = "unreadable_shard"
RETRIED = "retried"
# The fixed order of the counts tensor the ranks all-reduce (append only: saved states name reasons).
REASONS = (TRUNCATED_IMAGE, NOT_AN_IMAGE, EMPTY_CAPTION, MISSING_FILE, ZERO_FRAMES, UNDECODABLE_VIDEO, DECODE_ERROR,
           TOO_LONG, BAD_LINE, MISSING_ID, BAD_ENTRY, UNREADABLE_SHARD, RETRIED)

ACTOR_NAME = "vilau-data-stats"
MAX_KEYS_PER_REASON = 100_000  # distinct skipped origins kept per reason by the actor (beyond: counted)


def mmc4_document_key(url: str) -> str:
    """The display key of an MMC4 document (the URL's last segment, as the synthetic writer's manifest
    names documents). Not an identity: real URLs share "" and "index.html"; records are told apart by
    their origin."""
    return url.rsplit("/", 1)[-1]


class SkipEntry(NamedTuple):
    reason: str
    record: str  # "source/key", for people
    origin: str  # "unit#offset": which record (records.py), the identity
    done: int  # the part id its drop completes (epochs.part_id), -1: nothing (a note on a kept record)


def skip_entry(reason: str, source: str, key: str, origin: str = "", done: int = -1) -> str:
    """How a counted fault travels with the data: "reason<TAB>source/key<TAB>origin<TAB>done"."""
    return f"{reason}\t{source}/{key}\t{origin}\t{int(done)}"


def parse_skip_entry(entry: str) -> SkipEntry:
    reason, record, *rest = entry.split("\t")
    origin = rest[0] if rest and rest[0] else record  # entries of older checkpoints: the record is all there is
    return SkipEntry(reason, record, origin, int(rest[1]) if len(rest) > 1 else -1)


class SkipCounts:
    """Faults counted per reason (integers): the training loop's run and epoch counts. Each entry is
    counted once because the data position marks what it counted as done (see the module docstring)."""

    def __init__(self, counts: dict[str, int] | None = None):
        self.counts: Counter = Counter({r: int(n) for r, n in (counts or {}).items() if n})

    def add(self, reason: str, n: int = 1) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r} (stats.REASONS)")
        self.counts[reason] += n

    def vector(self) -> list[int]:
        """The counts in REASONS order (what the ranks all-reduce)."""
        return [self.counts.get(r, 0) for r in REASONS]

    def state(self) -> dict[str, int]:
        return dict(self.counts)

    @classmethod
    def from_state(cls, state: dict | None) -> "SkipCounts":
        """Also reads the key sets that checkpoints held before counts were integers."""
        state = state or {}
        if "keys" in state or "overflow" in state:
            old = {r: len(k) for r, k in (state.get("keys") or {}).items()}
            for r, n in (state.get("overflow") or {}).items():
                old[r] = old.get(r, 0) + int(n)
            return cls(old)
        return cls(state)


class DistinctSkips:
    """Distinct faulty records per reason, told apart by origin (a record met in every pass or epoch
    counts once): the driver-side actor's bookkeeping, never sent per training step."""

    def __init__(self):
        self.keys: dict[str, dict[str, str]] = defaultdict(dict)  # reason -> origin -> "source/key"
        self.overflow: Counter = Counter()  # beyond MAX_KEYS_PER_REASON: counted as seen

    def add(self, reason: str, record: str, origin: str | None = None) -> None:
        origin = origin or record
        seen = self.keys[reason]
        if origin in seen:
            return
        if len(seen) < MAX_KEYS_PER_REASON:
            seen[origin] = record
        else:
            self.overflow[reason] += 1

    def add_entries(self, entries) -> None:
        for entry in entries:
            parsed = parse_skip_entry(entry)
            self.add(parsed.reason, parsed.record, parsed.origin)

    def counts(self) -> dict[str, int]:
        return {r: len(self.keys.get(r, ())) + self.overflow.get(r, 0) for r in set(self.keys) | set(self.overflow)}

    def merge(self, other: "DistinctSkips") -> None:
        for reason, origins in other.keys.items():
            for origin, record in origins.items():
                self.add(reason, record, origin)
        self.overflow.update(other.overflow)


# ---------------------------------------------------------------- the driver-side stats actor


def _actor_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
    class DataStats:
        def __init__(self) -> None:
            self._groups: dict[str, dict] = {}

        def _group(self, group: str) -> dict:
            if group not in self._groups:
                self._groups[group] = {"skipped": DistinctSkips(), "samples": Counter(), "tokens": Counter()}
            return self._groups[group]

        def add(self, group: str, skipped: list[str], samples: dict[str, int], tokens: dict[str, int]) -> None:
            g = self._group(group)
            g["skipped"].add_entries(skipped)
            g["samples"].update(samples)
            g["tokens"].update(tokens)

        def get(self, group: str | None = None) -> dict:
            """{"skipped": {reason: n}, "skipped_keys": {reason: [source/key]}, "samples", "tokens"}."""
            names = [group] if group is not None else list(self._groups)
            skipped, samples, tokens = DistinctSkips(), Counter(), Counter()
            for name in names:
                if name in self._groups:
                    g = self._groups[name]
                    skipped.merge(g["skipped"])
                    samples.update(g["samples"])
                    tokens.update(g["tokens"])
            return {
                "skipped": skipped.counts(),
                "skipped_keys": {r: sorted(k.split("/", 1)[-1] for k in keys.values()) for r, keys in skipped.keys.items()},
                "samples": dict(samples),
                "tokens": dict(tokens),
            }

        def reset(self, group: str | None = None) -> None:
            if group is None:
                self._groups.clear()
            else:
                self._groups.pop(group, None)

    return DataStats


_handles: dict[str, object] = {}  # job id -> handle (the creating process keeps the actor referenced)
_actor_cls = None


def stats_actor():
    """The job's DataStats actor, created on first use."""
    import ray

    global _actor_cls
    job = ray.get_runtime_context().get_job_id()
    if job not in _handles:
        try:
            _handles[job] = ray.get_actor(ACTOR_NAME)
        except ValueError:
            if _actor_cls is None:
                _actor_cls = _actor_class()
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            # On the creator's node (the driver's: the head on a cluster), not on a worker node that
            # a spot reclaim may take away. Soft: a UDF creating it runs wherever it can.
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            _handles[job] = _actor_cls.options(
                name=ACTOR_NAME, get_if_exists=True, lifetime=None, scheduling_strategy=here
            ).remote()
    return _handles[job]


def data_stats(group: str | None = None) -> dict:
    """Everything counted into the actor for ``group`` (None: all groups together)."""
    import ray

    return ray.get(stats_actor().get.remote(group))


def skip_counts(group: str | None = None) -> dict[str, int]:
    """Distinct records dropped so far, by reason, e.g. {"truncated_image": 3, "missing_file": 1}."""
    return data_stats(group)["skipped"]


def reset_stats(group: str | None = None) -> None:
    import ray

    ray.get(stats_actor().reset.remote(group))


class Tally:
    """Counts of one block: the dropped records (travelling with the block's rows), and, for a build
    with a stats ``group``, samples and tokens per source sent to the actor once per block."""

    def __init__(self, group: str | None):
        self.group = group
        self.skipped: list[str] = []
        self.samples: Counter = Counter()
        self.tokens: Counter = Counter()

    def skip(self, reason: str, key: str, source: str = "", origin: str = "", done: int = -1) -> None:
        self.skipped.append(skip_entry(reason, source, key, origin, done))

    def take_skipped(self) -> list[str]:
        out, self.skipped = self.skipped, []
        return out

    def flush(self, skipped: list[str] = ()) -> None:
        if self.group is None or not (skipped or self.samples or self.tokens):
            self.samples, self.tokens = Counter(), Counter()
            return
        import ray

        # Driver-side builds only (the training path has group None): waited on, so that counts are in
        # once the consumer has seen the block's rows.
        ray.get(stats_actor().add.remote(self.group, list(skipped), dict(self.samples), dict(self.tokens)))
        self.samples, self.tokens = Counter(), Counter()
