"""The order of an epoch, who reads what, and where a rank stands in it (exactly-once resume).

An epoch's order is a pure function of (shuffle seed, epoch, world size), so every rank, every restart
and every rerun computes the same one, and a checkpoint only has to say how far each rank got:

1. The read plan's units (shards, or row-group ranges of big parquet shards) are permuted with
   (seed, epoch): a new shard order every epoch.
2. Units go to ranks in that order, each to the rank with the least work so far (by the unit's size
   times its repeat factor), so ranks get about equal shares without counting records.
3. Each rank's units are cut into *windows* of ``data.shuffle_window_shards`` units. A window is one
   Ray Data read task: it streams its units side by side, picks the next record from a random unit,
   and passes it through a shuffle buffer of ``data.shuffle_buffer_rows`` rows (memory stays bounded;
   a batch draws from every shard of its window).
4. Every record a window emits gets a *sample id*, ``window << 32 | offset``: its place in the rank's
   stream, known before anything is decoded.

The rank's dataset keeps this order (``preserve_order``), so the training loop consumes sample ids in
increasing order of the windows' pool calls. Its position (`DataPosition`) is the epoch, a *frontier*
(every id below it is done: trained, or dropped as a bad record) and the ids at or above the frontier
already trained (stage 2 packs one call's samples into several rows). Resuming builds the rank's
dataset without the windows wholly below the frontier and drops done ids inside the read task, before
any decoding or tokenization: the cost of a resume does not grow with how far into the epoch it is.

An epoch ends for every rank when one rank's stream runs out (``report`` is a barrier, so ranks must
take the same number of steps): the other ranks' remaining rows are left out of that epoch. Which rows
those are follows from the plan (for stage 1 it is exactly determined; for stage 2 after a resume the
packing of the window it resumed in may differ), and the next epoch reads everything again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from orchestration.data.records import NORMALIZED_SCHEMA, ReadUnit, read_unit_tables
from orchestration.storage import S3Settings

WINDOW_SHIFT = 32  # sample id = window << 32 | offset in window
PART_SHIFT = 4  # part id = sample id << 4 | part << 2 | (parts - 1): a record gives up to 4 samples

STREAM_SCHEMA = NORMALIZED_SCHEMA.append(pa.field("sample_id", pa.int64())).append(
    pa.field("done_parts", pa.list_(pa.int32()))  # parts of this record already trained (resume)
)


def part_id(sample_id: int, part: int = 0, parts: int = 1) -> int:
    """The id of one trained sequence: stage 2 makes up to 4 of one record (e.g. an image-text pair
    both ways), which may land in different packed rows, so positions count parts, not records."""
    return (sample_id << PART_SHIFT) | (part << 2) | (parts - 1)


def split_part_id(pid: int) -> tuple[int, int, int]:
    """(sample id, part, parts) of a part id."""
    return pid >> PART_SHIFT, (pid >> 2) & 3, (pid & 3) + 1


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Window:
    """One read task of a rank's epoch: units read side by side through a seeded shuffle buffer."""

    index: int
    units: tuple[ReadUnit, ...]
    seed: int
    buffer_rows: int
    skip_below: int = 0  # sample ids below this are done (resume)
    skip_ids: frozenset = frozenset()  # and these, at or above it
    done_parts: dict = field(default_factory=dict)  # sample id -> parts already trained (the rest is due)


@dataclass
class DataPosition:
    """How far one rank got in its epoch; saved in its checkpoint part."""

    epoch: int = 0
    frontier: int = 0  # every part id below it is done
    taken: set[int] = field(default_factory=set)  # part ids >= frontier already trained

    def consume(self, call_start: int, sample_ids) -> None:
        """A trained row: its samples' part ids and the first part id of the pool call that made it."""
        if call_start > self.frontier:
            self.frontier = call_start
            self.taken = {i for i in self.taken if i >= call_start}
        self.taken.update(int(i) for i in sample_ids if i >= self.frontier)

    def next_epoch(self) -> None:
        self.epoch, self.frontier, self.taken = self.epoch + 1, 0, set()

    def state(self) -> dict:
        return {"epoch": self.epoch, "frontier": self.frontier, "taken": sorted(self.taken)}

    @classmethod
    def from_state(cls, state: dict | None) -> "DataPosition":
        if not state:
            return cls()
        return cls(int(state["epoch"]), int(state["frontier"]), set(state.get("taken", ())))


@dataclass(frozen=True)
class EpochPlan:
    """Everything that fixes the epochs' order: the units and the shuffle settings."""

    units: tuple[ReadUnit, ...]
    seed: int
    window_units: int = 8
    buffer_rows: int = 512

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["units"] = [json.loads(u.to_json()) for u in self.units]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "EpochPlan":
        data = json.loads(text)
        units = tuple(ReadUnit.from_json(json.dumps(u)) for u in data.pop("units"))
        return cls(units=units, **data)

    def epoch_units(self, epoch: int) -> list[ReadUnit]:
        """The units in this epoch's order."""
        order = np.random.default_rng(_seed("units", self.seed, epoch)).permutation(len(self.units))
        return [self.units[i] for i in order]

    def rank_units(self, epoch: int, rank: int, world: int) -> list[ReadUnit]:
        """This rank's units, in epoch order (each unit to the least-loaded rank so far)."""
        load = [0.0] * world
        mine = []
        for unit in self.epoch_units(epoch):
            target = min(range(world), key=lambda r: (load[r], r))
            load[target] += unit.weight
            if target == rank:
                mine.append(unit)
        return mine

    def windows(self, epoch: int, rank: int, world: int, position: DataPosition | None = None) -> list[Window]:
        """This rank's windows of the epoch, without those a position says are done."""
        units = self.rank_units(epoch, rank, world)
        done = position if position is not None and position.epoch == epoch else DataPosition(epoch)
        frontier = done.frontier >> PART_SHIFT
        parts: dict[int, tuple[int, set[int]]] = {}
        for pid in done.taken:
            sample, part, count = split_part_id(pid)
            parts.setdefault(sample, (count, set()))[1].add(part)
        whole = {s for s, (count, got) in parts.items() if len(got) >= count}
        out = []
        for index, start in enumerate(range(0, len(units), self.window_units)):
            first_id, next_first = index << WINDOW_SHIFT, (index + 1) << WINDOW_SHIFT
            if frontier >= next_first:
                continue  # wholly trained
            mine = [s for s in parts if first_id <= s < next_first]
            out.append(
                Window(
                    index=index,
                    units=tuple(units[start : start + self.window_units]),
                    seed=_seed("window", self.seed, epoch, rank, world, index),
                    buffer_rows=self.buffer_rows,
                    skip_below=max(frontier, first_id),
                    skip_ids=frozenset(s for s in mine if s in whole),
                    done_parts={s: sorted(parts[s][1]) for s in mine if s not in whole},
                )
            )
        return out


def mix_window(window: Window, s3: S3Settings | None, chunk_rows: int = 64) -> Iterator[pa.Table]:
    """The window's records in its shuffled order, with sample ids; done ids left out before decoding.

    Units are streamed side by side: the next record comes from a unit picked at random, into a buffer
    of ``buffer_rows`` records from which a random one leaves. The draws depend only on the seed and
    the units' record counts, so a rerun gives the same order and ids whatever it then leaves out.
    """
    rng = np.random.default_rng(window.seed)
    streams = [read_unit_tables(unit, s3) for unit in window.units]
    current: list[tuple[pa.Table, int] | None] = [None] * len(streams)
    active = list(range(len(streams)))
    buffer: list[tuple[pa.Table, int]] = []
    picks: list[tuple[pa.Table, int, int]] = []
    offset = 0

    def pull(i: int) -> tuple[pa.Table, int] | None:
        """The next record of unit i, or None when it is exhausted."""
        while current[i] is None or current[i][1] >= current[i][0].num_rows:
            table = next(streams[i], None)
            if table is None:
                return None
            current[i] = (table, 0)
        table, row = current[i]
        current[i] = (table, row + 1)
        return table, row

    def emit(record: tuple[pa.Table, int]) -> None:
        nonlocal offset
        sample_id = (window.index << WINDOW_SHIFT) | offset
        offset += 1
        if sample_id >= window.skip_below and sample_id not in window.skip_ids:
            picks.append((record[0], record[1], sample_id))

    while active or buffer:
        if active and len(buffer) < window.buffer_rows:
            choice = int(rng.integers(len(active)))
            record = pull(active[choice])
            if record is None:
                active.pop(choice)
            else:
                buffer.append(record)
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        emit(buffer.pop())
        if len(picks) >= chunk_rows:
            yield _picked(picks, window.done_parts)
            picks = []
    if picks:
        yield _picked(picks, window.done_parts)


def _picked(picks: list[tuple[pa.Table, int, int]], done_parts: dict) -> pa.Table:
    rows = pa.concat_tables([table.slice(row, 1) for table, row, _ in picks]).combine_chunks()
    rows = rows.append_column("sample_id", pa.array([i for _, _, i in picks], pa.int64()))
    return rows.append_column("done_parts", pa.array([done_parts.get(i, []) for _, _, i in picks], pa.list_(pa.int32())))


def window_reader(window: Window, s3: S3Settings | None):
    """The read function of one window's task (a picklable callable)."""
    return functools.partial(mix_window, window, s3)
