"""What a user sees in the terminal while a job runs, and the log file that holds everything else.

    with JobConsole(config, "pretrain") as console:
        ...                                    # Ray, Ray Train, Ray Data, library logs -> the log file
        console.print("...")                   # -> the terminal (and the log file)
        callbacks = [console.progress(stage, total_steps)]   # a live progress display per stage

Inside the block, file descriptors 1 and 2 point at ``<output_dir>/logs/<run_name>-<job>-<time>.log``
(with outputs on S3 or on a cluster: a new 0700 folder of the run's own under ``<tmp>/vilau-<uid>``), so everything Ray prints (controller and cleaner warnings, worker lines forwarded to the driver, report
dicts, C++ warnings) lands there, and the terminal keeps only the job's own lines: one progress display
per stage, a line per stage about its data, the summary. On a terminal the progress display is a live
tqdm bar (step/total, loss, throughput, ETA); otherwise it is one line per report. An error is printed
to the terminal in full (with the log file's path), never swallowed.

Progress travels from the Ray Train controller (a ``UserCallback`` that sees every report) to a small
actor that the driver polls; the training workers need to know nothing about it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
import traceback
from typing import Any

import ray
from ray.train import UserCallback

from orchestration.config import Config
from orchestration.launch import LM, TOWER, StageResult
from orchestration.private_temp import open_private_append, private_run_dir
from orchestration.storage import is_s3

TIMING = logging.getLogger("orchestration.timing")
POLL_S = 0.5


# Restartable and placed on the driver's node (the head on a cluster): losing a worker node must not take
# the progress display, or the controller's callback, with it.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ProgressBoard:
    """The latest report of each stage, written by the Train controller, read by the driver."""

    def __init__(self) -> None:
        self.latest: dict[str, dict] = {}

    def update(self, stage: str, metrics: dict) -> None:
        self.latest[stage] = {**metrics, "received_at": time.time()}

    def read(self, stage: str) -> dict | None:
        return self.latest.get(stage)


class ProgressCallback(UserCallback):
    """Runs in the Ray Train controller: forwards rank 0's report to the board (fire and forget)."""

    def __init__(self, board, stage: str):
        self.board, self.stage = board, stage

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics:
            keep = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}
            try:
                self.board.update.remote(self.stage, keep)
            except Exception:  # best effort: the display must never fail the run
                pass


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StageProgress:
    """The driver's display of one stage: polls the board until ``close``."""

    def __init__(self, console: "JobConsole", stage: str, total: int):
        self.console, self.stage, self.total = console, stage, total
        self.started = time.perf_counter()
        self.first_report_s: float | None = None
        self.last: dict | None = None
        self._stop = threading.Event()
        self._bar = None
        if console.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=f"[{stage}]", unit="step", file=console.terminal,
                             dynamic_ncols=True, leave=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
        self._thread = threading.Thread(target=self._poll, daemon=True, name=f"progress-{stage}")
        self._thread.start()

    def callback(self) -> ProgressCallback:
        return ProgressCallback(self.console.board, self.stage)

    def _poll(self) -> None:
        seen = None
        while not self._stop.wait(POLL_S):
            try:
                latest = ray.get(self.console.board.read.remote(self.stage), timeout=10)
            except Exception:  # the display is best effort; the run itself reports its own errors
                continue
            if latest and latest.get("received_at") != seen:
                seen = latest["received_at"]
                self._show(latest)

    def _show(self, m: dict) -> None:
        step = int(m.get("step", 0))
        if self.first_report_s is None:
            self.first_report_s = time.perf_counter() - self.started
        self.last = m
        rate = m.get("samples_per_s")
        loss = m.get("loss", float("nan"))
        eta = (self.total - step) * m.get("step_time_s", float("nan"))
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.3f}, {rate:.0f} samples/s", refresh=False)
            self._bar.update(step - self._bar.n)
        else:
            self.console.print(f"[{self.stage}] step {step}/{self.total}  loss {loss:.4f}  {rate:.1f} samples/s  "
                               f"{m.get('tokens_per_s', 0.0):.0f} tokens/s  ETA {format_duration(eta)}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._bar is not None:
            self._bar.close()


class JobConsole:
    """See the module docstring. Use as a context manager around the whole job."""

    def __init__(self, config: Config, job: str):
        self.config, self.job = config, job
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{config.run_name}-{job}-{stamp}"
        # The log is written as the job runs, so it lives on a local disk: beside the outputs of a local
        # run; when the outputs are on object storage or the job joins a cluster (where nothing may be
        # written under output_dir before the cluster checks have passed), in a new folder of this run's
        # own under this user's private temp root (never a predictable shared path such as /tmp/logs).
        joins_cluster = bool(config.cluster.address or os.environ.get("RAY_ADDRESS"))
        if is_s3(config.output_dir) or joins_cluster:
            log_dir = str(private_run_dir(f"{name}-"))
        else:
            log_dir = os.path.join(config.output_dir, "logs")
        self.log_path = os.path.abspath(os.path.join(log_dir, f"{name}.log"))
        self.started = time.perf_counter()
        self._board = None
        self._saved_fds: tuple[int, int] | None = None

    # -- redirection ------------------------------------------------------------------------------

    def __enter__(self) -> "JobConsole":
        os.makedirs(os.path.dirname(self.log_path), mode=0o700, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved_fds = (os.dup(1), os.dup(2))
        self.terminal = os.fdopen(os.dup(1), "w", buffering=1)
        self.interactive = self.terminal.isatty()
        self._log = open_private_append(self.log_path)  # never through a symlink planted at that name
        os.dup2(self._log.fileno(), 1)
        os.dup2(self._log.fileno(), 2)
        self._ray_was_running = ray.is_initialized()
        # Ray Data's progress bars are redrawn as new lines when not on a terminal: the per-stage data
        # line below replaces them (set before the datasets are made: they copy the context).
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        self.print(f"{self.job}: logs in {self.log_path}")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            text = "".join(traceback.format_exception(exc_type, exc, tb))
            self._log.write(text)
            self.terminal.write(f"\n{self.job} failed: {exc_type.__name__}: {exc}\n{text}\nfull log: {self.log_path}\n")
        if not self._ray_was_running and ray.is_initialized():
            ray.shutdown()  # while the chatter of shutting down still goes to the log
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved_fds[0], 1)
        os.dup2(self._saved_fds[1], 2)
        for fd in self._saved_fds:
            os.close(fd)
        self.terminal.flush()
        self.terminal.close()
        self._log.close()
        return False

    # -- output -----------------------------------------------------------------------------------

    def print(self, line: str = "") -> None:
        self.terminal.write(line + "\n")
        self._log.write(line + "\n")

    def timing(self, what: str, seconds: float) -> None:
        """A timing line for the log file (where the time of a run goes)."""
        TIMING.info("%s: %.1f s (at %.1f s)", what, seconds, time.perf_counter() - self.started)

    @property
    def board(self):
        if self._board is None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            self._board = ProgressBoard.options(scheduling_strategy=here).remote()
        return self._board

    def progress(self, stage: str, total: int) -> StageProgress:
        return StageProgress(self, stage, total)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


# ---------------------------------------------------------------- the summary at the end of a job


def mlflow_ui_command(config: Config) -> str:
    uri = config.tracking_uri
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def _loss_cell(r: StageResult) -> str:
    terms = r.loss_terms
    if "loss" not in terms:
        return "-"
    shown = {"tower": ("loss_contrastive", "loss_recon"), "lm": ("loss_text", "loss_image")}.get(r.stage, ())
    parts = [f"{k[len('loss_'):]} {terms[k]:.3f}" for k in shown if k in terms]
    return f"{terms['loss']:.3f}" + (f" ({', '.join(parts)})" if parts else "")


def _eval_cell(r: StageResult, chance: float | None) -> str:
    m, cells = r.metrics, []
    of_chance = f" (chance {chance:.3f})" if chance else ""
    if "eval/zero_shot_acc" in m:
        cells.append(f"zero-shot acc {m['eval/zero_shot_acc']:.3f}{of_chance}")
    if "eval/psnr" in m:
        cells.append(f"PSNR {m['eval/psnr']:.1f} dB")
    if "eval/generation_score" in m:
        cells.append(f"generation score {m['eval/generation_score']:.3f} (chance {m['eval/generation_chance']:.3f})")
    if "eval/understanding_score" in m:
        cells.append(f"understanding score {m['eval/understanding_score']:.3f} (chance {m['eval/understanding_chance']:.3f})")
    return ", ".join(cells) or "-"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def where_things_are(config: Config, results: list[StageResult]) -> str:
    """The summary a user reads at the end of a job: per stage its steps, final losses and evaluation
    (with chance levels), then where the checkpoints, exports and MLflow runs are and what to run next."""
    try:
        from orchestration.train.samples import class_names

        chance = 1.0 / len(class_names(config))
    except Exception:  # no labelled eval split: no chance level to show
        chance = None
    steps = {TOWER: config.tower_train.steps, LM: config.lm_train.steps}
    rows = [["stage", "steps", "final loss", "evaluation"]]
    rows += [[r.stage, f"{r.steps_done}/{steps.get(r.stage, r.steps_done)}", _loss_cell(r), _eval_cell(r, chance)]
             for r in results]
    lines = _table(rows) + [""]
    places = []
    for label, attr in (("checkpoint", "checkpoint_path"), ("export", "export_path")):
        for r in results:
            places.append([label, r.stage, str(getattr(r, attr))])
    if config.tracking.enabled:
        for r in results:
            places.append(["MLflow run", r.stage, f"{r.mlflow_run_id} (experiment {config.tracking.experiment!r})"])
    for r in results:
        if r.rows_skipped:
            places.append(["rows skipped", r.stage, str(r.rows_skipped)])
    lines += _table(places)
    if config.tracking.enabled:
        lines += [f"MLflow store: {config.tracking_uri}", f"view the runs: {mlflow_ui_command(config)}"]
    lm = next((r for r in results if r.stage == LM), None)
    if lm is not None:
        lines.append(f'generate: python jobs/generate.py --checkpoint {lm.export_path} --prompt "a photo of a red circle" --out generated')
    return "\n".join(lines)
