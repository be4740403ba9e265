"""cluster.yaml: valid for Ray's own cluster launcher, and safe and sized as the design says.

Validation goes through the same functions `ray up` uses before it touches AWS
(`prepare_config` fills defaults and merges setup commands, `validate_config` checks the schema):
no network and no AWS calls.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
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
    rules = prepared["provider"].get("security_group", {}).get("IpPermissions", [])
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
    for spec in prepared["available_node_types"].values():
        assert "SecurityGroupIds" not in spec["node_config"]  # no hand-picked, possibly open group


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


def test_mlflow_server_on_the_head_private_address_artifacts_on_s3(prepared):
    head_start = " ".join(prepared["head_start_ray_commands"])
    server = re.search(r"mlflow server (.*)", head_start).group(1)
    assert "--host \"$(hostname -I" in server  # the private address, not 0.0.0.0
    assert "0.0.0.0" not in server
    assert re.search(r"--artifacts-destination s3://", server)
    rules = prepared["provider"].get("security_group", {}).get("IpPermissions", [])
    assert _world_open_rules_on((5000,), rules) == []
