"""Sharded training checkpoints with torch.distributed.checkpoint (DCP).

One checkpoint directory holds, from every rank:

    .metadata, __<rank>_0.distcp   model + optimizer shards (DCP; rank 0 writes .metadata last)
    rank_<r>.pt                    that rank's RNG states and data position
    train_state.json               (rank 0) step, scheduler, the step history, last metrics
    COMPLETE.rank<r>               written by each rank after all of the above

A checkpoint is *complete* when it has ``.metadata`` and a COMPLETE marker of every rank. Each save
goes to a fresh directory (Ray Train registers it only once every rank has uploaded), so a save that
dies half-way leaves at most an incomplete directory beside the previous checkpoints and never touches
them; loading refuses an incomplete directory and falls back to the newest complete sibling.

The step history is a list of segments ``[first_step, last_step]``, one per (re)start, so a resumed
run can show that every step was applied exactly once in the lineage of the final weights.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
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
    # This rank's data position and distinct dropped records (BatchStream.data_state); per rank, so it
    # lives in rank_<r>.pt, not in train_state.json.
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


def save_checkpoint(
    directory: str,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    scheduler,
    state: TrainState,
    ignore_frozen: bool = False,
    before_complete=None,
) -> None:
    """Collective: every rank writes its shards and its own state into ``directory``.

    ``before_complete`` (tests: fault injection) runs after the shards are written and before this
    rank's COMPLETE marker, i.e. in the middle of the save.
    """
    rank, world = _rank_world()
    os.makedirs(directory, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizers, options=state_dict_options(ignore_frozen))
    torch.save(
        {"rng": rng_state(), "epoch": state.epoch, "batches_in_epoch": state.batches_in_epoch, "data": state.data},
        os.path.join(directory, f"rank_{rank}.pt"),
    )
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory)
    if rank == 0:
        meta = {k: v for k, v in asdict(state).items() if k != "data"} | {"world_size": world, "scheduler": scheduler.state_dict()}
        # LambdaLR saves None for a plain function: the schedule itself is rebuilt from the config.
        _write_json(os.path.join(directory, TRAIN_STATE), meta)
    if before_complete is not None:
        before_complete()
    with open(os.path.join(directory, f"COMPLETE.rank{rank}"), "w") as f:
        f.write(str(state.step))


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=float)
    os.replace(tmp, path)


def read_train_state(directory: str) -> dict:
    with open(os.path.join(directory, TRAIN_STATE)) as f:
        return json.load(f)


def check_complete(directory: str) -> dict:
    """The train state of a complete checkpoint; raises IncompleteCheckpointError otherwise."""
    if not os.path.isfile(os.path.join(directory, ".metadata")) or not os.path.isfile(
        os.path.join(directory, TRAIN_STATE)
    ):
        raise IncompleteCheckpointError(f"{directory}: no DCP metadata or train state (save cut off?)")
    meta = read_train_state(directory)
    missing = [r for r in range(meta["world_size"]) if not os.path.isfile(os.path.join(directory, f"COMPLETE.rank{r}"))]
    if missing:
        raise IncompleteCheckpointError(f"{directory}: ranks {missing} never finished their part of the save")
    return meta


def load_checkpoint(
    directory: str,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    scheduler,
    ignore_frozen: bool = False,
) -> TrainState:
    """Collective: restore model, optimizer, scheduler, RNG and data position saved by ``save_checkpoint``."""
    meta = check_complete(directory)
    rank, world = _rank_world()
    model_sd, optim_sd = get_state_dict(model, optimizers, options=state_dict_options(ignore_frozen))
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=directory)  # reshards if the world size changed
    set_state_dict(
        model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=state_dict_options(ignore_frozen),
    )
    sched = dict(meta.pop("scheduler"))
    sched.setdefault("lr_lambdas", [None] * len(scheduler.optimizer.param_groups))
    scheduler.load_state_dict(sched)
    # Per-rank state: RNG and data position. On a different world size, start the epoch over.
    own = os.path.join(directory, f"rank_{rank}.pt")
    train = TrainState(**{k: v for k, v in meta.items() if k in TrainState.__dataclass_fields__})
    train.epoch, train.batches_in_epoch = 0, 0
    if os.path.isfile(own) and meta["world_size"] == world:
        extra = torch.load(own, weights_only=False)
        set_rng_state(extra["rng"])
        train.epoch, train.batches_in_epoch = extra["epoch"], extra["batches_in_epoch"]
        train.data = extra.get("data", {})
    else:
        log.warning("checkpoint saved with %d ranks, resuming on %d: data position restarts the epoch",
                    meta["world_size"], world)
    train.world_size = world
    return train


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
        names = {os.path.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(path))}
        if ".metadata" in names and TRAIN_STATE in names:
            return path
    return None
