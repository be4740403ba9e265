"""The storage helper: endpoints and credentials are honoured and never printed."""

from orchestration.config import load_config
from orchestration.storage import S3Settings, join, pyarrow_filesystem, s3fs_options


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
