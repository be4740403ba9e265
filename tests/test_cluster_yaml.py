"""cluster.yaml: valid for Ray's own cluster launcher, and safe and sized as the design says.

Validation goes through the same functions `ray up` uses before it touches AWS
(`prepare_config` fills defaults and merges setup commands, `validate_config` checks the schema):
no network and no AWS calls.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.aws.config import (
    _configure_from_network_interfaces,
    _configure_iam_role,
    _configure_security_group,
    _create_default_ssh_inbound_rules,
)
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.tags import NODE_KIND_WORKER, TAG_RAY_CLUSTER_NAME, TAG_RAY_NODE_KIND

from gloo_ranks import free_loopback_port
from orchestration.config import PLACEHOLDER

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
IAM = ROOT / "cluster" / "iam"
SECURITY_GROUP_INGRESS = ROOT / "cluster" / "security-group-ingress.json"
MLFLOW_SERVER_SCRIPT = ROOT / "cluster" / "mlflow_server.py"
DASHBOARD_PORTS = (8265, 10001)  # dashboard / job API, Ray client


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pinned_ray_version(pyproject: dict) -> str:
    for dep in pyproject["project"]["dependencies"]:
        match = re.fullmatch(r"ray(\[[^\]]*\])?==(\S+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError("pyproject.toml does not pin ray")


def test_ray_validator_accepts_the_file(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_ray_validator_rejects_a_broken_variant(raw):
    # The check above is only worth something if the validator can fail on this file's shape.
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_train"]["resources"]["GPU"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_head_schedules_no_training(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    assert head["resources"].get("GPU", 0) == 0
    assert set(head["resources"]) <= {"CPU", "GPU"}  # no custom resource a task could ask for
    assert head["max_workers"] == 0


def test_worker_types_gpu_training_and_cpu_data(prepared):
    workers = {
        name: spec
        for name, spec in prepared["available_node_types"].items()
        if name != prepared["head_node_type"]
    }
    gpu = [s for s in workers.values() if s["resources"].get("GPU", 0) > 0]
    cpu = [s for s in workers.values() if s["resources"].get("GPU", 0) == 0]
    assert [s["resources"]["GPU"] for s in gpu] == [8]
    assert gpu[0]["node_config"]["InstanceType"] in {"p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge"}
    assert cpu and all(s["resources"].get("CPU", 0) > 0 for s in cpu)
    total_max = sum(s["max_workers"] for s in workers.values())
    assert total_max <= prepared["max_workers"]


def test_setup_installs_the_project_at_the_pinned_ray_version(prepared, pyproject):
    version = _pinned_ray_version(pyproject)
    for key in ("head_setup_commands", "worker_setup_commands"):  # after Ray merges setup_commands
        commands = " ".join(prepared[key])
        ray_pins = re.findall(r"ray(?:\[[^\]]*\])?==([\w.]+)", commands)
        assert ray_pins and set(ray_pins) == {version}
        assert "-c ~/vilau-ray/constraints.txt" in commands  # the project's lock file
        assert re.search(r"-e ~/vilau-ray(\s|$)", commands)  # the project itself
    assert f"ray=={version}" in (ROOT / "constraints.txt").read_text().splitlines()
    # The head's MLflow server talks to PostgreSQL: its driver is installed there, at the locked version.
    assert re.search(r"-c ~/vilau-ray/constraints.txt psycopg2-binary$", " ".join(prepared["head_setup_commands"]))
    assert any(line.startswith("psycopg2-binary==") for line in (ROOT / "constraints.txt").read_text().splitlines())
    assert prepared["file_mounts"]["~/vilau-ray"] == "."

    # The node images carry the same Ray, and a Python inside requires-python.
    docker = prepared["docker"]
    images = [docker["image"], docker["head_image"]] + [
        spec["docker"]["worker_image"]
        for spec in prepared["available_node_types"].values()
        if "worker_image" in spec.get("docker", {})
    ]
    python_ok = SpecifierSet(pyproject["project"]["requires-python"])
    for image in images:
        match = re.fullmatch(r"rayproject/ray:([\w.]+)-py(\d)(\d+)-(cpu|gpu)", image)
        assert match, image
        assert match.group(1) == version
        assert python_ok.contains(f"{match.group(2)}.{match.group(3)}")


def test_no_credentials_in_the_file(raw):
    text = CLUSTER_YAML.read_text()
    for pattern in (
        r"AKIA[0-9A-Z]{16}",  # AWS access key id
        r"ASIA[0-9A-Z]{16}",  # AWS temporary key id
        r"(?i)aws_secret_access_key",
        r"(?i)aws_access_key_id",
        r"(?i)aws_session_token",
        r"(?i)secret_key",
        r"(?i)password",
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    ):
        assert not re.search(pattern, text), pattern
    # The Ray auth token is shipped from a file path, never written inline.
    assert all(local.startswith(("~", "/", ".")) for local in raw["file_mounts"].values())


def _world_open_rules_on(ports, rules) -> list[dict]:
    """Ingress rules that open any of `ports` to the whole internet."""
    hits = []
    for rule in rules:
        world = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])) or any(
            r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", [])
        )
        all_ports = str(rule.get("IpProtocol")) == "-1" or rule.get("FromPort", -1) == -1
        lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
        if world and (all_ports or any(lo <= p <= hi for p in ports)):
            hits.append(rule)
    return hits


def test_dashboard_not_opened_to_the_internet(prepared):
    rules = json.loads(SECURITY_GROUP_INGRESS.read_text())  # the only group the nodes are in (see below)
    assert _world_open_rules_on(DASHBOARD_PORTS, rules) == []
    # The check itself catches the mistake it is there for.
    assert _world_open_rules_on(
        DASHBOARD_PORTS,
        [{"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
    )
    # The dashboard listens on loopback only, for the SSH tunnel of `ray dashboard cluster.yaml`.
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "ray dashboard cluster.yaml" in CLUSTER_YAML.read_text()


def _gpu_type(prepared) -> dict:
    return next(s for s in prepared["available_node_types"].values() if s["resources"].get("GPU", 0) > 0)


def test_gpu_workers_in_one_zone_with_efa_for_64_gpus(prepared):
    gpu = _gpu_type(prepared)
    assert gpu["max_workers"] * gpu["resources"]["GPU"] >= 64
    assert "," not in prepared["provider"]["availability_zone"]  # one AZ
    node = gpu["node_config"]
    assert node["Placement"]["GroupName"]  # a cluster placement group
    cards = {"p4d.24xlarge": 4, "p4de.24xlarge": 4, "p5.48xlarge": 32, "p5e.48xlarge": 32}[node["InstanceType"]]
    interfaces = node["NetworkInterfaces"]
    assert sorted(i["NetworkCardIndex"] for i in interfaces) == list(range(cards))
    assert all(i["InterfaceType"] == "efa" for i in interfaces)
    assert [i["DeviceIndex"] for i in interfaces if i["NetworkCardIndex"] == 0] == [0]
    assert len({i["SubnetId"] for i in interfaces}) == 1  # one subnet, so one AZ
    assert "--device=/dev/infiniband" in gpu["docker"]["worker_run_options"]
    starts = " ".join(prepared["worker_start_ray_commands"])
    for setting in ("FI_PROVIDER=efa", "NCCL_NET=ofi", "FI_EFA_USE_DEVICE_RDMA=1"):
        assert setting in starts




# -- least privilege: an instance profile per node type, policies beside the file -------------------


def _profile_name(spec: dict) -> str:
    arn = spec["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
    match = re.fullmatch(r"arn:aws:iam::<account-id>:instance-profile/([\w+=,.@-]+)", arn)
    assert match, f"no instance profile ARN: {arn!r}"
    return match.group(1)


def _policy(name: str) -> dict:
    return json.loads((IAM / f"{name}.json").read_text())


def _statements(policy: dict) -> list[dict]:
    assert policy["Version"] == "2012-10-17"
    out = []
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and "NotAction" not in statement and "NotResource" not in statement
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement.get("Resource", [])
        out.append({**statement, "Action": actions, "Resource": resources if isinstance(resources, list) else [resources]})
    return out


def _actions(policy: dict) -> set[str]:
    return {a for s in _statements(policy) for a in s["Action"]}


def test_every_node_type_has_its_own_instance_profile(prepared):
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    profiles = {name: _profile_name(spec) for name, spec in types.items()}
    assert profiles[head] == "vilau-train-head"
    assert {p for n, p in profiles.items() if n != head} == {"vilau-train-worker"}
    # Ray's own bootstrap keeps the head's profile and creates none (its default role has EC2 and S3
    # full access); it never touches AWS for that here.
    config = copy.deepcopy(prepared)
    assert _configure_iam_role(config)["available_node_types"][head]["node_config"]["IamInstanceProfile"] == \
        types[head]["node_config"]["IamInstanceProfile"]


def test_iam_policies_least_privilege(prepared):
    worker_profile = _profile_name(_gpu_type(prepared))
    cluster = prepared["cluster_name"]
    trust = _statements(_policy("trust-policy"))
    assert [(s["Principal"], s["Action"]) for s in trust] == [({"Service": "ec2.amazonaws.com"}, ["sts:AssumeRole"])]

    worker = _policy("worker-policy")
    assert {a.split(":")[0] for a in _actions(worker)} == {"s3"}  # no ec2, iam, ssm, sts
    for statement in _statements(worker):
        assert all(r == "arn:aws:s3:::<bucket>" or r.startswith("arn:aws:s3:::<bucket>/") for r in statement["Resource"])
        writes = {"s3:PutObject", "s3:DeleteObject"} & set(statement["Action"])
        if writes:  # writes only to the run prefix; the data is read-only
            assert statement["Resource"] == ["arn:aws:s3:::<bucket>/<run-prefix>*"], statement
    reads = {r for s in _statements(worker) if "s3:GetObject" in s["Action"] for r in s["Resource"]}
    assert reads == {"arn:aws:s3:::<bucket>/<data-prefix>*", "arn:aws:s3:::<bucket>/<run-prefix>*"}

    head = _statements(_policy("head-policy"))
    actions = {a for s in head for a in s["Action"]}
    assert not any(a == "*" or a.endswith(":*") for a in actions)
    assert {a.split(":")[0] for a in actions} == {"ec2", "iam", "s3", "ssm"}
    for statement in head:
        if statement["Resource"] == ["*"]:  # only EC2's read-only Describe calls are unscoped
            assert all(a.startswith("ec2:Describe") for a in statement["Action"]), statement
    pass_role = [s for s in head if any(a.startswith("iam:") for a in s["Action"])]
    assert [(s["Action"], s["Resource"]) for s in pass_role] == [
        (["iam:PassRole"], [f"arn:aws:iam::<account-id>:role/{worker_profile}"])  # the worker role, no other
    ]
    assert pass_role[0]["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}

    def condition(action: str, resource_suffix: str = "instance/*") -> dict:
        found = [s for s in head if action in s["Action"] and any(r.endswith(resource_suffix) for r in s["Resource"])]
        assert len(found) == 1, (action, found)
        return found[0].get("Condition", {}).get("StringEquals", {})

    # Launches are tagged with this cluster's name (Ray's own tag key); only its workers are terminated.
    assert condition("ec2:RunInstances") == {f"aws:RequestTag/{TAG_RAY_CLUSTER_NAME}": cluster}
    assert condition("ec2:TerminateInstances") == {
        f"ec2:ResourceTag/{TAG_RAY_CLUSTER_NAME}": cluster, f"ec2:ResourceTag/{TAG_RAY_NODE_KIND}": NODE_KIND_WORKER,
    }
    assert not actions & {"ec2:StopInstances", "ec2:StartInstances"} and prepared["provider"]["cache_stopped_nodes"] is False
    # What Ray's AWS node provider calls from the head.
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances",
            "ec2:DescribeInstanceTypes"} <= actions
    s3 = {r for s in head if any(a.startswith("s3:") for a in s["Action"]) for r in s["Resource"]}
    assert s3 == {"arn:aws:s3:::<bucket>", "arn:aws:s3:::<bucket>/*"}
    ssm = {r for s in head if any(a.startswith("ssm:") for a in s["Action"]) for r in s["Resource"]}
    assert ssm == {"arn:aws:ssm:us-west-2:<account-id>:parameter/vilau-train/mlflow/*"}


# -- network: a security group of our own, SSH from one CIDR ---------------------------------------


def test_no_ssh_from_the_internet(prepared):
    # Ray's bootstrap creates a group (with SSH from 0.0.0.0/0, always) for every node type that names
    # none; each names ours, so Ray creates and changes no group.
    config = _configure_from_network_interfaces(copy.deepcopy(prepared))
    groups = {name: spec["node_config"].get("SecurityGroupIds") for name, spec in config["available_node_types"].items()}
    assert all(ids and set(ids) == {"<vilau-train-sg-id>"} for ids in groups.values()), groups
    assert "security_group" not in prepared["provider"]
    assert _configure_security_group(copy.deepcopy(config))["available_node_types"] == config["available_node_types"]
    assert _world_open_rules_on((22,), _create_default_ssh_inbound_rules())  # what Ray would have added

    rules = json.loads(SECURITY_GROUP_INGRESS.read_text())
    assert _world_open_rules_on((22,), rules) == []
    assert _world_open_rules_on(range(0, 65536), rules) == []
    by_cidr = [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges")]
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"], [c["CidrIp"] for c in r["IpRanges"]]) for r in by_cidr] == [
        ("tcp", 22, 22, ["<admin-cidr>"])  # your IP or bastion: the only way in from outside
    ]
    # Everything else only from the group itself (Ray, EFA, MLflow between the cluster's nodes).
    others = [r for r in rules if r not in by_cidr]
    assert [[p["GroupId"] for p in r["UserIdGroupPairs"]] for r in others] == [["<vilau-train-sg-id>"]]


def test_every_placeholder_is_explained_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    files = [CLUSTER_YAML, SECURITY_GROUP_INGRESS, *sorted(IAM.glob("*.json"))]
    found = {m for f in files for m in re.findall(r"<[^<>\s]+>", f.read_text()) if m != "<repo root>"}
    assert {"<account-id>", "<bucket>", "<admin-cidr>", "<vilau-train-sg-id>"} <= found
    for placeholder in found:
        assert PLACEHOLDER.fullmatch(placeholder), placeholder  # the jobs' placeholder check finds it too
        assert placeholder in readme, f"README does not say what {placeholder} is"


# -- the MLflow server: authentication, a store that outlives the head, stopped by its PID ----------


def _mlflow_server_module():
    spec = importlib.util.spec_from_file_location("cluster_mlflow_server", MLFLOW_SERVER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _head_mlflow_command(prepared) -> list[str]:
    found = [c for c in prepared["head_start_ray_commands"] if "mlflow" in c]
    assert len(found) == 1, found
    argv = shlex.split(found[0])
    while "=" in argv[0]:  # leading VAR=value assignments
        argv.pop(0)
    assert argv[:2] == ["python", "~/vilau-ray/cluster/mlflow_server.py"], argv
    return argv[2:]


def test_mlflow_server_behind_basic_auth_on_the_private_address(prepared):
    args = _head_mlflow_command(prepared)
    assert args[0] == "restart"
    assert "--host" not in args  # the default: the head's private address (hostname -I), never 0.0.0.0
    assert "0.0.0.0" not in " ".join(args)
    assert re.fullmatch(r"s3://\S+", args[args.index("--artifacts-destination") + 1])
    port = int(args[args.index("--port") + 1])
    assert _world_open_rules_on((port,), json.loads(SECURITY_GROUP_INGRESS.read_text())) == []
    server = _mlflow_server_module()
    argv = server.server_argv("10.0.0.5", port, 2, "s3://b/mlflow-artifacts")
    assert argv[1:6] == ["server", "--app-name", "basic-auth", "--host", "10.0.0.5"]
    from importlib.metadata import entry_points

    assert "basic-auth" in {e.name for e in entry_points(group="mlflow.app")}  # in the pinned mlflow
    import flask_wtf  # noqa: F401  the basic-auth app refuses to start without it (mlflow[auth])

    # The jobs' MLflow user reaches every node as a file; no secret is on any command line.
    assert prepared["file_mounts"]["~/.mlflow/credentials"] == "~/.mlflow/credentials"
    assert not any(flag in argv for flag in ("--backend-store-uri", "--default-artifact-root"))


def test_tracking_store_outlives_the_head(prepared, tmp_path):
    args = _head_mlflow_command(prepared)
    assert "--allow-ephemeral-store" not in args
    commands = " ".join(prepared["head_start_ray_commands"])
    assert "sqlite" not in commands and "--backend-store-uri" not in commands
    server = _mlflow_server_module()
    server.check_persistent("tracking store", "postgresql://mlflow@db.example:5432/mlflow", False)
    for uri in (f"sqlite:///{tmp_path}/mlflow.db", f"file://{tmp_path}/mlruns", str(tmp_path / "mlruns")):
        with pytest.raises(SystemExit, match="ray down"):
            server.check_persistent("tracking store", uri, False)
        server.check_persistent("tracking store", uri, True)  # only when asked for a throwaway server
    # Network filesystems keep their files when the head goes: the check looks at the filesystem type.
    assert server.filesystem_kind(str(tmp_path / "mlflow.db")) is None
    assert set(server.NETWORK_FILESYSTEMS.values()) >= {"nfs", "lustre"}


def _spawn_sleeper(*extra_argv: str) -> subprocess.Popen:
    """A process of this test's own, in its own session, whose command line may look like a server's."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", *extra_argv],
                            start_new_session=True)


def test_stop_ends_only_the_process_its_pid_file_names(tmp_path):
    server = _mlflow_server_module()
    recorded = _spawn_sleeper()
    lookalike = _spawn_sleeper("mlflow", "server")  # what `pkill -f "mlflow server"` would kill too
    try:
        (tmp_path / "server.pid").write_text(f"{recorded.pid} {server.start_time(recorded.pid)}\n")
        server.stop(tmp_path)
        assert recorded.wait(timeout=30) == -signal.SIGTERM
        assert lookalike.poll() is None
        assert not (tmp_path / "server.pid").exists()
        # A PID file whose process is gone and whose PID now names another process: left alone.
        (tmp_path / "server.pid").write_text(f"{lookalike.pid} 1\n")
        server.stop(tmp_path)
        assert lookalike.poll() is None
    finally:
        for proc in (recorded, lookalike):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    commands = " ".join(c for key in ("head_start_ray_commands", "worker_start_ray_commands")
                        for c in yaml.safe_load(CLUSTER_YAML.read_text())[key])
    assert not re.search(r"\b(pkill|killall)\b", commands)


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.e2e
def test_mlflow_server_refuses_unauthenticated_calls_and_stops_by_pid(tmp_path):
    """The script as the head runs it, on loopback with a throwaway SQLite store."""
    home = tmp_path / "home"
    (home / ".mlflow").mkdir(parents=True)
    (home / ".mlflow" / "credentials").write_text(
        "[mlflow]\nmlflow_tracking_username = vilau-jobs\nmlflow_tracking_password = jobs-pw-for-this-test\n")
    state, port = tmp_path / "state", free_loopback_port()
    env = {**os.environ, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "VILAU_MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path}/auth.db",
           "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pw-for-this-test", "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-key"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(MLFLOW_SERVER_SCRIPT), *args, "--state-dir", str(state)],
                              env=env, capture_output=True, text=True, timeout=400)

    common = ["--host", "127.0.0.1", "--port", str(port), "--workers", "1",
              "--artifacts-destination", f"file://{tmp_path}/artifacts"]
    refused = run("start", *common)  # SQLite on this disk: refused unless asked for
    assert refused.returncode != 0 and "ray down" in refused.stderr
    lookalike = _spawn_sleeper("mlflow", "server")
    started = run("start", *common, "--allow-ephemeral-store")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        pid = int((state / "server.pid").read_text().split()[0])
        assert oct((state / "basic_auth.ini").stat().st_mode & 0o777) == oct(0o600)
        base = f"http://127.0.0.1:{port}"
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _get(f"{base}/health") == 200
        assert _get(search) == 401
        assert _get(search, ("vilau-jobs", "wrong")) == 401
        assert _get(search, ("vilau-jobs", "jobs-pw-for-this-test")) == 200  # the jobs' user was made
        group = [p for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == pid]
        assert len(group) > 1  # the server and its workers

        stopped = run("stop")
        assert stopped.returncode == 0, stopped.stderr
        deadline = time.monotonic() + 30
        while any(_pgid(int(p)) == pid for p in group) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_pgid(int(p)) == pid for p in group)  # the whole server group is gone
        assert lookalike.poll() is None  # and nothing else that merely looks like it
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{base}/health", timeout=5)
    finally:
        if (state / "server.pid").exists():
            run("stop")
        lookalike.kill()
        lookalike.wait(timeout=30)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
