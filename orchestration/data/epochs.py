"""The order of an epoch, who reads what, and where a rank stands in it (exactly-once resume).

An epoch's order is a pure function of (shuffle seed, epoch, world size), so every rank, every restart
and every rerun computes the same one, and a checkpoint only has to say how far each rank got:

1. Each source's units (shards, row-group ranges of big parquet shards, record ranges of one big index
   file) are permuted with (seed, epoch) and dealt to ranks source by source, each unit to the rank
   with the fewest records of that source so far: every rank gets every source that has as many units
   as there are ranks, in about equal amounts.
2. On each rank, each source is its own *stream of passes* over its units there: a new seeded unit
   order per pass, passes one after another, as many records as the source's share of the rank's epoch
   (mixture.py's repeat factor: a source with factor 1 is read exactly once; an up-weighted one makes
   several passes, the copies of a record a pass apart; a down-weighted one a partial pass, whose
   records change with the epoch). Every rank's epoch has the same number of draws of each source that
   is not read exactly once.
3. The rank's epoch is cut into *windows* of about ``data.shuffle_window_shards`` units' worth of
   records, every source's stream cut at the same fractions, so each window holds every source in its
   share (a unit may be split between windows at a record offset; the last piece of a unit in a pass
   reads to its real end, so estimated sizes never drop or repeat a record). A window is one Ray Data
   read task: `mixture.mix_order` picks each next record's source by weight from a seeded
   low-discrepancy sequence, reads the chunks of one pass side by side, and passes every source through
   its own shuffle buffer (its share of ``data.shuffle_buffer_rows``), so shares hold at every prefix.
4. Every record a window emits gets a *sample id*, ``window << 32 | offset``: its place in the rank's
   stream, known before anything is decoded.

The rank's dataset keeps this order (``preserve_order``), so the training loop consumes sample ids in
increasing order of the windows' pool calls. Its position (`DataPosition`) is the epoch, a *frontier*
(every id below it is done: trained, or dropped as a bad record) and the ids at or above the frontier
already trained (stage 2 packs one call's samples into several rows). Because windows and their draw
order are a pure function of the plan, the frontier also fixes every source's pass and cursor on the
rank: exactly-once per pass holds across restarts without saving them separately. Resuming builds the
rank's dataset without the windows wholly below the frontier and drops done ids inside the read task,
before any decoding or tokenization: the cost of a resume does not grow with how far into the epoch it is.

An epoch ends for every rank when one rank's stream runs out (``report`` is a barrier, so ranks must
take the same number of steps): the other ranks' remaining rows are left out of that epoch. Which rows
those are follows from the plan (for stage 1 it is exactly determined; for stage 2 after a resume the
packing of the window it resumed in may differ), and the next epoch reads everything again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from orchestration.data.mixture import mix_order
from orchestration.data.records import NORMALIZED_SCHEMA, ReadUnit, read_unit_tables
from orchestration.storage import S3Settings

log = logging.getLogger(__name__)

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
class Chunk:
    """Records [start, stop) of one unit, read in one pass of its source (stop None: to the unit's real
    end, which for an estimated size may be before or after ``unit.size``)."""

    unit: ReadUnit
    start: int
    stop: int | None
    pass_index: int

    @property
    def size(self) -> int:
        """Estimated records."""
        return (self.stop if self.stop is not None else max(self.unit.records_estimate, self.start + 1)) - self.start


@dataclass(frozen=True)
class Window:
    """One read task of a rank's epoch: each source's chunks, mixed by weight through shuffle buffers."""

    index: int
    parts: tuple[tuple[Chunk, ...], ...]  # per source (by name), its chunks in stream order
    seed: int
    buffer_rows: int
    skip_below: int = 0  # sample ids below this are done (resume)
    skip_ids: frozenset = frozenset()  # and these, at or above it
    done_parts: dict = field(default_factory=dict)  # sample id -> parts already trained (the rest is due)

    @property
    def units(self) -> tuple[ReadUnit, ...]:
        """The distinct units the window reads."""
        return tuple(dict.fromkeys(c.unit for part in self.parts for c in part))


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
    counted_by: dict = field(default_factory=dict, compare=False, hash=False)  # source -> how its records were counted
    _memo: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("units", "_memo")}
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

    def assignment(self, epoch: int, world: int) -> list[dict[str, list[ReadUnit]]]:
        """Per rank, per source, its units (in epoch order): each unit to the rank with the fewest
        records of that source so far (ties: the fewest records overall, then the lowest rank)."""
        key = ("assignment", epoch, world)
        if key not in self._memo:
            by_source: dict[str, list[ReadUnit]] = {}
            for unit in self.epoch_units(epoch):
                by_source.setdefault(unit.source, []).append(unit)
            total = [0] * world
            ranks: list[dict[str, list[ReadUnit]]] = [{} for _ in range(world)]
            for source in sorted(by_source):
                heap = [(0, total[r], r) for r in range(world)]
                heapq.heapify(heap)
                for unit in by_source[source]:
                    load, _, r = heapq.heappop(heap)
                    ranks[r].setdefault(source, []).append(unit)
                    total[r] += unit.records_estimate
                    heapq.heappush(heap, (load + unit.records_estimate, total[r], r))
            for old in [k for k in self._memo if k[0] == "assignment"]:
                del self._memo[old]  # one epoch's assignment at a time: plans can be large
            self._memo[key] = ranks
        return self._memo[key]

    def rank_units(self, epoch: int, rank: int, world: int) -> list[ReadUnit]:
        """This rank's units, source by source."""
        return [u for source, units in sorted(self.assignment(epoch, world)[rank].items()) for u in units]

    def source_draws(self, epoch: int, rank: int, world: int) -> dict[str, int]:
        """Records each source gives this rank's epoch (estimated): its records here when its repeat
        factor is 1 (one pass), else an equal share of the source's epoch total on every rank (so
        every rank has the same mixture, however its units' sizes came out)."""
        mine = self.assignment(epoch, world)[rank]
        if "sources" not in self._memo:
            totals: dict[str, int] = {}
            repeat: dict[str, float] = {}
            for unit in self.units:
                totals[unit.source] = totals.get(unit.source, 0) + unit.records_estimate
                repeat[unit.source] = unit.repeat
            self._memo["sources"] = totals, repeat
        totals, repeat = self._memo["sources"]
        draws = {}
        for source in sorted(totals):
            here = sum(u.records_estimate for u in mine.get(source, ()))
            if not here:
                log.warning("rank %d of %d has no unit of source %s in epoch %d (it has fewer units than there are "
                            "ranks): its share on this rank goes to the other sources", rank, world, source, epoch)
                continue
            draws[source] = here if repeat[source] == 1.0 else max(1, round(repeat[source] * totals[source] / world))
        return draws

    def source_stream(self, epoch: int, rank: int, world: int, source: str, draws: int) -> list[Chunk]:
        """A source's stream on this rank: passes over its units here, each in a new seeded order, up
        to ``draws`` records (the last unit cut at a record offset)."""
        units = self.assignment(epoch, world)[rank].get(source, [])
        chunks: list[Chunk] = []
        covered, pass_index = 0, 0
        while units and covered < draws:
            order = np.random.default_rng(_seed("pass", self.seed, epoch, rank, world, source, pass_index)).permutation(len(units))
            for i in order:
                size = units[i].records_estimate
                if covered + size <= draws:
                    chunks.append(Chunk(units[i], 0, None, pass_index))
                    covered += size
                else:
                    chunks.append(Chunk(units[i], 0, draws - covered, pass_index))
                    covered = draws
                    break
            pass_index += 1
        return chunks

    def rank_windows(self, epoch: int, rank: int, world: int) -> list[tuple[tuple[Chunk, ...], ...]]:
        """This rank's windows' parts: every source's stream cut at the same fractions into windows of
        about ``window_units`` units' worth of records."""
        draws = self.source_draws(epoch, rank, world)
        if not draws:
            return []
        streams = {source: self.source_stream(epoch, rank, world, source, n) for source, n in draws.items()}
        mine = self.rank_units(epoch, rank, world)
        mean_unit = sum(u.records_estimate for u in mine) / len(mine)
        count = max(1, round(sum(draws.values()) / (self.window_units * mean_unit)))
        cut = {source: _cut_stream(stream, [draws[source] * j // count for j in range(count + 1)])
               for source, stream in streams.items()}
        return [tuple(tuple(cut[source][j]) for source in sorted(cut)) for j in range(count)]

    def windows(self, epoch: int, rank: int, world: int, position: DataPosition | None = None) -> list[Window]:
        """This rank's windows of the epoch, without those a position says are done."""
        done = position if position is not None and position.epoch == epoch else DataPosition(epoch)
        frontier = done.frontier >> PART_SHIFT
        parts: dict[int, tuple[int, set[int]]] = {}
        for pid in done.taken:
            sample, part, count = split_part_id(pid)
            parts.setdefault(sample, (count, set()))[1].add(part)
        whole = {s for s, (count, got) in parts.items() if len(got) >= count}
        out = []
        for index, window_parts in enumerate(self.rank_windows(epoch, rank, world)):
            first_id, next_first = index << WINDOW_SHIFT, (index + 1) << WINDOW_SHIFT
            if frontier >= next_first:
                continue  # wholly trained
            mine = [s for s in parts if first_id <= s < next_first]
            out.append(
                Window(
                    index=index,
                    parts=window_parts,
                    seed=_seed("window", self.seed, epoch, rank, world, index),
                    buffer_rows=self.buffer_rows,
                    skip_below=max(frontier, first_id),
                    skip_ids=frozenset(s for s in mine if s in whole),
                    done_parts={s: sorted(parts[s][1]) for s in mine if s not in whole},
                )
            )
        return out


def _cut_stream(stream: list[Chunk], bounds: list[int]) -> list[list[Chunk]]:
    """A stream's chunks split at the (estimated) record positions ``bounds`` (increasing, from 0 to
    its length): the chunks of each span. A unit split inside a pass becomes [start, offset) and
    [offset, ...); the piece that ends the unit keeps its open end."""
    spans: list[list[Chunk]] = [[] for _ in range(len(bounds) - 1)]
    position, span = 0, 0
    for chunk in stream:
        end = position + chunk.size
        at = position
        while at < end:
            while bounds[span + 1] <= at:
                span += 1
            upto = min(bounds[span + 1], end)
            stop = None if upto == end and chunk.stop is None else chunk.start + (upto - position)
            spans[span].append(Chunk(chunk.unit, chunk.start + (at - position), stop, chunk.pass_index))
            at = upto
        position = end
    return spans


def mix_window(window: Window, s3: S3Settings | None, chunk_rows: int = 64) -> Iterator[pa.Table]:
    """The window's records in its mixed, shuffled order, with sample ids; done ids left out before
    decoding (see `mixture.mix_order`). The draws depend only on the seed and the chunks' records, so
    a rerun gives the same order and ids whatever it then leaves out."""
    readers: dict[tuple[int, int], Iterator] = {}

    def rows(chunk: Chunk) -> Iterator[tuple[pa.Table, int]]:
        for table in read_unit_tables(chunk.unit, s3, start=chunk.start, stop=chunk.stop):
            for row in range(table.num_rows):
                yield table, row

    def pull(i: int, j: int):
        reader = readers.get((i, j))
        if reader is None:
            reader = readers[(i, j)] = rows(window.parts[i][j])
        return next(reader, None)

    sizes = [[(c.size, c.pass_index) for c in part] for part in window.parts]
    picks: list[tuple[pa.Table, int, int]] = []
    for offset, (_, (table, row)) in enumerate(mix_order(sizes, window.seed, window.buffer_rows, pull)):
        sample_id = (window.index << WINDOW_SHIFT) | offset
        if sample_id >= window.skip_below and sample_id not in window.skip_ids:
            picks.append((table, row, sample_id))
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
