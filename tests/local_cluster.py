"""A Ray cluster of separate `ray start` processes on this machine, driven as a user drives one: the
`ray` CLI and the dashboard's REST API, token auth on with a token of its own (RAY_AUTH_TOKEN;
~/.ray/auth_token is never touched). Used by test_multinode (a head with no CPUs and worker nodes in
mount namespaces of their own).

Whatever the nodes' processes should hold (credentials, as an instance profile would give them) goes in
``node_env``: Ray's processes, the job drivers included, inherit it from `ray start`; nothing travels in
a job's runtime env. Teardown stops exactly the processes this harness started (the process groups of the
nodes it spawned and of their descendants), never `ray stop`.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default worker port range: never a service port here


def free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in RAY_WORKER_PORTS:
            return port



class LocalCluster:
    """A head and worker nodes on this machine, each `ray start --block` in its own process group.
    ``hidden``: folders each worker node gets an empty tmpfs over (in its own mount namespace);
    ``node_env``: what every node's environment holds besides Ray's settings."""

    def __init__(self, base: Path, hidden: list[str], node_env: dict[str, str] | None = None):
        self.base, self.hidden = base, hidden
        self.node_env = dict(node_env or {})
        self.token = secrets.token_hex(16)
        self.port, self.dashboard_port = free_port(), free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.started = time.time()
        self.submitted: list[str] = []
        self.logs: dict[str, Path] = {}

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTHONPATH", "AWS_", "MLFLOW_"))}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # as with the venv activated: `python` is ours
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            # A killed raylet refuses the health check at once: 5 checks 1 s apart notice it in ~5 s
            # (default ~15 s). A slow but live node has 10 s per check, so a busy machine loses none.
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="10000",
            RAY_health_check_failure_threshold="5",
            RAY_DEDUP_LOGS="0",
            # Ray's own helpers that look a cluster up with address "auto" (e.g. Train's placement group
            # cleaner) must find this one, not another Ray instance running on the machine.
            RAY_ADDRESS=f"127.0.0.1:{self.port}",
            # Ray's OOM killer watches the whole machine's memory; on a shared machine it would kill this
            # test's actors for other processes' use. The test's own footprint is small (tiny models).
            RAY_memory_monitor_refresh_ms="0",
        )
        env.update(self.node_env)
        return env

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = self.base / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as out:
            self.procs[name] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=self.env(), cwd="/", start_new_session=True
            )

    def _node_ports(self) -> list[str]:
        return [
            "--node-ip-address", "127.0.0.1",
            "--dashboard-agent-listen-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--object-store-memory", str(300 * 1024 * 1024),
        ]

    def start_head(self, num_cpus: int = 0) -> None:
        self.head_temp = self.base / "h"
        self._spawn("head", [
            RAY, "start", "--head", "--num-cpus", str(num_cpus), "--port", str(self.port),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(free_port()), "--temp-dir", str(self.head_temp),
            "--disable-usage-stats", "--block", *self._node_ports(),
        ])
        deadline = time.time() + 120
        while time.time() < deadline:
            self.check_alive("head")
            try:
                if self.api("/api/version"):
                    return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the head did not come up; see {self.logs['head']}")

    def start_worker(self, index: int) -> str:
        """A worker node in its own mount namespace; returns its name (also a custom resource of it)."""
        name = f"worker{index}"
        temp = self.base / f"w{index}"
        temp.mkdir()
        mounts = " && ".join(f"mount -t tmpfs tmpfs {p}" for p in [str(self.head_temp), *self.hidden])
        ray_start = " ".join([
            RAY, "start", "--address", f"127.0.0.1:{self.port}", "--num-cpus", "4", "--temp-dir", str(temp),
            "--resources", f"'{{\"{name}\": 1}}'", "--disable-usage-stats", "--block", *self._node_ports(),
        ])
        self._spawn(name, ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && exec {ray_start}"])
        return name

    def wait_for_nodes(self, names: list[str], timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name in names:
                self.check_alive(name)
            if set(names) <= set(self.alive_nodes().values()):
                return
            time.sleep(1)
        raise TimeoutError(f"nodes {names} did not join; logs under {self.base}")

    def check_alive(self, name: str) -> None:
        if self.procs[name].poll() is not None:
            raise RuntimeError(f"{name} exited: {self.logs[name].read_text()[-3000:]}")

    # -- the dashboard's REST API (what `ray job` and `ray list` use), with the cluster's token

    def api(self, path: str, body: dict | None = None, method: str | None = None):
        request = urllib.request.Request(
            self.dashboard + path, data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}, method=method,
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def status_without_token(self, path: str, token: str | None = None) -> int:
        """The HTTP status of a GET of ``path`` with no token (or with ``token``, a wrong one)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.dashboard + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as refused:
            return refused.code

    def state(self, kind: str, **filters: str) -> list[dict]:
        query = [("detail", "true"), ("limit", "10000")]
        for key, value in filters.items():
            query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        return self.api(f"/api/v0/{kind}?{urllib.parse.urlencode(query)}")["data"]["result"]["result"]

    def alive_nodes(self) -> dict[str, str]:
        """node id -> our name for it (head, workerN)."""
        out = {}
        for node in self.state("nodes"):
            if node["state"] != "ALIVE":
                continue
            names = [r for r in node["resources_total"] if r.startswith("worker")]
            out[node["node_id"]] = names[0] if names else "head"
        return out

    def client_env(self) -> dict[str, str]:
        """The environment of a `ray job ...` command run against this cluster: its address and token,
        and none of the nodes' own settings (a user's laptop holds no cluster credentials)."""
        env = {k: v for k, v in self.env().items() if k not in self.node_env}
        env["RAY_ADDRESS"] = self.dashboard
        return env

    def submit(self, submission_id: str, entrypoint: list[str], runtime_env: dict | None = None) -> None:
        """`ray job submit --working-dir <repo>` (the CLI, as a user runs it), without waiting. Credentials
        never go in ``runtime_env``: Ray keeps it in the job's stored metadata."""
        extra = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
        out = subprocess.run(
            [RAY, "job", "submit", "--working-dir", ".", "--submission-id", submission_id, "--no-wait",
             *extra, "--", *entrypoint],
            cwd=ROOT, env=self.client_env(), capture_output=True, text=True, timeout=180,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        self.submitted.append(submission_id)

    def job(self, submission_id: str) -> dict:
        return self.api(f"/api/jobs/{submission_id}")

    def job_logs(self, submission_id: str) -> str:
        logs = self.api(f"/api/jobs/{submission_id}/logs")["logs"]
        (self.base / f"job-{submission_id}.log").write_text(logs)
        return logs

    def note(self, event: str) -> None:
        """A timestamped line in the test's output (shown on failure): where the minutes went."""
        print(f"[multinode +{time.time() - self.started:6.1f}s] {event}", flush=True)

    def wait_job(self, submission_id: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(submission_id)
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            time.sleep(0.5)  # one small REST call: a 2 s poll added ~1 s per wait on average
        raise TimeoutError(f"job {submission_id} still {info['status']}:\n{self.job_logs(submission_id)[-5000:]}")

    # -- node loss

    def raylet_pid(self, name: str) -> int:
        """The raylet in this node's process group."""
        pgid = self.procs[name].pid  # start_new_session: the group is led by the node's first process
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
                if comm == "raylet" and os.getpgid(int(entry)) == pgid:
                    return int(entry)
            except (OSError, ProcessLookupError):
                continue
        raise RuntimeError(f"no raylet in {name}'s process group")

    def kill_node(self, name: str) -> None:
        groups = process_groups_under({self.procs[name].pid})  # before the raylet's children are re-parented
        os.kill(self.raylet_pid(name), signal.SIGKILL)
        self.stop(name, groups=groups)  # the rest of that node (its workers, agents) goes, as with a lost machine

    def stop(self, *names: str, groups: set[int] | None = None) -> None:
        """SIGKILL the process groups of these nodes and of every process descended from them (job
        drivers run in sessions of their own): only processes this test started, found by the PIDs it
        spawned, never by a name or a PID from the job API."""
        roots = {self.procs[name].pid for name in names}
        for pgid in sorted(process_groups_under(roots) | (groups or set())):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for name in names:
            self.procs[name].wait(timeout=30)

    def stop_all(self) -> None:
        self.stop(*self.procs)  # one snapshot of the tree: a killed parent's children are re-parented


def process_groups_under(roots: set[int]) -> set[int]:
    """The process groups of ``roots`` and of every live process whose chain of parents reaches one of
    them. A process inherits its parent's group unless it makes its own, so each of these groups was made
    by a process this test started (or by one of their descendants)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parent[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])  # field 4: the parent's PID
        except (OSError, ValueError, IndexError):
            continue
    groups = set()
    for pid in parent:
        ancestor = pid
        while ancestor not in roots and ancestor in parent and ancestor > 1:
            ancestor = parent[ancestor]
        if ancestor in roots:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
    return groups

