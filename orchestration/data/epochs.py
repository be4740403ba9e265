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
before any decoding or tokenization; where the units' sizes are exact (parquet), the window's order is
drawn before reading and only the rows still due are read: the cost of a resume does not grow with
how far into the epoch, or into its window, it is.

Elastic resume: a restart on another number of ranks continues the epoch. Each rank's position is in
its checkpoint part, which every rank can read; each new rank reads all of them and appends them to
the position's ``history`` (`DataPosition.continued`). `EpochPlan.layout` turns the history into what
the first world's windows have left (below any rank's frontier or trained whole: done; a record with
some of its parts trained: only the others due) and deals that remainder over the new ranks in equal
record counts, as offset ranges of the same windows (same seed, same mixed order: an offset names the
same record in every world). A later change of world size appends another level to the history.

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
from orchestration.data.records import LM_CACHE, NORMALIZED_SCHEMA, ReadUnit, read_unit_tables
from orchestration.storage import S3Settings

log = logging.getLogger(__name__)

WINDOW_SHIFT = 32  # sample id = window << 32 | offset in window
OFFSET_MASK = (1 << WINDOW_SHIFT) - 1
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
    stop_below: int | None = None  # and ids from this one on belong to another rank (elastic resume)
    skip_ids: frozenset = frozenset()  # and these, at or above it
    done_parts: dict = field(default_factory=dict)  # sample id -> parts already trained (the rest is due)

    @property
    def units(self) -> tuple[ReadUnit, ...]:
        """The distinct units the window reads."""
        return tuple(dict.fromkeys(c.unit for part in self.parts for c in part))


@dataclass
class DataPosition:
    """How far one rank got in its epoch; saved in its checkpoint part.

    ``history`` is empty unless the world size changed inside this epoch (elastic resume): then it
    lists, per earlier world of the epoch, its size and where each of its ranks got to (``frontier``,
    ``taken``), and this rank's ids refer to its share of what those ranks left (`EpochPlan.layout`).
    Every rank of a world holds the same history, so any rank's state carries it to the next world.
    """

    epoch: int = 0
    frontier: int = 0  # every part id below it is done
    taken: set[int] = field(default_factory=set)  # part ids >= frontier already trained
    history: list[dict] = field(default_factory=list)  # [{"world": W, "ranks": [{"frontier", "taken"}]}]

    def consume(self, call_start: int, sample_ids) -> None:
        """A trained row: its samples' part ids and the first part id of the pool call that made it."""
        if call_start > self.frontier:
            self.frontier = call_start
            self.taken = {i for i in self.taken if i >= call_start}
        self.taken.update(int(i) for i in sample_ids if i >= self.frontier)

    def next_epoch(self) -> None:
        self.epoch, self.frontier, self.taken, self.history = self.epoch + 1, 0, set(), []

    def state(self) -> dict:
        out = {"epoch": self.epoch, "frontier": self.frontier, "taken": sorted(self.taken)}
        if self.history:
            out["history"] = self.history
        return out

    @classmethod
    def from_state(cls, state: dict | None) -> "DataPosition":
        if not state:
            return cls()
        return cls(int(state["epoch"]), int(state["frontier"]), set(state.get("taken", ())),
                   [dict(level) for level in state.get("history", ())])

    @classmethod
    def continued(cls, positions: list["DataPosition"]) -> "DataPosition":
        """The position every rank of a new world starts from, continuing the epoch the ranks of the
        old world (``positions``, one per old rank, in rank order) were in: what any of them finished
        stays finished, the rest is dealt over the new ranks (`EpochPlan.layout`)."""
        epochs = {p.epoch for p in positions}
        if len(epochs) != 1:
            raise ValueError(f"the saved ranks are in different epochs {sorted(epochs)}: not one checkpoint")
        first = positions[0]
        if not first.history and not any(p.frontier or p.taken for p in positions):
            return cls(first.epoch)  # nothing of the epoch done: the new world's own plan of it
        level = {"world": len(positions), "ranks": [{"frontier": p.frontier, "taken": sorted(p.taken)} for p in positions]}
        return cls(first.epoch, 0, set(), [*first.history, level])


@dataclass(frozen=True)
class Span:
    """Part of a window of the epoch's first world, dealt to a rank of a later one (elastic resume):
    the records at offsets [start, stop) of the window's mixed order (stop None: to its real end)."""

    rank: int  # the window's rank in the epoch's first world
    window: int  # its index there
    start: int
    stop: int | None
    done_parts: tuple[tuple[int, int, tuple[int, ...]], ...] = ()  # (offset, parts, parts trained) of records partly trained


class _Done:
    """What the ranks of an epoch's worlds finished, in the first world's coordinates: per window, the
    offsets done (intervals) and the parts done of records partly trained."""

    def __init__(self):
        self.intervals: dict[tuple[int, int], list[tuple[int, float]]] = {}
        self.parts: dict[tuple[int, int, int], tuple[int, set[int]]] = {}

    def add(self, spans: list[Span], frontier: int, taken) -> None:
        """One rank's position (its part ids refer to its ``spans``: span i is window i of its ids)."""
        sample = frontier >> PART_SHIFT
        at_span, at_offset = sample >> WINDOW_SHIFT, sample & OFFSET_MASK
        for i, span in enumerate(spans[: at_span + 1]):
            stop = span.stop if i < at_span else at_offset
            stop = float("inf") if stop is None else stop
            if stop > span.start:
                self.intervals.setdefault((span.rank, span.window), []).append((span.start, stop))
        for pid in taken:
            sample, part, count = split_part_id(int(pid))
            if sample >> WINDOW_SHIFT < len(spans):
                span = spans[sample >> WINDOW_SHIFT]
                key = (span.rank, span.window, sample & OFFSET_MASK)
                self.parts.setdefault(key, (count, set()))[1].add(part)

    def remainder(self, rank: int, window: int, size: int) -> list[tuple[int, int | None, int, dict]]:
        """(start, stop, estimated records, {offset: (parts, parts done)}) of the window's offset ranges
        not done."""
        done = list(self.intervals.get((rank, window), []))
        partial: dict[int, tuple[int, tuple[int, ...]]] = {}
        for (r, w, offset), (count, got) in self.parts.items():
            if (r, w) == (rank, window):
                if len(got) >= count:
                    done.append((offset, offset + 1))
                else:
                    partial[offset] = (count, tuple(sorted(got)))
        gaps, at = [], 0
        for start, stop in sorted(done):
            if start > at:
                gaps.append((at, start))
            at = max(at, stop)
        if at != float("inf"):
            gaps.append((at, None))
        out = []
        for start, stop in gaps:
            records = (stop if stop is not None else max(size, start)) - start
            out.append((int(start), None if stop is None else int(stop), int(records),
                        {o: p for o, p in partial.items() if o >= start and (stop is None or o < stop)}))
        return out


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

    def layout(self, epoch: int, world: int, history: list[dict]) -> list[list[Span]]:
        """Per rank of ``world``, its spans of the epoch, in its stream order (span i is window i of
        its sample ids).

        Without history, each rank reads its own windows whole. With history (the world size changed
        inside the epoch), the windows of the epoch's first world, less what the ranks of every world
        since finished (records below a rank's frontier or trained whole, in the first world's
        coordinates), are cut into offset ranges and dealt in order, so that each rank gets an equal
        share of the records left (rank k the k-th ``1/world`` of them). A window keeps its seed and
        its mixed order, so an offset names the same record in every world, and the mixture's shares
        hold within each range as they do in the whole window. A pure function of its arguments:
        every rank, restart and rerun computes the same layout.
        """
        if not history:
            return [[Span(r, w, 0, None) for w in range(len(self.rank_windows(epoch, r, world)))] for r in range(world)]
        key = ("layout", epoch, world, json.dumps(history, sort_keys=True))
        if key in self._memo:
            return self._memo[key]
        first_world = history[0]["world"]
        done = _Done()
        for k, level in enumerate(history):
            spans = self.layout(epoch, level["world"], history[:k])
            for rank, pos in enumerate(level["ranks"]):
                done.add(spans[rank], int(pos["frontier"]), pos.get("taken", ()))
        left = []  # (first-world rank, window, start, stop, records, partial parts)
        for rank in range(first_world):
            for w, parts in enumerate(self.rank_windows(epoch, rank, first_world)):
                size = sum(c.size for part in parts for c in part)
                left += [(rank, w, *gap) for gap in done.remainder(rank, w, size)]
        total = sum(gap[4] for gap in left)
        bounds = [total * k // world for k in range(world + 1)]
        out: list[list[Span]] = [[] for _ in range(world)]
        k, dealt = 0, 0
        for rank, w, start, stop, records, partial in left:
            while True:
                while k < world - 1 and dealt >= bounds[k + 1]:
                    k += 1
                room = bounds[k + 1] - dealt if k < world - 1 else records
                piece_stop = stop if records <= room else start + room
                done_parts = tuple((o, count, got) for o, (count, got) in sorted(partial.items())
                                   if start <= o and (piece_stop is None or o < piece_stop))
                out[k].append(Span(rank, w, start, piece_stop, done_parts))
                if records <= room:
                    dealt += records
                    break
                dealt, records, start = dealt + room, records - room, start + room
        self._memo[key] = out
        return out

    def windows(self, epoch: int, rank: int, world: int, position: DataPosition | None = None) -> list[Window]:
        """This rank's windows of the epoch, without those a position says are done."""
        done = position if position is not None and position.epoch == epoch else DataPosition(epoch)
        first_world = done.history[0]["world"] if done.history else world
        spans = self.layout(epoch, world, done.history)[rank]
        frontier = done.frontier >> PART_SHIFT
        parts: dict[int, tuple[int, set[int]]] = {}
        for pid in done.taken:
            sample, part, count = split_part_id(pid)
            parts.setdefault(sample, (count, set()))[1].add(part)
        base: dict[int, list] = {}
        out = []
        for index, span in enumerate(spans):
            first_id, next_first = index << WINDOW_SHIFT, (index + 1) << WINDOW_SHIFT
            stop_id = None if span.stop is None else first_id | span.stop
            if frontier >= (next_first if stop_id is None else stop_id):
                continue  # wholly trained
            if span.rank not in base:
                base[span.rank] = self.rank_windows(epoch, span.rank, first_world)
            here = {s: (count, set(got)) for s, (count, got) in parts.items() if first_id <= s < next_first}
            for offset, count, got in span.done_parts:  # parts of a record trained in an earlier world
                here.setdefault(first_id | offset, (count, set()))[1].update(got)
            out.append(
                Window(
                    index=index,
                    parts=base[span.rank][span.window],
                    seed=_seed("window", self.seed, epoch, span.rank, first_world, span.window),
                    buffer_rows=self.buffer_rows,
                    skip_below=max(frontier, first_id | span.start),
                    stop_below=stop_id,
                    skip_ids=frozenset(s for s, (count, got) in here.items() if len(got) >= count),
                    done_parts={s: sorted(got) for s, (count, got) in here.items() if len(got) < count},
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


# Formats whose unit sizes are exact (parquet footers): a window's mixed order is known before reading.
EXACT_SIZE_FORMATS = ("coyo_parquet", LM_CACHE)


def mix_window(window: Window, s3: S3Settings | None, chunk_rows: int = 64) -> Iterator[pa.Table]:
    """The window's records in its mixed, shuffled order, with sample ids; done ids left out before
    decoding (see `mixture.mix_order`). The draws depend only on the seed and the chunks' records, so
    a rerun gives the same order and ids whatever it then leaves out.

    Where every unit's size is exact, the order is drawn first without reading a record, and then only
    the rows still due are read (each chunk from its first due row on): resuming at 90% of a window
    reads a tenth of it, not all of it. Otherwise the records are read as they are drawn."""
    if all(c.unit.format in EXACT_SIZE_FORMATS for part in window.parts for c in part):
        yield from _mix_known_sizes(window, s3, chunk_rows)
    else:
        yield from mix_as_drawn(window, s3, chunk_rows)


def mix_as_drawn(window: Window, s3: S3Settings | None, chunk_rows: int = 64) -> Iterator[pa.Table]:
    """`mix_window` reading every record of the window up to its stop as it is drawn (records of
    estimated sizes: the order depends on where a unit really ends)."""
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
        if window.stop_below is not None and sample_id >= window.stop_below:
            break
        if sample_id >= window.skip_below and sample_id not in window.skip_ids:
            picks.append((table, row, sample_id))
        if len(picks) >= chunk_rows:
            yield _picked(picks, window.done_parts)
            picks = []
    if picks:
        yield _picked(picks, window.done_parts)


def _mix_known_sizes(window: Window, s3: S3Settings | None, chunk_rows: int) -> Iterator[pa.Table]:
    """`mix_window` for units of exact sizes: the draws are made on row numbers (a unit's rows are
    pulled in order, so a pull is its chunk's next row number), and rows are read only from the
    first record due on. At that point every record due later is either waiting in a shuffle buffer
    (pulled, not yet emitted) or not pulled yet, so each chunk's reader starts at its lowest such row;
    rows read ahead of their turn wait in ``held``."""
    lengths = [[max(0, (c.stop if c.stop is not None else c.unit.size) - c.start) for c in part] for part in window.parts]
    cursor: dict[tuple[int, int], int] = {}
    waiting: dict[tuple[int, int], set[int]] = {}  # pulled into a buffer, not emitted yet

    def pull(i: int, j: int):
        row = cursor.get((i, j), 0)
        if row >= lengths[i][j]:
            return None
        cursor[(i, j)] = row + 1
        waiting.setdefault((i, j), set()).add(row)
        return j, row

    start: dict[tuple[int, int], int] | None = None  # per chunk, its first row due (set at the first due record)
    due_before: dict[tuple[int, int], set[int]] = {}  # rows below that cursor still due (waiting then)
    unwanted: dict[tuple[int, int], set[int]] = {}  # rows past the first due record that are not due after all
    readers: dict[tuple[int, int], Iterator] = {}
    held: dict[tuple[int, int, int], tuple[pa.Table, int]] = {}

    def rows(key: tuple[int, int]) -> Iterator[tuple[int, pa.Table, int]]:
        chunk, at = window.parts[key[0]][key[1]], start.get(key, 0)  # a chunk first pulled later: from its start
        for table in read_unit_tables(chunk.unit, s3, start=chunk.start + at, stop=chunk.stop):
            for index in range(table.num_rows):
                yield at, table, index
                at += 1

    def fetch(key: tuple[int, int], wanted: int):
        if (*key, wanted) in held:
            return held.pop((*key, wanted))
        reader = readers.get(key)
        if reader is None:
            reader = readers[key] = rows(key)
        for row, table, index in reader:
            if row == wanted:
                return table, index
            if row in unwanted.get(key, ()):
                unwanted[key].discard(row)
            elif row >= begin_cursor.get(key, 0) or row in due_before.get(key, ()):
                held[(*key, row)] = (table, index)
        log.warning("%s: fewer records than its footer said; record %d of the chunk left out",
                    window.parts[key[0]][key[1]].unit.uri, wanted)
        return None

    sizes = [[(c.size, c.pass_index) for c in part] for part in window.parts]
    begin_cursor: dict[tuple[int, int], int] = {}
    picks: list[tuple[pa.Table, int, int]] = []
    for offset, (i, (j, row)) in enumerate(mix_order(sizes, window.seed, window.buffer_rows, pull)):
        key = (i, j)
        waiting[key].discard(row)
        sample_id = (window.index << WINDOW_SHIFT) | offset
        if window.stop_below is not None and sample_id >= window.stop_below:
            break
        is_due = sample_id >= window.skip_below and sample_id not in window.skip_ids
        if start is None:
            if not is_due:
                continue
            begin_cursor = dict(cursor)
            due_before = {k: set(v) for k, v in waiting.items() if v}
            start = {k: min([*due_before.get(k, ()), begin_cursor[k]]) for k in begin_cursor}
            start[key] = min(start.get(key, row), row)
        if not is_due:
            held.pop((i, j, row), None)
            unwanted.setdefault(key, set()).add(row)
            continue
        got = fetch(key, row)
        if got is not None:
            picks.append((*got, sample_id))
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
