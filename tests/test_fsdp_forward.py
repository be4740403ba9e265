"""UnifiedLM under FSDP2 on 2 gloo ranks (CPU, no Ray): one rank's batch has no visual token, the other's
no text target. Every rank must run the same sharded modules (projector, depth transformer, LM head) or
the collectives of the ranks no longer match (hang or error). Gradients must equal the single-process run
on both batches."""

from __future__ import annotations

import numpy as np
import torch

from gloo_ranks import run_on_gloo_ranks
from vilau_model.config import get_lm_config, get_tower_config
from vilau_model.sequence import (
    IGNORE_INDEX,
    CaptionSample,
    GenerationSample,
    InterleavedSample,
    SequenceBuilder,
    collate_rows,
    pack_sequences,
)
from vilau_model.tokenizer import SpecialIds, train_bpe_tokenizer
from vilau_model.unified_lm import UnifiedLM

SEQ_LEN = 160
TEXTS = ["a red circle at the top left", "a blue square", "the cat sat on the mat.", "it was sunny."] * 10


def build_model(special: SpecialIds) -> UnifiedLM:
    from vilau_model.vision_tower import UnifiedVisionTower

    torch.manual_seed(0)
    tower = UnifiedVisionTower(get_tower_config("tiny")).eval()
    # Small depth-loss chunks (4 positions): the sharded depth unit runs many chunks in one call.
    return UnifiedLM(get_lm_config("tiny", depth_loss_chunk_logits=4 * 4 * 256), tower, special)


def make_batches(tokenizer, depth: int, grid: int):
    rng = np.random.default_rng(0)
    codes = lambda: rng.integers(0, 256, size=(grid, grid, depth))  # noqa: E731
    b = SequenceBuilder(tokenizer, code_depth=depth, max_len=SEQ_LEN)
    text_only = [InterleavedSample(["the cat sat on the mat.", "it was sunny."]), InterleavedSample(["a blue square"])]
    with_images = [GenerationSample("a red circle", codes()), CaptionSample(codes(), "a blue square")]
    batch_text = collate_rows(pack_sequences(b.build_many(text_only), SEQ_LEN, depth, b.ids.pad))
    batch_images = collate_rows(pack_sequences(b.build_many(with_images), SEQ_LEN, depth, b.ids.pad))
    # no text target at all in the second batch: only the visual positions stay supervised
    batch_images["labels"][~batch_images["is_visual"]] = IGNORE_INDEX
    assert not batch_text["is_visual"].any() and batch_images["is_visual"].any()
    return [batch_text, batch_images]


def loss_of(model: UnifiedLM, batch: dict) -> torch.Tensor:
    return model(**{k: batch[k] for k in ("input_ids", "labels", "codes", "is_visual", "position_ids", "segment_ids")})["loss"]


def _rank(rank: int, world: int, special: SpecialIds, state: dict, batches: list, out: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    model = build_model(special)
    model.load_state_dict(state)
    mesh = init_device_mesh("cpu", (world,))
    # Each part its own unit, so a module one rank skips would leave a collective unmatched; the depth
    # transformer as stage 2 shards it (one unit, not resharded after forward: orchestration.train.lm.lm_units).
    for unit in [*model.llm.get_decoder().layers, model.projector]:
        fully_shard(unit, mesh=mesh)
    fully_shard(model.depth, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, ignored_params=set(model.tower.parameters()))
    model.train()
    loss = loss_of(model, batches[rank])
    loss.backward()  # FSDP2 averages the gradients over the ranks
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    if rank == 0:
        torch.save(grads, out)


def test_fsdp2_ranks_with_and_without_images_match_one_process(tmp_path):
    torch.set_num_threads(1)
    tokenizer = train_bpe_tokenizer(TEXTS, tmp_path / "tok", vocab_size=300)
    special = SpecialIds.from_tokenizer(tokenizer)
    model = build_model(special)
    tcfg = model.tower.config
    batches = make_batches(tokenizer, tcfg.code_depth, tcfg.grid_size)

    # single process: the mean of the two batches' losses (what averaging gradients over 2 ranks gives)
    model.train()
    ((loss_of(model, batches[0]) + loss_of(model, batches[1])) / 2).backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    out = tmp_path / "grads.pt"
    # mismatched collectives show as a TimeoutError, not a stuck suite
    run_on_gloo_ranks(_rank, 2, special, model.state_dict(), batches, str(out))
    sharded = torch.load(out)

    assert set(sharded) == set(reference), set(reference) ^ set(sharded)
    for name in ("projector.0.weight", "depth.head.weight", "llm.lm_head.weight"):
        assert reference[name].abs().sum() > 0, name  # both kinds of loss reach the grads compared
    for name, grad in reference.items():
        torch.testing.assert_close(sharded[name], grad, rtol=1e-4, atol=1e-6, msg=name)


ACCUM_SETUPS = [("legacy_sync_last", 1), ("reduce_scatter_every", 1), ("reduce_scatter_every", 2)]


def _micro_batches(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(4, 8, generator=generator) for _ in range(3)]


def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _accumulating_rank(rank: int, world: int, out: str):
    """Three micro-batches a step under each (sync policy, HSDP replicas); rank 0 saves the gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from orchestration.train.fsdp import set_micro_batch_sync

    torch.set_num_threads(1)
    results = {}
    for policy, replicas in ACCUM_SETUPS:
        model = _small_model()
        if replicas == 1:
            mesh = init_device_mesh("cpu", (world,))
        else:
            mesh = init_device_mesh("cpu", (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        batches = _micro_batches(rank)
        for i, x in enumerate(batches):
            set_micro_batch_sync(model, is_last=i == len(batches) - 1, policy=policy)
            model(x).square().mean().backward()
        results[f"{policy}/{replicas}"] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(results, out)


def test_gradient_accumulation_gives_the_same_gradients_under_every_sync_policy_and_hsdp(tmp_path):
    """The trainer's accumulation (reduce-scatter every micro-batch; under HSDP the all-reduce on the
    last only) sums the same gradients as the old sync-on-the-last pattern and as one process."""
    world = 2
    model = _small_model()
    for rank in range(world):
        for x in _micro_batches(rank):
            (model(x).square().mean() / world).backward()  # FSDP averages over the ranks
    reference = {n: p.grad for n, p in model.named_parameters()}

    out = tmp_path / "grads.pt"
    run_on_gloo_ranks(_accumulating_rank, world, str(out))
    results = torch.load(out)
    assert set(results) == {f"{p}/{r}" for p, r in ACCUM_SETUPS}
    for setup, grads in results.items():
        for name, grad in reference.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=f"{setup}: {name}")
