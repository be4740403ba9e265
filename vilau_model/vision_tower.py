"""The unified foundation vision tower of VILA-U.

    pixels --vision encoder (all blocks but the last)--> tokens x [B, H*W, width]
           --residual quantizer--> x_q (straight-through) and codes [B, H, W, D]
    x_q --last block + pool + head--> image embedding   (contrastive vs the frozen text tower)
    x_q --conv decoder--> reconstruction [B, 3, S, S]     (pixel + perceptual [+ GAN])

Usage:

    tower = UnifiedVisionTower(get_tower_config("tiny"), TowerLossConfig())
    out = tower(images, tower.tokenize(captions), step=step)   # images: float [B, 3, S, S] in [0, 1]
    out["loss"].backward()                                      # out also has every term and stats

The loss weights live in the `TowerLossConfig` given to the constructor (default: the paper's
w_contra = w_recon = 1, SigLIP loss, MSE pixels, commitment = config.commitment_weight). With a PatchGAN
(gan_weight > 0) train the discriminator with its own optimizer on `discriminator_parameters()` and
`discriminator_loss(images, out["reconstruction"], step)`; the generator term of `forward` leaves the
discriminator's gradients alone (it sees the discriminator as a fixed function).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vilau_model.config import VisionTowerConfig
from vilau_model.decoder import build_decoder
from vilau_model.encoders import (
    ClipSource,
    build_clip,
    build_tokenizer,
    checkpoint_normalization,
    clip_source,
    text_modules,
    text_parameters,
    vision_adapter,
)
from vilau_model.losses import (
    ContrastiveLoss,
    PatchDiscriminator,
    PerceptualLoss,
    TowerLossConfig,
    adaptive_gan_weight,
    generator_loss,
    hinge_discriminator_loss,
    pixel_loss,
)
from vilau_model.quantizer import ResidualQuantizer

log = logging.getLogger(__name__)

# Upper bound on the log logit scale: log(1000). CLIP clamps at log(100), but SigLIP-SO400M's pretrained
# scale is exp(4.72) ~ 112, and a clamp below it would hold the scale fixed with zero gradient. Pretrained
# CLIP/SigLIP scales stay far below 1000; the bound only keeps a runaway scale from making logits of
# 1000 x cosine overflow-prone (fp32 handles them; the contrastive term runs in fp32).
MAX_LOG_LOGIT_SCALE = math.log(1000.0)


class UnifiedVisionTower(nn.Module):
    """source: where the encoders come from (default: resolved from the config, see
    `vilau_model.encoders.clip_source`); `load` passes the export's own, without weights."""

    def __init__(self, config: VisionTowerConfig, loss_config: TowerLossConfig | None = None,
                 source: ClipSource | None = None):
        super().__init__()
        self.source = source or clip_source(config)
        # The normalization the checkpoint was trained with (or the config's explicit one). It is kept in
        # the config (exports record it) and in persistent buffers (state dicts carry it), so stage 1, the
        # tokenization pool, evaluation and generation all normalize the same way.
        mean, std, where = checkpoint_normalization(config, self.source)
        log.info("vision tower %s: pixel normalization mean=%s std=%s from %s", config.name, mean, std, where)
        config = dataclasses.replace(config, image_mean=tuple(mean), image_std=tuple(std))
        self.config = config
        self.loss_config = loss_config or TowerLossConfig(commitment_weight=config.commitment_weight)
        lc = self.loss_config

        self.clip = build_clip(config, self.source)
        self.vision = vision_adapter(self.clip)  # views into self.clip.visual (no new weights)
        if self.vision.width != config.width or self.vision.grid_size != (config.grid_size, config.grid_size):
            raise ValueError(
                f"{config.clip_model}: encoder width {self.vision.width}, grid {self.vision.grid_size} do not "
                f"match the config's width {config.width}, grid {config.grid_size}"
            )
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        if getattr(self.clip, "logit_bias", None) is None:
            # CLIP checkpoints have no bias; the sigmoid loss needs one (SigLIP init: -10).
            self.clip.logit_bias = nn.Parameter(torch.full_like(self.clip.logit_scale, -10.0))

        # Frozen text tower (the VILA-U recipe): no gradients, and kept in eval mode by train().
        for p in text_parameters(self.clip):
            p.requires_grad_(False)

        self.quantizer = ResidualQuantizer(
            dim=config.width,
            codebook_size=config.codebook_size,
            depth=config.code_depth,
            shared_codebook=config.shared_codebook,
            decay=config.ema_decay,
            eps=config.ema_eps,
            dead_code_threshold=config.dead_code_threshold,
            chunk_size=config.search_chunk_size,
        )
        self.decoder = build_decoder(config)

        self.contrastive = ContrastiveLoss(lc.contrastive, lc.siglip_dist_impl)
        self.perceptual: PerceptualLoss | None = None
        if lc.perceptual_weight > 0 and lc.perceptual_weights_path:
            self.perceptual = PerceptualLoss(lc.perceptual_weights_path)
        elif lc.perceptual_weight > 0:
            log.warning(
                "perceptual loss OFF: perceptual_weight=%s but no perceptual_weights_path is configured "
                "(no random VGG is ever used)", lc.perceptual_weight,
            )
        self.discriminator = (
            PatchDiscriminator(lc.discriminator_layers, lc.discriminator_channels) if lc.gan_weight > 0 else None
        )
        self._tokenizer = None
        self.train()

    # -- modes and parameter groups --------------------------------------------------------------

    def train(self, mode: bool = True):
        super().train(mode)
        for m in text_modules(self.clip):
            m.eval()  # frozen text tower: dropout etc. stay off
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the tower optimizer updates: vision encoder, logit scale/bias, decoder.
        Excludes the frozen text tower, the EMA codebook (buffers) and the discriminator."""
        skip = {id(p) for p in text_parameters(self.clip)}
        if self.discriminator is not None:
            skip |= {id(p) for p in self.discriminator.parameters()}
        if self.perceptual is not None:
            skip |= {id(p) for p in self.perceptual.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in skip]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters()) if self.discriminator is not None else []

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts by part (works on the meta device)."""
        vision = sum(p.numel() for p in self.clip.visual.parameters())
        text = sum(p.numel() for p in text_parameters(self.clip))
        return {
            "vision_encoder": vision,
            "text_encoder": text,
            "decoder": sum(p.numel() for p in self.decoder.parameters()),
            "codebook": self.quantizer.embed.numel(),
            "discriminator": sum(p.numel() for p in self.discriminator_parameters()),
            "trainable": sum(p.numel() for p in self.trainable_parameters()),
        }

    # -- text ------------------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """LongTensor[B, context_length]. Raises for SigLIP names without a local tokenizer_path."""
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.config, self.source)
        return self._tokenizer(texts)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings [B, embed_dim] from the frozen text tower."""
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    # -- image -----------------------------------------------------------------------------------

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-block tokens [B, H*W, width] of images in [0, 1]."""
        pixels = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        return self.vision.penultimate(pixels)

    def _grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, H*W, C] -> [B, C, H, W] for the conv decoder."""
        g = self.config.grid_size
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, g, g)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, embed_dim], computed from the quantized tokens."""
        tokens = self._features(images)
        quantized = self.quantizer.decode(self.quantizer.encode(tokens))
        quantized = tokens + (quantized - tokens).detach()
        return F.normalize(self.vision.head(quantized), dim=-1)

    @torch.no_grad()
    def encode_codes(self, images: torch.Tensor) -> torch.Tensor:
        """Discrete codes LongTensor[B, H, W, D]."""
        g = self.config.grid_size
        codes = self.quantizer.encode(self._features(images))
        return codes.reshape(images.shape[0], g, g, self.config.code_depth)

    def code_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum over depths of the code vectors: LongTensor[B, H, W, D] -> Tensor[B, H, W, width]."""
        return self.quantizer.decode(codes)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [0, 1] from codes [B, H, W, D]."""
        emb = self.code_embeddings(codes)  # [B, H, W, C]
        return self.decoder(emb.permute(0, 3, 1, 2)).clamp(0.0, 1.0)

    # -- training --------------------------------------------------------------------------------

    def _gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.loss_config.gan_start_step

    def forward(self, images: torch.Tensor, text_tokens: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        """All loss terms (each separately), codebook stats and the (detached) reconstruction."""
        lc = self.loss_config
        tokens = self._features(images)
        q = self.quantizer(tokens)

        # Contrastive: embedding of the quantized tokens vs the frozen text embedding of the caption.
        # (in fp32 even under bf16 autocast: logits of up to 1000 x cosine need the precision)
        image_emb = F.normalize(self.vision.head(q.quantized).float(), dim=-1)
        text_emb = self.encode_text(text_tokens).float()
        logit_scale = self.clip.logit_scale.float().clamp(max=MAX_LOG_LOGIT_SCALE).exp()
        logit_bias = self.clip.logit_bias.float()
        loss_contrastive = self.contrastive(image_emb, text_emb, logit_scale, logit_bias)

        # Reconstruction from the same quantized tokens.
        reconstruction = self.decoder(self._grid(q.quantized))
        loss_pixel = pixel_loss(reconstruction, images.to(reconstruction.dtype), lc.pixel_loss)
        zero = loss_pixel.new_zeros(())
        loss_perceptual = self.perceptual(reconstruction, images) if self.perceptual is not None else zero
        loss_rec_base = loss_pixel + lc.perceptual_weight * loss_perceptual

        loss_gan, gan_weight = zero, zero
        if self._gan_active(step):
            loss_gan = generator_loss(self._frozen_discriminator(reconstruction))
            if torch.is_grad_enabled() and self.training:
                gan_weight = adaptive_gan_weight(loss_rec_base, loss_gan, self.decoder.last_layer)
            else:
                gan_weight = torch.ones_like(zero)
        loss_recon = loss_rec_base + lc.gan_weight * gan_weight * loss_gan

        loss = lc.w_contra * loss_contrastive + lc.w_recon * loss_recon + lc.commitment_weight * q.commitment_loss
        out = {
            "loss": loss,
            "loss_contrastive": loss_contrastive,
            "loss_recon": loss_recon,
            "loss_pixel": loss_pixel,
            "loss_perceptual": loss_perceptual,
            "loss_gan": loss_gan,
            "loss_commitment": q.commitment_loss,
            "gan_adaptive_weight": gan_weight.detach(),
            "perceptual_enabled": torch.tensor(float(self.perceptual is not None)),
            "logit_scale": logit_scale.detach(),
            "reconstruction": reconstruction.detach(),
        }
        out.update({k: v.detach() for k, v in q.stats.items()})
        return out

    def _frozen_discriminator(self, images: torch.Tensor) -> torch.Tensor:
        """The discriminator's logits with no graph edge to its parameters: the generator's backward then
        neither computes nor accumulates discriminator gradients (its own step would have to undo them)."""
        params = self.discriminator_parameters()
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            return self.discriminator(images)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)

    def discriminator_loss(self, images: torch.Tensor, reconstructions: torch.Tensor, step: int) -> torch.Tensor:
        """Hinge loss of the PatchGAN on real images vs (detached) reconstructions; 0 before gan_start_step."""
        if not self._gan_active(step):
            p = next(iter(self.discriminator.parameters()), None) if self.discriminator is not None else None
            return images.new_zeros(()) if p is None else 0.0 * p.sum()
        logits_real = self.discriminator(images)
        logits_fake = self.discriminator(reconstructions.detach())
        return hinge_discriminator_loss(logits_real, logits_fake)

    # -- weights ---------------------------------------------------------------------------------

    def _saved_state(self) -> dict[str, torch.Tensor]:
        # The perceptual VGG comes from its own path; it is not part of the tower's weights.
        return {k: v for k, v in self.state_dict().items() if not k.startswith("perceptual.")}

    def save(self, path: str) -> None:
        """All tower weights (encoders, codebook and EMA state, decoder, discriminator, pixel normalization)
        in safetensors; the metadata describes the encoder architecture, so the file loads without the
        pretrained checkpoint it started from."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self._saved_state().items()}
        metadata = {"config_name": self.config.name, "clip_model": self.config.clip_model,
                    "clip_source": self.source.without_weights().to_json()}
        save_file(state, path, metadata=metadata)

    @classmethod
    def load(
        cls, path: str, config: VisionTowerConfig, loss_config: TowerLossConfig | None = None
    ) -> "UnifiedVisionTower":
        """Build the tower's architecture (no pretrained weights read) and load the weights saved by `save`,
        pixel normalization included."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        if "clip_source" in metadata:
            source = ClipSource.from_json(metadata["clip_source"])
        else:  # exports from before the source was recorded
            source = clip_source(dataclasses.replace(config, pretrained=None))
        tower = cls(dataclasses.replace(config, pretrained=None), loss_config, source)
        state = load_file(path)
        missing, unexpected = tower.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("perceptual.")]
        if set(missing) & {"pixel_mean", "pixel_std"}:
            log.warning("%s: an export without its pixel normalization; using %s / %s", path,
                        tower.config.image_mean, tower.config.image_std)
            missing = [k for k in missing if k not in ("pixel_mean", "pixel_std")]
        if missing or unexpected:
            raise RuntimeError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        # the normalization the weights were trained with, also in the config (exports, data plane)
        tower.config = dataclasses.replace(tower.config, image_mean=tuple(tower.pixel_mean.flatten().tolist()),
                                           image_std=tuple(tower.pixel_std.flatten().tolist()))
        log.info("vision tower %s loaded from %s: pixel normalization mean=%s std=%s", config.name, path,
                 tower.config.image_mean, tower.config.image_std)
        return tower
