"""FSDP2 wrapping: one ``fully_shard`` per block, then the root, on a 1-d data-parallel mesh (FSDP) or a
2-d one (HSDP: replicate across nodes, shard within a node); a single rank runs without FSDP.

Ray Train's ``prepare_model(parallel_strategy="fsdp")`` is FSDP1 and GPU-only, so we shard ourselves.
Ray Train has already created the process group (gloo on CPU, nccl on GPU); the mesh reuses it.

Buffers are not sharded by FSDP2: they stay whole on every rank and no collective touches them. The
quantizer's EMA codebook is such a buffer; it stays identical across ranks because the quantizer
all-reduces its own statistics and restart choices (and every rank starts from the same seed).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def training_device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()  # cuda:<local rank>, already set as current by Ray Train
    return torch.device("cpu")


def data_parallel_mesh(device: torch.device, replicas: int = 1) -> DeviceMesh | None:
    """The data-parallel mesh: 1-d (plain FSDP, every rank holds 1/world of each tensor) or, with
    ``replicas`` > 1, 2-d HSDP: ("replicate", "shard") = (replicas, world / replicas). Ranks are laid
    out node by node, so the shard dimension stays within a node (fast links) and only gradient
    all-reduces cross nodes. None with a single rank: no FSDP at all (no collectives to pay for)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return None
    if replicas <= 1:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    if world % replicas:
        raise ValueError(f"cluster.hsdp_replicas={replicas} does not divide the world size {world}")
    return init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))


def mixed_precision(device: torch.device) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 gradient reduction on GPU; plain fp32 on CPU (gloo, no bf16 speedup)."""
    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def checkpoint_blocks(container: nn.ModuleList) -> nn.ModuleList:
    """Activation checkpointing: recompute each block's activations in backward (memory for compute).

    Only plain blocks are wrapped: a module with side effects in forward (the quantizer's EMA update)
    must never be recomputed. State-dict keys gain a wrapper prefix that torch.distributed.checkpoint's
    state-dict helpers strip again, so checkpoints do not depend on this setting.
    """
    for i, block in enumerate(container):
        container[i] = checkpoint_wrapper(block)
    return container


def promote_scalar_parameters(model: nn.Module) -> list[str]:
    """FSDP2 cannot shard 0-d parameters (CLIP's logit scale and bias): make them 1-element vectors.
    They broadcast the same way in the loss; exports reshape them back (see `match_shapes`)."""
    names = []
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(module, name, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def match_shapes(state: dict[str, torch.Tensor], reference: nn.Module) -> dict[str, torch.Tensor]:
    """Reshape entries of a (full) state dict to the shapes of a freshly built model (undoes
    `promote_scalar_parameters`)."""
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    return {k: v.reshape(shapes[k]) if k in shapes and v.shape != shapes[k] and v.numel() == shapes[k].numel() else v
            for k, v in state.items()}


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


# How gradients are synchronized over a step's micro-batches (`set_micro_batch_sync`).
REDUCE_SCATTER_EVERY = "reduce_scatter_every"
LEGACY_SYNC_LAST = "legacy_sync_last"
SYNC_POLICIES = (REDUCE_SCATTER_EVERY, LEGACY_SYNC_LAST)


def set_micro_batch_sync(model: nn.Module, is_last: bool, *, policy: str = REDUCE_SCATTER_EVERY) -> None:
    """Set up FSDP2's gradient reduction before the backward of one micro-batch of a step.

    ``reduce_scatter_every`` (what training uses): every micro-batch's gradients are reduce-scattered
    at once, so they accumulate in the sharded fp32 gradient (1/shard of each parameter); under HSDP
    only the cross-replica all-reduce waits for the last micro-batch (its partial sums stay sharded
    too), as torchtitan does. Gradient accumulation then costs no more memory than one micro-batch.

    ``legacy_sync_last``: skip all reduction until the last micro-batch. FSDP2 then keeps an
    *unsharded* fp32 gradient of every parameter through the step (+4 bytes x all parameters per GPU,
    ~27 GB at 7B); kept only so the memory plan and its test can measure the difference.
    """
    if not is_sharded(model):
        return
    if policy == REDUCE_SCATTER_EVERY:
        model.set_requires_gradient_sync(True)
        model.set_requires_all_reduce(is_last)  # no effect on a 1-d mesh (no replicate dimension)
    elif policy == LEGACY_SYNC_LAST:
        model.set_requires_gradient_sync(is_last)
    else:
        raise ValueError(f"unknown gradient sync policy {policy!r}; known: {SYNC_POLICIES}")


def shard_model(
    model: nn.Module,
    blocks: Iterable[nn.Module],
    mesh: DeviceMesh | None,
    mp_policy: MixedPrecisionPolicy,
    ignored_params: set[nn.Parameter] | None = None,
) -> nn.Module:
    """fully_shard each block (its own all-gather / reduce-scatter group), then the root for the rest.

    The last block is not resharded after forward: backward needs it first, so keeping it saves one
    all-gather per step (torchtitan does the same). With a single rank nothing is resharded: there is
    no memory to free, only copies to make. Without a mesh (one rank) the model stays a plain module.
    """
    promote_scalar_parameters(model)  # also without FSDP: checkpoints keep one layout for any world size
    if mesh is None:
        return model
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        reshard = mesh.size() > 1 and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, ignored_params=ignored_params or None)
    return model


@contextlib.contextmanager
def count_fsdp_collectives() -> Iterator[dict[str, Counter]]:
    """Counts FSDP2's all-gathers and reduce-scatters per unit while the block runs: yields
    ``{"all_gather": Counter, "reduce_scatter": Counter}`` keyed by the unit's first parameter name (e.g.
    ``depth.proj_h.weight``). For benchmarks and tests: it wraps FSDP2's private per-group collective
    functions (torch 2.14), so it counts what the unit schedule does on any backend, fake ones included."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group_module

    counts = {"all_gather": Counter(), "reduce_scatter": Counter()}
    gather, reduce = group_module.foreach_all_gather, group_module.foreach_reduce

    def counted(kind, fn):
        def wrapper(fsdp_params, *args, **kwargs):
            counts[kind][fsdp_params[0]._param_fqn if fsdp_params else "?"] += 1
            return fn(fsdp_params, *args, **kwargs)
        return wrapper

    group_module.foreach_all_gather = counted("all_gather", gather)
    group_module.foreach_reduce = counted("reduce_scatter", reduce)
    try:
        yield counts
    finally:
        group_module.foreach_all_gather, group_module.foreach_reduce = gather, reduce


def build_sharded_model(task, mesh: DeviceMesh | None, mp_policy: MixedPrecisionPolicy) -> nn.Module:
    """A stage's model as the trainer trains it, still without storage: built on the meta device ->
    activation checkpointing of the task's block lists (if the stage asks for it) -> FSDP2 units (each
    block, the task's extra units, the root; the task's ignored parameters left whole). ``task`` is an
    ``orchestration.train.trainer.Task``. The memory plan (``memory_plan.py``) builds through this same
    function, so its estimate follows what training does."""
    with torch.device("meta"):
        model = task.build_model()
    lists = task.block_lists(model)
    if task.section.activation_checkpointing:
        for container in lists:
            checkpoint_blocks(container)
    blocks = [b for c in lists for b in c] + task.extra_units(model)
    promote_scalar_parameters(model)  # before ignored_params: it replaces those parameters
    return shard_model(model, blocks, mesh, mp_policy, task.ignored_params(model))
