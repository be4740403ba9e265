"""What a run will ask for, computed before anything is spent: Ray resources per stage and the per-GPU
memory peak of each stage's step. ``jobs/plan.py`` prints it; every job's preflight
(``launch.preflight``) refuses a run that does not fit, naming the fields.

Memory is computed, not run: the real model classes at the config's shapes under fake tensors and a
fake process group of the real world size (orchestration/train/memory_plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestration.config import STAGE_SECTIONS, Config
from orchestration.resource_plan import ResourcePlan, cluster_capacity, plan_resources

# Of cluster.gpu_memory_gib, what a step may take; the rest is headroom for what the estimate cannot
# see exactly (allocator behaviour at the limit, NCCL's lazily grown buffers).
GPU_MEMORY_USABLE = 0.9


@dataclass
class RunPlan:
    resources: ResourcePlan
    memory: dict[str, object] = field(default_factory=dict)  # stage -> train.memory_plan estimate
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems


def memory_problems(config: Config, estimates: dict[str, object]) -> list[str]:
    """A stage whose per-GPU peak exceeds GPU_MEMORY_USABLE x cluster.gpu_memory_gib, with the fields to change."""
    if not (config.cluster.use_gpu and config.cluster.gpu_memory_gib):
        return []
    limit = config.cluster.gpu_memory_gib * GPU_MEMORY_USABLE
    problems = []
    for stage, estimate in estimates.items():
        if estimate.peak_gib > limit:
            section = STAGE_SECTIONS[stage]
            problems.append(
                f"{stage}: the per-GPU peak of one step is {estimate.peak_gib:.1f} GiB, over {GPU_MEMORY_USABLE:g} x "
                f"cluster.gpu_memory_gib={config.cluster.gpu_memory_gib:g} = {limit:.1f} GiB. Fields: cluster.gpu_memory_gib, "
                f"{section}.batch_size_per_worker, {section}.activation_checkpointing, cluster.num_workers"
                + (", data.seq_len" if stage == "lm" else "")
            )
    return problems


def estimate_memory(config: Config, stages) -> dict[str, object]:
    from orchestration.train.memory_plan import estimate_stage_memory

    return {stage: estimate_stage_memory(config, stage) for stage in stages if stage in STAGE_SECTIONS}


def plan_run(config: Config, stages: tuple[str, ...], *, memory: bool = True) -> RunPlan:
    """Resources of ``stages`` against the cluster, and (``memory``) each training stage's per-GPU peak."""
    resources = plan_resources(config, stages, cluster_capacity(config))
    plan = RunPlan(resources, problems=list(resources.problems))
    if memory:
        plan.memory = estimate_memory(config, stages)
        plan.problems += memory_problems(config, plan.memory)
    return plan


def report_lines(config: Config, plan: RunPlan) -> list[str]:
    """The plan as jobs/plan.py prints it."""
    lines = [f"plan of {config.run_name!r}: {config.cluster.num_workers} workers"
             + (f" (HSDP, {config.cluster.hsdp_replicas} replicas)" if config.cluster.hsdp_replicas > 1 else "")
             + (f", GPUs of {config.cluster.gpu_memory_gib:g} GiB" if config.cluster.use_gpu and config.cluster.gpu_memory_gib else ""),
             "", "resources (held at the same time within a phase):"]
    lines += ["  " + line for line in plan.resources.table()]
    for stage, estimate in plan.memory.items():
        section = getattr(config, STAGE_SECTIONS[stage])
        lines += ["", f"memory per GPU, {stage} (one step: {section.grad_accum} micro-batches of {section.batch_size_per_worker}"
                  + (f" x {config.data.seq_len} tokens" if stage == "lm" else "") + "):"]
        lines += ["  " + line for line in estimate.lines()]
    lines.append("")
    if plan.problems:
        lines += ["DOES NOT FIT:"] + [f"  {p}" for p in plan.problems]
    else:
        lines.append("fits: every phase can be placed" + (" and every step fits its GPU" if plan.memory and config.cluster.gpu_memory_gib and config.cluster.use_gpu else ""))
    return lines
