"""The depth-head cross-entropy in chunks of positions equals the all-at-once version, loss and gradients."""

from __future__ import annotations

import pytest
import torch

from vilau_model.depth_transformer import DepthTransformer, depth_cross_entropy_sum

D, K, WIDTH = 4, 64, 16


def setup(n: int, seed: int = 0):
    torch.manual_seed(seed)
    depth = DepthTransformer(llm_hidden_size=24, code_width=WIDTH, code_depth=D, codebook_size=K,
                             hidden_size=32, layers=2, heads=4)
    codebook = torch.randn(K, WIDTH)
    h = torch.randn(n, 24, requires_grad=True)
    codes = torch.randint(0, K, (n, D))
    return depth, codebook, h, codes


def loss_and_grads(depth, codebook, h, codes, chunk):
    depth.zero_grad(set_to_none=True)
    h.grad = None
    loss = depth_cross_entropy_sum(depth, h, codes, lambda c: codebook[c], max_logits_per_chunk=chunk)
    loss.backward()
    return loss.detach(), h.grad.clone(), {n: p.grad.clone() for n, p in depth.named_parameters()}


@pytest.mark.parametrize("positions_per_chunk", [1, 5, 36])
def test_chunked_equals_full(positions_per_chunk):
    depth, codebook, h, codes = setup(37)
    full = loss_and_grads(depth, codebook, h, codes, None)
    chunked = loss_and_grads(depth, codebook, h, codes, positions_per_chunk * D * K)
    torch.testing.assert_close(chunked[0], full[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(chunked[1], full[1], rtol=1e-5, atol=1e-6)
    for name, grad in full[2].items():
        # fp32 sums in another order: absolute error up to ~5e-7 of the gradient's largest entry (|g| ~ 7 here)
        torch.testing.assert_close(chunked[2][name], grad, rtol=1e-5, atol=1e-5, msg=name)
    # and it is the plain mean-free CE over all positions x depths
    logits = depth(h, codebook[codes][:, :-1]).float()
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, K), codes.reshape(-1), reduction="sum")
    torch.testing.assert_close(full[0], reference.detach())


def test_no_positions_still_runs_the_depth_transformer():
    depth, codebook, h, codes = setup(0)
    loss, _, grads = loss_and_grads(depth, codebook, h, codes, 2 * D * K)
    assert loss.item() == 0.0
    # every parameter took part (zero gradient), as FSDP2 needs on a rank without visual positions
    assert set(grads) == {n for n, _ in depth.named_parameters()}
    assert all((g == 0).all() for g in grads.values())


def test_no_grad_chunks_without_recomputation():
    depth, codebook, h, codes = setup(20)
    with torch.no_grad():
        a = depth_cross_entropy_sum(depth, h, codes, lambda c: codebook[c], max_logits_per_chunk=3 * D * K)
        b = depth_cross_entropy_sum(depth, h, codes, lambda c: codebook[c], max_logits_per_chunk=None)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("chunk", [None, 5 * D * K])
def test_position_weights_scale_each_positions_cross_entropies(chunk):
    depth, codebook, h, codes = setup(23)
    weights = torch.ones(23)
    weights[[0, 7, 22]] = 5.0
    weighted = depth_cross_entropy_sum(depth, h, codes, lambda c: codebook[c], max_logits_per_chunk=chunk, weights=weights)
    logits = depth(h, codebook[codes][:, :-1]).float()
    per_position = torch.nn.functional.cross_entropy(logits.reshape(-1, K), codes.reshape(-1), reduction="none")
    reference = (per_position.view(23, D).sum(dim=1) * weights).sum()
    torch.testing.assert_close(weighted, reference, rtol=1e-5, atol=1e-5)
    # all-one weights are the plain sum
    ones = depth_cross_entropy_sum(depth, h, codes, lambda c: codebook[c], max_logits_per_chunk=chunk, weights=torch.ones(23))
    plain = depth_cross_entropy_sum(depth, h, codes, lambda c: codebook[c], max_logits_per_chunk=chunk)
    torch.testing.assert_close(ones, plain, rtol=1e-6, atol=1e-5)


def test_no_visual_target_gives_a_zero_loss_that_keeps_the_graph_and_never_an_empty_attention_batch():
    from torch.overrides import TorchFunctionMode

    depth, codebook, h, codes = setup(0)

    class AttentionBatches(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.batches = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.scaled_dot_product_attention:
                self.batches.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    with AttentionBatches() as seen:
        loss = depth_cross_entropy_sum(depth, h, codes, lambda c: codebook[c], 2**10)
    assert seen.batches and 0 not in seen.batches  # CUDA's flash kernel rejects a batch of 0
    assert float(loss) == 0.0
    loss.backward()
    # every depth parameter is in the graph (FSDP's gradient hooks fire on every rank) with gradient 0
    for name, p in depth.named_parameters():
        assert p.grad is not None and not p.grad.any(), name


def _depth_gathers_rank(rank: int, world: int, chunk_logits: int, out: str):
    """One micro-batch (forward + backward) of the tiny UnifiedLM sharded as stage 2 shards it; the
    depth transformer's all-gathers and reduce-scatters counted."""
    import json

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from orchestration.train.fsdp import count_fsdp_collectives, shard_model
    from orchestration.train.lm import lm_units
    from vilau_model.config import get_lm_config, get_tower_config
    from vilau_model.unified_lm import UnifiedLM
    from vilau_model.vision_tower import UnifiedVisionTower

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tower = UnifiedVisionTower(get_tower_config("tiny")).eval()
    model = UnifiedLM(get_lm_config("tiny", depth_loss_chunk_logits=chunk_logits), tower)
    block_lists, extra = lm_units(model)
    shard_model(model, [b for c in block_lists for b in c] + extra, init_device_mesh("cpu", (world,)),
                MixedPrecisionPolicy(), set(model.tower.parameters()))
    D, K = model.code_depth, model.codebook_size
    g = torch.Generator().manual_seed(rank)
    B, L = 2, 48
    codes = torch.randint(0, K, (B, L, D), generator=g)
    is_visual = torch.zeros(B, L, dtype=torch.bool)
    is_visual[:, 8:40] = True  # 2 x 31 supervised visual positions
    ids = torch.randint(3, 200, (B, L), generator=g)
    model.train()
    with count_fsdp_collectives() as counts:
        model(input_ids=ids, labels=ids, codes=codes, is_visual=is_visual)["loss"].backward()
    depth = {k: {name: n for name, n in c.items() if name.startswith("depth.")} for k, c in counts.items()}
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"chunks": -(-62 // max(1, chunk_logits // (D * K))), **depth}, f)


def test_depth_transformer_is_gathered_once_per_micro_batch_whatever_the_chunks(tmp_path):
    """Under FSDP2 the chunked depth loss must not re-gather the depth blocks per chunk (nor again in each
    chunk's backward recompute): the depth transformer is one unit, called once for all chunks, kept
    unsharded from its forward to its backward; its gradients are reduce-scattered once."""
    import json

    from gloo_ranks import run_on_gloo_ranks

    out = tmp_path / "counts.json"
    run_on_gloo_ranks(_depth_gathers_rank, 2, 8 * 4 * 256, str(out))  # 8 positions a chunk
    counts = json.loads(out.read_text())
    assert counts["chunks"] == 8
    assert list(counts["all_gather"].values()) == [1], counts  # one unit, gathered once
    assert list(counts["reduce_scatter"].values()) == [1], counts
