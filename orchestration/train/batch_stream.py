"""Micro-batches for one rank, epoch after epoch, each trained sample exactly once per epoch.

The exactly-once batch machinery the training loop reads from: :class:`EpochFeed` runs one epoch's
Ray Dataset in a thread of its own, :class:`BatchStream` turns the feeds into micro-batches the ranks
take in lockstep and keeps the data position a checkpoint records. Split from trainer.py so the loop
and the data bookkeeping can be read (and tested) apart.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict

import torch
import torch.distributed as dist


log = logging.getLogger(__name__)

class EpochFeed:
    """One epoch's dataset, read by a thread of its own into a bounded queue of chunks.

    Building and iterating a Ray Dataset starts its execution (read tasks, a fresh pool of tokenizer
    actors that load the tower). The queue holds up to ``depth`` chunks, so the execution can finish
    (``produced`` is set) while that many are still to be trained on: the moment to start the next
    epoch's feed, whose start-up then overlaps with them. ``close`` stops the thread, which drops the
    dataset iterator and so its execution.
    """

    def __init__(self, make_dataset, epoch: int, position, batch_size: int, depth: int = 32):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.produced = threading.Event()
        self.closed = False
        self.thread = threading.Thread(
            target=self._run, args=(make_dataset, epoch, position, batch_size), daemon=True, name=f"epoch-{epoch}",
        )
        self.thread.start()

    def _run(self, make_dataset, epoch: int, position, batch_size: int) -> None:
        chunks = None
        try:
            dataset = make_dataset(epoch, position)
            chunks = iter(dataset.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2))
            for chunk in chunks:
                if not self._put(("chunk", chunk)):
                    return
            self.produced.set()
            self._put(("done", None))
        except BaseException as exc:  # raised in the reader that iterates this feed
            self._put(("error", exc))
        finally:
            if chunks is not None:
                chunks.close()  # shuts the execution down now, not whenever the iterator is collected

    def _put(self, item) -> bool:
        while not self.closed:
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            kind, payload = self.queue.get()
            if kind == "done":
                return
            if kind == "error":
                raise payload
            yield payload

    def close(self) -> None:
        self.closed = True


class BatchStream:
    """Micro-batches forever, epoch after epoch, each trained sample exactly once per epoch.

    Every rank builds its own share of each epoch (``make_dataset(epoch, position)``, see
    orchestration/data/epochs.py), starting from its data position: the resumed dataset leaves out
    what this rank already trained before anything is decoded. A background thread reads ``depth``
    batches ahead; the next epoch's pipeline is started (`EpochFeed`) once the current one has
    produced all its data (up to a feed's depth of chunks before the epoch's end), so its start-up
    (read tasks, tokenizer actors loading the tower) overlaps with training instead of stalling every
    rank at the epoch boundary, and is skipped when the run needs no more batches
    (``batches_needed``). The position advances only when the loop takes a batch, so a checkpoint
    records what was trained on.

    The stream owns its state (torchtitan/lingua's Stateful pattern): the trainer puts
    ``state_dict()`` into each checkpoint and hands the restored one back with ``load_state_dict``
    before the first batch. A restored state may also be the states of every rank of a world of
    another size (``{"world": W, "ranks": [...]}``, elastic resume): the epoch then continues where
    those ranks left it (`DataPosition.continued`).

    Ranks take the same number of batches per epoch (``report`` is a barrier): before each batch the
    ranks agree (one all-reduce of a flag) that every one of them has one; when one rank's share runs
    out, the epoch ends for all, and the rows the others had left are not trained in that epoch.

    Faults arrive with the rows (stats.py): integer counts per reason, for the run, the current epoch
    and each epoch (``skipped_by_epoch``), kept with the position. A dropped record's entry marks its
    part id done in the position like a trained sample, so a restart neither reads nor counts it again
    (and a restart from an earlier checkpoint takes counts and position back together).
    """

    def __init__(self, make_dataset, rank: int, world: int, stage: str, batch_size: int,
                 columns: dict[str, torch.dtype], device: torch.device, depth: int = 4, recorder=None,
                 batches_needed: int | None = None, host_batch=None, batch_timeout_s: float | None = None,
                 explain_error=None, sources: list[str] | None = None):
        from orchestration.data.epochs import DataPosition
        from orchestration.data.stats import SkipCounts

        self.make_dataset, self.rank, self.world, self.stage = make_dataset, rank, world, stage
        self.batch_size, self.columns, self.device, self.recorder = batch_size, columns, device, recorder
        self.host_batch = host_batch or (lambda batch: batch)  # numpy batch -> numpy batch, in the reader
        # How long the loop waits for a batch, and how a pipeline's failure is put to the user (e.g. an
        # actor pool that never got its resources, said with the fields that size it).
        self.batch_timeout_s = batch_timeout_s
        self.explain_error = explain_error or (lambda exc: exc)
        self.position = DataPosition()
        self.skipped = SkipCounts()
        self.skipped_epoch = SkipCounts()
        self.skipped_by_epoch: dict[int, dict[str, int]] = {}  # faults per epoch (with the position)
        # The sources' fixed order in the all-reduced counts (every rank passes the same plan's names).
        self.sources = sorted(sources) if sources is not None else None
        self.samples: defaultdict[str, int] = defaultdict(int)  # trained samples per source, this run
        self.batches_in_epoch = 0  # micro-batches taken in the current epoch (the same on every rank)
        self.batches_needed = batches_needed  # what the rest of the run takes (None: no limit)
        self.batches_taken = 0
        self.closed = False
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread: threading.Thread | None = None

    # -- state (checkpoints) ------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this rank's data: its position in the epoch, the trained samples
        per source and the dropped records (plain Python values: picklable, JSON-able)."""
        return {
            "position": self.position.state(),
            "batches_in_epoch": self.batches_in_epoch,
            "samples": dict(self.samples),
            "skipped": self.skipped.state(),
            "skipped_epoch": self.skipped_epoch.state(),
            "skipped_by_epoch": {e: dict(c) for e, c in self.skipped_by_epoch.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's state: this rank's own (same world size), or every rank's of a
        world of another size, ``{"world": W, "ranks": [state of rank 0, ...]}``. Before the first batch."""
        from orchestration.data.epochs import DataPosition
        from orchestration.data.stats import SkipCounts

        if self.thread is not None:
            raise RuntimeError("load_state_dict after the stream started reading")
        if not state:
            return
        if "ranks" in state:
            ranks = [r or {} for r in state["ranks"]]
            self.position = DataPosition.continued([DataPosition.from_state(r.get("position")) for r in ranks])
            self.batches_in_epoch = max((int(r.get("batches_in_epoch", 0)) for r in ranks), default=0)
            # Run totals are sums over ranks (data_metrics): the new rank 0 carries the old ranks' totals.
            ranks = ranks if self.rank == 0 else []
            self.skipped, self.skipped_epoch, self.samples = SkipCounts(), SkipCounts(), defaultdict(int)
            self.skipped_by_epoch = {}
            for r in ranks:
                for reason, n in SkipCounts.from_state(r.get("skipped")).counts.items():
                    self.skipped.add(reason, n)
                if r.get("position", {}).get("epoch", 0) == self.position.epoch:
                    for reason, n in SkipCounts.from_state(r.get("skipped_epoch")).counts.items():
                        self.skipped_epoch.add(reason, n)
                for epoch, counts in (r.get("skipped_by_epoch") or {}).items():
                    mine = self.skipped_by_epoch.setdefault(int(epoch), {})
                    for reason, n in counts.items():
                        mine[reason] = mine.get(reason, 0) + int(n)
                for source, n in r.get("samples", {}).items():
                    self.samples[source] += n
            return
        self.position = DataPosition.from_state(state.get("position"))
        self.batches_in_epoch = int(state.get("batches_in_epoch", 0))
        self.skipped = SkipCounts.from_state(state.get("skipped"))
        self.skipped_epoch = SkipCounts.from_state(state.get("skipped_epoch"))
        self.skipped_by_epoch = {int(e): dict(c) for e, c in (state.get("skipped_by_epoch") or {}).items()}
        self.samples = defaultdict(int, state.get("samples", {}))

    def start(self) -> None:
        """Start reading ahead from the current position (done by the first ``next`` otherwise)."""
        from orchestration.data.epochs import DataPosition

        if self.thread is not None:
            return
        self.min_epoch = self.position.epoch  # the reader drops an epoch the ranks have ended
        self.thread = threading.Thread(
            target=self._read,
            args=(self.make_dataset, self.position.epoch, DataPosition.from_state(self.position.state())),
            daemon=True, name=f"{self.stage}-batches",
        )
        self.thread.start()

    # -- reading (background thread) ----------------------------------------------------------------

    def _read(self, make_dataset, epoch: int, position) -> None:
        feed = EpochFeed(make_dataset, epoch, position, self.batch_size)
        upcoming: EpochFeed | None = None
        try:
            while True:
                pending: list[dict] = []
                rows = 0
                for chunk in feed:
                    if upcoming is None and feed.produced.is_set() and self._wants_more(feed.queue.qsize()):
                        upcoming = EpochFeed(make_dataset, epoch + 1, None, self.batch_size)
                    if self.closed:
                        return
                    if self.min_epoch > epoch:
                        break  # the ranks ended this epoch already
                    pending.append(_parse_track_columns(chunk))
                    rows = _real_rows(pending)
                    while rows >= self.batch_size or (pending and rows == 0):
                        batch, pending = _take_rows(pending, self.batch_size)
                        rows = _real_rows(pending)
                        batch["epoch"] = epoch  # for host_batch's choices per (sample, epoch): caption dropout
                        self.queue.put(("batch", epoch, self.host_batch(batch)))
                feed.close()
                leftover = [entry for c in pending for row in c["skipped"] for entry in row]
                self.queue.put(("end", epoch, leftover))
                epoch += 1
                if upcoming is None and not self._await_need():
                    return
                feed = upcoming or EpochFeed(make_dataset, epoch, None, self.batch_size)
                upcoming = None
        except BaseException as exc:  # handed to the training loop, which raises it
            self.queue.put(("error", -1, self.explain_error(exc)))
        finally:
            for f in (feed, upcoming):
                if f is not None:
                    f.close()

    def _wants_more(self, chunks_left: int) -> bool:
        """Whether the run likely needs batches beyond the current epoch's (about one per chunk left)."""
        if self.batches_needed is None:
            return True
        return self.batches_taken + self.queue.qsize() + chunks_left < self.batches_needed

    def _await_need(self) -> bool:
        """At an epoch's end with no next feed started (the estimate said the run needs no more): wait
        until the loop has taken everything queued and still needs batches (True; e.g. another rank
        ended the epoch early) or the stream is closed at the end of the run (False)."""
        if self.batches_needed is None:
            return True
        while not self.closed:
            if self.queue.empty() and self.batches_taken < self.batches_needed:
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        """Stop reading ahead (the reader leaves at its next batch)."""
        self.closed = True
        while self.thread is not None and self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except queue.Empty:
                pass

    # -- consuming (training loop) ------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.start()
        while True:
            kind, epoch, payload = self._next_item()
            if kind == "error":
                raise payload
            if epoch < self.position.epoch:
                continue  # read ahead in an epoch the ranks have ended
            if kind == "batch" and payload["valid"] == 0:  # only dropped records: count, nothing to train
                self._count_skips(payload["skipped"])
                continue
            if not self._all_ranks_have(kind == "batch"):
                if kind == "end":
                    self._count_skips(payload)
                self._end_epoch()
                continue
            return self._take(payload)

    def _next_item(self):
        try:
            return self.queue.get(timeout=self.batch_timeout_s)
        except queue.Empty:
            from orchestration.resource_plan import ResourceWaitError

            raise ResourceWaitError(
                f"[{self.stage}] rank {self.rank} waited data.batch_timeout_s={self.batch_timeout_s:g} s for its next "
                "batch and its data pipeline delivered none (a read that stalls, or read tasks or pool actors that "
                "wait for CPUs/GPUs the cluster does not have free: see `python jobs/plan.py`)"
            ) from None

    def _all_ranks_have(self, have: bool) -> bool:
        if self.world == 1:
            return have
        flag = torch.tensor([1.0 if have else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def _end_epoch(self) -> None:
        if self.position.epoch == 0 and self.batches_in_epoch == 0:
            raise RuntimeError(
                f"[{self.stage}] rank {self.rank}: epoch 0 gave no full batch of {self.batch_size} on every rank; "
                "the dataset has too few rows for this many workers"
            )
        self.position.next_epoch()
        self.min_epoch = self.position.epoch
        self.batches_in_epoch = 0
        from orchestration.data.stats import SkipCounts

        self.skipped_epoch = SkipCounts()

    def _take(self, batch: dict) -> dict:
        for call_start, ids in zip(batch["call_start"], batch["sample_ids"]):
            self.position.consume(int(call_start), ids)
        self._count_skips(batch["skipped"])
        self.batches_in_epoch += 1
        self.batches_taken += 1
        keys = [str(k) for row in batch["keys"] for k in row]
        for key in keys:
            self.samples[key.split("/", 1)[0]] += 1
        if self.recorder is not None:
            self.recorder(self.position.epoch, keys)
        return {
            name: torch.as_tensor(batch[name]).to(dtype=dtype).to(self.device, non_blocking=True)
            for name, dtype in self.columns.items()
        }

    def _count_skips(self, entries) -> None:
        """Count the faults a consumed batch (or carrier, or an epoch's leftover) holds, and mark the
        dropped records' part ids done in the position (a restart then leaves them out before reading)."""
        from orchestration.data.stats import parse_skip_entry

        entries = [e for row in entries for e in (row if not isinstance(row, str) else [row])]
        if not entries:
            return
        done = []
        epoch_counts = self.skipped_by_epoch.setdefault(self.position.epoch, {})
        for entry in entries:
            parsed = parse_skip_entry(entry)
            self.skipped.add(parsed.reason)
            self.skipped_epoch.add(parsed.reason)
            epoch_counts[parsed.reason] = epoch_counts.get(parsed.reason, 0) + 1
            if parsed.done >= 0:
                done.append(parsed.done)
        if done:
            self.position.consume(-1, done)  # no call starts here: the frontier stays, the ids join `taken`

    def data_metrics(self) -> dict[str, float]:
        """Collective: faults by reason over all ranks, for the run (``rows_skipped/<reason>``) and the
        current epoch (``rows_skipped_epoch/<reason>``), and each source's realized share of the
        samples trained so far (``mixture_share/<source>``): one all-reduce of a fixed-order tensor."""
        from orchestration.data.stats import REASONS

        sources = self.sources if self.sources is not None else self._source_names()
        unknown = set(self.samples) - set(sources)
        if unknown and not getattr(self, "_warned_unknown", False):
            # Not raised: the other ranks are about to wait in the all-reduce below.
            log.warning("[%s] rank %d trained samples of source(s) %s that the plan does not name (%s): left out of "
                        "mixture_share", self.stage, self.rank, sorted(unknown), sources)
            self._warned_unknown = True
        mine = self.skipped.vector() + self.skipped_epoch.vector() + [self.samples.get(s, 0) for s in sources]
        totals = torch.tensor(mine, dtype=torch.float64)
        if self.world > 1:
            totals = totals.to(self.device)
            dist.all_reduce(totals)
        values = [int(v) for v in totals.cpu().tolist()]
        n = len(REASONS)
        run, epoch, samples = values[:n], values[n : 2 * n], dict(zip(sources, values[2 * n :]))
        out: dict[str, float] = {f"rows_skipped/{r}": v for r, v in zip(REASONS, run) if v}
        out.update({f"rows_skipped_epoch/{r}": v for r, v in zip(REASONS, epoch) if v})
        total = sum(samples.values())
        out["samples_trained"] = total
        out.update({f"mixture_share/{k}": round(n / max(total, 1), 4) for k, n in samples.items()})
        return out

    def _source_names(self) -> list[str]:
        """Without ``sources``: the names this rank has trained (one rank), or, once, all ranks' names."""
        if self.world == 1:
            return sorted(self.samples)
        gathered = [None] * self.world
        dist.all_gather_object(gathered, sorted(self.samples))  # once per run: the order is then fixed
        self.sources = sorted({name for names in gathered for name in names})
        return self.sources


def _parse_track_columns(chunk: dict) -> dict:
    """The position columns (JSON strings on the wire) as object arrays of lists."""
    import json

    import numpy as np

    for name in ("sample_ids", "keys", "skipped"):
        values = chunk[name]
        parsed = np.empty(len(values), dtype=object)
        for i, text in enumerate(values):
            parsed[i] = json.loads(text)
        chunk[name] = parsed
    return chunk


def _real_rows(chunks: list[dict]) -> int:
    """Rows that hold samples (not carriers of dropped records only)."""
    return sum(1 for c in chunks for ids in c["sample_ids"] if len(ids))


def _take_rows(chunks: list[dict], n: int) -> tuple[dict, list[dict]]:
    """The first ``n`` real rows of ``chunks`` as one batch (carrier rows folded into its ``skipped``),
    and the chunks left. ``valid`` in the batch is the number of real rows (0: only carriers)."""
    import numpy as np

    merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    real = np.array([len(ids) > 0 for ids in merged["sample_ids"]], dtype=bool)
    positions = np.flatnonzero(real)
    cut = int(positions[n - 1]) + 1 if len(positions) >= n else len(real)
    head = {k: v[:cut] for k, v in merged.items()}
    rest = {k: v[cut:] for k, v in merged.items()}
    keep = real[:cut]
    carried = [e for row in head["skipped"][~keep] for e in row]
    batch = {k: v[keep] for k, v in head.items()}
    if carried:
        batch["skipped"] = list(batch["skipped"]) + [carried]
    batch["valid"] = int(keep.sum())
    return batch, ([rest] if len(rest["call_start"]) else [])
