"""The residual quantizer's math on fixed inputs, its EMA codebook, and its behaviour under 2 gloo ranks."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from gloo_ranks import run_on_gloo_ranks
from vilau_model.quantizer import ResidualQuantizer, nearest_codes


def _clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    """Vectors around a few centres at several scales, so residual depths have structure to find."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, dim, generator=g) * 3
    x = centres[torch.randint(8, (n,), generator=g)]
    return x + torch.randn(n, dim, generator=g)


def _trained_quantizer(steps: int = 20, **kw) -> tuple[ResidualQuantizer, torch.Tensor]:
    torch.manual_seed(0)
    rq = ResidualQuantizer(dim=8, codebook_size=32, depth=4, **kw)
    data = _clustered(2048, 8, seed=1)
    rq.train()
    for _ in range(steps):
        rq(data)
    return rq.eval(), data


@pytest.mark.parametrize("shared", [True, False])
def test_residual_norm_falls_with_depth(shared):
    # 40 steps: a shared book's first step restarts its dead codes from depth 0's input (the reference's
    # rule), so all codes start at the data's scale and take steps to spread to the finer depths' scales.
    rq, data = _trained_quantizer(steps=40, shared_codebook=shared)
    x = data[:512]
    codes = rq.encode(x)
    cumulative = rq.lookup(codes).cumsum(dim=-2)  # [N, D, dim]
    norms = [x.norm(dim=-1).mean().item()]
    norms += [(x - cumulative[:, d]).norm(dim=-1).mean().item() for d in range(rq.depth)]
    assert all(b < a for a, b in zip(norms, norms[1:])), norms
    assert norms[-1] < 0.8 * norms[1]  # later depths keep paying off, not just the first


def test_output_is_sum_of_chosen_codes_and_decode_encode_is_exact():
    rq, data = _trained_quantizer()
    x = data[:300].reshape(3, 10, 10, 8)  # any leading shape
    out = rq(x)
    assert out.codes.shape == (3, 10, 10, 4) and out.codes.dtype == torch.long
    # the sum of the chosen codes, gathered by hand from the codebook
    manual = sum(rq.embed[0][out.codes[..., d]] for d in range(rq.depth))
    torch.testing.assert_close(out.code_sum, manual, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.quantized, manual, rtol=0, atol=1e-5)  # x + (q - x) in float
    # decode(encode(x)) reproduces the quantized features bit for bit
    assert torch.equal(rq.encode(x), out.codes)
    assert torch.equal(rq.decode(rq.encode(x)), out.code_sum)
    # per-depth lookup: [.., D, dim], summing to the decode
    assert rq.lookup(out.codes).shape == (3, 10, 10, 4, 8)


def test_per_depth_codebooks_look_up_their_own_book():
    rq, data = _trained_quantizer(shared_codebook=False)
    assert rq.embed.shape == (4, 32, 8)
    codes = rq.encode(data[:64])
    per_depth = rq.lookup(codes)
    for d in range(4):
        assert torch.equal(per_depth[:, d], rq.embed[d][codes[:, d]])


def test_chunked_search_matches_the_full_distance_matrix():
    g = torch.Generator().manual_seed(3)
    x, book = torch.randn(1000, 16, generator=g), torch.randn(300, 16, generator=g)
    full = torch.cdist(x, book).argmin(dim=1)
    assert torch.equal(nearest_codes(x, book, chunk_size=None), full)
    assert torch.equal(nearest_codes(x, book, chunk_size=7), full)  # ragged last chunk


def test_one_ema_step_equals_hand_calculation():
    decay, eps = 0.9, 1e-5
    rq = ResidualQuantizer(dim=2, codebook_size=3, depth=1, decay=decay, eps=eps)
    codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    rq.embed.copy_(codebook[None])
    rq.ema_count.fill_(5.0)
    rq.ema_sum.copy_(codebook[None] * 5.0)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0], [-1.0, -1.0]])

    out = rq.train()(x)
    assert out.codes[:, 0].tolist() == [0, 0, 1, 0]

    # by hand: counts [3, 1, 0]; sums: code 0 <- (1,0)+(0,1)+(-1,-1) = (0,0), code 1 <- (9,1)
    count = [0.9 * 5 + 0.1 * 3, 0.9 * 5 + 0.1 * 1, 0.9 * 5 + 0.1 * 0]  # 4.8, 4.6, 4.5
    sums = [[0.0, 0.0], [0.9 * 50 + 0.1 * 9, 0.1 * 1], [0.0, 0.9 * 50]]
    n = sum(count)
    smoothed = [(c + eps) / (n + 3 * eps) * n for c in count]
    expected = torch.tensor([[s / sm for s in row] for row, sm in zip(sums, smoothed)])
    torch.testing.assert_close(rq.ema_count[0], torch.tensor(count))
    torch.testing.assert_close(rq.ema_sum[0], torch.tensor(sums))
    torch.testing.assert_close(rq.embed[0], expected)
    assert out.stats["codebook_restarts"].item() == 0
    assert out.stats["codebook_usage"].item() == pytest.approx(2 / 3)


def test_shared_codebook_takes_one_ema_step_per_depth_by_hand():
    """D=2, one shared codebook: depth 0's assignments update it before depth 1 is searched (the reference's
    order), and each depth outputs the code as it was when chosen. Every number below is worked by hand."""
    decay, eps = 0.5, 1e-5
    rq = ResidualQuantizer(dim=2, codebook_size=3, depth=2, decay=decay, eps=eps)
    rq.embed.copy_(torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]]))
    rq.ema_count.fill_(5.0)
    rq.ema_sum.copy_(rq.embed * 5.0)
    x = torch.tensor([[15.3, 0.0], [0.0, 1.0]])

    def embed_from(count, sums):
        n = sum(count)
        smoothed = [(c + eps) / (n + 3 * eps) * n for c in count]
        return [[v / sm for v in row] for row, sm in zip(sums, smoothed)]

    # depth 0 on the initial book: (15.3, 0) -> code 1 (10, 0), (0, 1) -> code 0; counts [1, 1, 0]
    count0 = [0.5 * 5 + 0.5 * 1, 0.5 * 5 + 0.5 * 1, 0.5 * 5]  # [3, 3, 2.5]
    sums0 = [[0.0, 0.5 * 1.0], [0.5 * 50 + 0.5 * 15.3, 0.0], [0.0, 0.5 * 50]]  # (0, .5), (32.65, 0), (0, 25)
    book0 = embed_from(count0, sums0)  # ~ (0, 0.1667), (10.883, 0), (0, 10)
    # depth 1 searches the UPDATED book: residual (5.3, 0) is 5.303 from code 0 and 5.583 from code 1 (it
    # would pick code 1, 4.7 away, in the book before the update); (0, 1) -> code 0. counts [2, 0, 0]
    count1 = [0.5 * 3 + 0.5 * 2, 0.5 * 3, 0.5 * 2.5]  # [2.5, 1.5, 1.25]: all >= 1, no restarts
    sums1 = [[0.5 * 0.0 + 0.5 * 5.3, 0.5 * 0.5 + 0.5 * 1.0], [0.5 * 32.65, 0.0], [0.0, 0.5 * 25]]
    book1 = embed_from(count1, sums1)

    out = rq.train()(x)
    assert out.codes.tolist() == [[1, 0], [0, 0]]
    torch.testing.assert_close(rq.ema_count[0], torch.tensor(count1))
    torch.testing.assert_close(rq.ema_sum[0], torch.tensor(sums1))
    torch.testing.assert_close(rq.embed[0], torch.tensor(book1))
    # the output: depth 0's code from the initial book, depth 1's from the book after depth 0's update
    expected_sum = torch.tensor([[10.0 + book0[0][0], book0[0][1]], [0.0 + book0[0][0], book0[0][1]]])
    torch.testing.assert_close(out.code_sum, expected_sum)
    expected_commitment = 0.5 * (
        torch.nn.functional.mse_loss(x, torch.tensor([[10.0, 0.0], [0.0, 0.0]]))
        + torch.nn.functional.mse_loss(x, expected_sum)
    )
    torch.testing.assert_close(out.commitment_loss, expected_commitment)
    assert out.stats["codebook_restarts"].item() == 0
    assert out.stats["codebook_usage"].item() == pytest.approx(2 / 3)  # codes 0 and 1 used this step


def test_never_chosen_code_is_restarted_from_batch_vectors():
    rq = ResidualQuantizer(dim=2, codebook_size=4, depth=1, decay=0.99)
    rq.embed.copy_(torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1000.0, 1000.0]]]))
    rq.ema_count.copy_(torch.tensor([[10.0, 10.0, 10.0, 1.0]]))  # code 3: alive until it goes unused
    rq.ema_sum.copy_(rq.embed * rq.ema_count.unsqueeze(-1))
    x = torch.rand(64, 2, generator=torch.Generator().manual_seed(0))

    out = rq.train()(x)
    assert (out.codes != 3).all()  # nothing near (1000, 1000)
    assert out.stats["codebook_restarts"].item() == 1
    restarted = rq.embed[0, 3]
    assert (x == restarted).all(dim=1).any(), "restarted code should be one of the batch vectors"
    assert rq.ema_count[0, 3].item() == pytest.approx(1.0)
    # codes 0-2 were used and kept their (EMA-moved) places near the data
    assert rq.embed[0, :3].abs().max() < 2


def test_first_training_step_initialises_every_code_from_data():
    torch.manual_seed(0)
    rq = ResidualQuantizer(dim=4, codebook_size=16, depth=2)
    out = rq.train()(torch.randn(256, 4) + 50.0)  # data far from the random init
    # at depth 0 one code (the one nearest to the data) takes every vector and the 15 unused ones restart on
    # data; at depth 1 restarted codes that no vector picks (count 1 -> 0.99) restart once more
    assert 15 <= out.stats["codebook_restarts"].item() <= 30
    assert (rq.embed[0] > 40).all()


def test_gradients_pass_straight_through():
    rq, data = _trained_quantizer()
    x = data[:100].clone().requires_grad_(True)
    out = rq(x)
    g = torch.randn_like(x)
    (out.quantized * g).sum().backward()
    assert torch.equal(x.grad, g)  # d(x + stopgrad(q - x))/dx = identity

    x.grad = None
    rq(x).commitment_loss.backward()  # commitment pulls x towards the (fixed) cumulative codes
    assert x.grad.abs().sum() > 0


def test_no_update_in_eval_mode():
    rq, data = _trained_quantizer()
    before = {k: v.clone() for k, v in rq.state_dict().items()}
    rq.eval()(data[:100] * 5)
    assert all(torch.equal(before[k], v) for k, v in rq.state_dict().items())


# -- two gloo ranks ---------------------------------------------------------------------------


def _rank_worker(rank: int, world: int, outdir: str) -> None:
    torch.manual_seed(0)  # same init on both ranks, as after a broadcast of the initial weights
    rq = ResidualQuantizer(dim=8, codebook_size=64, depth=3).train()
    torch.manual_seed(100 + rank)  # different random restart draws per rank
    for step in range(6):
        # different data per rank, and from step 3 on rank 1 sees a far-off cluster: rank 0 alone
        # would let those codes die, so restarts and EMA both have to be shared
        x = _clustered(512, 8, seed=10 * step + rank)
        if rank == 1 and step >= 3:
            x = x + 20.0
        rq(x)
    torch.save({k: v.clone() for k, v in rq.state_dict().items()}, os.path.join(outdir, f"rank{rank}.pt"))

    # One training step (no dead codes) under 2 ranks equals one step on the concatenated batch, for
    # per-depth books and for the shared book (whose per-depth updates each all-reduce their statistics).
    for shared in (False, True):
        rq2 = _ema_reference_quantizer(shared)
        rq2(_clustered(128, 8, seed=rank))
        torch.save(rq2.state_dict(), os.path.join(outdir, f"ema_shared{shared}_rank{rank}.pt"))


def _ema_reference_quantizer(shared: bool) -> ResidualQuantizer:
    rq = ResidualQuantizer(dim=8, codebook_size=16, depth=2, shared_codebook=shared).train()
    torch.manual_seed(0)
    rq.embed.copy_(torch.randn_like(rq.embed))
    rq.ema_count.fill_(100.0)
    rq.ema_sum.copy_(rq.embed * 100.0)
    return rq


def test_two_gloo_ranks_keep_identical_codebooks():
    with tempfile.TemporaryDirectory() as tmp:
        run_on_gloo_ranks(_rank_worker, 2, tmp)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in (0, 1))
        ema = {shared: [torch.load(os.path.join(tmp, f"ema_shared{shared}_rank{r}.pt")) for r in (0, 1)]
               for shared in (False, True)}

    for key in ("embed", "ema_count", "ema_sum"):
        assert torch.equal(r0[key], r1[key]), key
    # the shared codebook serves both ranks' data: some codes live out at rank 1's far cluster
    assert (r0["embed"][0].mean(dim=1) > 10).any()

    # single-process reference on the concatenated batch
    for shared, (e0, e1) in ema.items():
        rq = _ema_reference_quantizer(shared)
        rq(torch.cat([_clustered(128, 8, seed=0), _clustered(128, 8, seed=1)]))
        for key in ("embed", "ema_count", "ema_sum"):
            assert torch.equal(e0[key], e1[key]), (shared, key)
            torch.testing.assert_close(e0[key], rq.state_dict()[key], rtol=1e-5, atol=1e-5, msg=f"{shared} {key}")
