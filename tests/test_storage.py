"""The storage helper: endpoints and credentials are honoured and never printed."""

import pickle

import pyarrow.fs as pafs

from conftest import S3_BUCKET, S3_TEST_KEY, S3_TEST_SECRET
from orchestration.config import load_config
from orchestration.storage import S3Settings, filesystem, join, pyarrow_filesystem, s3fs_options


def test_settings_come_from_config_then_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    from_env = S3Settings.from_config(load_config().data.s3)
    assert (from_env.access_key_id, from_env.endpoint_url) == ("env-key", "http://127.0.0.1:9000")

    config = load_config(None, ["data.s3.endpoint_url=http://127.0.0.1:9999", "data.s3.access_key_id=cfg-key", "data.s3.secret_access_key=cfg-secret"])
    settings = S3Settings.from_config(config.data.s3)
    assert (settings.access_key_id, settings.secret_access_key, settings.endpoint_url) == ("cfg-key", "cfg-secret", "http://127.0.0.1:9999")
    assert "cfg-secret" not in repr(settings) and "cfg-secret" not in str(settings)

    options = s3fs_options(settings)
    assert options["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9999"
    assert options["key"] == "cfg-key"


def test_pyarrow_filesystem_for_local_and_s3():
    fs, path = pyarrow_filesystem("relative/dir")
    assert fs.type_name == "local" and path.endswith("relative/dir")
    settings = S3Settings(endpoint_url="http://127.0.0.1:9999", access_key_id="k", secret_access_key="s")
    fs, path = pyarrow_filesystem("s3://bucket/prefix", settings)
    assert fs.type_name == "s3" and path == "bucket/prefix"
    assert join("s3://bucket/a", "b", "c") == "s3://bucket/a/b/c"


def test_keys_from_the_environment_work_and_stay_out_of_pickled_filesystems(monkeypatch, s3_server):
    """Credentials from the environment (a node's, or an instance profile) are left to the AWS SDK's own
    lookup: the filesystems reach S3 with them, and a pickled filesystem (Ray Tune stores one in its
    sweep state, on the run's storage) holds none of them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_TEST_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_TEST_SECRET)
    config = load_config(None, [f"data.s3.endpoint_url={s3_server.endpoint_url}"])
    arrow, bucket = pyarrow_filesystem(f"s3://{S3_BUCKET}", config.data.s3)
    arrow.create_dir(f"{bucket}/env-keys")
    with arrow.open_output_stream(f"{bucket}/env-keys/probe.txt") as f:
        f.write(b"ok")
    fsspec_fs, _ = filesystem(f"s3://{S3_BUCKET}", config.data.s3)
    assert fsspec_fs.cat_file(f"{bucket}/env-keys/probe.txt") == b"ok"
    for fs in (arrow, fsspec_fs):
        pickled = pickle.dumps(fs)
        assert S3_TEST_SECRET.encode() not in pickled and S3_TEST_KEY.encode() not in pickled, type(fs)
    again = pickle.loads(pickle.dumps(arrow))  # unpickled where the environment holds the keys: works
    assert again.get_file_info(f"{bucket}/env-keys/probe.txt").type == pafs.FileType.File
