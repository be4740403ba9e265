"""Shared test harness: real components, made once per session.

- one local Ray instance (logical CPUs oversubscribed: Data and Train deadlock on 2 cores otherwise);
- a real S3-protocol server (moto) on 127.0.0.1 with a bucket;
- an MLflow SQLite tracking URI in a temp dir;
- the synthetic shards, clean and with corrupt records, made once;
- an empty MLflow SQLite store made once, copied where a test's runs log (see mlflow_db_template);
- for tiny-model tests: one torch thread per module, and the tiny vision tower (seed 0, eval mode).

Ray, S3 and the shards are only started for tests that ask for them, so model tests stay fast.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from gloo_ranks import free_loopback_port
from orchestration.config import load_config
from orchestration.data.synthetic import make_synthetic_dataset
from orchestration.storage import S3Settings, upload_dir

RAY_LOGICAL_CPUS = 8
S3_BUCKET = "vilau-test"
# moto accepts any credentials; these only have to be present and are fake on purpose.
S3_TEST_KEY = "testing-key-id"
S3_TEST_SECRET = "testing-secret-value"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session."""
    import ray

    from orchestration.cluster import LOCAL_INSTANCE_ENV

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    for name, value in LOCAL_INSTANCE_ENV.items():  # as a job's local instance: no preemption watcher, fast polls
        os.environ.setdefault(name, value)
    if not ray.is_initialized():
        # address="local": always a fresh instance of our own, even if `ray start` runs on this machine.
        ray.init(address="local", num_cpus=RAY_LOGICAL_CPUS, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server on loopback; yields the resolved connection settings."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_loopback_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    settings = S3Settings(
        endpoint_url=f"http://127.0.0.1:{port}",
        region="us-east-1",
        access_key_id=S3_TEST_KEY,
        secret_access_key=S3_TEST_SECRET,
        max_retries=2,
    )
    client = boto3.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=S3_TEST_KEY,
        aws_secret_access_key=S3_TEST_SECRET,
    )
    client.create_bucket(Bucket=S3_BUCKET)
    yield settings
    server.stop()


@pytest.fixture(scope="session")
def s3_overrides(s3_server) -> list[str]:
    """Config overrides that point a run at the test S3 server."""
    return [
        f"data.s3.endpoint_url={s3_server.endpoint_url}",
        f"data.s3.access_key_id={s3_server.access_key_id}",
        f"data.s3.secret_access_key={s3_server.secret_access_key}",
    ]


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """Clean shards in every format: (directory, manifest)."""
    out = tmp_path_factory.mktemp("synthetic")
    manifest = make_synthetic_dataset(out, samples=64, seed=0, eval_samples=64)
    return str(out), manifest


@pytest.fixture(scope="session")
def corrupt_data(tmp_path_factory):
    """Shards with 20% bad records of every kind: (directory, manifest)."""
    out = tmp_path_factory.mktemp("synthetic_corrupt")
    manifest = make_synthetic_dataset(out, samples=64, seed=1, corrupt_fraction=0.2, eval_samples=16)
    return str(out), manifest


@pytest.fixture(scope="session")
def s3_synthetic_data(s3_server, synthetic_data):
    """The clean shards uploaded to the S3 server: (s3 URI, manifest)."""
    local_dir, manifest = synthetic_data
    uri = f"s3://{S3_BUCKET}/synthetic"
    upload_dir(local_dir, uri, s3_server)
    return uri, manifest


@pytest.fixture(scope="session")
def mlflow_db_template():
    """An empty MLflow SQLite store, its tables made once per session. Making them runs MLflow's
    migrations, each its own committed transaction: seconds of fsync per store on a busy disk (12 s
    measured here under load), paid again by every test that starts a store of its own. A test copies
    this file instead (fresh_mlflow_db); the job run in test_jobs still makes its store from nothing.
    Made on tmpfs where there is one, for the same reason."""
    from mlflow import MlflowClient

    folder = tempfile.mkdtemp(prefix="vilau-mlflow-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    path = Path(folder) / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # the store is made on first use
    yield path
    shutil.rmtree(folder, ignore_errors=True)


def fresh_mlflow_db(template: Path, path: Path) -> str:
    """An empty MLflow store at ``path`` (a copy of the session's template, if none is there); its URI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        shutil.copyfile(template, path)
    return f"sqlite:///{path}"


@pytest.fixture()
def tiny_config(tmp_path, synthetic_data, request):
    """The tiny preset pointed at the session's shards, with outputs in a temp dir."""

    def make(*overrides: str):
        db = tmp_path / "mlflow.db"
        if "tracking.enabled=false" not in overrides:  # a store only where runs may log
            fresh_mlflow_db(request.getfixturevalue("mlflow_db_template"), db)
        base = [
            f"data.root={synthetic_data[0]}",
            f"output_dir={tmp_path / 'outputs'}",
            f"cluster.storage_path={tmp_path / 'outputs' / 'ray'}",
            f"tracking.uri=sqlite:///{db}",
        ]
        return load_config(None, base + list(overrides))

    return make



@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are dominated by per-op overhead; extra threads only contend on a shared 2-core box.
    A module opts in for all its tests with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_tower():
    """The tiny-preset vision tower, random init from seed 0, in eval mode (one per test module)."""
    import torch

    from vilau_model.config import get_tower_config
    from vilau_model.vision_tower import UnifiedVisionTower

    torch.manual_seed(0)
    return UnifiedVisionTower(get_tower_config("tiny")).eval()


@pytest.fixture()
def sharegpt_two_turns() -> list[dict]:
    """A ShareGPT conversation with an image and two question/answer turns."""
    return [
        {"from": "human", "value": "<image>\nwhat is in the image?"},
        {"from": "gpt", "value": "a red circle."},
        {"from": "human", "value": "where is it?"},
        {"from": "gpt", "value": "at the top left"},
    ]
