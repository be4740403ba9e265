"""The released VILA-U checkpoints (mit-han-lab `vila-u-7b-256`, `vila-u-7b-384`) <-> this project's model.

A released directory (what the reference's `VILAUMetaModel.save_pretrained` writes):

    config.json                  top level: model_type "vila_u_llama", llm_cfg / vision_tower_cfg /
                                 mm_projector_cfg (the three sub-configs), mm_hidden_size, hidden_size,
                                 mm_use_im_start_end, mm_use_vi_start_end, num_video_frames, model_dtype, ...
    llm/                         a transformers LLaMA (config.json, weights, tokenizer with the added markers)
    vision_tower/                RQVAESIGLIPTransformer: config.json {rqvaesiglip: {...}, rqtransformer: {...},
                                 hidden_size}, weights, preprocessor_config.json
    mm_projector/                config.json {mm_projector_type: "mlp2x_gelu"}, weights (layers.0, layers.2)

`vision_tower` holds two models: `rqvaesiglip` (a transformers SigLIP under `siglip_model`, the RQ bottleneck
under `quantizer`, `post_quant_conv` and the VQGAN `decoder`) = this project's `UnifiedVisionTower`, and
`rqtransformer` (the depth transformer) = `UnifiedLM.depth`. The SigLIP architecture is not in the file: the
reference reads it from `rqvaesiglip.pretrained_model` (a hub name), so `siglip_config` resolves a local
directory of that name or a table of the two SigLIPs the releases use.

`ReleasedStateAdapter` maps state dicts in both directions (torchtitan's state-dict-adapter idea):

    released name                                        this project
    rqvaesiglip.siglip_model.<n>                         tower  clip.model.<n>
    rqvaesiglip.logit_scale / logit_bias                 (aliases of siglip_model's; checked equal)
    rqvaesiglip.quantizer.codebooks.<i>.weight [K+1, C]  tower  quantizer.embed[i] [K, C]   (+ padding row)
    rqvaesiglip.quantizer.codebooks.<i>.cluster_size_ema tower  quantizer.ema_count[i]
    rqvaesiglip.quantizer.codebooks.<i>.embed_ema        tower  quantizer.ema_sum[i]
    rqvaesiglip.post_quant_conv.<n>                      tower  decoder.post_quant_conv.<n>
    rqvaesiglip.decoder.<n>                              tower  decoder.<n>          (decoder="rqvae")
    rqtransformer.in_mlp_1 / in_mlp_2                    heads  depth.proj_c / depth.proj_h
    rqtransformer.pos_emb_d [1, D, H]                    heads  depth.pos [D, H]
    rqtransformer.head_transformer.blocks.<i>.ln1/ln2    heads  depth.blocks.<i>.ln_1/ln_2
    ....attn.query/key/value (3 linears)                 heads  depth.blocks.<i>.qkv (one linear, q|k|v rows)
    ....attn.proj, mlp.0, mlp.2                          heads  depth.blocks.<i>.proj, mlp.0, mlp.2
    rqtransformer.classifier_mlp.layer_norm / linear     heads  depth.ln_f / depth.head
    mm_projector layers.0 / layers.2                     heads  projector.0 / projector.2
    llm/*                                                the export's llm/ (same transformers layout)

Tensors without a counterpart are never dropped silently: the codebooks' padding rows (`nn.Embedding`'s
padding_idx row, never looked up) come back as `extras` (the importer keeps them beside the export and the
exporter writes them back); any other unknown tensor raises `UnmappedTensors` naming it. In the other
direction, the tower's discriminator (no counterpart in the release) and the pixel normalization buffers
(the release keeps them in preprocessor_config.json) are reported in `notes`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field

import torch

from vilau_model.config import LMConfig, VisionTowerConfig

SIGLIP = "rqvaesiglip.siglip_model."
QUANT = "rqvaesiglip.quantizer.codebooks."
RQT = "rqtransformer."
LOGIT_ALIASES = ("rqvaesiglip.logit_scale", "rqvaesiglip.logit_bias")

# The two SigLIPs the releases name in `rqvaesiglip.pretrained_model` (their hub config.json values), for
# when no local directory of that name exists. Shapes are checked against the weights on import; the head
# count is the one value the weights cannot confirm.
KNOWN_SIGLIP = {
    "google/siglip-large-patch16-256": {
        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "image_size": 256, "patch_size": 16},
        "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                        "num_attention_heads": 16, "vocab_size": 32000, "max_position_embeddings": 64},
    },
    "google/siglip-so400m-patch14-384": {
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                          "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
        "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                        "num_attention_heads": 16, "vocab_size": 32000, "max_position_embeddings": 64},
    },
}


class UnmappedTensors(ValueError):
    """Tensors of one side that have no counterpart on the other (named in the message)."""


class ReleasedConfigError(ValueError):
    """A released config value this project's model cannot represent (named in the message)."""


# ---------------------------------------------------------------- the conversation template


@dataclass(frozen=True)
class ConversationTemplate:
    """A two-separator chat template (the reference's `vicuna_v1`, SeparatorStyle.TWO):

        system + sep + ROLE0: user + sep + ROLE1: assistant + sep2 ...   (an empty turn: "ROLE:" alone)

    The released model generates images from `prompt(text)` followed by " <im_start>", and its
    unconditional (classifier-free guidance) input is `prompt("")`: the template with an empty user turn."""

    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str

    def prompt(self, user: str) -> str:
        """The text before the assistant's answer: system, the user turn, the assistant role."""
        text = self.system + self.sep
        user = user.strip()
        text += f"{self.roles[0]}: {user}{self.sep}" if user else f"{self.roles[0]}:"
        return text + f"{self.roles[1]}:"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ConversationTemplate":
        return cls(d["name"], d["system"], tuple(d["roles"]), d["sep"], d["sep2"])


VICUNA_V1 = ConversationTemplate(
    name="vicuna_v1",
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2="</s>",
)


def template_prompt_ids(tokenizer, template: ConversationTemplate, text: str, start_marker: str) -> list[int]:
    """BOS + the template's prompt for `text` tokenized as the reference does (`prompt + " <im_start>"` in
    one string), without the trailing start marker, which the generator appends."""
    ids = tokenizer(template.prompt(text) + " " + start_marker, add_special_tokens=False).input_ids
    marker = tokenizer.convert_tokens_to_ids(start_marker)
    if not ids or ids[-1] != marker:
        raise ValueError(f"the tokenizer did not keep {start_marker!r} as one token at the prompt's end")
    return [tokenizer.bos_token_id] + ids[:-1]


# ---------------------------------------------------------------- configs


@dataclass
class ReleasedConfigs:
    """The config.json files of a released directory (plus the SigLIP architecture they name)."""

    top: dict
    vision_tower: dict
    mm_projector: dict
    llm: dict
    siglip: dict  # a transformers SiglipConfig as a dict
    preprocessor: dict | None = None

    @property
    def rqvaesiglip(self) -> dict:
        return self.vision_tower["rqvaesiglip"]

    @property
    def rqtransformer(self) -> dict:
        return self.vision_tower["rqtransformer"]


def siglip_config(pretrained_model: str, search_dirs: tuple[str, ...] = ()) -> dict:
    """The SigLIP architecture `rqvaesiglip.pretrained_model` names: a local transformers SigLIP directory
    (absolute, or relative to one of `search_dirs`), else the table of the released ones."""
    candidates = [pretrained_model] + [os.path.join(d, pretrained_model) for d in search_dirs]
    for path in candidates:
        config = os.path.join(path, "config.json")
        if os.path.isfile(config):
            with open(config) as f:
                cfg = json.load(f)
            if cfg.get("model_type") != "siglip":
                raise ReleasedConfigError(f"{config}: model_type {cfg.get('model_type')!r}, expected 'siglip'")
            return cfg
    if pretrained_model in KNOWN_SIGLIP:
        known = KNOWN_SIGLIP[pretrained_model]
        return {"model_type": "siglip", "text_config": dict(known["text_config"]),
                "vision_config": dict(known["vision_config"])}
    raise ReleasedConfigError(
        f"rqvaesiglip.pretrained_model={pretrained_model!r}: no local SigLIP directory of that name and not one "
        f"of the known releases {sorted(KNOWN_SIGLIP)}; put its config.json in such a directory")


def _require(cond: bool, field_name: str, value, why: str) -> None:
    if not cond:
        raise ReleasedConfigError(f"{field_name}={value!r}: {why}")


def tower_config_from_released(cfgs: ReleasedConfigs, name: str = "vila-u") -> VisionTowerConfig:
    """The `VisionTowerConfig` of a released `rqvaesiglip` (+ its SigLIP and preprocessing)."""
    rq, dd = cfgs.rqvaesiglip, cfgs.rqvaesiglip["ddconfig"]
    vision, text = cfgs.siglip["vision_config"], cfgs.siglip["text_config"]
    width, image_size, patch = vision["hidden_size"], vision["image_size"], vision["patch_size"]
    grid = image_size // patch
    latent, code = list(rq["latent_shape"]), list(rq["code_shape"])
    _require(latent == [grid, grid, width], "rqvaesiglip.latent_shape", latent,
             f"expected [{grid}, {grid}, {width}] (the SigLIP grid and width)")
    _require(code[:2] == latent[:2], "rqvaesiglip.code_shape", code,
             "only one code stack per grid cell is supported (code_shape[:2] == latent_shape[:2])")
    _require(rq.get("embed_dim", width) == width, "rqvaesiglip.embed_dim", rq.get("embed_dim"), f"expected {width}")
    n_embed, decay = rq["n_embed"], rq.get("decay", 0.99)
    _require(isinstance(n_embed, int), "rqvaesiglip.n_embed", n_embed, "per-depth codebook sizes are not supported")
    _require(isinstance(decay, (int, float)), "rqvaesiglip.decay", decay, "per-depth decays are not supported")
    ch_mult = tuple(dd["ch_mult"])
    levels = len(ch_mult)
    lowest = dd["resolution"] // 2 ** (levels - 1)
    _require(dd["resolution"] == image_size, "ddconfig.resolution", dd["resolution"], f"expected the image size {image_size}")
    _require(dd.get("out_ch", 3) == 3, "ddconfig.out_ch", dd.get("out_ch"), "RGB output only")
    _require(list(dd.get("attn_resolutions", [])) == [lowest], "ddconfig.attn_resolutions", dd.get("attn_resolutions"),
             f"this project's decoder has attention at the lowest resolution only ([{lowest}])")
    _require(all((dd["ch"] * m) % 32 == 0 for m in ch_mult), "ddconfig.ch", dd["ch"],
             "channel counts must be multiples of 32 (the GroupNorm's 32 groups)")
    if rq.get("decoder_latent_shape") is not None:
        _require(list(rq["decoder_latent_shape"])[:2] == [lowest, lowest], "rqvaesiglip.decoder_latent_shape",
                 rq["decoder_latent_shape"], f"expected [{lowest}, {lowest}] (resolution / 2**(levels-1))")
    else:
        _require(grid == lowest, "rqvaesiglip.decoder_latent_shape", None,
                 f"the {grid}x{grid} grid is resized to {lowest}x{lowest} by this project's decoder; the release "
                 "without decoder_latent_shape does not resize")
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the reference's image processor for both releases
    if cfgs.preprocessor and cfgs.preprocessor.get("image_mean") is not None:
        mean, std = tuple(cfgs.preprocessor["image_mean"]), tuple(cfgs.preprocessor["image_std"])
    return VisionTowerConfig(
        name=name,
        clip_model=rq.get("pretrained_model", "siglip"),
        image_size=image_size,
        patch_size=patch,
        width=width,
        layers=vision["num_hidden_layers"],
        heads=vision["num_attention_heads"],
        mlp_ratio=vision["intermediate_size"] / width,
        text_width=text["hidden_size"],
        text_layers=text["num_hidden_layers"],
        text_heads=text["num_attention_heads"],
        context_length=text.get("max_position_embeddings", 64),
        text_vocab_size=text.get("vocab_size", 32000),
        embed_dim=text["hidden_size"],
        codebook_size=n_embed,
        code_depth=code[2],
        shared_codebook=bool(rq["shared_codebook"]),
        ema_decay=float(decay),
        commitment_weight=float(rq.get("latent_loss_weight", 0.25)),
        # the reference restarts codes whose EMA count is below 1; without restarts none is ever below 0
        dead_code_threshold=1.0 if rq.get("restart_unused_codes", True) else 0.0,
        image_mean=mean,
        image_std=std,
        decoder="rqvae",
        decoder_ch=dd["ch"],
        decoder_ch_mult=ch_mult,
        decoder_res_blocks=dd["num_res_blocks"],
        decoder_z_channels=dd["z_channels"],
    )


def lm_config_from_released(cfgs: ReleasedConfigs, tower: VisionTowerConfig, base: LMConfig | None = None) -> LMConfig:
    """The `LMConfig` of a released LLM + rqtransformer; training settings (caption dropout, loss weights)
    come from `base` (default: LMConfig's), sampling settings from the reference (CFG 3, top-k 900, top-p 0.96)."""
    llm, rqt = cfgs.llm, cfgs.rqtransformer
    _require(cfgs.mm_projector.get("mm_projector_type") == "mlp2x_gelu", "mm_projector.mm_projector_type",
             cfgs.mm_projector.get("mm_projector_type"), "this project's projector is mlp2x_gelu")
    _require(llm.get("model_type") == "llama", "llm.model_type", llm.get("model_type"), "a LLaMA LLM is expected")
    _require(rqt["input_embed_dim_1"] == tower.width, "rqtransformer.input_embed_dim_1", rqt["input_embed_dim_1"],
             f"expected the code width {tower.width}")
    _require(rqt["input_embed_dim_2"] == llm["hidden_size"], "rqtransformer.input_embed_dim_2",
             rqt["input_embed_dim_2"], f"expected the LLM width {llm['hidden_size']}")
    _require(rqt["vocab_size"] == tower.codebook_size, "rqtransformer.vocab_size", rqt["vocab_size"],
             f"expected the codebook size {tower.codebook_size}")
    _require(list(rqt["block_size"])[2] == tower.code_depth, "rqtransformer.block_size", rqt["block_size"],
             f"expected depth {tower.code_depth} last")
    rope = llm.get("rope_scaling") or None
    base = base or LMConfig(name="vila-u")
    return dataclasses.replace(
        base,
        name=base.name,
        pretrained_path=None,
        hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"],
        num_layers=llm["num_hidden_layers"],
        num_heads=llm["num_attention_heads"],
        num_kv_heads=llm.get("num_key_value_heads") or llm["num_attention_heads"],
        # the text vocabulary before the four visual markers (the release's last four tokens)
        vocab_size=llm["vocab_size"] - 4,
        max_position_embeddings=llm["max_position_embeddings"],
        rms_norm_eps=llm.get("rms_norm_eps", 1e-5),
        rope_theta=llm.get("rope_theta", 10000.0),
        rope_scaling_type=(rope.get("rope_type") or rope.get("type")) if rope else None,
        rope_scaling_factor=float(rope["factor"]) if rope else 1.0,
        depth_layers=rqt["head"]["n_layer"],
        depth_heads=rqt["head"]["block"]["n_head"],
        depth_hidden_size=rqt["embed_dim"],
        frames_per_video=int(cfgs.top.get("num_video_frames") or base.frames_per_video),
        cfg_scale=3.0,
        temperature=1.0,
        top_k=900,
        top_p=0.96,
    )


def released_sub_configs(tower: VisionTowerConfig, siglip: dict, lm: LMConfig, llm_hidden: int,
                         previous: dict | None = None) -> dict[str, dict]:
    """config.json of `vision_tower/` and `mm_projector/` for this project's tower + LM (`previous`: the
    imported release's, whose other fields are kept)."""
    _require(tower.decoder == "rqvae", "tower.decoder", tower.decoder,
             "the release's decoder is RQ-VAE's; a tower with the small decoder has no released layout")
    grid = tower.grid_size
    lowest = tower.image_size // 2 ** (len(tower.decoder_ch_mult) - 1)
    prev_vt = (previous or {}).get("vision_tower", {})
    prev_rq = dict(prev_vt.get("rqvaesiglip") or {})
    prev_dd = dict(prev_rq.get("ddconfig") or {})
    rq = {
        **prev_rq,
        "embed_dim": tower.width,
        "n_embed": tower.codebook_size,
        "latent_shape": [grid, grid, tower.width],
        "code_shape": [grid, grid, tower.code_depth],
        "shared_codebook": tower.shared_codebook,
        "restart_unused_codes": tower.dead_code_threshold > 0,
        "decay": tower.ema_decay,
        "latent_loss_weight": tower.commitment_weight,
        "decoder_latent_shape": None if grid == lowest else [lowest, lowest],
        # a SigLIP name or a local directory with its config.json (what the reference's from_pretrained reads)
        "pretrained_model": prev_rq.get("pretrained_model", tower.clip_model.removeprefix("siglip-config:")),
        "ddconfig": {**prev_dd, "double_z": prev_dd.get("double_z", False), "z_channels": tower.decoder_z_channels,
                     "resolution": tower.image_size, "in_channels": 3, "out_ch": 3, "ch": tower.decoder_ch,
                     "ch_mult": list(tower.decoder_ch_mult), "num_res_blocks": tower.decoder_res_blocks,
                     "attn_resolutions": [lowest], "dropout": prev_dd.get("dropout", 0.0)},
        "architectures": ["RQVAESiglipModel"],
        "model_type": "rqvaesiglip_model",
    }
    prev_rqt = dict(prev_vt.get("rqtransformer") or {})
    rqt = {
        **prev_rqt,
        "block_size": [grid, grid, tower.code_depth],
        "input_embed_dim_1": tower.width,
        "input_embed_dim_2": llm_hidden,
        "embed_dim": lm.depth_hidden_size,
        "vocab_size": tower.codebook_size,
        "head": {"block": {"n_head": lm.depth_heads}, "n_layer": lm.depth_layers},
        "architectures": ["RQTransformer"],
        "model_type": "rqtransformer_model",
    }
    vision_tower = {**prev_vt, "rqvaesiglip": rq, "rqtransformer": rqt, "hidden_size": tower.width,
                    "architectures": ["RQVAESIGLIPTransformer"], "model_type": "rqvaesigliptransformer_model"}
    mm_projector = {**(previous or {}).get("mm_projector", {}), "mm_projector_type": "mlp2x_gelu",
                    "architectures": ["MultimodalProjector"], "model_type": "v2l_projector"}
    return {"vision_tower": vision_tower, "mm_projector": mm_projector}


def released_top_config(sub: dict[str, dict], llm_config: dict, tower: VisionTowerConfig, lm: LMConfig,
                        previous: dict | None = None, dtype: str = "torch.bfloat16") -> dict:
    """The top-level config.json (the reference's VILAUConfig) around the three sub-configs."""
    top = dict(previous or {})
    top.update({
        "architectures": ["VILAULlamaModel"],
        "model_type": "vila_u_llama",
        "llm_cfg": llm_config,
        "vision_tower_cfg": sub["vision_tower"],
        "mm_projector_cfg": sub["mm_projector"],
        "hidden_size": llm_config["hidden_size"],
        "mm_hidden_size": tower.width,
        "mm_use_im_start_end": True,
        "mm_use_vi_start_end": True,
        "mm_use_im_patch_token": top.get("mm_use_im_patch_token", False),
        "image_aspect_ratio": top.get("image_aspect_ratio", "resize"),
        "num_video_frames": lm.frames_per_video,
        "model_dtype": top.get("model_dtype", dtype),
        "resume_path": top.get("resume_path"),
    })
    return top


# ---------------------------------------------------------------- state dicts


@dataclass
class Imported:
    """A released state mapped onto this project: tower and heads (projector + depth) state dicts, the
    tensors without a counterpart (`extras`, released names), and what was noted on the way."""

    tower: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


_DEPTH_DIRECT = {  # released (under rqtransformer.) -> ours (under depth.), same tensor
    "in_mlp_1": "proj_c", "in_mlp_2": "proj_h",
    "classifier_mlp.layer_norm": "ln_f", "classifier_mlp.linear": "head",
}
_BLOCK_DIRECT = {"ln1": "ln_1", "ln2": "ln_2", "attn.proj": "proj", "mlp.0": "mlp.0", "mlp.2": "mlp.2"}
_QKV = ("query", "key", "value")  # the order of the rows of this project's qkv


class ReleasedStateAdapter:
    """Maps the released `vision_tower` + `mm_projector` state dicts to this project's tower and heads and
    back (see the module docstring for the table). The LLM needs no mapping: both sides are transformers'."""

    def __init__(self, tower: VisionTowerConfig, lm: LMConfig):
        self.tower, self.lm = tower, lm

    # -- released -> ours ----------------------------------------------------------------------------

    def from_released(self, vision_tower: dict[str, torch.Tensor], mm_projector: dict[str, torch.Tensor]) -> Imported:
        left = dict(vision_tower)
        out = Imported({}, {})
        take = left.pop

        for name in [n for n in left if n.startswith(SIGLIP)]:
            out.tower["clip.model." + name[len(SIGLIP):]] = take(name)
        for alias in LOGIT_ALIASES:
            if alias in left:
                tensor, own = take(alias), out.tower.get("clip.model." + alias.rsplit(".", 1)[-1])
                if own is None or not torch.equal(tensor, own):
                    raise UnmappedTensors(f"{alias} differs from siglip_model's (the reference ties them)")

        K, D = self.tower.codebook_size, self.tower.code_depth
        embed, count, ema = [], [], []
        for i in range(D):
            names = [f"{QUANT}{i}.{n}" for n in ("weight", "cluster_size_ema", "embed_ema")]
            present = [n in left for n in names]
            if self.tower.shared_codebook and i > 0:
                # the reference's shared codebook is one module listed D times: copies must agree
                for n, there in zip(names, present):
                    if there and not torch.equal(take(n), vision_tower[n.replace(f"{QUANT}{i}.", f"{QUANT}0.", 1)]):
                        raise UnmappedTensors(f"{n}: differs from codebook 0's although shared_codebook is set")
                continue
            if not all(present):
                raise UnmappedTensors(f"codebook {i}: missing {[n for n, p in zip(names, present) if not p]}")
            weight = take(names[0])
            if tuple(weight.shape) != (K + 1, self.tower.width):
                raise UnmappedTensors(f"{names[0]}: shape {tuple(weight.shape)}, expected {(K + 1, self.tower.width)}")
            embed.append(weight[:K])
            out.extras[names[0] + ":padding_row"] = weight[K:].clone()
            count.append(take(names[1]))
            ema.append(take(names[2]))
        out.tower["quantizer.embed"] = torch.stack(embed)
        out.tower["quantizer.ema_count"] = torch.stack(count)
        out.tower["quantizer.ema_sum"] = torch.stack(ema)
        out.notes.append("codebook padding rows (nn.Embedding padding_idx, never looked up) kept as extras")

        for name in [n for n in left if n.startswith("rqvaesiglip.post_quant_conv.")]:
            out.tower["decoder.post_quant_conv." + name.rsplit(".", 1)[-1]] = take(name)
        for name in [n for n in left if n.startswith("rqvaesiglip.decoder.")]:
            out.tower["decoder." + name[len("rqvaesiglip.decoder."):]] = take(name)

        for name in [n for n in left if n.startswith(RQT)]:
            rest = name[len(RQT):]
            if rest == "pos_emb_d":
                out.heads["depth.pos"] = take(name).squeeze(0)
                continue
            block = re.match(r"head_transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)$", rest)
            if block:
                i, part, kind = block.groups()
                if part in _BLOCK_DIRECT:
                    out.heads[f"depth.blocks.{i}.{_BLOCK_DIRECT[part]}.{kind}"] = take(name)
                continue  # q/k/v below
            module, _, kind = rest.rpartition(".")
            if module in _DEPTH_DIRECT:
                out.heads[f"depth.{_DEPTH_DIRECT[module]}.{kind}"] = take(name)
        for i in range(self.lm.depth_layers):
            for kind in ("weight", "bias"):
                parts = [f"{RQT}head_transformer.blocks.{i}.attn.{p}.{kind}" for p in _QKV]
                if not all(p in left for p in parts):
                    raise UnmappedTensors(f"depth block {i}: missing {[p for p in parts if p not in left]}")
                out.heads[f"depth.blocks.{i}.qkv.{kind}"] = torch.cat([take(p) for p in parts])

        if left:
            raise UnmappedTensors(f"vision_tower tensors with no counterpart in this project: {sorted(left)}")

        proj = dict(mm_projector)
        for ours, theirs in (("projector.0", "layers.0"), ("projector.2", "layers.2")):
            for kind in ("weight", "bias"):
                if f"{theirs}.{kind}" not in proj:
                    raise UnmappedTensors(f"mm_projector: missing {theirs}.{kind}")
                out.heads[f"{ours}.{kind}"] = proj.pop(f"{theirs}.{kind}")
        if proj:
            raise UnmappedTensors(f"mm_projector tensors with no counterpart in this project: {sorted(proj)}")
        return out

    # -- ours -> released ----------------------------------------------------------------------------

    def to_released(self, tower: dict[str, torch.Tensor], heads: dict[str, torch.Tensor],
                    extras: dict[str, torch.Tensor] | None = None, names: list[str] | None = None,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
        """(vision_tower state, mm_projector state, notes). `extras`: the padding rows kept at import (zeros
        otherwise); `names`: the released file's names at import, to write the same aliases and shared
        codebook copies (default: every name the reference's module lists)."""
        extras = extras or {}
        left, vt, notes = dict(tower), {}, []
        take = left.pop
        for name in [n for n in left if n.startswith("clip.model.")]:
            vt[SIGLIP + name[len("clip.model."):]] = take(name)
        for alias in LOGIT_ALIASES:
            vt[alias] = vt[SIGLIP + alias.rsplit(".", 1)[-1]].clone()

        embed, count, ema = take("quantizer.embed"), take("quantizer.ema_count"), take("quantizer.ema_sum")
        for i in range(self.tower.code_depth):
            b = 0 if self.tower.shared_codebook else i
            pad_key = f"{QUANT}{b}.weight:padding_row"
            pad = extras.get(pad_key, torch.zeros(1, embed.shape[-1], dtype=embed.dtype))
            vt[f"{QUANT}{i}.weight"] = torch.cat([embed[b], pad.to(embed.dtype)])
            vt[f"{QUANT}{i}.cluster_size_ema"] = count[b].clone()
            vt[f"{QUANT}{i}.embed_ema"] = ema[b].clone()

        for name in [n for n in left if n.startswith("decoder.post_quant_conv.")]:
            vt["rqvaesiglip.post_quant_conv." + name.rsplit(".", 1)[-1]] = take(name)
        for name in [n for n in left if n.startswith("decoder.")]:
            vt["rqvaesiglip.decoder." + name[len("decoder."):]] = take(name)
        for name in ("pixel_mean", "pixel_std"):
            if left.pop(name, None) is not None:
                notes.append(f"tower {name}: written to vision_tower/preprocessor_config.json, not as a tensor")
        dropped = sorted(n for n in left if n.startswith("discriminator."))
        if dropped:
            notes.append(f"tower discriminator ({len(dropped)} tensors): no counterpart in the release, not written")
            for n in dropped:
                left.pop(n)
        if left:
            raise UnmappedTensors(f"tower tensors with no counterpart in the release: {sorted(left)}")

        hl = dict(heads)
        vt[RQT + "pos_emb_d"] = hl.pop("depth.pos").unsqueeze(0)
        for theirs, ours in _DEPTH_DIRECT.items():
            for kind in ("weight", "bias"):
                vt[f"{RQT}{theirs}.{kind}"] = hl.pop(f"depth.{ours}.{kind}")
        for i in range(self.lm.depth_layers):
            prefix = f"{RQT}head_transformer.blocks.{i}."
            for theirs, ours in _BLOCK_DIRECT.items():
                for kind in ("weight", "bias"):
                    vt[f"{prefix}{theirs}.{kind}"] = hl.pop(f"depth.blocks.{i}.{ours}.{kind}")
            for kind in ("weight", "bias"):
                for part, tensor in zip(_QKV, hl.pop(f"depth.blocks.{i}.qkv.{kind}").chunk(3)):
                    vt[f"{prefix}attn.{part}.{kind}"] = tensor.clone()
        mm = {}
        for ours, theirs in (("projector.0", "layers.0"), ("projector.2", "layers.2")):
            for kind in ("weight", "bias"):
                mm[f"{theirs}.{kind}"] = hl.pop(f"{ours}.{kind}")
        if hl:
            raise UnmappedTensors(f"projector/depth tensors with no counterpart in the release: {sorted(hl)}")

        if names is not None:
            # write what the imported file held: HF's safetensors save keeps one of the tied names
            wanted = set(names)
            optional = set(LOGIT_ALIASES)
            if self.tower.shared_codebook:
                optional |= {n for n in vt if n.startswith(QUANT) and not n.startswith(f"{QUANT}0.")}
            missing = sorted(n for n in wanted if n not in vt)
            if missing:
                raise UnmappedTensors(f"names of the imported release this model cannot produce: {missing[:5]}")
            vt = {n: t for n, t in vt.items() if n in wanted or n not in optional}
        return vt, mm, notes
