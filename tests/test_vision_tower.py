"""The vision tower's API: shapes, frozen text tower, save/load, encoder splits, paper presets on meta."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from vilau_model import TowerLossConfig, UnifiedVisionTower, get_tower_config
from vilau_model.decoder import PixelDecoder, RQVAEAttnBlock, RQVAEDecoder, build_decoder
from vilau_model.encoders import TimmViTAdapter, vision_adapter


@pytest.fixture(scope="module")
def tower() -> UnifiedVisionTower:
    torch.manual_seed(0)
    return UnifiedVisionTower(get_tower_config("tiny"))


def test_api_shapes(tower):
    cfg = tower.config
    g, d, s = cfg.grid_size, cfg.code_depth, cfg.image_size
    images = torch.rand(3, 3, s, s)
    tokens = tower.tokenize(["a red circle", "a blue square", "a green cross"])
    assert tokens.shape == (3, cfg.context_length) and tokens.dtype == torch.long

    out = tower(images, tokens, step=0)
    for key in ("loss", "loss_contrastive", "loss_recon", "loss_pixel", "loss_perceptual", "loss_gan",
                "loss_commitment", "codebook_usage", "codebook_perplexity", "codebook_restarts"):
        assert out[key].ndim == 0 and torch.isfinite(out[key]), key
    assert out["reconstruction"].shape == images.shape
    lc = tower.loss_config
    torch.testing.assert_close(
        out["loss"],
        lc.w_contra * out["loss_contrastive"] + lc.w_recon * out["loss_recon"]
        + lc.commitment_weight * out["loss_commitment"],
    )

    codes = tower.encode_codes(images)
    assert codes.shape == (3, g, g, d) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < cfg.codebook_size
    recon = tower.decode_codes(codes)
    assert recon.shape == images.shape and recon.min() >= 0 and recon.max() <= 1
    emb = tower.code_embeddings(codes)
    assert emb.shape == (3, g, g, cfg.width)
    per_depth = tower.quantizer.lookup(codes)
    assert per_depth.shape == (3, g, g, d, cfg.width)
    torch.testing.assert_close(per_depth.sum(dim=-2), emb)

    img, txt = tower.encode_image(images), tower.encode_text(tokens)
    assert img.shape == txt.shape == (3, cfg.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))


def test_image_embedding_is_a_function_of_the_codes(tower):
    """encode_image goes through the quantizer: images with equal codes get equal embeddings."""
    tower.eval()
    images = torch.rand(2, 3, 32, 32)
    tokens = tower.vision.penultimate((images - tower.pixel_mean) / tower.pixel_std)
    quantized = tower.quantizer.decode(tower.quantizer.encode(tokens))
    torch.testing.assert_close(tower.encode_image(images), F.normalize(tower.vision.head(quantized), dim=-1))
    tower.train()


def test_text_tower_frozen_and_kept_in_eval(tower):
    text_params = {id(p) for p in tower.clip.transformer.parameters()} | {id(tower.clip.token_embedding.weight)}
    assert all(not p.requires_grad for p in tower.clip.transformer.parameters())
    assert not tower.clip.positional_embedding.requires_grad
    assert not any(id(p) in text_params for p in tower.trainable_parameters())
    assert any(p is tower.clip.logit_scale for p in tower.trainable_parameters())
    tower.train()
    assert tower.training and tower.clip.visual.training and tower.decoder.training
    assert not tower.clip.transformer.training and not tower.clip.ln_final.training


def test_gradients_reach_the_vision_encoder_through_the_quantizer(tower):
    tower.zero_grad()
    out = tower(torch.rand(2, 3, 32, 32), tower.tokenize(["a", "b"]))
    out["loss_pixel"].backward()  # decoder -> straight-through -> encoder
    first = tower.clip.visual.conv1.weight.grad
    assert first is not None and first.abs().sum() > 0
    assert tower.clip.token_embedding.weight.grad is None


def test_logit_scale_learns_above_clips_old_clamp(tower):
    """SigLIP-SO400M starts at log scale 4.72 (exp ~112): above CLIP's log(100) clamp, which would leave it
    without gradient. Here it is used as is and gets a gradient."""
    images, tokens = torch.rand(4, 3, 32, 32), tower.tokenize(["a red circle", "a blue square", "a cross", "a dot"])
    saved = tower.clip.logit_scale.detach().clone()
    try:
        for log_scale in (4.72, 6.5):  # SO400M's, and one still under the generous bound of log(1000)
            with torch.no_grad():
                tower.clip.logit_scale.fill_(log_scale)
            tower.zero_grad()
            out = tower(images, tokens)
            assert out["logit_scale"].item() == pytest.approx(torch.tensor(log_scale).exp().item(), rel=1e-5)
            out["loss_contrastive"].backward()
            grad = tower.clip.logit_scale.grad
            assert grad is not None and grad.abs().item() > 0, log_scale
    finally:
        with torch.no_grad():
            tower.clip.logit_scale.copy_(saved)
        tower.zero_grad()


def test_save_load_roundtrip(tower, tmp_path):
    path = str(tmp_path / "tower.safetensors")
    images = torch.rand(2, 3, 32, 32)
    tower.train()(images, tower.tokenize(["a", "b"]))  # move the EMA state off its init
    tower.save(path)
    loaded = UnifiedVisionTower.load(path, tower.config)
    for (k, a), b in zip(tower.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    tower.eval(), loaded.eval()
    assert torch.equal(tower.encode_codes(images), loaded.encode_codes(images))
    torch.testing.assert_close(tower.decode_codes(tower.encode_codes(images)), loaded.decode_codes(loaded.encode_codes(images)))
    tower.train()


def test_loss_config_variants():
    torch.manual_seed(0)
    cfg = get_tower_config("tiny", shared_codebook=False)
    tower = UnifiedVisionTower(cfg, TowerLossConfig(contrastive="softmax", pixel_loss="l1", w_contra=0.5))
    images = torch.rand(2, 3, 32, 32)
    out = tower(images, tower.tokenize(["a", "b"]))
    # on [-1, 1] (RQ-VAE's scale): twice the L1 distance of the [0, 1] images
    torch.testing.assert_close(out["loss_pixel"], F.l1_loss(out["reconstruction"] * 2 - 1, images * 2 - 1))
    torch.testing.assert_close(out["loss_pixel"], 2 * F.l1_loss(out["reconstruction"], images))
    assert tower.quantizer.embed.shape[0] == cfg.code_depth
    with pytest.raises(ValueError):
        TowerLossConfig(pixel_loss="l2")


def test_pretrained_local_checkpoint_initialises_both_encoders(tower, tmp_path):
    """`pretrained=` a local open_clip checkpoint (the recipe starts from CLIP/SigLIP weights)."""
    path = str(tmp_path / "clip.pt")
    torch.save(tower.clip.state_dict(), path)
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    loaded = UnifiedVisionTower(get_tower_config("tiny", pretrained=path))
    for (k, a), b in zip(tower.clip.state_dict().items(), loaded.clip.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError):
        UnifiedVisionTower(get_tower_config("tiny", pretrained="no-such-tag"))


def test_bf16_autocast_step(tower):
    tower.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tower(torch.rand(2, 3, 32, 32), tower.tokenize(["a", "b"]))
    assert out["loss_contrastive"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert tower.clip.visual.conv1.weight.grad.abs().sum() > 0


# -- encoder splits --------------------------------------------------------------------------


def test_open_clip_vit_penultimate_is_the_second_to_last_block_output(tower):
    images = torch.rand(2, 3, 32, 32)
    pixels = (images - tower.pixel_mean) / tower.pixel_std
    inter = tower.clip.visual.forward_intermediates(pixels, indices=2, output_fmt="NLC", intermediates_only=True)
    expected = inter["image_intermediates"][0]  # spatial tokens after block L-2 (0-based), class token dropped
    torch.testing.assert_close(tower.vision.penultimate(pixels), expected)


def test_timm_siglip_trunk_split_matches_the_full_forward():
    """SigLIP towers are timm-backed in open_clip: penultimate + head must equal the trunk's forward."""
    from open_clip.timm_model import TimmModel

    torch.manual_seed(0)
    visual = TimmModel("vit_base_patch16_siglip_224", embed_dim=768, image_size=224, pool="map", proj="none")
    trunk = visual.trunk
    trunk.blocks = trunk.blocks[:3]  # keep it small; the split logic is the same
    visual.eval()
    adapter = vision_adapter(type("M", (), {"visual": visual})())
    assert isinstance(adapter, TimmViTAdapter) and adapter.grid_size == (14, 14) and adapter.width == 768
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = adapter.penultimate(pixels)
        assert tokens.shape == (1, 196, 768)
        torch.testing.assert_close(adapter.head(tokens), visual(pixels), rtol=1e-4, atol=1e-4)


# -- paper presets ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, grid, width, depth, vision_params",
    [("vilau-256", 16, 1024, 4, 315_956_224), ("vilau-384", 27, 1152, 16, 428_225_600)],
)
def test_paper_presets_build_on_meta_and_report_parameter_counts(name, grid, width, depth, vision_params):
    cfg = get_tower_config(name)
    assert (cfg.grid_size, cfg.width, cfg.code_depth, cfg.codebook_size) == (grid, width, depth, 16384)
    with torch.device("meta"):
        tower = UnifiedVisionTower(cfg)
        counts = tower.num_parameters()
        # the split encoder runs on meta tensors too: shapes of the paper model
        tokens = tower.vision.penultimate(torch.empty(1, 3, cfg.image_size, cfg.image_size))
        embedding = tower.vision.head(tokens)
        image = tower.decoder(torch.empty(1, width, grid, grid))
    assert all(p.is_meta for p in tower.parameters())
    print(name, counts)
    assert counts["vision_encoder"] == vision_params  # SigLIP-L/16-256 or SO400M/14-384 image tower
    assert counts["text_encoder"] > 300_000_000
    assert counts["codebook"] == 16384 * width
    assert counts["trainable"] == counts["vision_encoder"] + counts["decoder"] + 2  # + logit scale/bias
    assert tokens.shape == (1, grid * grid, width)
    assert embedding.shape == (1, cfg.embed_dim)
    assert image.shape == (1, 3, cfg.image_size, cfg.image_size)


def _rqvae_decoder_parameters(width: int, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z=256) -> int:
    """RQ-VAE's (VQGAN's) decoder parameter count, summed from its layer list by hand."""
    conv = lambda cin, cout, k: cin * cout * k * k + cout  # noqa: E731
    norm = lambda c: 2 * c  # noqa: E731
    res = lambda cin, cout: norm(cin) + conv(cin, cout, 3) + norm(cout) + conv(cout, cout, 3) + (  # noqa: E731
        conv(cin, cout, 1) if cin != cout else 0)
    attn = lambda c: norm(c) + 4 * conv(c, c, 1)  # noqa: E731
    c = ch * ch_mult[-1]
    total = conv(width, z, 1) + conv(z, c, 3) + 2 * res(c, c) + attn(c)  # projection, stem, middle block
    for level in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            total += res(c, ch * ch_mult[level]) + (attn(ch * ch_mult[level]) if level == len(ch_mult) - 1 else 0)
            c = ch * ch_mult[level]
        total += conv(c, c, 3) if level else 0  # upsample conv
    return total + norm(c) + conv(c, 3, 3)


@pytest.mark.parametrize("name", ["vilau-256", "vilau-384"])
def test_paper_presets_use_rqvae_decoder_capacity(name):
    cfg = get_tower_config(name)
    assert (cfg.decoder, cfg.decoder_ch, cfg.decoder_ch_mult, cfg.decoder_res_blocks) == ("rqvae", 128, (1, 1, 2, 2, 4), 2)
    with torch.device("meta"):
        decoder = build_decoder(cfg)
        image = decoder(torch.empty(2, cfg.width, cfg.grid_size, cfg.grid_size))
    assert image.shape == (2, 3, cfg.image_size, cfg.image_size)  # 27x27 (384 px) is resized to 24x24 first
    count = sum(p.numel() for p in decoder.parameters())
    assert count == _rqvae_decoder_parameters(cfg.width)
    assert 42_000_000 < count < 43_000_000  # VQGAN's f16 decoder, ~42M, plus the code-width projection
    # attention only at the lowest resolution: the middle block and each block of the last level
    attention = [n for n, m in decoder.named_modules() if isinstance(m, RQVAEAttnBlock)]
    assert attention == ["mid.attn_1"] + [f"up.4.attn.{i}" for i in range(3)]
    assert isinstance(build_decoder(get_tower_config("tiny")), PixelDecoder)  # tiny keeps its small decoder


def test_rqvae_decoder_trains_in_a_tiny_tower():
    torch.manual_seed(0)
    cfg = get_tower_config("tiny", decoder="rqvae", decoder_ch=32, decoder_ch_mult=(1, 2, 2, 2), decoder_res_blocks=1)
    tower = UnifiedVisionTower(cfg)
    assert isinstance(tower.decoder, RQVAEDecoder)
    assert tower.num_parameters()["decoder"] == _rqvae_decoder_parameters(64, 32, (1, 2, 2, 2), 1)
    images = torch.rand(2, 3, 32, 32)
    out = tower(images, tower.tokenize(["a", "b"]))
    assert out["reconstruction"].shape == images.shape and torch.isfinite(out["loss"])
    out["loss_pixel"].backward()
    assert tower.decoder.last_layer.grad.abs().sum() > 0
    assert tower.clip.visual.conv1.weight.grad.abs().sum() > 0  # through the decoder and the straight-through
    with pytest.raises(ValueError, match="decoder"):
        get_tower_config("tiny", decoder="big")


def test_siglip_tokenizer_needs_a_local_path():
    with torch.device("meta"):
        tower = UnifiedVisionTower(get_tower_config("vilau-256"))
    with pytest.raises(RuntimeError, match="tokenizer_path"):
        tower.tokenize(["a photo"])


def test_tiny_uses_open_clips_bundled_bpe(tower):
    reference = open_clip.tokenizer.SimpleTokenizer(context_length=tower.config.context_length)
    assert torch.equal(tower.tokenize(["a photo of a red circle"]), reference(["a photo of a red circle"]))
