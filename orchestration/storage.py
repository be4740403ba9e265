"""One way to reach data wherever it lives: a local directory or an s3:// URI.

`filesystem(uri, s3)` gives the fsspec filesystem (for s3fs-style file access) and
`pyarrow_filesystem(uri, s3)` the pyarrow one (for pyarrow and Ray Data readers). Both honour a custom
S3 endpoint (MinIO, moto, Ceph) and take credentials from the config or, when it has none, from the
standard AWS environment variables. Credentials are never logged: `describe` prints a URI with them
left out, and the config dumper redacts them.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING

import fsspec
import pyarrow.fs as pafs

if TYPE_CHECKING:  # the config module imports pydantic; keep this module cheap to import
    from orchestration.config import S3Section


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def strip_scheme(uri: str) -> str:
    return uri[len("s3://") :] if is_s3(uri) else uri


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "s3://" + posixpath.join(strip_scheme(base), *parts)
    return os.path.join(base, *parts)


@dataclass(frozen=True)
class S3Settings:
    """The resolved S3 connection. Built from the config section plus the environment."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    anonymous: bool = False
    max_retries: int = 5
    # False when the keys came from the environment: the filesystems then leave them to the AWS SDK's
    # own lookup (environment, instance profile) instead of holding them, so a pickled filesystem (Ray
    # Tune keeps one in its sweep state on storage) carries no credential.
    explicit_keys: bool = True

    def __repr__(self) -> str:  # never print secrets, even by accident
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, anonymous={self.anonymous})"

    __str__ = __repr__

    @classmethod
    def from_config(cls, section: "S3Section | None") -> "S3Settings":
        env = os.environ
        if section is None:
            key = secret = None
            endpoint, region, anonymous, retries = None, None, False, 5
        else:
            key = section.access_key_id.get_secret_value() if section.access_key_id else None
            secret = section.secret_access_key.get_secret_value() if section.secret_access_key else None
            endpoint, region = section.endpoint_url, section.region
            anonymous, retries = section.anonymous, section.max_retries
        return cls(
            endpoint_url=endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=region or env.get("AWS_DEFAULT_REGION", "us-east-1"),
            access_key_id=key or env.get("AWS_ACCESS_KEY_ID"),
            secret_access_key=secret or env.get("AWS_SECRET_ACCESS_KEY"),
            session_token=env.get("AWS_SESSION_TOKEN") if key is None else None,
            anonymous=anonymous,
            max_retries=retries,
            explicit_keys=key is not None,
        )


def _settings(s3: "S3Section | S3Settings | None") -> S3Settings:
    return s3 if isinstance(s3, S3Settings) else S3Settings.from_config(s3)


def s3fs_options(s3: "S3Section | S3Settings | None") -> dict:
    """Keyword arguments for ``s3fs.S3FileSystem`` (also accepted as fsspec storage_options)."""
    settings = _settings(s3)
    options: dict = {
        "anon": settings.anonymous,
        "client_kwargs": {"region_name": settings.region},
        # botocore retries transient errors (throttling, 5xx, dropped connections) with backoff.
        "config_kwargs": {"retries": {"max_attempts": settings.max_retries + 1, "mode": "standard"}},
    }
    if settings.endpoint_url:
        options["client_kwargs"]["endpoint_url"] = settings.endpoint_url
    if settings.access_key_id and settings.explicit_keys and not settings.anonymous:
        options["key"] = settings.access_key_id
        options["secret"] = settings.secret_access_key
        if settings.session_token:
            options["token"] = settings.session_token
    return options


def filesystem(uri: str, s3: "S3Section | S3Settings | None" = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    if is_s3(uri):
        # skip_instance_cache: two configs with different endpoints must not share a client.
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3fs_options(s3))
        return fs, strip_scheme(uri)
    return fsspec.filesystem("file"), os.path.abspath(uri)


def pyarrow_filesystem(uri: str, s3: "S3Section | S3Settings | None" = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it (what Ray Data readers take)."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    settings = _settings(s3)
    kwargs: dict = {
        "region": settings.region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=settings.max_retries + 1),
    }
    if settings.anonymous:
        kwargs["anonymous"] = True
    elif settings.access_key_id and settings.explicit_keys:
        kwargs.update(access_key=settings.access_key_id, secret_key=settings.secret_access_key)
        if settings.session_token:
            kwargs["session_token"] = settings.session_token
    if settings.endpoint_url:
        scheme, _, host = settings.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs), strip_scheme(uri)


def list_files(uri: str, s3: "S3Section | S3Settings | None" = None, suffixes: tuple[str, ...] = (), *, with_sizes: bool = False):
    """Files directly in the directory ``uri`` (not in its subdirectories) ending in one of ``suffixes``,
    as sorted full URIs (with ``with_sizes``: (uri, bytes) pairs).

    Not recursive on purpose: a dataset's index shards sit beside media trees of millions of objects
    (MMC4's images/), and one listing request per directory is all planning may cost.
    """
    fs, path = filesystem(uri, s3)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such directory: {uri}") from None
    if not entries and not fs.exists(path):
        raise FileNotFoundError(f"no such directory: {uri}")
    prefix = "s3://" if is_s3(uri) else ""
    found = sorted(
        (prefix + e["name"], int(e.get("size") or 0))
        for e in entries
        if e.get("type") == "file" and (not suffixes or e["name"].endswith(suffixes))
    )
    return found if with_sizes else [name for name, _ in found]


def upload_dir(local_dir: str, uri: str, s3: "S3Section | S3Settings | None" = None) -> None:
    """Copy a local directory tree to ``uri`` (used to stage shards on S3)."""
    fs, path = filesystem(uri, s3)
    fs.put(os.path.join(local_dir, ""), path.rstrip("/") + "/", recursive=True)
