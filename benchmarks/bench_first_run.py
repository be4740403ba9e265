"""The embedded default as a new user runs it: `python jobs/pretrain.py` in a fresh directory.

    python benchmarks/bench_first_run.py [--keep DIR] [-- pretrain overrides ...]

Prints the wall time, the console's line count, and the CPU seconds of every process the run started
(sampled from /proc every 0.5 s, grouped by Ray's process titles: training workers, data tasks, Ray's
own actors...). On a shared machine the wall time follows the load; the CPU seconds do not, and on an
idle 2-core machine the wall time cannot be below CPU / 2. Last lines:

    RESULT first_run_wall_s=<s>
    RESULT first_run_cpu_s=<s>
    RESULT first_run_train_cpu_share=<CPU of the Ray Train workers / all CPU>
    RESULT first_run_console_lines=<n>
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def _session_cpu(session: int, cpu: dict[int, float], names: dict[int, str]) -> None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) != session:
                continue
            pid = int(entry)
            cpu[pid] = max(cpu.get(pid, 0.0), (int(fields[11]) + int(fields[12])) / TICK)
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if pid not in names or cmd.startswith("ray::"):  # Ray renames a worker after its task or actor
                names[pid] = cmd
        except (OSError, ValueError, IndexError):
            pass  # the process ended between listing and reading


def _kind(cmd: str) -> str:
    if cmd.startswith("ray::"):
        return cmd.split(" ")[0].split(".")[0]
    if "jobs/pretrain.py" in cmd:
        return "driver (jobs/pretrain.py)"
    return Path(cmd.split(" ")[0]).name or cmd[:40]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", default=None, help="run in this directory and keep it (default: a temp dir)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="vilau-first-run-"))
    workdir.mkdir(parents=True, exist_ok=True)
    console = workdir / "console.txt"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO)
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[0]
    start = time.perf_counter()
    with open(console, "w") as out:
        job = subprocess.Popen([sys.executable, str(REPO / "jobs" / "pretrain.py"), *args.overrides], cwd=workdir,
                               env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        cpu: dict[int, float] = {}
        names: dict[int, str] = {}
        while job.poll() is None:
            _session_cpu(job.pid, cpu, names)
            time.sleep(0.5)
    wall = time.perf_counter() - start
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[0]
    text = console.read_text(errors="replace")
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for pid, seconds in cpu.items():
        by_kind[_kind(names[pid])][0] += seconds
        by_kind[_kind(names[pid])][1] += 1
    total = sum(cpu.values())
    train = by_kind.get("ray::RayTrainWorker", [0.0, 0])[0]
    print(text)
    print(f"exit code {job.returncode}; wall {wall:.1f} s; load average {load_before} before, {load_after} after")
    print(f"CPU {total:.1f} s in {len(cpu)} processes (an idle 2-core machine needs >= {total / 2:.0f} s wall):")
    for kind, (seconds, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"  {seconds:7.1f} s  {count:3d} x  {kind}")
    if args.keep is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"RESULT first_run_wall_s={wall:.1f}")
    print(f"RESULT first_run_cpu_s={total:.1f}")
    print(f"RESULT first_run_train_cpu_share={train / max(total, 1e-9):.3f}")
    print(f"RESULT first_run_console_lines={len(text.splitlines())}")
    if job.returncode != 0:
        sys.exit(job.returncode)


if __name__ == "__main__":
    main()
