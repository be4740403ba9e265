"""The CLIP/SigLIP encoders of the vision tower, built with open_clip.

VILA-U quantizes the output of the vision encoder's penultimate block and sends the quantized tokens
through the last block and the pooling head to get the contrastive image embedding, so contrastive
learning shapes the discrete tokens. open_clip has no such split, so the adapters below expose it:

    penultimate(pixels) -> [B, H*W, width]   spatial tokens after all blocks but the last
    head(tokens)        -> [B, embed_dim]    last block + norm + pool + projection

for open_clip's own VisionTransformer (custom/CLIP configs), for the timm trunk open_clip uses for
SigLIP (ViT-L-16-SigLIP-256, ViT-SO400M-14-SigLIP-384), and for transformers' SigLIP (google/siglip-*).

Where the weights come from (`ClipSource`, resolved from `VisionTowerConfig.clip_model` / `.pretrained`):

    open_clip          an open_clip model name, `pretrained` = open_clip tag or local checkpoint file
    open_clip_config   a local open_clip directory (open_clip_config.json + weights: what `hf-hub:` repos
                       hold), given as `pretrained` or as `clip_model = "local-dir:PATH"`; or `hf-hub:ID`
    siglip_hf          a transformers SigLIP directory (`SiglipModel.save_pretrained`) as `pretrained`
    custom             any other name: a small CLIP built from the config's shapes

The pixel normalization comes with the checkpoint (`checkpoint_normalization`): the preprocess config of
the open_clip tag or directory (or the open_clip_config.json beside a checkpoint file, else the one every
published tag of that architecture agrees on), or the SigLIP image processor's config.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer

from vilau_model.config import VisionTowerConfig

log = logging.getLogger(__name__)


OPEN_CLIP_CONFIG = "open_clip_config.json"
SIGLIP_CONFIG_PREFIX = "siglip-config:"  # clip_model = "siglip-config:DIR": a transformers SigLIP of DIR/config.json
SIGLIP_DEFAULT_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # transformers' SiglipImageProcessor defaults


def _is_open_clip_name(name: str) -> bool:
    return name in open_clip.list_models()


@dataclass(frozen=True)
class ClipSource:
    """Which architecture to build and where its weights are (None: build without weights).

    `model_cfg` is the architecture itself for directory sources (open_clip's model_cfg, or the
    transformers SiglipConfig as a dict): the tower export stores it, so an export loads anywhere, even
    where the pretrained directory is absent.
    """

    kind: str  # "open_clip" | "open_clip_config" | "siglip_hf" | "custom"
    name: str
    weights: str | None = None  # open_clip tag, checkpoint file, or directory
    model_cfg: dict | None = None
    preprocess: dict | None = None  # the checkpoint's own {"mean": ..., "std": ...} when it has one

    def without_weights(self) -> "ClipSource":
        return ClipSource(self.kind, self.name, None, self.model_cfg, self.preprocess)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "name": self.name, "model_cfg": self.model_cfg, "preprocess": self.preprocess})

    @classmethod
    def from_json(cls, text: str) -> "ClipSource":
        d = json.loads(text)
        return cls(d["kind"], d["name"], None, d.get("model_cfg"), d.get("preprocess"))


def _read_json(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _mean_std(cfg: dict | None, mean_key: str = "mean", std_key: str = "std") -> dict | None:
    if cfg and cfg.get(mean_key) is not None and cfg.get(std_key) is not None:
        return {"mean": [float(v) for v in cfg[mean_key]], "std": [float(v) for v in cfg[std_key]]}
    return None


def _is_siglip_hf_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and _read_json(config).get("model_type") == "siglip"


def _open_clip_tag_preprocess(name: str, weights: str | None) -> dict | None:
    """A tag's preprocess config; for a checkpoint file (or no weights), the one all of the architecture's
    published tags agree on (SigLIP: 0.5 / 0.5), or None."""
    if weights and not os.path.exists(weights):
        return _mean_std(open_clip.get_pretrained_cfg(name, weights))
    found = {json.dumps(_mean_std(open_clip.get_pretrained_cfg(name, tag))) for tag in open_clip.list_pretrained_tags_by_model(name)}
    found.discard("null")
    return json.loads(found.pop()) if len(found) == 1 else None


def clip_source(config: VisionTowerConfig) -> ClipSource:
    """Resolve the config's `clip_model` / `pretrained` into a `ClipSource` (reads only small JSON files)."""
    name, weights = config.clip_model, config.pretrained
    if name.startswith("local-dir:"):
        weights = name[len("local-dir:"):]
        if not os.path.isfile(os.path.join(weights, OPEN_CLIP_CONFIG)):
            raise FileNotFoundError(f"clip_model={name!r}: no {OPEN_CLIP_CONFIG} in that directory")
    elif name.startswith(SIGLIP_CONFIG_PREFIX):
        # a transformers SigLIP architecture from a directory's config.json; weights (if any) from `pretrained`
        # (an imported VILA-U release keeps its tower weights in the tower export, not here)
        directory = Path(name[len(SIGLIP_CONFIG_PREFIX):])
        if not _is_siglip_hf_dir(directory):
            raise FileNotFoundError(f"clip_model={name!r}: no SigLIP config.json (model_type 'siglip') in that directory")
        processor = directory / "preprocessor_config.json"
        preprocess = _mean_std(_read_json(processor), "image_mean", "image_std") if processor.is_file() else None
        return ClipSource("siglip_hf", name, weights if weights and os.path.isdir(weights) else None,
                          _read_json(directory / "config.json"),
                          preprocess or _mean_std({"mean": SIGLIP_DEFAULT_MEAN_STD[0], "std": SIGLIP_DEFAULT_MEAN_STD[1]}))
    elif name.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config

        hf = _get_hf_config(name[len("hf-hub:"):])
        return ClipSource("open_clip_config", config.clip_model, config.clip_model, hf["model_cfg"],
                          _mean_std(hf.get("preprocess_cfg")))
    if weights and os.path.isdir(weights):
        directory = Path(weights)
        if (directory / OPEN_CLIP_CONFIG).is_file():
            cfg = _read_json(directory / OPEN_CLIP_CONFIG)
            if "model_cfg" not in cfg:
                raise ValueError(f"{directory / OPEN_CLIP_CONFIG}: no 'model_cfg'")
            return ClipSource("open_clip_config", name, str(directory), cfg["model_cfg"], _mean_std(cfg.get("preprocess_cfg")))
        if _is_siglip_hf_dir(directory):
            processor = directory / "preprocessor_config.json"
            preprocess = _mean_std(_read_json(processor), "image_mean", "image_std") if processor.is_file() else None
            model_cfg = _read_json(directory / "config.json")
            return ClipSource("siglip_hf", name, str(directory), model_cfg,
                              preprocess or _mean_std({"mean": SIGLIP_DEFAULT_MEAN_STD[0], "std": SIGLIP_DEFAULT_MEAN_STD[1]}))
        raise ValueError(
            f"pretrained={weights!r}: a directory must hold an open_clip model ({OPEN_CLIP_CONFIG} + weights) or a "
            "transformers SigLIP model (config.json with model_type 'siglip')"
        )
    # A checkpoint file carries no preprocessing; an open_clip_config.json beside it (hf-hub layout) does.
    beside = Path(weights).parent / OPEN_CLIP_CONFIG if weights and os.path.isfile(weights) else None
    preprocess = _mean_std(_read_json(beside).get("preprocess_cfg")) if beside is not None and beside.is_file() else None
    if _is_open_clip_name(name):
        return ClipSource("open_clip", name, weights, None, preprocess or _open_clip_tag_preprocess(name, weights))
    if weights and not os.path.exists(weights):
        raise FileNotFoundError(f"pretrained={weights!r}: a custom model ({name!r}) only loads a local checkpoint path")
    return ClipSource("custom", name, weights, None, preprocess)


def checkpoint_normalization(config: VisionTowerConfig, source: ClipSource | None = None):
    """(mean, std, where from) of the pixel normalization: the config's explicit values, else the
    checkpoint's own preprocessing config, else OpenAI CLIP's statistics (with a warning for SigLIP)."""
    if (config.image_mean is None) != (config.image_std is None):
        raise ValueError("image_mean and image_std are set together")
    if config.image_mean is not None:
        return tuple(config.image_mean), tuple(config.image_std), "config"
    source = source or clip_source(config)
    if source.preprocess is not None:
        return tuple(source.preprocess["mean"]), tuple(source.preprocess["std"]), f"checkpoint ({source.kind})"
    if "siglip" in f"{config.clip_model} {config.pretrained}".lower():
        log.warning(
            "vision tower %s: no preprocessing config found for %s / %s; using OpenAI CLIP's normalization. "
            "SigLIP checkpoints expect mean = std = 0.5: set image_mean / image_std explicitly",
            config.name, config.clip_model, config.pretrained,
        )
    return tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD), "default (OpenAI CLIP)"


def build_clip(config: VisionTowerConfig, source: ClipSource | None = None) -> nn.Module:
    """The CLIP/SigLIP model for the config: an open_clip model, or a transformers SigLIP behind the same
    interface (`SiglipCLIP`).

    `source` defaults to `clip_source(config)`; a source without weights builds the architecture only.
    Respects an enclosing `with torch.device("meta")`: paper presets build without weights.
    """
    source = source or clip_source(config)
    device = torch.get_default_device()
    weights = source.weights if device.type != "meta" else None
    if source.kind == "siglip_hf":
        model = SiglipCLIP.build(source.model_cfg, weights)
    elif source.kind == "open_clip_config":
        model = _open_clip_from_cfg(source.model_cfg, weights, device)
    elif source.kind == "open_clip":
        model = open_clip.create_model(source.name, pretrained=weights, device=device)
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
        # Logit scale from the config (SigLIP's t = log 10 by default), SigLIP's bias b = -10; the softmax
        # loss ignores the bias.
        model = open_clip.model.CLIP(
            embed_dim=config.embed_dim,
            vision_cfg=vision_cfg,
            text_cfg=text_cfg,
            init_logit_scale=math.log(config.init_logit_scale),
            init_logit_bias=-10.0,
        )
        if weights:
            open_clip.load_checkpoint(model, weights)
    if source.weights is None and device.type != "meta":
        log.info("vision tower %s: encoders randomly initialised (no pretrained weights)", config.name)
    return model


def _open_clip_from_cfg(model_cfg: dict, weights: str | None, device: torch.device) -> nn.Module:
    """An open_clip model from an explicit model_cfg (a local or hf-hub directory's), weights optional."""
    import copy

    cfg = copy.deepcopy(model_cfg)
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    cfg.pop("multimodal_cfg", None)
    model = (open_clip.model.CustomTextCLIP if custom_text else open_clip.model.CLIP)(**cfg)
    model.to(device)
    if weights:
        if os.path.isdir(weights):
            from open_clip.factory import _find_checkpoint_in_dir

            found = _find_checkpoint_in_dir(Path(weights))
            if found is None:
                raise FileNotFoundError(f"{weights}: no open_clip weights (open_clip_model.safetensors / .bin) inside")
            weights = str(found)
        elif weights.startswith("hf-hub:"):
            from open_clip.pretrained import download_pretrained_from_hf

            weights = download_pretrained_from_hf(weights[len("hf-hub:"):])
        open_clip.load_checkpoint(model, weights)
    return model


class SiglipCLIP(nn.Module):
    """A transformers `SiglipModel` behind the parts of open_clip's CLIP interface the tower uses:
    `visual`, `encode_text`, `logit_scale`, `logit_bias`. Its weights stay under `model.` once."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @classmethod
    def build(cls, config_dict: dict, weights: str | None) -> "SiglipCLIP":
        from transformers import SiglipConfig, SiglipModel

        if weights:
            return cls(SiglipModel.from_pretrained(weights, local_files_only=True))
        return cls(SiglipModel(SiglipConfig.from_dict({k: v for k, v in config_dict.items() if k != "transformers_version"})))

    @property
    def visual(self) -> nn.Module:
        return self.model.vision_model

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter:
        return self.model.logit_bias

    @property
    def text(self) -> nn.Module:
        return self.model.text_model

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=tokens)


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


class SiglipHFAdapter(VisionAdapter):
    """transformers SiglipVisionTransformer: no class token, attention-pooling (MAP) head."""

    def __init__(self, visual: nn.Module):
        self.visual = visual
        grid = visual.config.image_size // visual.config.patch_size
        self.grid_size = (grid, grid)
        self.width = visual.config.hidden_size

    def penultimate(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.visual.embeddings(pixels)
        for layer in self.visual.encoder.layers[:-1]:
            x = layer(x, None)
        return x

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.post_layernorm(v.encoder.layers[-1](tokens, None))
        return v.head(x) if v.use_head else x.mean(dim=1)

    def last_block_parameters(self):
        return self.visual.encoder.layers[-1].parameters()


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
    if isinstance(clip, SiglipCLIP):
        return SiglipHFAdapter(clip.visual)
    raise NotImplementedError(f"unsupported open_clip vision tower {type(clip.visual).__name__}")


def block_lists(clip: nn.Module) -> list[nn.ModuleList]:
    """The transformer block lists of the vision and text towers (FSDP units, activation checkpointing)."""
    if isinstance(clip, SiglipCLIP):
        return [clip.visual.encoder.layers, clip.text.encoder.layers]
    visual, lists = clip.visual, []
    lists.append(visual.transformer.resblocks if hasattr(visual, "transformer") else visual.trunk.blocks)
    text = getattr(clip, "transformer", None) or getattr(getattr(clip, "text", None), "transformer", None)
    if text is not None and hasattr(text, "resblocks"):
        lists.append(text.resblocks)
    return lists


def text_modules(clip: nn.Module) -> list[nn.Module]:
    """The modules that make up the text tower of an open_clip model."""
    if hasattr(clip, "text"):  # CustomTextCLIP, SiglipCLIP
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


def build_tokenizer(config: VisionTowerConfig, source: ClipSource | None = None):
    """The text tokenizer: open_clip's bundled CLIP BPE for custom configs; an HF tokenizer from the
    local `config.tokenizer_path` (or the SigLIP directory's own) for models that need one. Never downloads."""
    source = source or clip_source(config)
    if source.kind == "siglip_hf":
        path = config.tokenizer_path or source.weights
        if not path:
            raise RuntimeError(f"{config.name}: a transformers SigLIP tower needs tokenizer_path (or its own directory)")
        context = source.model_cfg.get("text_config", {}).get("max_position_embeddings", config.context_length)
        return open_clip.tokenizer.HFTokenizer(path, context_length=context, clean="canonicalize")
    if source.kind == "custom":
        return open_clip.tokenizer.SimpleTokenizer(context_length=config.context_length)
    model_cfg = source.model_cfg if source.kind == "open_clip_config" else open_clip.get_model_config(config.clip_model)
    text_cfg = model_cfg.get("text_cfg", {})
    if "hf_tokenizer_name" not in text_cfg:
        return open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
    path = config.tokenizer_path
    if path is None and source.kind == "open_clip_config" and source.weights and os.path.isdir(source.weights):
        path = source.weights  # a local open_clip directory may hold its tokenizer files
    if not path:
        raise RuntimeError(
            f"{config.clip_model} uses the HF tokenizer {text_cfg['hf_tokenizer_name']!r}, which needs a "
            "download; set VisionTowerConfig.tokenizer_path to a local copy of it"
        )
    return open_clip.tokenizer.HFTokenizer(
        path,
        context_length=text_cfg.get("context_length", config.context_length),
        **text_cfg.get("tokenizer_kwargs", {}),
    )


