"""What each stage of a run asks Ray for, held against the cluster it will run on, before anything starts.

A stage is a sequence of phases; the asks of one phase are held at the same time (e.g. stage 2 on the
fly: the training worker group AND every rank's tokenization pool). A phase fits when its bundles can
be placed on the cluster's nodes; two parts that wait on the same GPUs do not fit, and a run that would
sit waiting for them forever is refused here, naming the fields that size each part.

The cluster is, in this order: the `ray up` file in ``cluster.cluster_yaml`` (each node type x its
max_workers: the most an autoscaling cluster can grow to); the live cluster when the job joins one
(``cluster.address`` / ``RAY_ADDRESS``, after ``init_ray``); else the local instance a job starts.

Also here: :class:`ResourceWaitError`, what a wait on Ray resources raises when its deadline passes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from orchestration.config import Config, ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
# Ray's logical memory reserved per tokenization-pool actor (torch + the frozen tower + the tokenizer).
TOKENIZER_ACTOR_MEMORY = 1 * GIB
# Ray Data gives a map task or actor 1 CPU unless told otherwise (GPU actors included).
DATA_TASK_CPUS = 1.0


class ResourceWaitError(RuntimeError):
    """A wait on Ray resources (an actor pool, a worker group, a batch) passed its deadline."""


@dataclass(frozen=True)
class Bundle:
    cpu: float = 0.0
    gpu: float = 0.0
    memory: float = 0.0  # bytes of Ray's logical "memory" resource

    def __str__(self) -> str:
        parts = [f"CPU {self.cpu:g}"]
        if self.gpu:
            parts.append(f"GPU {self.gpu:g}")
        if self.memory:
            parts.append(f"memory {self.memory / GIB:g} GiB")
        return "{" + ", ".join(parts) + "}"


@dataclass(frozen=True)
class Ask:
    part: str  # what asks, in words
    count: int
    each: Bundle
    fields: tuple[str, ...]  # the config fields that size it


@dataclass
class Phase:
    stage: str
    name: str
    asks: list[Ask]

    @property
    def label(self) -> str:
        return f"{self.stage}: {self.name}"

    def total(self) -> Bundle:
        return Bundle(
            sum(a.count * a.each.cpu for a in self.asks),
            sum(a.count * a.each.gpu for a in self.asks),
            sum(a.count * a.each.memory for a in self.asks),
        )


@dataclass
class Capacity:
    source: str  # where the node list came from, in words
    nodes: list[Bundle]
    check_memory: bool = True  # a local instance's logical memory is not worth holding against

    def total(self) -> Bundle:
        return Bundle(sum(n.cpu for n in self.nodes), sum(n.gpu for n in self.nodes), sum(n.memory for n in self.nodes))


@dataclass
class ResourcePlan:
    capacity: Capacity
    phases: list[Phase]
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def table(self) -> list[str]:
        total = self.capacity.total()
        lines = [f"cluster: {self.capacity.source}: {len(self.capacity.nodes)} node(s), "
                 f"{total.cpu:g} CPUs, {total.gpu:g} GPUs"]
        rows = [["phase", "part", "count x each", "total"]]
        for phase in self.phases:
            for i, ask in enumerate(phase.asks):
                n = ask.count
                rows.append([phase.label if i == 0 else "", ask.part, f"{n} x {ask.each}",
                             str(Bundle(n * ask.each.cpu, n * ask.each.gpu, n * ask.each.memory))])
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return lines


# ---------------------------------------------------------------- what the stages ask for


def worker_bundle(config: Config) -> Bundle:
    """One Ray Train worker (launch.build_trainer asks for exactly this)."""
    return Bundle(cpu=config.cluster.cpus_per_worker, gpu=1.0 if config.cluster.use_gpu else 0.0)


def tokenizer_actor_bundle(config: Config) -> Bundle:
    """One tokenization-pool actor (orchestration/data/lm_data.tokenize_dataset asks for exactly this)."""
    return Bundle(cpu=DATA_TASK_CPUS, gpu=config.data.tokenizer_actor_gpus, memory=TOKENIZER_ACTOR_MEMORY)


def generation_bundle(config: Config) -> Bundle:
    """The end-of-stage-2 generation task (orchestration/train/samples.py runs with these)."""
    return Bundle(cpu=1.0, gpu=1.0 if config.cluster.use_gpu else 0.0)


def tokenizes_once(config: Config) -> bool:
    """Stage 2 tokenizes through one cluster-wide pool into data.cache_dir before training (a cache
    already there is read instead); without a cache_dir every rank tokenizes on the fly."""
    return config.data.cache_dir is not None


def stage_phases(config: Config, stage: str) -> list[Phase]:
    c = config.cluster
    worker_fields = ("cluster.num_workers", "cluster.cpus_per_worker", "cluster.use_gpu")
    workers = Ask("training workers", c.num_workers, worker_bundle(config), worker_fields)
    # Read/decode tasks can wait for a CPU, but at least one must be free beside whatever trains.
    decode = Ask("data read/decode tasks (at least one)", 1, Bundle(cpu=DATA_TASK_CPUS), ("cluster.cpus_per_worker",))
    export = Phase(stage, "export", [Ask("export task", 1, Bundle(cpu=1.0), ())])
    pool_fields = ("data.tokenizer_actors", "data.tokenizer_actor_gpus")
    if stage == "tower":
        return [Phase(stage, "train", [workers, decode]), export]
    if stage == "lm":
        end = [export, Phase(stage, "samples", [Ask("generation task", 1, generation_bundle(config), ("cluster.use_gpu",))])]
        if tokenizes_once(config):
            pool = Ask("tokenization pool (one, cluster-wide)", config.data.tokenizer_actors,
                       tokenizer_actor_bundle(config), pool_fields)
            return [Phase(stage, "tokenize into data.cache_dir", [pool, decode]), Phase(stage, "train", [workers, decode]), *end]
        pools = Ask(f"tokenization actors ({c.num_workers} ranks' pools x {config.data.tokenizer_actors})",
                    c.num_workers * config.data.tokenizer_actors, tokenizer_actor_bundle(config),
                    (*pool_fields, "cluster.num_workers", "data.cache_dir"))
        return [Phase(stage, "train, tokenizing on the fly", [workers, pools, decode]), *end]
    if stage == "tune":
        trial = Ask("one trial's workers", config.tune.workers_per_trial, worker_bundle(config),
                    ("tune.workers_per_trial", "cluster.cpus_per_worker", "cluster.use_gpu"))
        return [Phase(stage, "one trial", [Ask("trial driver", 1, Bundle(cpu=0.1), ()), trial, decode])]
    raise ValueError(f"unknown stage {stage!r}")


# ---------------------------------------------------------------- what the cluster has


def resolve_cluster_yaml(path: str) -> Path:
    candidate = Path(os.path.expanduser(path))
    if candidate.is_file() or candidate.is_absolute():
        return candidate
    return PROJECT_ROOT / path


def capacity_from_cluster_yaml(path: str) -> Capacity:
    """Every node type of a `ray up` file at its max_workers (the head once), within the file's
    global max_workers (types taken in the file's order)."""
    file = resolve_cluster_yaml(path)
    try:
        spec = yaml.safe_load(file.read_text())
        types = spec["available_node_types"]
        head_type = spec.get("head_node_type")
        budget = int(spec.get("max_workers", 1 << 30))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"cluster.cluster_yaml: cannot read the node types of {file}: {exc}") from None
    nodes, described = [], []
    for name, node_type in types.items():
        resources = node_type.get("resources") or {}
        bundle = Bundle(float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), float(resources.get("memory", 0)))
        count = 1 if name == head_type else min(int(node_type.get("max_workers", 0)), budget)
        if name != head_type:
            budget -= count
        nodes += [bundle] * count
        described.append(f"{count} x {name} {bundle}")
    has_memory = all(n.memory for n in nodes)
    return Capacity(f"{file.name} at its max size ({'; '.join(described)})", nodes, check_memory=has_memory)


def capacity_of_live_cluster() -> Capacity:
    """The alive nodes of the cluster this process has joined."""
    import ray

    nodes = [Bundle(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)), float(n["Resources"].get("memory", 0)))
             for n in ray.nodes() if n.get("Alive")]
    return Capacity("the live cluster", nodes)


def capacity_of_local_instance(config: Config) -> Capacity:
    """The instance a job starts when it joins no cluster (cluster.init_ray): local_num_cpus logical CPUs
    and the GPUs this machine has."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # no usable CUDA: no GPUs
        gpus = 0
    return Capacity(f"a local instance (cluster.local_num_cpus={config.cluster.local_num_cpus})",
                    [Bundle(float(config.cluster.local_num_cpus), float(gpus))], check_memory=False)


def joins_a_cluster(config: Config) -> bool:
    return bool(config.cluster.address or os.environ.get("RAY_ADDRESS"))


def cluster_capacity(config: Config, *, live: bool | None = None) -> Capacity:
    """What the run is held against (see the module docstring). ``live``: whether this process has
    joined the cluster it runs on (default: whether Ray is initialized)."""
    if config.cluster.cluster_yaml:
        return capacity_from_cluster_yaml(config.cluster.cluster_yaml)
    if live is None:
        import ray

        live = ray.is_initialized()
    if live and joins_a_cluster(config):
        return capacity_of_live_cluster()
    return capacity_of_local_instance(config)


# ---------------------------------------------------------------- the fit


def place(bundles: list[Bundle], nodes: list[Bundle], check_memory: bool) -> int:
    """First-fit decreasing placement of ``bundles`` on ``nodes``; returns how many could not be placed."""
    free = [[n.cpu, n.gpu, n.memory] for n in nodes]
    unplaced = 0
    for b in sorted(bundles, key=lambda b: (b.gpu, b.cpu, b.memory), reverse=True):
        for room in free:
            if room[0] + 1e-9 >= b.cpu and room[1] + 1e-9 >= b.gpu and (not check_memory or room[2] + 1 >= b.memory):
                room[0] -= b.cpu
                room[1] -= b.gpu
                room[2] -= b.memory
                break
        else:
            unplaced += 1
    return unplaced


def phase_problem(phase: Phase, capacity: Capacity) -> str | None:
    bundles = [a.each for a in phase.asks for _ in range(a.count)]
    if not place(bundles, capacity.nodes, capacity.check_memory):
        return None
    need, have = phase.total(), capacity.total()
    fields = sorted({f for a in phase.asks for f in a.fields})
    held = " + ".join(f"{a.count} {a.part} x {a.each}" for a in phase.asks)
    short = []
    if need.gpu > have.gpu + 1e-9:
        short.append(f"{need.gpu:g} GPUs of {have.gpu:g}")
    if need.cpu > have.cpu + 1e-9:
        short.append(f"{need.cpu:g} CPUs of {have.cpu:g}")
    if capacity.check_memory and need.memory > have.memory:
        short.append(f"{need.memory / GIB:.0f} GiB of memory of {have.memory / GIB:.0f}")
    why = ", ".join(short) if short else "no node has room for every bundle"
    message = (f"{phase.label}: asks for {held} at the same time: {why} on {capacity.source}; "
               f"it would wait forever. Fields: {', '.join(fields)}")
    if phase.stage == "lm" and any("ranks' pools" in a.part for a in phase.asks):
        message += ("; set data.cache_dir so that stage 2 tokenizes once through one cluster-wide pool before "
                    "training takes the GPUs")
    return message


def plan_resources(config: Config, stages: tuple[str, ...], capacity: Capacity) -> ResourcePlan:
    phases = [p for stage in stages for p in stage_phases(config, stage)]
    plan = ResourcePlan(capacity, phases)
    plan.problems = [m for m in (phase_problem(p, capacity) for p in phases) if m]
    if not capacity.nodes:
        plan.problems.append(f"cluster: {capacity.source} has no nodes")
    return plan


def check_resources(config: Config, stages: tuple[str, ...], capacity: Capacity | None = None) -> ResourcePlan:
    """The plan of ``stages`` against the cluster; raises ConfigError listing every phase that does not fit."""
    plan = plan_resources(config, stages, capacity or cluster_capacity(config))
    if plan.problems:
        raise ConfigError("the run does not fit its cluster:\n  " + "\n  ".join(plan.problems))
    return plan


def rank_data_limits(config: Config, world: int, pool_gpus: float = 0.0):
    """Ray Data limits of ONE training rank's pipeline: its share of what the training worker group
    leaves free (CPUs, and half the object store as Ray Data's own default takes), so that ``world``
    executors started side by side never ask for more than the cluster has (each would otherwise size
    itself to the whole cluster). ``pool_gpus``: the GPUs of this rank's own tokenization pool."""
    import ray
    from ray.data import ExecutionResources

    total = ray.cluster_resources()
    free_cpus = total.get("CPU", 0.0) - world * config.cluster.cpus_per_worker
    store = total.get("object_store_memory", 0.0)
    return ExecutionResources(
        cpu=max(free_cpus / world, DATA_TASK_CPUS + config.data.tokenizer_actors * DATA_TASK_CPUS * (pool_gpus > 0)),
        gpu=pool_gpus,
        object_store_memory=max(store * 0.5 / world, 64 << 20) if store else None,
    )


def pool_start_error(exc: BaseException, what: str, each: Bundle, count: int, fields: tuple[str, ...], timeout_s: float):
    """Ray Data's "Timed out while starting actors" (an actor pool whose actors never got their
    resources), said as what the pool asked for and the fields that size it; None for anything else."""
    import ray

    if not isinstance(exc, ray.exceptions.GetTimeoutError) or "starting actors" not in str(exc):
        return None
    try:
        free = ray.available_resources()
        free_text = f"free now: CPU {free.get('CPU', 0):g}, GPU {free.get('GPU', 0):g}"
    except Exception:  # Ray already gone: say what we know
        free_text = "free resources unknown"
    return ResourceWaitError(
        f"{what}: {count} actors x {each} did not start within data.actor_start_timeout_s={timeout_s:g} s; the "
        f"cluster has no room for them ({free_text}; a GPU held by training is not free). Fields: {', '.join(fields)}"
    )


def worker_start_attempts(config: Config, attempt_s: float = 60.0) -> int:
    """Ray Train waits ``attempt_s`` for a worker group's placement group per attempt and retries without
    end; this many attempts make up cluster.worker_start_timeout_s."""
    return max(1, math.ceil(config.cluster.worker_start_timeout_s / attempt_s))
