"""Bad records and per-source counts: the vocabulary of reasons, and how counts leave the data workers.

Every way a record can be bad has one name, used by the decoders (decode.py), the tokenization pool,
the synthetic writer's manifest and the MLflow metrics ``rows_skipped/<reason>``:

    not_an_image       the bytes are not an image PIL recognizes (an HTML error page, random bytes)
    truncated_image    a recognized image whose pixel data cannot be decoded (cut short or damaged)
    empty_caption      no text to learn from (blank caption, all-empty sentences or answers)
    missing_file       a referenced image/video file is not there, or the record has no image
    zero_frames        a video container that holds no video frames
    undecodable_video  bytes that are not a video container, or a stream that fails to decode
    decode_error       anything else that goes wrong on one record (logged with the record key)
    too_long           the sequence builder kept no supervised token

Two ways counts travel:

- **With the data** (training): each output row carries the bad records dropped next to it
  (``skipped``: "reason<TAB>source/key" strings), so the training loop counts what it consumed, per
  distinct record and per epoch, with no actor in the way (nothing to lose with a node, nothing to call
  per block). See orchestration/train/trainer.py's BatchStream.
- **Into a named actor** (driver-side builds: tests, the tokenized cache, benchmarks), when a build is
  given a stats ``group``: `DataStats` keeps distinct skipped keys per reason and samples/tokens per
  source. It restarts if its node dies (``max_restarts=-1``); counts of that group start over then.
"""

from __future__ import annotations

from collections import Counter, defaultdict

TRUNCATED_IMAGE = "truncated_image"
NOT_AN_IMAGE = "not_an_image"
EMPTY_CAPTION = "empty_caption"
MISSING_FILE = "missing_file"
ZERO_FRAMES = "zero_frames"
UNDECODABLE_VIDEO = "undecodable_video"
DECODE_ERROR = "decode_error"
TOO_LONG = "too_long"

ACTOR_NAME = "vilau-data-stats"
MAX_KEYS_PER_REASON = 100_000  # distinct skipped keys kept per reason (beyond: counted, not told apart)


def mmc4_document_key(url: str) -> str:
    """The record key of an MMC4 document (readers and the synthetic writer's manifest use it)."""
    return url.rsplit("/", 1)[-1]


def skip_entry(reason: str, source: str, key: str) -> str:
    """How a dropped record travels with the data: "reason<TAB>source/key"."""
    return f"{reason}\t{source}/{key}"


def parse_skip_entry(entry: str) -> tuple[str, str]:
    """(reason, "source/key") of a `skip_entry` string."""
    reason, _, record = entry.partition("\t")
    return reason, record


class DistinctSkips:
    """Distinct dropped records per reason (a record dropped in every epoch counts once)."""

    def __init__(self, keys: dict[str, list[str]] | None = None, overflow: dict[str, int] | None = None):
        self.keys: dict[str, set[str]] = defaultdict(set, {r: set(k) for r, k in (keys or {}).items()})
        self.overflow: Counter = Counter(overflow or {})  # beyond MAX_KEYS_PER_REASON: counted as seen

    def add(self, reason: str, record: str) -> None:
        seen = self.keys[reason]
        if record in seen:
            return
        if len(seen) < MAX_KEYS_PER_REASON:
            seen.add(record)
        else:
            self.overflow[reason] += 1

    def add_entries(self, entries) -> None:
        for entry in entries:
            self.add(*parse_skip_entry(entry))

    def counts(self) -> dict[str, int]:
        return {r: len(self.keys.get(r, ())) + self.overflow.get(r, 0) for r in set(self.keys) | set(self.overflow)}

    def state(self) -> dict:
        return {"keys": {r: sorted(k) for r, k in self.keys.items()}, "overflow": dict(self.overflow)}

    @classmethod
    def from_state(cls, state: dict | None) -> "DistinctSkips":
        state = state or {}
        return cls(state.get("keys"), state.get("overflow"))

    def merge(self, other: "DistinctSkips") -> None:
        for reason, keys in other.keys.items():
            for key in keys:
                self.add(reason, key)
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
                "skipped_keys": {r: sorted(k.split("/", 1)[-1] for k in keys) for r, keys in skipped.keys.items()},
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

    def skip(self, reason: str, key: str, source: str = "") -> None:
        self.skipped.append(skip_entry(reason, source, key))

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
