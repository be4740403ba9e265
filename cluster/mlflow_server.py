"""The MLflow tracking server on the head node of cluster.yaml: started, stopped and restarted by the PID
it was started under, behind MLflow's basic-auth app, with its runs in a database that outlives the head.

    python cluster/mlflow_server.py restart --artifacts-destination s3://<bucket>/mlflow-artifacts
    python cluster/mlflow_server.py stop

cluster.yaml's head_start_ray_commands run `restart` (every `ray up`). What it does:

- **stop** reads ``<state dir>/server.pid`` and ends that process group only, and only if the PID is still
  an ``mlflow server`` (a PID reused by another program after a reboot is left alone). Nothing is found
  by name.
- **start** refuses a tracking store on the head's own disk (SQLite or a file store): ``ray down`` deletes
  that disk and every run's history with it. The store is a database URI (PostgreSQL on RDS, say) or a
  SQLite file on a network filesystem (EFS/NFS/FSx); ``--allow-ephemeral-store`` overrides this, for a
  throwaway server (the tests).
- The server runs MLflow's ``basic-auth`` app: every API call but ``/health`` needs a user and password.
  The admin is bootstrapped from ``admin-password``; the user the jobs log as comes from
  ``~/.mlflow/credentials`` (cluster.yaml ships that file to every node, as MLflow clients read it) and is
  created here, once, with the EDIT permission of ``default_permission`` (a later change of its secret
  in that file needs MLflow's update-password API as well).
- Secrets never appear in a command line or in cluster.yaml. Each is taken from the environment when
  set (names below), else from AWS SSM Parameter Store (SecureString) under ``--ssm-prefix``, which only
  the head's instance profile may read (cluster/iam/head-policy.json):

      <prefix>/backend-store-uri   MLFLOW_BACKEND_STORE_URI         e.g. postgresql://mlflow:...@<rds-endpoint>:5432/mlflow
      <prefix>/auth-database-uri   VILAU_MLFLOW_AUTH_DATABASE_URI   the users/permissions store (another database)
      <prefix>/admin-password      MLFLOW_AUTH_ADMIN_PASSWORD
      <prefix>/flask-secret-key    MLFLOW_FLASK_SERVER_SECRET_KEY   the basic-auth app's CSRF key

  The auth database URI goes into a generated ``basic_auth.ini`` (mode 0600, in a 0700 folder); the rest
  reach the server through its environment only.
"""

from __future__ import annotations

import argparse
import base64
import configparser
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SECRETS = {  # SSM parameter name under --ssm-prefix -> environment variable
    "backend-store-uri": "MLFLOW_BACKEND_STORE_URI",
    "auth-database-uri": "VILAU_MLFLOW_AUTH_DATABASE_URI",
    "admin-password": "MLFLOW_AUTH_ADMIN_PASSWORD",
    "flask-secret-key": "MLFLOW_FLASK_SERVER_SECRET_KEY",
}
ADMIN_USER = "admin"
# Filesystems whose files survive the head node (statfs f_type magic numbers, linux/magic.h).
NETWORK_FILESYSTEMS = {0x6969: "nfs", 0x0BD00BD0: "lustre", 0xFE534D42: "smb2", 0xFF534D42: "cifs"}
START_DEADLINE_S = 300  # first start against an empty database runs its migrations
STOP_DEADLINE_S = 30


def default_host() -> str:
    """The head's private address (first of `hostname -I`): never 0.0.0.0."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()
    if not out:
        raise SystemExit("no private address found (hostname -I printed nothing); pass --host")
    return out[0]


def read_secrets(env: dict[str, str], ssm_prefix: str, region: str | None) -> dict[str, str]:
    """Each secret from the environment, else from SSM Parameter Store (decrypted)."""
    missing = [name for name, var in SECRETS.items() if not env.get(var)]
    if missing:
        import boto3

        ssm = boto3.client("ssm", region_name=region)
        for name in missing:
            parameter = f"{ssm_prefix.rstrip('/')}/{name}"
            env[SECRETS[name]] = ssm.get_parameter(Name=parameter, WithDecryption=True)["Parameter"]["Value"]
    return env


def local_store_path(uri: str) -> str | None:
    """The file behind a SQLite or file store URI; None for a database server."""
    for scheme in ("sqlite:///", "file://", "file:"):
        if uri.startswith(scheme):
            return uri[len(scheme):]
    return None if "://" in uri else uri


def filesystem_kind(path: str) -> str | None:
    """'nfs' / 'lustre' / ... when ``path`` (or its nearest existing parent) is on a network filesystem."""
    probe = Path(path).resolve()
    while not probe.exists():
        probe = probe.parent
    out = subprocess.run(["stat", "-f", "-c", "%t", str(probe)], capture_output=True, text=True, check=True)
    return NETWORK_FILESYSTEMS.get(int(out.stdout.strip(), 16))


def check_persistent(what: str, uri: str, allow_ephemeral: bool) -> None:
    path = local_store_path(uri)
    if path is None or allow_ephemeral or filesystem_kind(path):
        return
    raise SystemExit(
        f"refused: the MLflow {what} {uri.split('://')[0]}:// file {path} is on this node's own disk, which "
        "`ray down` deletes with every run's history. Use a database URI (postgresql://... on RDS) or a file "
        "on EFS/NFS/FSx; --allow-ephemeral-store only for a throwaway server."
    )


def write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by this user only (created 0600, never through a symlink)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def auth_config(state: Path, database_uri: str) -> Path:
    ini = configparser.ConfigParser()
    ini["mlflow"] = {
        "default_permission": "EDIT",  # any signed-in user may log runs; only the admin manages users
        "database_uri": database_uri,
        "admin_username": ADMIN_USER,  # the password comes from MLFLOW_AUTH_ADMIN_PASSWORD
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    text = io.StringIO()
    ini.write(text)
    path = state / "basic_auth.ini"
    write_private(path, text.getvalue())
    return path


def job_credentials(home: str) -> tuple[str, str] | None:
    """The (user, password) MLflow clients on the cluster use: ~/.mlflow/credentials, as MLflow reads it."""
    ini = configparser.ConfigParser()
    ini.read(os.path.join(home, ".mlflow", "credentials"))
    section = ini["mlflow"] if "mlflow" in ini else {}
    user, password = section.get("mlflow_tracking_username"), section.get("mlflow_tracking_password")
    return (user, password) if user and password else None


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22): with the PID, it
    names one process; a PID reused by a later process has another start time. None once it has exited
    (a zombie waiting for its parent counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # fields after "pid (comm)": state is field 3
    return None if fields[0] in ("Z", "X") else fields[19]


def recorded_server(state: Path) -> tuple[int, str] | None:
    """(pid, start time) from the PID file, if it names a process that is still that process."""
    try:
        pid_text, started = (state / "server.pid").read_text().split()
        pid = int(pid_text)
    except (FileNotFoundError, ValueError):
        return None
    return (pid, started) if start_time(pid) == started else None


def stop(state: Path) -> None:
    """End the process group of the server this state dir started, if it still runs; nothing else."""
    server = recorded_server(state)
    if server is not None:
        pid, started = server
        os.killpg(pid, signal.SIGTERM)  # start_new_session: the server leads its group (pgid == pid)
        deadline = time.monotonic() + STOP_DEADLINE_S
        while start_time(pid) == started and time.monotonic() < deadline:
            time.sleep(0.2)
        if start_time(pid) == started:
            os.killpg(pid, signal.SIGKILL)
        print(f"stopped the MLflow server (pid {pid})")
    (state / "server.pid").unlink(missing_ok=True)


def api(base: str, path: str, auth: tuple[str, str], body: dict | None = None) -> int:
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def server_argv(host: str, port: int, workers: int, artifacts_destination: str) -> list[str]:
    """The server's command line: no secret in it (those travel in the environment)."""
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    return [mlflow, "server", "--app-name", "basic-auth", "--host", host, "--port", str(port),
            "--workers", str(workers), "--artifacts-destination", artifacts_destination]


def start(args: argparse.Namespace, state: Path) -> int:
    env = read_secrets(dict(os.environ), args.ssm_prefix, args.region)
    check_persistent("tracking store", env["MLFLOW_BACKEND_STORE_URI"], args.allow_ephemeral_store)
    check_persistent("auth database", env["VILAU_MLFLOW_AUTH_DATABASE_URI"], args.allow_ephemeral_store)
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config(state, env.pop("VILAU_MLFLOW_AUTH_DATABASE_URI")))
    env["MLFLOW_AUTH_ADMIN_USERNAME"] = ADMIN_USER
    host = args.host or default_host()
    argv = server_argv(host, args.port, args.workers, args.artifacts_destination)
    log_path = state / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, cwd=state)
    write_private(state / "server.pid", f"{proc.pid} {start_time(proc.pid)}\n")
    base = f"http://{host}:{args.port}"
    deadline = time.monotonic() + START_DEADLINE_S
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the MLflow server exited ({proc.returncode}); see {log_path}:\n"
                             + log_path.read_text(errors="replace")[-3000:])
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the MLflow server did not answer {base}/health in {START_DEADLINE_S} s; see {log_path}")
        time.sleep(1)
    jobs = job_credentials(os.path.expanduser("~"))
    if jobs and jobs[0] != ADMIN_USER:
        code = api(base, "/api/2.0/mlflow/users/create", (ADMIN_USER, env["MLFLOW_AUTH_ADMIN_PASSWORD"]),
                   {"username": jobs[0], "password": jobs[1]})
        if code not in (200, 400):  # 400: the user exists already (a restart)
            raise SystemExit(f"could not create the MLflow user {jobs[0]!r} for the jobs (HTTP {code})")
    print(f"MLflow server (basic auth) on {base}, pid {proc.pid}, log {log_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "restart"])
    parser.add_argument("--artifacts-destination", help="e.g. s3://<bucket>/mlflow-artifacts")
    parser.add_argument("--host", help="address to bind (default: the head's private address)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--state-dir", default="~/mlflow", help="PID file, log, generated auth config")
    parser.add_argument("--ssm-prefix", default="/vilau-train/mlflow")
    parser.add_argument("--region", default=None, help="the SSM region (default: boto3's)")
    parser.add_argument("--allow-ephemeral-store", action="store_true",
                        help="accept SQLite on this node's disk (history is lost with the node)")
    args = parser.parse_args(argv)
    state = Path(os.path.expanduser(args.state_dir))
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    if args.action in ("stop", "restart"):
        stop(state)
    if args.action in ("start", "restart"):
        if not args.artifacts_destination:
            parser.error("start needs --artifacts-destination")
        if recorded_server(state) is not None:
            raise SystemExit("an MLflow server from this state dir is running; use restart")
        return start(args, state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
