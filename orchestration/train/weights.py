"""Filling a model built on the meta device: this rank's shards only, never the whole model.

The trainer builds every model under ``torch.device("meta")``, shards it, then ``to_empty`` gives each
rank storage for its own shards (uninitialized). This module fills that storage:

- :func:`init_by_name`: random init, module by module. Each module's tensors are drawn at full size on
  the CPU from a generator seeded by (seed, module name), then cut to this rank's part. The result is
  the same whatever the world size or mesh, and the peak extra memory is one module's full tensors.
- :func:`broadcast_from_rank0`: rank 0 builds the model eagerly (exactly the eager init, also for
  libraries whose init we cannot replay per module, e.g. open_clip) and every rank receives its shards
  tensor by tensor (``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``); buffers
  are broadcast whole (FSDP2 does not shard them).
- :func:`load_safetensors`: pretrained weights from a (possibly multi-file) safetensors directory,
  e.g. a LLaMA written by ``save_pretrained``; each rank reads only the rows of its shard from disk
  (``safe_open(...).get_slice``).

Buffers computed in constructors (rotary ``inv_freq``) are recomputed after ``to_empty``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter/module name without the wrappers (activation checkpointing, compile) in it."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_index(t: torch.Tensor) -> tuple[slice, ...]:
    """The slices of the global tensor that this rank holds of ``t`` (all of it for a plain tensor)."""
    if not isinstance(t, DTensor):
        return tuple(slice(0, n) for n in t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def copy_local_part(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full tensor ``full`` into ``target`` (a DTensor shard or a tensor)."""
    local_tensor(target).copy_(full[local_index(target)])


def module_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{clean_name(name)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _direct_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p for n, p in module._parameters.items() if p is not None}
    out.update({n: b for n, b in module._buffers.items() if b is not None})
    return out


def _full_size_twin(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose own tensors are fresh full-size CPU tensors (children shared,
    read-only): init functions run on it exactly as on an eagerly built module."""
    # Not copy.copy: FSDP2's unit classes re-run the original __init__ (without arguments) when copied.
    cls = type(module)
    if isinstance(module, FSDPModule):  # FSDP<cls>(FSDPModule, cls): init as the class the model defines
        cls = next(c for c in cls.__mro__[1:] if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))
    twin = object.__new__(cls)
    twin.__dict__.update(module.__dict__)
    twin._parameters = {
        n: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for n, p in module._parameters.items()
    }
    twin._buffers = {n: None if b is None else torch.empty(b.shape, dtype=b.dtype) for n, b in module._buffers.items()}
    return twin


def default_module_init(name: str, module: nn.Module) -> None:
    """Init of one module's own tensors: rotary frequencies recomputed, ``reset_parameters`` where the
    class has one, else N(0, 0.02) for parameters (the GPT/LLaMA convention)."""
    if hasattr(module, "rope_init_fn") and "inv_freq" in module._buffers:  # transformers rotary embedding
        inv_freq, _ = module.rope_init_fn(module.config, torch.device("cpu"))
        module.inv_freq.copy_(inv_freq)
        return
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
        return
    if module._buffers:
        raise NotImplementedError(
            f"{type(module).__name__} has buffers ({sorted(module._buffers)}) that no init function "
            "knows how to recompute after a meta-device build"
        )
    for p in module._parameters.values():
        if p is not None:
            nn.init.normal_(p, std=0.02)


@torch.no_grad()
def init_by_name(
    model: nn.Module,
    seed: int,
    init_module: Callable[[str, nn.Module], None] = default_module_init,
    skip: Callable[[str, nn.Module], bool] | None = None,
) -> list[str]:
    """Random init of every module of a materialized (``to_empty``) model, reproducible from ``seed``
    whatever the sharding: each module's tensors are drawn at full size from a generator seeded by
    (seed, module name) and this rank keeps its part. ``init_module(name, module)`` inits one module's
    own tensors; ``skip(name, module)`` leaves modules alone (weights loaded afterwards). Returns the
    names of the modules initialized."""
    done = []
    for name, module in model.named_modules():
        tensors = _direct_tensors(module)
        name = clean_name(name)
        if not tensors or (skip is not None and skip(name, module)):
            continue
        twin = _full_size_twin(module)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(module_seed(seed, name))
            init_module(name, twin)
        for n, t in tensors.items():
            source = twin._parameters[n] if n in twin._parameters else twin._buffers[n]
            copy_local_part(t, source.to(t.device))
        done.append(name)
    fix_tensor_aliases(model)
    return done


def fix_tensor_aliases(model: nn.Module) -> None:
    """Plain attributes that alias a buffer still point at the meta tensor after ``to_empty``
    (transformers' rotary ``original_inv_freq``): point them at the materialized buffer again."""
    for module in model.modules():
        if "inv_freq" in module._buffers and hasattr(module, "original_inv_freq"):
            module.original_inv_freq = module.inv_freq


@torch.no_grad()
def broadcast_from_rank0(model: nn.Module, build_reference: Callable[[], nn.Module], adapt=None) -> None:
    """Rank 0 builds the model eagerly (``build_reference``); every rank receives its shards of the
    parameters and whole copies of the buffers. ``adapt(state, model)`` maps the reference's state dict
    to the sharded model's shapes (e.g. promoted scalars)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank() if dist.is_initialized() else 0
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    reference = build_reference() if rank == 0 else None
    state = reference.state_dict() if reference is not None else {}
    if adapt is not None and state:
        state = adapt(state, model)
    device = next(model.parameters()).device
    if not distributed:
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    else:
        set_model_state_dict(
            model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        )
    # Buffers: persistent ones came with the state dict above, but non-persistent ones (normalization
    # constants) did not; FSDP2 never shards buffers, so every rank takes rank 0's whole.
    reference_buffers = dict(reference.named_buffers()) if reference is not None else {}
    for name, buffer in model.named_buffers():
        if rank == 0:
            buffer.copy_(reference_buffers[clean_name(name)].to(buffer.device))
        if distributed:
            dist.broadcast(buffer, src=0)
    fix_tensor_aliases(model)
    del reference, state


def safetensors_files(directory: str) -> list[str]:
    """The weight files of a save_pretrained directory (the index's files when there is one)."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(directory, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors weights")
    return files


def safetensors_keys(directory: str) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for path in safetensors_files(directory):
        with safe_open(path, framework="pt") as f:
            keys.update(f.keys())
    return keys


@torch.no_grad()
def load_safetensors(module: nn.Module, directory: str, grow_rows: Iterable[str] = ()) -> set[str]:
    """Load a safetensors directory into ``module`` (sharded or not), each rank reading only its own
    slices. Tensors named in ``grow_rows`` (token embedding, LM head) may have more rows in the model
    than in the file (added vocabulary): the new rows start at the mean of the file's rows. Returns the
    names loaded; raises if the files lack a model tensor or hold an unknown one."""
    from safetensors import safe_open

    targets = {clean_name(n): t for n, t in module.named_parameters()}
    targets.update({clean_name(n): b for n, b in module.named_buffers() if n.rsplit(".", 1)[-1] != "inv_freq"})
    grow = set(grow_rows)
    loaded, unexpected = set(), []
    for path in safetensors_files(directory):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                target = targets.get(key)
                if target is None and key.endswith("rotary_emb.inv_freq"):
                    continue  # older checkpoints carry the rotary frequencies; the model computes them
                if target is None:
                    unexpected.append(key)
                    continue
                view = f.get_slice(key)
                file_shape = tuple(view.get_shape())
                index = local_index(target)
                local = local_tensor(target)
                if file_shape == tuple(target.shape):
                    local.copy_(view[index])
                elif key in grow and file_shape[1:] == tuple(target.shape[1:]) and file_shape[0] < target.shape[0]:
                    rows, n_file = index[0], file_shape[0]
                    keep = slice(rows.start, min(rows.stop, n_file))
                    if keep.stop > keep.start:
                        local[: keep.stop - keep.start].copy_(view[(keep,) + index[1:]])
                    if rows.stop > n_file:
                        mean = view[:].float().mean(dim=0).to(local.dtype)
                        local[max(n_file - rows.start, 0):].copy_(mean[index[1:]].expand_as(local[max(n_file - rows.start, 0):]))
                else:
                    raise ValueError(f"{path}: {key} has shape {file_shape}, the model {tuple(target.shape)}")
                loaded.add(key)
    missing = sorted(set(targets) - loaded)
    if missing or unexpected:
        raise ValueError(f"{directory}: model tensors missing from the files {missing[:5]}, "
                         f"unknown tensors in the files {unexpected[:5]}")
    return loaded


def load_pretrained(
    module: nn.Module,
    directory: str,
    seed: int,
    grow_rows: Iterable[str] = (),
    init_module: Callable[[str, nn.Module], None] = default_module_init,
) -> set[str]:
    """A materialized module from a safetensors directory, shard-wise: modules whose tensors the files
    do not all hold (rotary frequencies, anything new) are initialized by :func:`init_by_name` first,
    then :func:`load_safetensors` reads this rank's slices. Returns the names loaded."""
    in_files = safetensors_keys(directory)

    def covered(name: str, m: nn.Module) -> bool:
        own = [n for n, t in list(m._parameters.items()) + list(m._buffers.items()) if t is not None]
        return all((f"{name}.{n}" if name else n) in in_files for n in own)

    init_by_name(module, seed, init_module=init_module, skip=covered)
    return load_safetensors(module, directory, grow_rows=grow_rows)
