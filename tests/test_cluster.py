"""Cluster path checks: node-local paths refused on a multi-node cluster (each field named), outputs
refused inside Ray's temporary --working-dir copy, placeholders of the cluster preset refused.

Cheap: no Ray. The same checks on a real 3-node cluster are in tests/test_multinode.py."""

from __future__ import annotations

import os
import shutil

import pytest

from orchestration.cluster import (
    ClusterShape,
    check_cluster_paths,
    check_working_dir_outputs,
    node_local_paths,
    ray_working_dir_copy,
)
from orchestration.config import CONFIG_DIR, ConfigError, load_config

SMOKE = CONFIG_DIR / "cluster-smoke.yaml"
S3_PATHS = [
    "data.root=s3://b/smoke/data",
    "data.cache_dir=s3://b/smoke/tokenized",
    "cluster.storage_path=s3://b/smoke/ray",
    "output_dir=s3://b/smoke/outputs",
    "tracking.uri=http://10.0.0.5:5000",
]
THREE_NODES_HEAD_CPU0 = ClusterShape(alive_nodes=3, driver_node_cpus=0.0)


def smoke(*overrides: str):
    return load_config(SMOKE, S3_PATHS + list(overrides))


def test_cluster_preset_with_s3_paths_and_a_server_passes():
    config = smoke()
    assert node_local_paths(config) == []
    check_cluster_paths(config, THREE_NODES_HEAD_CPU0)


@pytest.mark.parametrize(
    "override, field",
    [
        ("data.root=/mnt/shards", "data.root='/mnt/shards'"),
        ("data.cache_dir=/var/tokenized", "data.cache_dir='/var/tokenized'"),
        ("cluster.storage_path=/home/me/ray_results", "cluster.storage_path='/home/me/ray_results'"),
        ("output_dir=/home/me/outputs", "output_dir='/home/me/outputs'"),
        ("tracking.uri=sqlite:////home/me/mlflow.db", "tracking.uri='sqlite:////home/me/mlflow.db'"),
        ("tracking.uri=file:///home/me/mlruns", "tracking.uri='file:///home/me/mlruns'"),
        ("data.tower_sources.coyo_parquet.path=/mnt/coyo", "data.tower_sources.coyo_parquet.path='/mnt/coyo'"),
    ],
)
def test_each_node_local_field_is_refused_by_name(override, field):
    config = smoke(override)
    with pytest.raises(ConfigError) as err:
        check_cluster_paths(config, THREE_NODES_HEAD_CPU0)
    message = str(err.value)
    assert f"{field} is a path on one node's disk" in message
    assert message.count("is a path on one node's disk") == 1  # only the bad field
    assert "3 node(s) whose head runs no tasks (CPU 0)" in message
    assert "cluster.shared_filesystem=true" in message


def test_every_local_field_is_named_at_once(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}/out", f"cluster.storage_path={tmp_path}/ray",
                                f"data.root={tmp_path}/data", f"data.cache_dir={tmp_path}/cache"])
    with pytest.raises(ConfigError) as err:
        check_cluster_paths(config, ClusterShape(alive_nodes=2, driver_node_cpus=4.0))
    message = str(err.value)
    for field in ("data.root", "data.cache_dir", "cluster.storage_path", "output_dir"):
        assert f"{field}='{tmp_path}" in message
    assert "tracking.uri (unset: SQLite under output_dir)" in message


def test_a_head_without_cpus_counts_as_a_cluster_even_alone():
    with pytest.raises(ConfigError, match="data.root"):
        check_cluster_paths(smoke("data.root=/mnt/shards"), ClusterShape(alive_nodes=1, driver_node_cpus=0.0))


def test_local_paths_pass_on_one_node_or_a_shared_filesystem():
    local = load_config(None)
    check_cluster_paths(local, ClusterShape(alive_nodes=1, driver_node_cpus=8.0))  # a laptop
    shared = load_config(None, ["cluster.shared_filesystem=true"])
    check_cluster_paths(shared, THREE_NODES_HEAD_CPU0)  # NFS / EFS / FSx on every node


def test_placeholders_of_the_preset_are_refused_by_name():
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE)
    message = str(err.value)
    for field in ("data.root", "data.cache_dir", "cluster.storage_path", "output_dir", "tracking.uri"):
        assert f"\n  {field}=" in message
    with pytest.raises(ConfigError, match="tracking.uri='http://<mlflow-server-private-ip>:5000'"):
        load_config(SMOKE, S3_PATHS[:-1])


def test_output_dir_on_s3_needs_a_tracking_server():
    with pytest.raises(ConfigError, match="tracking.uri: .*output_dir is 's3://b/out'"):
        load_config(None, ["output_dir=s3://b/out"])


# ---------------------------------------------------------------- `ray job submit --working-dir`


@pytest.fixture()
def in_working_dir_copy(tmp_path, monkeypatch):
    """The current directory made to look like Ray's unpacked --working-dir (what `ray job submit`
    runs a job in): .../runtime_resources/working_dir_files/_ray_pkg_<hash>."""
    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (copy / "jobs").mkdir(parents=True)
    monkeypatch.chdir(copy)
    return copy


def test_working_dir_copy_is_recognised(in_working_dir_copy):
    assert ray_working_dir_copy() == str(in_working_dir_copy)
    assert ray_working_dir_copy(str(in_working_dir_copy / "jobs")) == str(in_working_dir_copy)
    assert ray_working_dir_copy("/home/me/vilau") is None


def test_relative_outputs_under_working_dir_are_refused_with_what_to_set(in_working_dir_copy):
    with pytest.raises(ConfigError) as err:
        check_working_dir_outputs(load_config(None))  # tiny.yaml: output_dir=outputs, storage_path=outputs/ray, SQLite
    message = str(err.value)
    assert "Ray's temporary copy of --working-dir" in message
    assert f"output_dir -> {in_working_dir_copy}/outputs" in message
    assert f"cluster.storage_path -> {in_working_dir_copy}/outputs/ray" in message
    assert f"tracking.uri (unset: SQLite under output_dir) -> {in_working_dir_copy}/outputs/mlflow.db" in message
    assert "output_dir=s3://" in message and "cluster.storage_path=s3://" in message and "tracking.uri=http" in message


def test_only_the_relative_field_is_named(in_working_dir_copy, tmp_path):
    outside = tmp_path / "kept"
    with pytest.raises(ConfigError) as err:
        check_working_dir_outputs(load_config(None, [f"output_dir={outside}", "cluster.storage_path=ray_results",
                                                     "data.synthetic.make_if_missing=false"]))
    listed = str(err.value).split("\nSet each")[0].splitlines()[1:]
    assert listed == [f"  cluster.storage_path -> {in_working_dir_copy}/ray_results"]


def test_absolute_and_s3_outputs_pass_under_working_dir(in_working_dir_copy, tmp_path):
    config = load_config(SMOKE, S3_PATHS)
    check_working_dir_outputs(config)
    shared = load_config(None, [f"output_dir={tmp_path}/out", f"cluster.storage_path={tmp_path}/ray",
                                f"data.root={tmp_path}/data"])
    assert not shared.output_dir.startswith(os.getcwd())


# ---------------------------------------------------------------- output_dir on S3


def test_lm_tokenizer_trained_once_into_an_s3_output_dir(s3_server, s3_synthetic_data, s3_overrides):
    """With output_dir on S3 (a cluster), the driver's trained LM tokenizer is kept there, so a rerun or
    another job (tokenize_data, pretrain) gets the same one, from any machine."""
    import boto3

    from orchestration.data.lm_data import directory_files, ensure_lm_tokenizer
    from conftest import S3_BUCKET

    data_uri, _ = s3_synthetic_data
    config = load_config(None, [f"data.root={data_uri}", f"output_dir=s3://{S3_BUCKET}/tok-test/outputs",
                                "tracking.uri=http://127.0.0.1:1", *s3_overrides])
    first = ensure_lm_tokenizer(config)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                          aws_access_key_id=s3_server.access_key_id, aws_secret_access_key=s3_server.secret_access_key)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=S3_BUCKET, Prefix="tok-test/outputs/lm_tokenizer/")["Contents"]]
    assert "tok-test/outputs/lm_tokenizer/tokenizer.json" in keys
    files = directory_files(first)
    # Every call reuses one local copy (named by content), not a new temp dir per call.
    assert ensure_lm_tokenizer(config) == first and directory_files(first) == files
    # Without the local copy it is downloaded, not trained again: there are no shards to train on here.
    shutil.rmtree(first)
    elsewhere = config.model_copy(update={"data": config.data.model_copy(update={"root": f"s3://{S3_BUCKET}/no-shards"})})
    second = ensure_lm_tokenizer(elsewhere)
    assert directory_files(second) == files
