"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), saved asynchronously straight
into the run's storage and restored by each rank reading only its own shards from there.

One checkpoint directory holds, from every rank:

    .metadata, __<rank>_0.distcp   model + optimizer shards (DCP; rank 0 writes .metadata last)
    rank_<r>.pt                    that rank's RNG states and data state (BatchStream.state_dict)
    train_state.json               (rank 0) step, scheduler, the step history, last metrics
    COMPLETE.rank<r>               written by each rank after all of the above

A checkpoint is *complete* when it has ``.metadata`` and a COMPLETE marker of every rank (each rank
writes its marker last). Each save goes to a fresh directory (Ray Train registers it only once every
rank has committed it), so a save that dies half-way leaves at most an incomplete directory beside the
previous checkpoints and never touches them; loading refuses an incomplete directory and falls back to
the newest complete sibling.

A restart on another number of ranks loads the same directory: DCP reshards the model and optimizer
shards onto the new ranks, and every new rank reads every old rank's ``rank_<r>.pt``, from which its
data stream continues the epoch (``TrainState.data``; see orchestration/data/epochs.py).

The step history is a list of segments ``[first_step, last_step]``, one per (re)start, so a resumed
run can show that every step was applied exactly once in the lineage of the final weights.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
STEP_DIR = re.compile(r"checkpoint_step(\d+)_")


class IncompleteCheckpointError(RuntimeError):
    """The directory is not a complete checkpoint (a save was cut off, or files are missing)."""


@dataclass
class TrainState:
    """Everything about progress that is not a tensor."""

    step: int = 0  # optimizer steps taken (including skipped non-finite ones)
    epoch: int = 0  # data epoch this rank is in
    batches_in_epoch: int = 0  # micro-batches this rank consumed in that epoch
    # This rank's data state (BatchStream.state_dict(): position, counts); per rank, so it lives in
    # rank_<r>.pt, not in train_state.json. After a change of world size, every old rank's:
    # {"world": W, "ranks": [...]} (BatchStream.load_state_dict continues the epoch from them).
    data: dict = field(default_factory=dict)
    nonfinite_skipped: int = 0
    history: list[list[int]] = field(default_factory=list)  # [[first_step, last_step], ...]
    world_size: int = 1
    metrics: dict[str, float] = field(default_factory=dict)

    def start_segment(self) -> None:
        self.history.append([self.step + 1, self.step])

    def advance(self) -> None:
        self.step += 1
        self.history[-1][1] = self.step


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def state_dict_options(ignore_frozen: bool) -> StateDictOptions:
    # Without the frozen weights in the checkpoint, loading must not insist on them.
    return StateDictOptions(ignore_frozen_params=ignore_frozen, strict=not ignore_frozen)


def _fsspec(filesystem: pafs.FileSystem | None):
    from fsspec.implementations.arrow import ArrowFSWrapper

    return ArrowFSWrapper(filesystem or pafs.LocalFileSystem())


class StorageWriter(FsspecWriter):
    """DCP writer onto a pyarrow filesystem (Ray Train's storage: local disk, NFS or S3)."""

    def __init__(self, path: str, filesystem: pafs.FileSystem | None):
        super().__init__(path, sync_files=False)  # fsspec streams have no fsync; flush() is what there is
        self.fs.fs = _fsspec(filesystem)


class StorageReader(FsspecReader):
    """DCP reader on a pyarrow filesystem: each rank opens only the files holding its shards and reads
    only their byte ranges, straight from storage (no download of the whole checkpoint)."""

    def __init__(self, path: str, filesystem: pafs.FileSystem | None):
        super().__init__(path)
        self.fs.fs = _fsspec(filesystem)

    def _slice_file(self, file, sinfo):
        # One ranged read per stored item. DCP's default view hands torch.load the open file, and
        # torch.load reads a zip record in many small seeks and reads: on S3 each is its own request
        # (360 small tensors from the local S3 server: 277 s before, 15 s with one read per item).
        file.seek(sinfo.offset)
        return io.BytesIO(file.read(sinfo.length))


def _write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


class AsyncSaver:
    """Asynchronous sharded checkpoints, written straight into the run's storage.

    ``start`` copies this rank's shards to host memory (DCP's staging: training may change the weights
    right after) and returns; a background thread writes them (``dcp.async_save``), then this rank's RNG
    and data position, rank 0's train state, and last this rank's COMPLETE marker. A save that is cut
    off never gets all markers, so loading refuses it and the previous checkpoint stays the one to use.
    The background DCP collectives run on their own gloo group so they never interleave with FSDP's.
    """

    def __init__(self, filesystem: pafs.FileSystem | None, root: str):
        self.fs = filesystem or pafs.LocalFileSystem()
        self.root = root.rstrip("/")
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.future: Future | None = None
        self.segment = self._segment_id()

    @staticmethod
    def _segment_id() -> str:
        """One id per (re)start, the same on every rank: checkpoint directories of different restarts
        never collide, even at the same step."""
        ident = [time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}"]
        if dist.is_initialized():
            dist.broadcast_object_list(ident, src=0)
        return ident[0]

    def directory(self, step: int) -> str:
        return f"{self.root}/checkpoint_step{step:07d}_{self.segment}"

    def start(self, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer], scheduler,
              state: TrainState, ignore_frozen: bool = False, before_complete=None, directory: str | None = None) -> str:
        """Collective: begin saving ``step`` (into ``directory``, by default the step's own under the
        root); returns the checkpoint directory. Waits for a previous save."""
        self.wait()
        rank, world = _rank_world()
        directory = directory.rstrip("/") if directory else self.directory(step)
        model_sd, optim_sd = get_state_dict(model, optimizers, options=state_dict_options(ignore_frozen))
        per_rank = io.BytesIO()
        torch.save({"rng": rng_state(), "epoch": state.epoch, "batches_in_epoch": state.batches_in_epoch,
                    "data": state.data}, per_rank)
        meta = {k: v for k, v in asdict(state).items() if k != "data"} | {"world_size": world, "scheduler": scheduler.state_dict()}
        written = dcp.async_save(
            {"model": model_sd, "optim": optim_sd},
            storage_writer=StorageWriter(directory, self.fs),
            process_group=self.group,
        )

        def finish() -> None:
            written.result()
            _write_bytes(self.fs, f"{directory}/rank_{rank}.pt", per_rank.getvalue())
            if rank == 0:
                # LambdaLR saves None for a plain function: the schedule itself is rebuilt from the config.
                _write_bytes(self.fs, f"{directory}/{TRAIN_STATE}", json.dumps(meta, indent=1, default=float).encode())
            if before_complete is not None:
                before_complete()
            _write_bytes(self.fs, f"{directory}/COMPLETE.rank{rank}", str(state.step).encode())

        self.future = self.executor.submit(finish)
        return directory

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed by this rank; re-raise its error."""
        if self.future is not None:
            self.future.result()

    def idle(self) -> bool:
        """No save of this rank is in flight."""
        return self.future is None or self.future.done()

    def close(self) -> None:
        self.wait()
        self.executor.shutdown(wait=True)


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """Collective: True iff ``flag`` is True on every rank (one tiny all-reduce)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t) == 0.0


def save_checkpoint(
    directory: str,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    scheduler,
    state: TrainState,
    ignore_frozen: bool = False,
    before_complete=None,
    filesystem: pafs.FileSystem | None = None,
) -> None:
    """Collective, blocking: the same save as :class:`AsyncSaver` into ``directory``, waited for.

    ``before_complete`` (tests: fault injection) runs after the shards are written and before this
    rank's COMPLETE marker, i.e. in the middle of the save.
    """
    saver = AsyncSaver(filesystem, os.path.dirname(directory.rstrip("/")))
    try:
        saver.start(state.step, model, optimizers, scheduler, state, ignore_frozen=ignore_frozen,
                    before_complete=before_complete, directory=directory)
        saver.wait()
    finally:
        saver.executor.shutdown(wait=True)


def read_train_state(directory: str, filesystem: pafs.FileSystem | None = None) -> dict:
    return json.loads(_read_bytes(filesystem or pafs.LocalFileSystem(), f"{directory.rstrip('/')}/{TRAIN_STATE}"))


def check_complete(directory: str, filesystem: pafs.FileSystem | None = None) -> dict:
    """The train state of a complete checkpoint; raises IncompleteCheckpointError otherwise."""
    fs = filesystem or pafs.LocalFileSystem()
    directory = directory.rstrip("/")
    if not _exists(fs, f"{directory}/.metadata") or not _exists(fs, f"{directory}/{TRAIN_STATE}"):
        raise IncompleteCheckpointError(f"{directory}: no DCP metadata or train state (save cut off?)")
    meta = read_train_state(directory, fs)
    missing = [r for r in range(meta["world_size"]) if not _exists(fs, f"{directory}/COMPLETE.rank{r}")]
    if missing:
        raise IncompleteCheckpointError(f"{directory}: ranks {missing} never finished their part of the save")
    return meta


def load_checkpoint(
    directory: str,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    scheduler,
    ignore_frozen: bool = False,
    filesystem: pafs.FileSystem | None = None,
) -> TrainState:
    """Collective: restore model, optimizer, scheduler, RNG and data position saved by ``save_checkpoint``
    / :class:`AsyncSaver`, reading only this rank's shards straight from ``filesystem`` (local or S3)."""
    fs = filesystem or pafs.LocalFileSystem()
    directory = directory.rstrip("/")
    meta = check_complete(directory, fs)
    rank, world = _rank_world()
    model_sd, optim_sd = get_state_dict(model, optimizers, options=state_dict_options(ignore_frozen))
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=StorageReader(directory, fs))  # reshards if the world size changed
    set_state_dict(
        model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=state_dict_options(ignore_frozen),
    )
    sched = dict(meta.pop("scheduler"))
    sched.setdefault("lr_lambdas", [None] * len(scheduler.optimizer.param_groups))
    scheduler.load_state_dict(sched)
    # Per-rank state: RNG and data position. Every rank's part is readable by every rank: on another
    # world size each new rank reads all of them (the data state of every old rank; the RNG streams
    # are per rank and start afresh), and the data stream continues the epoch from them.
    train = TrainState(**{k: v for k, v in meta.items() if k in TrainState.__dataclass_fields__})
    if meta["world_size"] == world:
        extra = _read_rank_part(fs, directory, rank)
        set_rng_state(extra["rng"])
        train.data = extra.get("data", {})
        if train.data:
            train.data.setdefault("batches_in_epoch", extra.get("batches_in_epoch", 0))  # saved beside it before
    else:
        parts = [_read_rank_part(fs, directory, r) for r in range(meta["world_size"])]
        train.data = {"world": meta["world_size"], "ranks": [p.get("data", {}) for p in parts]}
        log.warning("checkpoint saved with %d ranks, resuming on %d: the data epoch continues from the old "
                    "ranks' positions", meta["world_size"], world)
    train.world_size = world
    return train


def _read_rank_part(fs: pafs.FileSystem, directory: str, rank: int) -> dict:
    path = f"{directory}/rank_{rank}.pt"
    if not _exists(fs, path):
        raise IncompleteCheckpointError(f"{directory}: rank {rank}'s part ({path}) is missing")
    return torch.load(io.BytesIO(_read_bytes(fs, path)), weights_only=False)


def flat_tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{"model/<fqn>": tensor, "optim/state/<fqn>/exp_avg": tensor, ...}`` of a (nested) state dict."""
    out = {}
    for key, value in state.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flat_tensors(value, name))
        elif isinstance(value, torch.Tensor):
            out[name] = value
    return out


def state_digest(model: nn.Module, optimizers: list[torch.optim.Optimizer], ignore_frozen: bool) -> dict[str, list[float]]:
    """Collective: ``{name: [sum, sum of squares]}`` in float64 of every tensor that a checkpoint saves
    (model and optimizer state, by the names DCP stores them under), over the whole unsharded tensor.
    Tests compare it with the same sums computed from a checkpoint's files (cluster.fault_injection.
    record_restored_state). Gathers every parameter in turn: a test aid, not for large models."""
    from torch.distributed.tensor import DTensor

    model_sd, optim_sd = get_state_dict(model, optimizers, options=state_dict_options(ignore_frozen))
    flat = flat_tensors({"model": model_sd, "optim": optim_sd}).items()
    return tensor_digest((name, t.full_tensor() if isinstance(t, DTensor) else t) for name, t in flat)


def tensor_digest(tensors) -> dict[str, list[float]]:
    """``{name: [sum, sum of squares]}`` in float64 of (name, tensor) pairs, taken one at a time: what
    state_digest records and what tests compute from a checkpoint's files to compare with it."""
    digest = {}
    for name, tensor in tensors:
        full = tensor.detach().to("cpu", torch.float64)
        digest[name] = [float(full.sum()), float((full * full).sum())]
    return digest


def checkpoint_step(path: str) -> int:
    match = STEP_DIR.search(os.path.basename(path.rstrip("/")))
    return int(match.group(1)) if match else -1


def newest_complete_sibling(checkpoint_path: str, filesystem: pafs.FileSystem | None, before_step: int) -> str | None:
    """The newest complete checkpoint directory next to ``checkpoint_path`` with a step below
    ``before_step`` (used when the latest registered checkpoint turns out to be damaged)."""
    fs = filesystem or pafs.LocalFileSystem()
    parent = os.path.dirname(checkpoint_path.rstrip("/"))
    infos = fs.get_file_info(pafs.FileSelector(parent))
    candidates = sorted(
        (checkpoint_step(i.path), i.path) for i in infos
        if i.type == pafs.FileType.Directory and 0 <= checkpoint_step(i.path) < before_step
    )
    for _, path in reversed(candidates):
        try:
            check_complete(path, fs)
            return path
        except IncompleteCheckpointError:
            continue
    return None
