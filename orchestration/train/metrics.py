"""Step timing, throughput, data-wait share, MFU and the progress line.

Every rank measures its own time; rank 0's numbers are logged (ranks run in lockstep, so they agree).
Loss terms are averaged over the logging window on each rank and then across ranks. Per-step values
stay on the device until the log step reads the window's sums back in one copy.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import torch
import torch.distributed as dist

# Dense bf16 peak of common accelerators, for the MFU estimate (FLOP/s).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # no meaningful MFU on a CPU
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class WindowMetrics:
    """Accumulates per-step scalars and timings between two log points."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self.data_wait = 0.0
        self.start = time.perf_counter()

    def add_step(self, scalars: dict, samples, tokens) -> None:
        """Scalars, samples and tokens may be device tensors: they are summed where they are and read
        back once, in ``means`` / ``summary`` (one host sync per log step, none per step)."""
        for k, v in scalars.items():
            self.sums[k] = self.sums[k] + v
        self.steps += 1
        self.samples = self.samples + samples
        self.tokens = self.tokens + tokens

    def read(self) -> None:
        """Bring the device sums to the host in one copy."""
        keys = [k for k, v in self.sums.items() if isinstance(v, torch.Tensor)]
        counts = [x for x in (self.samples, self.tokens) if isinstance(x, torch.Tensor)]
        if not keys and not counts:
            return
        tensors = [self.sums[k] for k in keys] + counts
        # One device for the copy: a task may return a CPU scalar beside its device scalars (the tower's
        # perceptual_enabled), and stack refuses to mix a CUDA tensor with a CPU one.
        device = next((t.device for t in tensors if t.device.type != "cpu"), torch.device("cpu"))
        values = torch.stack([t.double().reshape(()).to(device) for t in tensors]).tolist()
        for k, v in zip(keys, values):
            self.sums[k] = v
        rest = values[len(keys):]
        if isinstance(self.samples, torch.Tensor):
            self.samples = rest.pop(0)
        if isinstance(self.tokens, torch.Tensor):
            self.tokens = rest.pop(0)

    def means(self) -> dict[str, float]:
        self.read()
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}

    def summary(self, world: int, flops_per_token: float | None, peak: float | None) -> dict[str, float]:
        """Window metrics; samples and tokens are per rank here and scaled to the whole job."""
        self.read()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {
            "step_time_s": elapsed / max(self.steps, 1),
            "samples_per_s": self.samples * world / elapsed,
            "tokens_per_s": self.tokens * world / elapsed,
            "data_wait_share": self.data_wait / elapsed,
        }
        if flops_per_token and peak:
            out["mfu"] = self.tokens * flops_per_token / elapsed / peak
        return out


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of scalars over ranks (same keys on every rank; gloo has no AVG, so SUM / world)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.cpu().tolist()))


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(stage: str, step: int, total: int, metrics: dict[str, float]) -> str:
    eta = (total - step) * metrics.get("step_time_s", float("nan"))
    return (
        f"[{stage}] step {step}/{total} loss {metrics.get('loss', float('nan')):.4f} "
        f"lr {metrics.get('lr', 0.0):.2e} grad_norm {metrics.get('grad_norm', float('nan')):.3f} "
        f"{metrics.get('samples_per_s', 0.0):.1f} samples/s {metrics.get('tokens_per_s', 0.0):.0f} tokens/s "
        f"data-wait {100 * metrics.get('data_wait_share', 0.0):.1f}% ETA {format_eta(eta)}"
    )
