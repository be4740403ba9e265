"""Spawned gloo ranks for tests of collectives (CPU, no Ray), and a free loopback port for test servers."""

from __future__ import annotations

import datetime
import os
import socket
import sys

import torch.distributed as dist
import torch.multiprocessing as mp


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_gloo_ranks(fn, world: int, *args, timeout_s: float = 300.0) -> None:
    """``fn(rank, world, *args)`` on ``world`` spawned processes joined in one gloo process group.

    A rank that fails raises here (ProcessExitedException); a hang (collectives that never match) fails
    after ``timeout_s`` instead of holding the suite. ``fn`` must be a module-level function."""
    ctx = mp.start_processes(_rank_main, args=(fn, world, free_loopback_port(), args, timeout_s),
                             nprocs=world, join=False, start_method="spawn")
    for _ in range(int(timeout_s)):
        if ctx.join(timeout=1):
            return
    for process in ctx.processes:
        process.kill()
    raise TimeoutError(f"{fn.__name__}: the gloo ranks did not finish in {timeout_s:.0f} s")


def _rank_main(rank: int, fn, world: int, port: int, args: tuple, timeout_s: float) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    fn(rank, world, *args)
    # Every rank leaves together: none tears its sockets down while a peer still runs gloo work.
    dist.barrier()
    dist.destroy_process_group()
    # Leave without interpreter teardown: gloo objects still referenced then (FSDP's device mesh keeps
    # the group) are destroyed with their threads running, which aborts the process now and then
    # ("terminate called without an active exception", SIGABRT) after a test that passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
