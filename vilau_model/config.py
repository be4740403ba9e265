"""Model presets as dataclasses.

`tiny` runs in seconds on a CPU and is what tests and the embedded default use; `small` (tower and LM)
trains on one 24-80 GB GPU; `vilau-256`, `vilau-384` and `vilau-7b` carry the paper's shapes (DESIGN.md
section 4).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class VisionTowerConfig:
    """The unified vision tower: CLIP/SigLIP encoders (open_clip), residual quantizer, pixel decoder."""

    name: str
    # open_clip model name; a name not known to open_clip is built from the shapes below.
    clip_model: str
    image_size: int
    patch_size: int
    width: int  # vision encoder width == code dimension
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 32
    text_vocab_size: int = 49408
    embed_dim: int = 64
    # Initial contrastive temperature (logit scale) of randomly initialised encoders; pretrained ones
    # bring their own. A frozen random text tower maps captions to near-parallel embeddings (same-colour
    # prompts of the tiny tower have cosine ~0.9), so the softmax needs a sharper scale to see them apart.
    init_logit_scale: float = 10.0
    # Residual quantizer
    codebook_size: int = 16384
    code_depth: int = 4
    shared_codebook: bool = True
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    commitment_weight: float = 0.25
    dead_code_threshold: float = 1.0
    search_chunk_size: int = 4096
    # Pixel decoder
    decoder_channels: tuple[int, ...] = (64, 32)
    # Where the encoders' weights come from; None = random init. One of: an open_clip tag (with an open_clip
    # `clip_model` name), a local open_clip checkpoint file, a local open_clip directory (open_clip_config.json +
    # weights, what `hf-hub:` repos hold), or a transformers SigLIP directory (`SiglipModel.save_pretrained`).
    pretrained: str | None = None
    # Pixel normalization (RGB in [0, 1] -> (x - mean) / std). None = the checkpoint's own preprocessing
    # config (see encoders.resolve_normalization); the tower stores the values it used in its weights.
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    # Local HF tokenizer directory for open_clip models whose tokenizer needs the hub (SigLIP).
    tokenizer_path: str | None = None
    decoder_res_blocks: int = 1  # residual blocks per decoder stage ("rqvae": RQ-VAE's num_res_blocks, +1 per level)
    # Pixel decoder kind: "small" (decoder_channels, decoder_res_blocks per stage) or "rqvae" (RQ-VAE's capacity:
    # decoder_ch x decoder_ch_mult, attention at the lowest resolution, a 1x1 projection to decoder_z_channels).
    decoder: str = "small"
    decoder_ch: int = 128
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_z_channels: int = 256

    def __post_init__(self):
        if self.decoder not in ("small", "rqvae"):
            raise ValueError(f"decoder must be 'small' or 'rqvae', got {self.decoder!r}")
        # tuples also when the config comes back from JSON (exports), so configs compare equal
        for name in ("decoder_channels", "decoder_ch_mult", "image_mean", "image_std"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class LMConfig:
    """The unified LLM (transformers causal LM) plus projector and depth transformer."""

    name: str
    # Local path for from_pretrained (weights + tokenizer); None = random init from the shapes below.
    pretrained_path: str | None = None
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    vocab_size: int = 512  # text vocabulary before the visual markers are added
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5  # LLaMA-2's
    rope_theta: float = 10000.0
    # Attention over packed rows (see vilau_model.packed_attention): "sdpa_dense" (a [B,1,L,L] mask, any
    # device), "flex" (FlexAttention block mask, never [L,L]; GPU training: no CPU backward in torch 2.14)
    # or "flash_varlen" (flash-attn's varlen kernel; the `gpu` extra).
    attention: str = "sdpa_dense"
    # transformers backend of sdpa_dense: "sdpa" or "eager" ("flash_attention_2" = flash_varlen)
    attn_implementation: str = "sdpa"
    depth_layers: int = 2
    depth_heads: int = 4
    depth_hidden_size: int = 64
    # Depth-head logits (positions x D x codebook) computed at once in the loss; None = all (unbounded).
    depth_loss_chunk_logits: int | None = 2**25
    frames_per_video: int = 8
    max_images_per_doc: int = 6
    # RoPE scaling for training beyond the pretrained context (LLaMA-2: 4096) passed to transformers as
    # `rope_scaling={"rope_type": type, "factor": factor}`; None = no scaling.
    rope_scaling_type: str | None = None
    rope_scaling_factor: float = 1.0
    # Probability that a generation sample's prompt is emptied, so that the unconditional branch of
    # classifier-free guidance is trained (DESIGN.md 4: CFG at s = 3).
    caption_dropout: float = 0.1
    # Factor on the image loss of visual positions whose depth-0 code differs from the previous
    # position's (object edges, a block's first cell). Teacher forcing copies most cells from their
    # neighbour, so only these few depend on the prompt and their gradient is diluted by the rest; a
    # small model with a short stage 2 (tiny) needs them weighed up to learn to follow the prompt.
    # 1.0 = the paper's plain mean.
    visual_change_weight: float = 1.0
    cfg_scale: float = 3.0
    # Sampling temperature of image / video codes (generate_images' default).
    temperature: float = 1.0
    top_k: int = 900
    top_p: float = 0.96

    @property
    def rope_scaling(self) -> dict | None:
        if self.rope_scaling_type is None:
            return None
        return {"rope_type": self.rope_scaling_type, "factor": float(self.rope_scaling_factor)}


TOWER_PRESETS: dict[str, VisionTowerConfig] = {
    "tiny": VisionTowerConfig(
        name="tiny",
        clip_model="vilau-tiny",
        image_size=32,
        patch_size=4,
        width=64,
        layers=4,
        heads=4,
        codebook_size=256,
        code_depth=4,
        search_chunk_size=1024,
        # Stage 1 runs 150 steps: a fast EMA lets the codebook follow the encoder (0.99's 100-step time constant
        # lags it for most of the run). The shared book takes one update per depth, so per step it keeps
        # 0.9**4 ~ 0.66 of its statistics (a ~2.5-step time constant).
        ema_decay=0.9,
        init_logit_scale=30.0,
    ),
    # For trying the method on one 24-80 GB GPU before the paper scale: SigLIP-B/16 at 256 px, 16x16 grid,
    # D=4, 16384 codes (initialise it from the ViT-B-16-SigLIP-256 weights).
    "small": VisionTowerConfig(
        name="small",
        clip_model="ViT-B-16-SigLIP-256",
        image_size=256,
        patch_size=16,
        width=768,
        layers=12,
        heads=12,
        text_width=768,
        text_layers=12,
        text_heads=12,
        context_length=64,
        text_vocab_size=32000,
        embed_dim=768,
        codebook_size=16384,
        code_depth=4,
        decoder_channels=(256, 128, 64, 32),
    ),
    # SigLIP-L/16 at 256 px: 16x16 grid, D=4
    "vilau-256": VisionTowerConfig(
        name="vilau-256",
        clip_model="ViT-L-16-SigLIP-256",
        image_size=256,
        patch_size=16,
        width=1024,
        layers=24,
        heads=16,
        text_width=1024,
        text_layers=24,
        text_heads=16,
        context_length=64,
        text_vocab_size=32000,
        embed_dim=1024,
        codebook_size=16384,
        code_depth=4,
        # RQ-VAE's decoder (ch 128, ch_mult 1-1-2-2-4, num_res_blocks 2, attention at the lowest resolution)
        decoder="rqvae",
        decoder_res_blocks=2,
    ),
    # SigLIP-SO400M/14 at 384 px: 27x27 grid, D=16
    "vilau-384": VisionTowerConfig(
        name="vilau-384",
        clip_model="ViT-SO400M-14-SigLIP-384",
        image_size=384,
        patch_size=14,
        width=1152,
        layers=27,
        heads=16,
        mlp_ratio=3.7362,
        text_width=1152,
        text_layers=27,
        text_heads=16,
        context_length=64,
        text_vocab_size=32000,
        embed_dim=1152,
        codebook_size=16384,
        code_depth=16,
        # RQ-VAE's decoder (ch 128, ch_mult 1-1-2-2-4, num_res_blocks 2, attention at the lowest resolution)
        decoder="rqvae",
        decoder_res_blocks=2,
    ),
}

LM_PRESETS: dict[str, LMConfig] = {
    # The tiny stage 2 sees ~350 generation samples: without weighing up the prompt-dependent cells it
    # never follows the prompt, and its flat code distributions sampled at temperature 1 give noise (60
    # steps in the tiny mix at lr 6e-3: colour of generated images right ~0.27 -> ~0.8 with weight 20).
    "tiny": LMConfig(name="tiny", visual_change_weight=20.0, temperature=0.6),
    # A ~0.3B LLaMA-shaped LM (LLaMA-2's 32000-token vocabulary) to pair with the `small` tower on one GPU.
    "small": LMConfig(
        name="small",
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=20,
        num_heads=16,
        num_kv_heads=16,
        vocab_size=32000,
        max_position_embeddings=4096,
        depth_layers=2,
        depth_heads=8,
        depth_hidden_size=512,
    ),
    # LLaMA-2-7B shapes
    "vilau-7b": LMConfig(
        name="vilau-7b",
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        vocab_size=32000,
        max_position_embeddings=8192,
        depth_layers=3,
        depth_heads=16,
        depth_hidden_size=1024,
    ),
}


# Presets at the paper's scale: they are meant to start from pretrained weights (the tower does not converge
# from scratch), so the run configuration refuses them without weights unless told otherwise.
PAPER_TOWER_PRESETS = frozenset({"vilau-256", "vilau-384"})
PAPER_LM_PRESETS = frozenset({"vilau-7b"})


def get_tower_config(name: str, **overrides) -> VisionTowerConfig:
    if name not in TOWER_PRESETS:
        raise ValueError(f"unknown vision tower preset {name!r}; known: {sorted(TOWER_PRESETS)}")
    return dataclasses.replace(TOWER_PRESETS[name], **overrides)


def get_lm_config(name: str, **overrides) -> LMConfig:
    if name not in LM_PRESETS:
        raise ValueError(f"unknown LM preset {name!r}; known: {sorted(LM_PRESETS)}")
    return dataclasses.replace(LM_PRESETS[name], **overrides)
