"""Loss terms of the vision tower: contrastive under data parallelism, perceptual on/off, PatchGAN."""

from __future__ import annotations

import logging
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from gloo_ranks import run_on_gloo_ranks
from vilau_model.config import get_tower_config
from vilau_model.losses import ContrastiveLoss, PerceptualLoss, TowerLossConfig, save_stand_in_perceptual_weights
from vilau_model.vision_tower import UnifiedVisionTower

WORLD, LOCAL_BATCH, DIM = 2, 6, 16


def _features():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(WORLD * LOCAL_BATCH, DIM, generator=g), dim=-1)
    text = F.normalize(image + 0.5 * torch.randn(WORLD * LOCAL_BATCH, DIM, generator=g), dim=-1)
    return image, text


def _loss_and_grad(kind: str, image: torch.Tensor, text: torch.Tensor, scale: float = 10.0):
    image = image.clone().requires_grad_(True)
    loss = ContrastiveLoss(kind)(image, text, torch.tensor(scale), torch.tensor(-5.0))
    return loss, image


def _contrastive_worker(rank: int, world: int, outdir: str) -> None:
    image, text = _features()
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}
    for kind in ("sigmoid", "softmax"):
        loss, img = _loss_and_grad(kind, image[local], text[local])
        # data parallelism averages over ranks: backward the per-rank share of the mean
        (loss / world).backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[kind] = {"loss": mean_loss / world, "grad": img.grad}
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))


def test_contrastive_loss_on_two_ranks_equals_single_process_on_concatenated_batch():
    with tempfile.TemporaryDirectory() as tmp:
        run_on_gloo_ranks(_contrastive_worker, WORLD, tmp)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]

    image, text = _features()
    for kind in ("sigmoid", "softmax"):
        loss, img = _loss_and_grad(kind, image, text)
        loss.backward()
        for r, res in enumerate(ranks):
            torch.testing.assert_close(res[kind]["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
            # and the gradients each rank gets for its own images are the single-process ones
            torch.testing.assert_close(
                res[kind]["grad"], img.grad[r * LOCAL_BATCH:(r + 1) * LOCAL_BATCH], rtol=1e-5, atol=1e-6
            )
        # sanity: negatives from the other rank matter (a local-only loss would differ)
        local_only, _ = _loss_and_grad(kind, image[:LOCAL_BATCH], text[:LOCAL_BATCH])
        assert abs(local_only.item() - loss.item()) > 1e-3


def test_contrastive_loss_prefers_matching_pairs():
    image, text = _features()
    for kind in ("sigmoid", "softmax"):
        matched, _ = _loss_and_grad(kind, image, text)
        shuffled, _ = _loss_and_grad(kind, image, text.roll(1, dims=0))
        assert matched < shuffled


# -- perceptual ------------------------------------------------------------------------------


def _tiny_tower(**loss_kw) -> UnifiedVisionTower:
    torch.manual_seed(0)
    return UnifiedVisionTower(get_tower_config("tiny"), TowerLossConfig(**loss_kw))


def test_perceptual_loss_is_off_and_says_so_without_weights(caplog):
    with caplog.at_level(logging.WARNING, logger="vilau_model.vision_tower"):
        tower = _tiny_tower(perceptual_weight=1.0)  # asked for, but no weights path
    assert tower.perceptual is None
    assert any("perceptual loss OFF" in r.getMessage() for r in caplog.records)
    images = torch.rand(2, 3, 32, 32)
    out = tower(images, tower.tokenize(["a", "b"]))
    assert out["perceptual_enabled"].item() == 0.0
    assert out["loss_perceptual"].item() == 0.0


def test_perceptual_loss_from_local_weights(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    # A weights file in torchvision's VGG16 layout (made here: no downloads), with LPIPS lin layers.
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}  # VGG16 trunk
    for k, ch in enumerate((64, 128, 256, 512, 512)):
        state[f"lin{k}.model.1.weight"] = torch.rand(1, ch, 1, 1)
    path = str(tmp_path / "vgg_lpips.safetensors")
    save_file(state, path)

    loss_fn = PerceptualLoss(path)
    assert loss_fn.has_lpips_lin
    assert all(not p.requires_grad for p in loss_fn.parameters())
    a = torch.rand(2, 3, 32, 32)
    b = (a + 0.2 * torch.randn_like(a)).clamp(0, 1).requires_grad_(True)
    assert loss_fn(a, a).item() == pytest.approx(0.0, abs=1e-6)
    d = loss_fn(b, a)
    assert d.item() > 0
    d.backward()
    assert b.grad.abs().sum() > 0

    tower = _tiny_tower(perceptual_weight=0.5, perceptual_weights_path=path)
    out = tower(a, tower.tokenize(["x", "y"]))
    assert out["perceptual_enabled"].item() == 1.0 and out["loss_perceptual"].item() > 0
    torch.testing.assert_close(out["loss_recon"], out["loss_pixel"] + 0.5 * out["loss_perceptual"])
    # the frozen VGG is not part of the tower's trainable or saved weights
    assert not any(p is q for p in tower.trainable_parameters() for q in loss_fn.parameters())
    assert not any(k.startswith("perceptual.") for k in tower._saved_state())


def test_perceptual_loss_with_a_small_stand_in_trunk(tmp_path):
    """A VGG16-layout trunk with 1/8 of the channels loads like the real one (what tiny runs and tests use)."""
    path = save_stand_in_perceptual_weights(str(tmp_path / "stand_in.safetensors"))
    loss_fn = PerceptualLoss(path)
    assert loss_fn.lin_source == "uniform" and loss_fn.lin4.shape == (1, 64, 1, 1)
    assert sum(p.numel() for p in loss_fn.parameters()) < 300_000  # VGG16's trunk: 14.7M
    a = torch.rand(2, 3, 32, 32)
    b = (a + 0.2 * torch.randn_like(a)).clamp(0, 1).requires_grad_(True)
    assert loss_fn(a, a).item() == pytest.approx(0.0, abs=1e-6)
    d = loss_fn(b, a)
    d.backward()
    assert d.item() > 0 and b.grad.abs().sum() > 0

    tower = _tiny_tower(perceptual_weight=1.0, perceptual_weights_path=path)
    out = tower(a, tower.tokenize(["x", "y"]))
    assert out["perceptual_enabled"].item() == 1.0
    torch.testing.assert_close(out["loss_recon"], out["loss_pixel"] + out["loss_perceptual"])
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(path).items() if not k.startswith("features.28.")}  # a trunk cut short
    save_file(state, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="features.28.weight"):
        PerceptualLoss(str(tmp_path / "short.safetensors"))


def test_perceptual_loss_equals_the_lpips_package(tmp_path):
    """Same trunk, same calibrated lin layers: our distance on [0, 1] images is lpips.LPIPS on [-1, 1]."""
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, pretrained=True, verbose=False).eval()  # random trunk
    path = str(tmp_path / "lpips_vgg.pt")
    torch.save(reference.state_dict(), path)  # its own key layout: net.sliceK.N.*, lin{k}.model.1.weight
    ours = PerceptualLoss(path)
    assert ours.lin_source == "weights file"
    a, b = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        expected = reference(a * 2 - 1, b * 2 - 1).mean()
    torch.testing.assert_close(ours(a, b), expected, rtol=1e-4, atol=1e-6)
    # a torchvision-layout trunk without lin layers takes the calibrated ones the package ships (no hub)
    trunk = {f"features.{k.split('.', 2)[2]}": v for k, v in reference.state_dict().items() if k.startswith("net.slice")}
    torch.save(trunk, str(tmp_path / "vgg16_features.pt"))
    from_package = PerceptualLoss(str(tmp_path / "vgg16_features.pt"))
    assert from_package.lin_source == "lpips package"
    torch.testing.assert_close(from_package(a, b), expected, rtol=1e-4, atol=1e-6)


# -- PatchGAN --------------------------------------------------------------------------------


def test_patchgan_adaptive_weight_and_start_step():
    tower = _tiny_tower(gan_weight=0.5, gan_start_step=10)
    images = torch.rand(4, 3, 32, 32)
    tokens = tower.tokenize(["a red circle"] * 4)

    before = tower(images, tokens, step=0)
    assert before["loss_gan"].item() == 0.0
    assert tower.discriminator_loss(images, before["reconstruction"], step=0).item() == 0.0

    quantizer_state = {k: v.clone() for k, v in tower.quantizer.state_dict().items()}
    rng = torch.get_rng_state()  # the quantizer's dead-code restarts draw from it
    out = tower(images, tokens, step=10)
    w = out["gan_adaptive_weight"].item()
    assert w > 0 and out["loss_gan"].item() != 0.0
    expected = out["loss_pixel"] + 0.5 * w * out["loss_gan"]
    torch.testing.assert_close(out["loss_recon"], expected)

    # the VQGAN weight by hand: ||grad_last(rec)|| / (||grad_last(gan)|| + 1e-4) at the decoder's last conv
    # the same quantization as that step: the codebook before its per-depth EMA updates, the same restarts
    tower.quantizer.load_state_dict(quantizer_state)
    torch.set_rng_state(rng)
    recon = tower.decoder(tower._grid(tower.quantizer(tower._features(images)).quantized))
    rec = F.mse_loss(recon * 2 - 1, images * 2 - 1)  # pixels on [-1, 1]
    gan = -tower.discriminator(recon).mean()
    g_rec = torch.autograd.grad(rec, tower.decoder.last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, tower.decoder.last_layer)[0]
    assert w == pytest.approx((g_rec.norm() / (g_gan.norm() + 1e-4)).item(), rel=1e-3)

    # discriminator step: its own parameters, positive hinge loss, gradients only there
    d_params = tower.discriminator_parameters()
    assert d_params and not any(p is q for p in d_params for q in tower.trainable_parameters())
    d_loss = tower.discriminator_loss(images, out["reconstruction"], step=10)
    assert d_loss.item() > 0
    tower.zero_grad()
    d_loss.backward()
    assert all(p.grad is not None for p in d_params)
    assert all(p.grad is None for p in tower.decoder.parameters())


def test_lpips_and_patchgan_recipe_trains_without_nan(tmp_path):
    """The paper recipe's model side, in one process: generator steps on the full loss (pixels, stand-in
    LPIPS, adaptive-weight GAN from its start step) alternating with hinge discriminator steps."""
    path = save_stand_in_perceptual_weights(str(tmp_path / "stand_in.safetensors"))
    tower = _tiny_tower(perceptual_weight=1.0, perceptual_weights_path=path, gan_weight=0.5, gan_start_step=3)
    g_opt = torch.optim.AdamW(tower.trainable_parameters(), lr=2e-3, weight_decay=0.0)
    d_opt = torch.optim.AdamW(tower.discriminator_parameters(), lr=2e-3, weight_decay=0.0)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = tower.tokenize(["a red circle", "a blue square"] * 4)
    d_before = [p.detach().clone() for p in tower.discriminator_parameters()]
    pixel = []
    for step in range(8):
        out = tower(images, tokens, step=step)
        g_opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        g_opt.step()
        d_opt.zero_grad(set_to_none=True)  # the generator's GAN term reached the discriminator too
        d_loss = tower.discriminator_loss(images, out["reconstruction"], step)
        d_loss.backward()
        d_opt.step()
        assert all(torch.isfinite(out[k]) for k in ("loss", "loss_perceptual", "loss_gan")) and torch.isfinite(d_loss)
        assert (out["loss_gan"].item() != 0.0) == (step >= 3) and (out["gan_adaptive_weight"].item() > 0) == (step >= 3)
        if step == 2:  # before its start the discriminator has not moved
            assert all(torch.equal(a, b) for a, b in zip(d_before, tower.discriminator_parameters()))
        pixel.append(out["loss_pixel"].item())
    assert not all(torch.equal(a, b) for a, b in zip(d_before, tower.discriminator_parameters()))
    assert pixel[-1] < pixel[0]
