"""Per-GPU memory of one optimizer step of a stage, computed on the driver without a GPU.

The stage's real model is built at the config's real shapes through the trainer's own path
(``fsdp.build_sharded_model``: meta build -> activation checkpointing -> FSDP2 units) and sharded over
the real FSDP / HSDP mesh of ``cluster.num_workers`` ranks, with the GPU run's mixed-precision policy
(bf16 parameters, fp32 gradient reduction). Nothing is allocated: everything runs under
``FakeTensorMode`` (tensors with shapes and dtypes, no storage) over a fake process group of the real
world size (collectives do nothing), on the "cpu" device (FSDP2's lazy init would create CUDA streams).
``FSDPMemTracker`` follows every tensor this rank would hold through one full step as the trainer runs
it: forward and backward of every ``grad_accum`` micro-batch with the trainer's gradient-sync policy
(``fsdp.set_micro_batch_sync``), clipping, AdamW step (its state created beforehand, as in any step
after the first).

What that run cannot see is added as named margins (see ``_margins``): the CUDA context and NCCL's
buffers, the attention kernel's work buffers, the caching allocator's fragmentation, and the overlap of
FSDP2's communication streams with compute.

Data-dependent shapes: the LM gathers its text and visual positions with boolean masks of the batch,
whose values a fake tensor does not have. ``_KnownIntegerValues`` keeps the real values of the small
integer/bool tensors computed from the batch (the masks, the counts) next to their fake twins, so that
a boolean index becomes an index of the right length. The batch itself is built here (``_lm_rows``):
the worst rows for memory, see there.

No Ray: the task classes import ``ray`` as a module, but nothing here starts or joins Ray.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from orchestration.config import Config
from orchestration.train.fsdp import REDUCE_SCATTER_EVERY, SYNC_POLICIES, set_micro_batch_sync

GIB = 1024**3
MIB = 1024**2

# Margins (bytes) for what the CPU fake run cannot see; each is explained where it is used.
CUDA_CONTEXT_BYTES = 1 * GIB
NCCL_BYTES_PER_GROUP = GIB // 2
FRAGMENTATION_SHARE = 0.10

# Integer/bool tensors up to this many elements get their real values computed alongside (masks,
# counts, the [B, L, L] attention mask of a row: 64 Mi elements at L = 8192).
KNOWN_VALUE_LIMIT = 2**28


@dataclass
class StageMemory:
    """The per-GPU peak of one optimizer step of a stage, and what it is made of."""

    stage: str
    world_size: int
    hsdp_replicas: int
    grad_accum: int
    micro_batch_size: int
    sync_policy: str
    tracked_peak_bytes: int  # what FSDPMemTracker saw at the step's peak
    tracked: dict[str, int]  # that peak by category (parameters, gradients, optimizer state, ...)
    margins: dict[str, int]  # what the fake run cannot see, by name
    micro_batch_peaks: list[int] = field(default_factory=list)  # tracked peak within each micro-batch
    trainable_params: int = 0
    batch_description: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def peak_bytes(self) -> int:
        return self.tracked_peak_bytes + sum(self.margins.values())

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def breakdown(self) -> dict[str, int]:
        """Every part of ``peak_bytes`` (tracked categories, then margins); sums to the peak."""
        return {**self.tracked, **{f"margin: {k}": v for k, v in self.margins.items()}}

    def lines(self) -> list[str]:
        mesh = f"FSDP over {self.world_size}" if self.hsdp_replicas == 1 else (
            f"HSDP {self.hsdp_replicas} replicas x {self.world_size // self.hsdp_replicas} shards")
        out = [
            f"[{self.stage}] per-GPU peak of one optimizer step: {self.peak_gib:.2f} GiB "
            f"({mesh}; {self.grad_accum} micro-batches of {self.micro_batch_size}; gradient sync {self.sync_policy})",
            f"  micro-batches: {self.batch_description}",
        ]
        width = max(len(k) for k in self.breakdown())
        for name, value in self.breakdown().items():
            if value:
                out.append(f"  {name:<{width}}  {value / GIB:8.2f} GiB")
        if self.micro_batch_peaks:
            peaks = ", ".join(f"{p / GIB:.2f}" for p in self.micro_batch_peaks)
            out.append(f"  tracked peak within each micro-batch's forward + backward (GiB): {peaks}")
        out.extend(f"  note: {n}" for n in self.notes)
        return out


# ---------------------------------------------------------------- the estimate


def estimate_stage_memory(
    config: Config,
    stage: str,
    *,
    world_size: int | None = None,
    hsdp_replicas: int | None = None,
    grad_accum: int | None = None,
    sync_policy: str = REDUCE_SCATTER_EVERY,
    lm_overrides: dict | None = None,
    sample_depth_chunks: bool = True,
) -> StageMemory:
    """Per-GPU peak of one optimizer step of ``stage`` ("tower" or "lm") as ``config`` would train it on
    GPUs: ``cluster.num_workers`` ranks (``world_size`` overrides), ``cluster.hsdp_replicas`` (or
    ``hsdp_replicas``), the stage's ``grad_accum`` (or ``grad_accum``), its batch size, sequence length and
    activation checkpointing. Shapes only: no weights are read, nothing is allocated.
    ``lm_overrides``: fields of the LM preset to change (``vilau_model.config.LMConfig``), e.g.
    ``{"attn_implementation": "flash_attention_2"}`` or a cut-down model in tests.
    ``sample_depth_chunks``: run 3 of the depth loss's identical chunks (see ``_sampled_depth_chunks``).

    In a process that already has a default process group (a Ray Train worker, a test's gloo ranks) the
    estimate runs in a fresh child process, leaving that group alone."""
    import torch.distributed as dist

    if stage not in ("tower", "lm"):
        raise ValueError(f"stage must be 'tower' or 'lm', got {stage!r}")
    if sync_policy not in SYNC_POLICIES:
        raise ValueError(f"unknown gradient sync policy {sync_policy!r}; known: {SYNC_POLICIES}")
    args = (config, stage, world_size, hsdp_replicas, grad_accum, sync_policy, lm_overrides, sample_depth_chunks)
    if dist.is_available() and dist.is_initialized():
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_estimate, *args).result()
    return _estimate(*args)


def _estimate(config: Config, stage: str, world_size, hsdp_replicas, grad_accum, sync_policy, lm_overrides,
              sample_depth_chunks) -> StageMemory:
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    started = time.perf_counter()
    config, notes = _shapes_only(config)
    world = world_size or config.cluster.num_workers
    replicas = hsdp_replicas or config.cluster.hsdp_replicas
    section = config.lm_train if stage == "lm" else config.tower_train
    accum = grad_accum or section.grad_accum
    if world % replicas:
        raise ValueError(f"cluster.hsdp_replicas={replicas} does not divide the world size {world}")

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        with torch.random.fork_rng(devices=[]):
            result = _run_step(config, stage, section, world, replicas, accum, sync_policy, notes, lm_overrides,
                               sample_depth_chunks)
    finally:
        dist.destroy_process_group()
    result.seconds = time.perf_counter() - started
    return result


def _shapes_only(config: Config) -> tuple[Config, list[str]]:
    """The config with everything the plan must not read left out: pretrained weights (shapes come from
    the preset, or from a local LLM config.json when model.lm_path has one), the stage-1 export."""
    import os

    notes = []
    plan = config.model_copy(deep=True)
    plan.model.allow_random_init = True
    lm_path = plan.model.lm_path
    if lm_path and not os.path.isfile(os.path.join(lm_path, "config.json")):
        notes.append(f"model.lm_path {lm_path!r} has no local config.json: LLM shapes from preset {plan.model.lm!r}")
        plan.model.lm_path = None
    plan.model.tower_pretrained = None
    plan.model.tower_checkpoint = None
    if plan.tower_train.perceptual_weight > 0:
        # The LPIPS VGG16's shapes, from a full-width stand-in: the run's weights file need not be here.
        plan.tower_train.perceptual_weights_path = _full_width_vgg_stand_in()
        notes.append("perceptual loss: VGG16 at full width (a random stand-in of the LPIPS weights' shapes)")
    return plan, notes


_VGG_STAND_IN: list[str] = []


def _full_width_vgg_stand_in() -> str:
    """A random VGG16 trunk of the real widths in a temporary file (once per process, 59 MB)."""
    import atexit
    import os
    import tempfile

    from vilau_model.losses import save_stand_in_perceptual_weights

    if not _VGG_STAND_IN:
        handle, path = tempfile.mkstemp(suffix=".safetensors", prefix="vgg16-shapes-")
        os.close(handle)
        save_stand_in_perceptual_weights(path, channels=(64, 128, 256, 512, 512))
        atexit.register(lambda: os.path.exists(path) and os.remove(path))
        _VGG_STAND_IN.append(path)
    return _VGG_STAND_IN[0]


def _task(config: Config, stage: str):
    if stage == "lm":
        from orchestration.train.lm import LMTask

        return LMTask(config, tokenizer_files=None)
    from orchestration.train.tower import TowerTask

    return TowerTask(config)


def _run_step(config, stage, section, world, replicas, accum, sync_policy, notes, lm_overrides,
              sample_depth_chunks) -> StageMemory:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from orchestration.train.fsdp import build_sharded_model, data_parallel_mesh, is_sharded
    from orchestration.train.optim import build_optimizer, clip_grad_norm

    device = torch.device("cpu")
    # The GPU run's policy (fsdp.mixed_precision gives fp32 for a cpu device): bf16 compute, fp32 reduction.
    gpu_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    task = _task(config, stage)
    if stage == "lm" and lm_overrides:
        import dataclasses

        task.lm_cfg = dataclasses.replace(task.lm_cfg, **lm_overrides)
        notes.append(f"LM preset {task.lm_cfg.name!r} changed: {lm_overrides}")
    if stage == "lm" and task.lm_cfg.attention == "flex":
        import dataclasses

        # A FlexAttention block mask is built from the rows' real segment ids, which fake tensors do not
        # have: trace the dense-mask path instead. It holds a [B,1,L,L] mask (and SDPA's additive copy)
        # that flex never builds, so the peak is an upper bound by those (B x L x L x 3 bytes).
        task.lm_cfg = dataclasses.replace(task.lm_cfg, attention="sdpa_dense")
        notes.append("model.attention=flex traced as sdpa_dense (block masks need real segment ids): an upper "
                     "bound by the dense [B,1,L,L] mask and its additive copy")
    mesh = data_parallel_mesh(device, replicas)  # outside fake mode: it creates process groups
    steps, description = _micro_batches(config, stage, task, section, accum)  # real, small: before fake mode
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False)
    known = _KnownIntegerValues(fake_mode)
    steps = [[{name: known.adopt(real) for name, real in batch.items()} for batch in step] for step in steps]
    # Built and sharded on the meta device as the trainer does, then given fake storage (to_empty).
    model = build_sharded_model(task, mesh, gpu_policy)
    with fake_mode:
        fake_mode.allow_non_fake_inputs = True  # to_empty reads the meta tensors' shapes
        model.to_empty(device=device)
        fake_mode.allow_non_fake_inputs = False
        if stage == "lm":
            model.tower.to(torch.bfloat16)  # as LMTask.init_weights does on GPU workers
        model.train()
        params = task.trainable_parameters(model)
        optimizer = build_optimizer(params, section.optim)
        # Any step after the first holds AdamW's state throughout: create it now (zero gradients, one
        # step), so the measured step is a steady-state one.
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # The task's own optimizers (the tower's replicated discriminator), their state created alike.
        extra_optimizers = task.extra_optimizers(model)

        if not is_sharded(model):
            raise ValueError("the memory plan needs at least 2 ranks (one rank trains without FSDP)")
        tracker = _StepPeakTracker(model, optimizer)
        tracker.track_inputs(tuple(steps))
        replicated = _track_replicated(tracker, task, model, extra_optimizers)
        if replicated:
            notes.append(f"replicated on every rank (not sharded): {replicated / 1e6:.1f} M parameters "
                         "(the discriminator), counted whole under Sharded Param / OptState")
        # A step with every loss term on (the tower's GAN starts at gan_start_step).
        plan_step = config.tower_train.gan_start_step if stage == "tower" and config.tower_train.gan_weight > 0 else 0
        micro_peaks = []
        sampling = _sampled_depth_chunks(notes) if sample_depth_chunks else nullcontext()
        with tracker, known, sampling, _untracked_sharding_propagation():
            for micro_batches in steps:
                task.prepare_step(micro_batches)
                scale = 1.0 if task.loss_sums_over_step else 1.0 / accum
                for i, batch in enumerate(micro_batches):
                    tracker.start_window()
                    set_micro_batch_sync(model, is_last=i == accum - 1, policy=sync_policy)
                    out = task.forward(model, batch, step=plan_step)
                    (out["loss"] * scale).backward()
                    task.after_backward(model, batch, out, plan_step, scale)
                    del out
                    micro_peaks.append(tracker.window_peak)
                    tracker.reset_mod_stats()  # the next micro-batch's forward is a new module call
                clip_grad_norm(params, section.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                # The task's own step, as after_optimizer_step takes it (without its finiteness check: a
                # fake tensor has no value to test).
                for extra in extra_optimizers:
                    task.average_and_clip_discriminator_gradients(model)
                    extra.step()
                    extra.zero_grad(set_to_none=True)
        if known.empty_nonzero:
            notes.append(f"{known.empty_nonzero} nonzero() on values a fake tensor does not have taken as empty "
                         "(e.g. the quantizer's dead codes: none restarted in the planned step)")
    peak = tracker.get_tracker_snapshot("peak")
    tracked, tracked_total = _categories(peak)
    sizes = _model_sizes(model, params, mesh)
    margins = _margins(config, stage, task, section, sizes, tracked_total, replicas)
    notes.extend(_margin_notes(sizes))
    return StageMemory(
        stage=stage, world_size=world, hsdp_replicas=replicas, grad_accum=accum,
        micro_batch_size=section.batch_size_per_worker, sync_policy=sync_policy,
        tracked_peak_bytes=tracked_total, tracked=tracked, margins=margins, micro_batch_peaks=micro_peaks, trainable_params=sizes.trainable_params,
        batch_description=description, notes=notes,
    )


@contextmanager
def _sampled_depth_chunks(notes: list[str]):
    """The depth loss runs its positions in chunks, each checkpointed: a chunk's logits and activations
    are freed before the next chunk starts, and in backward each is recomputed and freed in turn, so
    every chunk holds the same memory (what stays is the loss's running sum). At 7B a row full of
    images is ~60 chunks, each a few hundred fake ops: the plan runs the first two and the last (the
    peak of all of them; tests/test_memory_plan.py checks it against running every chunk)."""
    from vilau_model import depth_transformer

    original = depth_transformer.chunk_starts
    sampled = []

    def first_two_and_last(n: int, per_chunk: int):
        starts = original(n, per_chunk)
        if len(starts) <= 3:
            return starts
        sampled.append(len(starts))
        return [starts[0], starts[1], starts[-1]]

    depth_transformer.chunk_starts = first_two_and_last
    try:
        yield
    finally:
        depth_transformer.chunk_starts = original
    if sampled:
        notes.append(f"depth loss: 3 of its {max(sampled)} chunks run (each holds the same memory, freed before the next)")


class _Depth:
    """A re-entrant context manager that counts how deep inside it the code is."""

    depth = 0

    def __enter__(self):
        self.depth += 1

    def __exit__(self, *exc):
        self.depth -= 1


_PROPAGATION = _Depth()


@contextmanager
def _untracked_sharding_propagation():
    """DTensor infers an op's output shape by running it on global-shaped fake tensors in the active
    fake mode, which is ours: FSDPMemTracker would count those as allocated (a foreach op over all
    gradients of the clip or the optimizer step: the whole model's fp32 size at once). DTensor wraps
    that inference in ``ShardingPropagator._fake_mode_lock`` (a no-op lock by default); our tracker
    ignores the ops run inside it."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator._fake_mode_lock
    ShardingPropagator._fake_mode_lock = _PROPAGATION
    try:
        yield
    finally:
        ShardingPropagator._fake_mode_lock = original


def _step_peak_tracker_class():
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mod_tracker import ModTracker

    class NestedGradModTracker(ModTracker):
        """ModTracker that accepts a backward inside a forward (the tower's adaptive GAN weight takes a
        gradient in its forward): the end of that inner backward pops the modules still in their
        forward, whose own forward end then finds them gone. The plan uses the module hierarchy for
        nothing but "in backward or not" (activations vs temporaries), so a missing entry is let pass."""

        def _get_pop_fn(self, w_mod, name, is_bw):
            pop = super()._get_pop_fn(w_mod, name, is_bw)

            def fn(*args):
                if name in self.parents or self.is_bw:
                    pop(*args)

            return fn

    class StepPeakTracker(FSDPMemTracker):
        """FSDPMemTracker without its per-module peaks (unused here: it walks every tracked module on
        every op, a third of the plan's run time at 7B), plus the peak of a window (a micro-batch)."""

        window_peak = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._mod_tracker = NestedGradModTracker()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if _PROPAGATION.depth:
                return func(*args, **(kwargs or {}))  # DTensor's shape inference, not this rank's memory
            return super().__torch_dispatch__(func, types, args, kwargs)

        def start_window(self) -> None:
            self.window_peak = _total(self._curr_mem_snap)

        def _update_peak_stats(self, peak_state) -> None:
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                    self._peak_mem[dev] = dev_snap["Total"]
                    self._peak_mem_snap[dev] = dict(dev_snap)
            self.window_peak = max(self.window_peak, _total(self._curr_mem_snap))

    return StepPeakTracker


def _StepPeakTracker(model, optimizer):
    return _step_peak_tracker_class()(model, optimizer)


def _track_replicated(tracker, task, model, optimizers) -> int:
    """FSDPMemTracker follows the parameters FSDP2 shards and the optimizer it was given; parameters FSDP2
    ignores (kept whole on every rank) and the task's other optimizers' state are added here. Returns the
    number of such parameters."""
    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType

    ignored = task.ignored_params(model) or set()
    for p in ignored:
        tracker._update_and_maybe_create_winfos(p, _FSDPRefType.SHARDED_PARAM)
    for optimizer in optimizers:
        tracker._track_optimizer_states(_FSDPRefType.OPT, optimizer)
    return sum(p.numel() for p in ignored)


def _total(snapshot: dict) -> int:
    return sum(dev.get("Total", 0) for dev in snapshot.values())


def _categories(snapshot: dict) -> tuple[dict[str, int], int]:
    """FSDPMemTracker's peak snapshot -> {category name: bytes} (over devices) and its total."""
    out: dict[str, int] = {}
    for dev in snapshot.values():
        for key, value in dev.items():
            if key == "Total":
                continue
            name = getattr(key, "value", str(key))
            out[name] = out.get(name, 0) + value
    return out, _total(snapshot)


@dataclass
class _ModelSizes:
    trainable_params: int
    largest_unit_params: int  # parameters of the largest FSDP unit (one all-gather)


def _model_sizes(model, params, mesh) -> _ModelSizes:
    from torch.distributed.fsdp import FSDPModule

    total = sum(p.numel() for p in params)
    largest = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                largest = max(largest, sum(fp.sharded_param.numel() for fp in group.fsdp_params))  # global numel
    return _ModelSizes(total, largest)


def _margins(config, stage, task, section, sizes: _ModelSizes, tracked_total: int, replicas: int) -> dict[str, int]:
    """What the CPU fake run does not see, sized explicitly (bytes)."""
    margins: dict[str, int] = {}
    # CUDA context (~0.5-1 GiB once cuBLAS/cuDNN kernels and their workspaces are loaded) is taken from
    # the GPU outside PyTorch's allocator; NCCL's buffers (~0.5 GiB per communicator at these world
    # sizes: channels x peers x NCCL_BUFFSIZE) likewise, one communicator per mesh dimension.
    margins["CUDA context + NCCL buffers"] = CUDA_CONTEXT_BYTES + NCCL_BYTES_PER_GROUP * (2 if replicas > 1 else 1)
    # FSDP2 all-gathers on its own CUDA stream: the next unit's parameters are gathered while the current
    # unit computes, and a resharded unit's memory returns to the allocator only when the compute
    # stream is done with it. The CPU run frees it at once: add one more unit's bf16 parameters.
    margins["all-gather overlap (one more unit's bf16 parameters)"] = 2 * sizes.largest_unit_params
    margins["attention kernel workspace"] = _attention_workspace(config, stage, task, section)
    # The caching allocator keeps freed blocks per stream and rounds block sizes (2 MiB for large
    # requests): reserved memory exceeds the live bytes FSDPMemTracker counts by ~5-15% in FSDP
    # training (FSDP's communication buffers live on other streams than compute); 10% of the peak.
    margins["allocator fragmentation (10% of the tracked peak)"] = int(FRAGMENTATION_SHARE * tracked_total)
    return margins


def _attention_workspace(config, stage, task, section) -> int:
    """The GPU attention kernel's buffers that no tensor of the fake run stands for (one layer's at a
    time: layers run one after the other).

    Backward of the flash / memory-efficient kernels accumulates the query gradient in fp32
    (B x heads x L x head_dim x 4 bytes = B x L x width x 4). With the LM's dense boolean [B, 1, L, L]
    mask (sdpa), SDPA also turns the mask into an additive one of the compute dtype before the
    memory-efficient kernel (bf16, B x L x L x 2 bytes); flash_attention_2 (varlen) has no mask.
    """
    if stage == "tower":
        cfg = task.tower_cfg
        return section.batch_size_per_worker * cfg.grid_size**2 * cfg.width * 4
    cfg = task.lm_cfg
    B, L = section.batch_size_per_worker, config.data.seq_len
    fp32_accumulator = B * L * cfg.hidden_size * 4
    if cfg.attn_implementation.startswith("flash_attention"):
        return fp32_accumulator
    return fp32_accumulator + B * L * L * 2


def _margin_notes(sizes: _ModelSizes) -> list[str]:
    return [f"trainable parameters: {sizes.trainable_params / 1e9:.3f} B; largest FSDP unit: "
            f"{sizes.largest_unit_params / 1e6:.0f} M parameters"]


# ---------------------------------------------------------------- the batches


def _micro_batches(config, stage, task, section, accum) -> tuple[list[list[dict]], str]:
    """Real (small, integer) tensors shaped like the stage's micro-batches, grouped into optimizer steps.

    LM: the micro-batches alternate between the two rows that are worst for memory in different places
    (``_lm_rows``); with grad_accum 1 that takes two steps, the peak is the higher of the two."""
    B = section.batch_size_per_worker
    if stage == "tower":
        cfg = task.tower_cfg
        batch = {
            "pixels": torch.zeros(B, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8),
            "text_tokens": torch.zeros(B, cfg.context_length, dtype=torch.int64),
        }
        steps = [[{k: v.clone() for k, v in batch.items()} for _ in range(accum)]]
        return steps, f"{B} images of {cfg.image_size} px + {cfg.context_length}-token captions"
    rows, description = _lm_rows(config, task)
    kinds = list(rows)
    total = max(accum, len(kinds))
    n_steps = math.ceil(total / accum)
    micro = [
        {k: v.unsqueeze(0).expand(B, *v.shape).clone() for k, v in rows[kinds[i % len(kinds)]].items()}
        for i in range(n_steps * accum)
    ]
    return [micro[s * accum:(s + 1) * accum] for s in range(n_steps)], description


def _lm_rows(config, task) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
    """Two packed rows of data.seq_len, in the trainer's columns (``LMTask.columns``):

    "images": text-to-image samples packed back to back ([BOS, 32 prompt tokens, <im_start>, grid^2
        visual positions, <im_end>, EOS], the image block supervised), the rest padding: the most
        visual positions a row holds, the worst case for the projector, the depth transformer and its
        [positions x D x codebook] logits;
    "text": samples of 2048 supervised text tokens: the worst case for the LM head's fp32 logits
        [positions x vocabulary].
    """
    from vilau_model.sequence import IGNORE_INDEX

    L = config.data.seq_len
    tower = task.tower_source.config
    D, grid = tower.code_depth, tower.grid_size
    special = task.special
    prompt = 32
    sample = 1 + prompt + 1 + grid * grid + 1 + 1
    if sample > L:
        raise ValueError(f"data.seq_len={L} holds no {grid}x{grid} image (needs {sample} positions)")

    def empty() -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.full((L,), special.pad, dtype=torch.int64),
            "labels": torch.full((L,), IGNORE_INDEX, dtype=torch.int64),
            "codes": torch.zeros(L, D, dtype=torch.int64),
            "is_visual": torch.zeros(L, dtype=torch.bool),
            "position_ids": torch.zeros(L, dtype=torch.int64),
            "segment_ids": torch.zeros(L, dtype=torch.int64),
        }

    images = empty()
    n_images = L // sample
    for s in range(n_images):
        start = s * sample
        span = slice(start, start + sample)
        images["input_ids"][span] = 5
        images["segment_ids"][span] = s + 1
        images["position_ids"][span] = torch.arange(sample)
        visual = slice(start + prompt + 2, start + prompt + 2 + grid * grid)
        images["is_visual"][visual] = True
        images["codes"][visual] = torch.arange(grid * grid * D).reshape(-1, D) % tower.codebook_size
        block = slice(start + prompt + 1, start + sample)  # markers, visual positions, EOS
        images["labels"][block] = images["input_ids"][block]
    pad = slice(n_images * sample, L)
    images["position_ids"][pad] = torch.arange(L - n_images * sample)

    text = empty()
    length = min(2048, L)
    for s in range(math.ceil(L / length)):
        span = slice(s * length, min((s + 1) * length, L))
        n = span.stop - span.start
        text["input_ids"][span] = torch.arange(n) % special.vocab_size
        text["labels"][span] = text["input_ids"][span]
        text["segment_ids"][span] = s + 1
        text["position_ids"][span] = torch.arange(n)
    visual_positions = n_images * grid * grid
    description = (f"rows of {L}: alternately {n_images} text-to-image samples ({visual_positions} visual positions, "
                   f"{visual_positions / L:.0%} of the row) and all-text ({L} supervised tokens)")
    return {"images": images, "text": text}, description


# ---------------------------------------------------------------- data-dependent shapes under fake tensors


class _KnownIntegerValues(TorchDispatchMode):
    """Real values of the small integer/bool tensors of a fake run, kept next to their fake twins.

    A boolean index (``h[mask]``, ``x.index_put((mask,), v)``) has as many elements as the mask has
    True values, which a fake tensor does not know. This mode computes, next to the fake op, the real
    result of every op whose inputs all have known values and whose result is integer or bool (masks,
    counts, ids; the batch is known from the start), and turns a boolean index with a known value into
    the integer index it stands for. A ``nonzero`` of an unknown value counts as empty (recorded in
    ``empty_nonzero``); any other boolean index of an unknown value fails, naming the op.
    """

    _INDEXING = {
        torch.ops.aten.index.Tensor: 1,
        torch.ops.aten.index_put.default: 1,
        torch.ops.aten.index_put_.default: 1,
        torch.ops.aten._unsafe_index_put.default: 1,
        torch.ops.aten._index_put_impl_.default: 1,
    }

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode = fake_mode
        self.values = WeakIdKeyDictionary()
        # Storages written by an op whose result is not followed: every tensor viewing them (a slice
        # filled in place, its base) is unknown from then on, until the storage is allocated anew.
        self.stale: set[int] = set()
        self.empty_nonzero = 0

    def adopt(self, real: torch.Tensor) -> torch.Tensor:
        fake = self.fake_mode.from_tensor(real)
        self.stale.discard(_storage_key(fake))
        self.values[fake] = real
        return fake

    def _real(self, x):
        if not isinstance(x, torch.Tensor):
            return None
        real = self.values.get(x)
        if real is None or _storage_key(x) in self.stale:
            return None
        return real

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        kwargs = kwargs or {}
        if any(t is DTensor or (isinstance(t, type) and issubclass(t, DTensor)) for t in types):
            return NotImplemented
        if func in self._INDEXING:
            args = self._integer_indices(func, args)
        if func is torch.ops.aten.nonzero.default:
            real = self._real(args[0])
            if real is None:
                self.empty_nonzero += 1
                with _disable_current_modes():
                    empty = torch.zeros(0, args[0].dim(), dtype=torch.long)
                return self.fake_mode.from_tensor(empty)
            with _disable_current_modes():
                result = real.nonzero()
            return self.adopt(result)
        if func is torch.ops.aten.bincount.default and self._real(args[0]) is None:
            # Counts of values below minlength (the quantizer's codes < codebook size): minlength bins.
            weights = args[1] if len(args) > 1 else kwargs.get("weights")
            minlength = args[2] if len(args) > 2 else kwargs.get("minlength", 0)
            dtype = torch.int64 if weights is None else (torch.float64 if weights.dtype == torch.float64 else torch.float32)
            with _disable_current_modes():
                bins = torch.zeros(minlength, dtype=dtype)
            return self.fake_mode.from_tensor(bins)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and (out.is_floating_point() or out.numel() > KNOWN_VALUE_LIMIT):
            if func._schema.is_mutable:
                self._forget_mutated(func, args)
            return out  # the common case: floating-point results are never followed
        self._follow(func, args, kwargs, out)
        return out

    def _integer_indices(self, func, args):
        indices = args[self._INDEXING[func]]
        if not any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
            return args
        converted = []
        for index in indices:
            if isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8):
                real = self._real(index)
                if real is None:
                    raise NotImplementedError(
                        f"memory plan: {func} with a boolean index whose values are unknown (computed from "
                        "floating-point data); the plan cannot size its result"
                    )
                with _disable_current_modes():
                    parts = real.bool().nonzero().unbind(1)
                converted.extend(self.adopt(p) for p in parts)
            else:
                converted.append(index)
        args = list(args)
        args[self._INDEXING[func]] = converted
        return tuple(args)

    def _follow(self, func, args, kwargs, out) -> None:
        """Record the real value of ``out`` when every tensor input's value is known and it is small."""
        outs = out if isinstance(out, (tuple, list)) else (out,)
        tensors_out = [o for o in outs if isinstance(o, torch.Tensor)]
        if not tensors_out or any(o.is_floating_point() or o.is_complex() or o.numel() > KNOWN_VALUE_LIMIT
                                  for o in tensors_out):
            self._forget_mutated(func, args)
            return
        flat_in = [a for a in _flatten((args, kwargs)) if isinstance(a, torch.Tensor)]
        reals = [self._real(a) for a in flat_in]
        if any(r is None for r in reals):
            self._forget_mutated(func, args)
            return
        swap = {id(a): r for a, r in zip(flat_in, reals)}

        def real_of(x):
            if isinstance(x, torch.Tensor):
                return swap[id(x)]
            if isinstance(x, (list, tuple)):
                return type(x)(real_of(v) for v in x)
            if isinstance(x, torch.device):
                return torch.device("cpu")
            return x

        real_args = real_of(list(args))
        real_kwargs = {k: real_of(v) for k, v in kwargs.items()}
        if "device" in real_kwargs:
            real_kwargs["device"] = torch.device("cpu")
        with _disable_current_modes():
            real_out = func(*real_args, **real_kwargs)
        real_outs = real_out if isinstance(real_out, (tuple, list)) else (real_out,)
        inputs = {_storage_key(a) for a in flat_in}
        for fake, real in zip(outs, real_outs):
            if isinstance(fake, torch.Tensor) and isinstance(real, torch.Tensor):
                key = _storage_key(fake)
                if key not in inputs:
                    self.stale.discard(key)  # a new allocation (possibly at a freed storage's address)
                self.values[fake] = real

    def _forget_mutated(self, func, args) -> None:
        """An in-place op whose result is not followed leaves its target's known value stale: drop it."""
        if not func._schema.is_mutable:
            return
        for arg, schema_arg in zip(args, func._schema.arguments):
            if schema_arg.alias_info is not None and schema_arg.alias_info.is_write and isinstance(arg, torch.Tensor):
                self.values.pop(arg, None)
                self.stale.add(_storage_key(arg))


def _storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage, shared by all its views."""
    return t.untyped_storage()._cdata


def _flatten(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _flatten(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _flatten(v)
    else:
        yield x
