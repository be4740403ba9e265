"""Where a run meets the cluster: joining it (or starting a local instance), the run's storage, and the
checks that a run's paths work where it runs: on a multi-node cluster, and under `ray job submit`.

    init_ray(config)            start a local instance, or join a cluster / `ray job submit`
    run_storage(config)         (storage path, filesystem) for Ray Train's RunConfig

Two mistakes lose a user's work or fail only after workers have started:

- On a cluster of several nodes (or a head that runs no tasks), each node has its own disk. A local
  ``data.root`` is missing on the worker nodes, checkpoints under a local ``cluster.storage_path`` are
  scattered over machines, and a SQLite or file MLflow store on the driver's disk is out of reach of
  the workers that log. :func:`check_cluster_paths` refuses such paths by field, right after the driver
  joins the cluster and before any worker starts, unless ``cluster.shared_filesystem`` says that local
  paths are on NFS / EFS / FSx mounted on every node.
- `ray job submit --working-dir .` runs the driver inside Ray's temporary copy of the directory
  (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``), deleted with the cluster: a relative
  output path resolves into it. :func:`check_working_dir_outputs` refuses that when a job loads its
  config (orchestration/job_cli.py), before Ray starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from orchestration.config import Config, ConfigError
from orchestration.storage import is_s3, pyarrow_filesystem

# Where Ray unpacks a job's --working-dir (and py_modules) on every node.
RAY_WORKING_DIR_MARKER = f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}"


def is_uri(path: str) -> bool:
    return "://" in path


def mlflow_store_path(uri: str) -> str | None:
    """The local path behind a SQLite or file MLflow store URI; None for a server (http/https/databricks)."""
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///") :]  # sqlite:////abs/path -> /abs/path
    if uri.startswith("file://"):
        return uri[len("file://") :]
    if uri.startswith("file:"):
        return uri[len("file:") :]
    if "://" not in uri:
        return uri  # a bare path is a file store
    return None


def node_local_paths(config: Config) -> list[tuple[str, str]]:
    """(field, value) for every path of the run that lives on one machine's disk."""
    found = []
    for field, value in (
        ("data.root", config.data.root),
        ("data.cache_dir", config.data.cache_dir),
        ("cluster.storage_path", config.cluster.storage_path),
        ("output_dir", config.output_dir),
    ):
        if value is not None and not is_uri(value):
            found.append((field, value))
    for group in ("tower_sources", "lm_sources"):
        for name, source in getattr(config.data, group).items():
            for key in ("path", "media_root"):
                value = getattr(source, key)
                if value is not None and os.path.isabs(value):  # relative ones are under data.root
                    found.append((f"data.{group}.{name}.{key}", value))
    if config.tracking.enabled:
        store = mlflow_store_path(config.tracking_uri)
        if store is not None:
            field = "tracking.uri" if config.tracking.uri else "tracking.uri (unset: SQLite under output_dir)"
            found.append((field, config.tracking_uri))
    return found


@dataclass
class ClusterShape:
    """What the driver sees of the cluster it joined."""

    alive_nodes: int
    driver_node_cpus: float

    @property
    def needs_shared_paths(self) -> bool:
        """Work runs on machines other than the driver's: several nodes, or a driver node without CPUs."""
        return self.alive_nodes > 1 or self.driver_node_cpus == 0


def cluster_shape() -> ClusterShape:
    """The shape of the cluster this (connected) driver is in."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.get_runtime_context().get_node_id()
    driver_cpus = next((n["Resources"].get("CPU", 0.0) for n in nodes if n["NodeID"] == here), 0.0)
    return ClusterShape(alive_nodes=len(nodes), driver_node_cpus=driver_cpus)


def check_cluster_paths(config: Config, shape: ClusterShape) -> None:
    """Refuse node-local paths on a cluster whose nodes do not share a disk; names every field."""
    if not shape.needs_shared_paths or config.cluster.shared_filesystem:
        return
    local = node_local_paths(config)
    if not local:
        return
    why = (
        f"this job runs on a Ray cluster of {shape.alive_nodes} node(s)"
        + (" whose head runs no tasks (CPU 0)" if shape.driver_node_cpus == 0 else "")
        + ", and each node has its own disk, so these paths would differ from node to node:"
    )
    lines = [f"{field}={value!r} is a path on one node's disk" for field, value in local]
    raise ConfigError(
        why + "\n  " + "\n  ".join(lines) + "\n"
        "Use s3://bucket/prefix for data.root, data.cache_dir, cluster.storage_path and output_dir, and an "
        "MLflow tracking server (tracking.uri=http://<head private IP>:5000) for tracking; or, if these "
        "paths are on a filesystem mounted on every node (NFS, EFS, FSx), set cluster.shared_filesystem=true."
    )


def ray_working_dir_copy(cwd: str | None = None) -> str | None:
    """The root of Ray's temporary --working-dir copy that ``cwd`` is in, or None."""
    cwd = cwd or os.getcwd()
    at = cwd.find(RAY_WORKING_DIR_MARKER)
    if at < 0:
        return None
    rest = cwd[at + len(RAY_WORKING_DIR_MARKER) :].split(os.sep, 1)[0]  # _ray_pkg_<hash>
    return cwd[: at + len(RAY_WORKING_DIR_MARKER)] + rest


def output_fields(config: Config) -> list[tuple[str, str]]:
    """(field, local path) for everything the run writes that should outlive it."""
    found = [
        (field, value)
        for field, value in (
            ("output_dir", config.output_dir),
            ("cluster.storage_path", config.cluster.storage_path),
            ("data.cache_dir", config.data.cache_dir),
        )
        if value is not None and not is_uri(value)
    ]
    if config.tracking.enabled:
        store = mlflow_store_path(config.tracking_uri)
        if store is not None:
            found.append(("tracking.uri" if config.tracking.uri else "tracking.uri (unset: SQLite under output_dir)", store))
    if config.data.synthetic.make_if_missing and not is_uri(config.data.root):
        found.append(("data.root (data.synthetic.make_if_missing writes generated shards there)", config.data.root))
    return found


def check_working_dir_outputs(config: Config, cwd: str | None = None) -> None:
    """Refuse outputs inside Ray's temporary working-dir copy (a relative path under `ray job submit
    --working-dir`); they would vanish with the cluster."""
    copy_root = ray_working_dir_copy(cwd)
    if copy_root is None:
        return
    inside = [(f, p) for f, p in output_fields(config) if os.path.abspath(p).startswith(copy_root + os.sep) or os.path.abspath(p) == copy_root]
    if not inside:
        return
    lines = [f"{field} -> {path}" for field, path in inside]
    raise ConfigError(
        "this job runs in Ray's temporary copy of --working-dir, which is deleted with the cluster, and "
        "these outputs would be written into it:\n  " + "\n  ".join(lines) + "\n"
        "Set each to a location that outlives the job: output_dir=s3://bucket/prefix/outputs, "
        "cluster.storage_path=s3://bucket/prefix/ray, data.cache_dir=s3://bucket/prefix/tokenized, "
        "tracking.uri=http://<MLflow server>:5000 (and data.root to your shards, with "
        "data.synthetic.make_if_missing=false); or an absolute path on a filesystem every node mounts."
    )


# ---------------------------------------------------------------- joining Ray, the run's storage

# Environment of a local instance (its processes inherit it). One machine is never preempted: no
# preemption-watcher actor per stage. The Train controller notices a finished worker group at its next
# poll: poll every 0.5 s, not 2.
LOCAL_INSTANCE_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def init_ray(config: Config) -> None:
    """Join the configured cluster, the cluster a `ray job submit` runs in (``RAY_ADDRESS``), or start a
    local instance. On a cluster whose nodes do not share a disk, node-local paths are refused here,
    before any worker starts."""
    import ray

    if ray.is_initialized():
        return
    if config.cluster.address or os.environ.get("RAY_ADDRESS"):
        # cluster.address wins; else Ray reads RAY_ADDRESS (set inside `ray job submit`, or exported).
        ray.init(address=config.cluster.address) if config.cluster.address else ray.init()
        try:
            check_cluster_paths(config, cluster_shape())
        except Exception:
            ray.shutdown()
            raise
    else:
        # A new local instance ("local": not a `ray start` cluster that may run here). More logical
        # CPUs than cores: Ray Data and Ray Train deadlock on a 2-core machine otherwise.
        for name, value in LOCAL_INSTANCE_ENV.items():
            os.environ.setdefault(name, value)
        ray.init(address="local", num_cpus=config.cluster.local_num_cpus, include_dashboard=False)


def run_storage(config: Config) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for RunConfig; S3 honours data.s3 (endpoint, keys)."""
    path = config.cluster.storage_path
    if is_s3(path):
        fs, inner = pyarrow_filesystem(path, config.data.s3)
        return inner, fs
    return os.path.abspath(path), None


def storage_uri(config: Config, fs_path: str) -> str:
    """A path on the storage filesystem as the user writes it (s3://... or a local path)."""
    return f"s3://{fs_path}" if is_s3(config.cluster.storage_path) else fs_path
