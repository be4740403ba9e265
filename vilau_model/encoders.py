"""The CLIP/SigLIP encoders of the vision tower, built with open_clip.

VILA-U quantizes the output of the vision encoder's penultimate block and sends the quantized tokens
through the last block and the pooling head to get the contrastive image embedding, so contrastive
learning shapes the discrete tokens. open_clip has no such split, so the adapters below expose it:

    penultimate(pixels) -> [B, H*W, width]   spatial tokens after all blocks but the last
    head(tokens)        -> [B, embed_dim]    last block + norm + pool + projection

for open_clip's own VisionTransformer (custom/CLIP configs) and for the timm trunk open_clip uses for
SigLIP (ViT-L-16-SigLIP-256, ViT-SO400M-14-SigLIP-384).
"""

from __future__ import annotations

import logging
import math
import os

import open_clip
import torch
import torch.nn as nn
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer

from vilau_model.config import VisionTowerConfig

log = logging.getLogger(__name__)


def _is_open_clip_name(name: str) -> bool:
    return name in open_clip.list_models()


def build_clip(config: VisionTowerConfig) -> nn.Module:
    """An open_clip CLIP/CustomTextCLIP model for the config.

    A known open_clip name is created by name (`pretrained` = open_clip tag or local checkpoint path);
    any other name is built from the config's shapes (a small CLIP with open_clip's BPE tokenizer).
    Respects an enclosing `with torch.device("meta")`: paper presets build without weights.
    """
    device = torch.get_default_device()
    if _is_open_clip_name(config.clip_model):
        pretrained = config.pretrained if device.type != "meta" else None
        model = open_clip.create_model(config.clip_model, pretrained=pretrained, device=device)
    else:
        vision_cfg = dict(
            image_size=config.image_size,
            patch_size=config.patch_size,
            width=config.width,
            layers=config.layers,
            head_width=config.width // config.heads,
            mlp_ratio=config.mlp_ratio,
            pool_type="avg",  # mean over the (quantized) patch tokens, no reliance on a class token
        )
        text_cfg = dict(
            context_length=config.context_length,
            vocab_size=config.text_vocab_size,
            width=config.text_width,
            heads=config.text_heads,
            layers=config.text_layers,
        )
        # SigLIP-style logit init (t = log 10, b = -10); the softmax loss ignores the bias.
        model = open_clip.model.CLIP(
            embed_dim=config.embed_dim,
            vision_cfg=vision_cfg,
            text_cfg=text_cfg,
            init_logit_scale=math.log(10.0),
            init_logit_bias=-10.0,
        )
        if config.pretrained and device.type != "meta":
            if not os.path.exists(config.pretrained):
                raise FileNotFoundError(
                    f"pretrained={config.pretrained!r}: a custom model ({config.clip_model!r}) "
                    "only loads a local checkpoint path"
                )
            open_clip.load_checkpoint(model, config.pretrained)
    if config.pretrained is None and device.type != "meta":
        log.info("vision tower %s: encoders randomly initialised (no pretrained weights)", config.name)
    return model


class VisionAdapter:
    """Split view of an open_clip vision tower: penultimate tokens, and the head on top of them.

    A plain object, not a module: it only reads the open_clip model's weights, which stay registered
    (once) under the open_clip model, so state dicts and FSDP see each parameter once.
    """

    grid_size: tuple[int, int]
    width: int

    def penultimate(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def last_block_parameters(self):
        raise NotImplementedError


class OpenClipViTAdapter(VisionAdapter):
    """open_clip.transformer.VisionTransformer (one class token, learnable positional embedding)."""

    def __init__(self, visual: VisionTransformer):
        if visual.attn_pool is not None:
            raise NotImplementedError("attentional pooling towers are not supported")
        if not visual.transformer.batch_first:
            raise NotImplementedError("expected a batch-first open_clip transformer")
        self.visual = visual
        self.grid_size = tuple(visual.grid_size)
        self.width = visual.conv1.out_channels

    def _class_token(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        v = self.visual
        token = (v.class_embedding + v.positional_embedding[0]).to(dtype)
        return token.view(1, 1, -1).expand(batch, -1, -1)

    def penultimate(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(pixels).flatten(2).transpose(1, 2)  # [B, H*W, width]
        x = x + v.positional_embedding[1:].to(x.dtype)
        x = torch.cat([self._class_token(x.shape[0], x.dtype), x], dim=1)
        x = v.ln_pre(x)  # (patch dropout is skipped: the grid must stay whole)
        for block in v.transformer.resblocks[:-1]:
            x = block(x)
        return x[:, 1:]  # spatial tokens only: these are what gets quantized

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        v = self.visual
        # The class token entering the last block is the fresh (input-independent) class embedding,
        # not the continuous penultimate one: the image embedding is then a function of the codes only.
        prefix = v.ln_pre(self._class_token(tokens.shape[0], tokens.dtype))
        x = v.transformer.resblocks[-1](torch.cat([prefix, tokens], dim=1))
        if v.final_ln_after_pool:
            pooled = v.ln_post(self._pool(x))
        else:
            pooled = self._pool(v.ln_post(x))
        return pooled @ v.proj if v.proj is not None else pooled

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.visual.pool_type == "avg":
            return x[:, 1:].mean(dim=1)
        if self.visual.pool_type == "tok":
            return x[:, 0]
        raise NotImplementedError(f"pool_type {self.visual.pool_type!r}")

    def last_block_parameters(self):
        return self.visual.transformer.resblocks[-1].parameters()


class TimmViTAdapter(VisionAdapter):
    """open_clip.timm_model.TimmModel around a timm VisionTransformer (SigLIP: no prefix tokens, MAP head)."""

    def __init__(self, visual: TimmModel):
        trunk = visual.trunk
        if not hasattr(trunk, "blocks") or not hasattr(trunk, "patch_embed"):
            raise NotImplementedError(f"timm trunk {type(trunk).__name__} is not a ViT")
        if trunk.num_prefix_tokens != 0:
            raise NotImplementedError("timm trunks with class/register tokens are not supported")
        self.visual = visual
        self.grid_size = tuple(trunk.patch_embed.grid_size)
        self.width = trunk.embed_dim

    def penultimate(self, pixels: torch.Tensor) -> torch.Tensor:
        t = self.visual.trunk
        x = t.norm_pre(t._pos_embed(t.patch_embed(pixels)))  # no patch dropout: keep the grid whole
        for block in t.blocks[:-1]:
            x = block(x)
        return x

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.visual.trunk
        x = t.norm(t.blocks[-1](tokens))
        return self.visual.head(t.forward_head(x))

    def last_block_parameters(self):
        return self.visual.trunk.blocks[-1].parameters()


def vision_adapter(clip: nn.Module) -> VisionAdapter:
    if isinstance(clip.visual, VisionTransformer):
        return OpenClipViTAdapter(clip.visual)
    if isinstance(clip.visual, TimmModel):
        return TimmViTAdapter(clip.visual)
    raise NotImplementedError(f"unsupported open_clip vision tower {type(clip.visual).__name__}")


def text_modules(clip: nn.Module) -> list[nn.Module]:
    """The modules that make up the text tower of an open_clip model."""
    if hasattr(clip, "text"):  # CustomTextCLIP
        return [clip.text]
    return [clip.transformer, clip.token_embedding, clip.ln_final]


def text_parameters(clip: nn.Module) -> list[nn.Parameter]:
    if hasattr(clip, "text"):
        return list(clip.text.parameters())
    params = [p for m in text_modules(clip) for p in m.parameters()]
    params.append(clip.positional_embedding)
    if isinstance(clip.text_projection, nn.Parameter):
        params.append(clip.text_projection)
    elif clip.text_projection is not None:
        params.extend(clip.text_projection.parameters())
    return params


def build_tokenizer(config: VisionTowerConfig):
    """The text tokenizer: open_clip's bundled CLIP BPE for custom configs; an HF tokenizer from the
    local `config.tokenizer_path` for open_clip models that need one (SigLIP). Never downloads."""
    if not _is_open_clip_name(config.clip_model):
        return open_clip.tokenizer.SimpleTokenizer(context_length=config.context_length)
    text_cfg = open_clip.get_model_config(config.clip_model).get("text_cfg", {})
    if "hf_tokenizer_name" not in text_cfg:
        return open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
    if not config.tokenizer_path:
        raise RuntimeError(
            f"{config.clip_model} uses the HF tokenizer {text_cfg['hf_tokenizer_name']!r}, which needs a "
            "download; set VisionTowerConfig.tokenizer_path to a local copy of it"
        )
    return open_clip.tokenizer.HFTokenizer(
        config.tokenizer_path,
        context_length=text_cfg.get("context_length", config.context_length),
        **text_cfg.get("tokenizer_kwargs", {}),
    )


def image_mean_std(clip: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = open_clip.get_model_preprocess_cfg(clip)
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    return tuple(mean), tuple(std)
