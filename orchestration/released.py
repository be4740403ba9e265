"""Released VILA-U directories in and out (no Ray): `import_released` writes this project's stage-2 export
from one, `export_released` writes one from a stage-2 export, and `model.init_from` reads such an export
(the hooks in `orchestration.train.lm`, `orchestration.train.tower` and `orchestration.data.lm_data`).

An import is a stage-2 export (and so also a stage-1 tower export), laid out as `export.py` writes them:

    EXPORT/llm/                   the release's llm/ as it is (transformers LLaMA + tokenizer with the markers)
    EXPORT/tower.safetensors      rqvaesiglip mapped onto UnifiedVisionTower (SigLIP from transformers)
    EXPORT/tower.json
    EXPORT/vilau_lm.safetensors   projector (mm_projector) + depth transformer (rqtransformer)
    EXPORT/vilau_lm.json          lm_config, special_ids, and the release's conversation template
    EXPORT/siglip/                the SigLIP architecture (config.json, no weights): the tower config's
                                  clip_model is "siglip-config:EXPORT/siglip"
    EXPORT/released/              what only the way back needs: released.json (the release's config files,
                                  tensor names and dtypes) and extras.safetensors (tensors without a
                                  counterpart here: the codebooks' padding rows)

Tensors keep their dtype both ways (a bf16 release imports as bf16 files; the model loads them into its
fp32 parameters), so importing and exporting again gives the same tensors bit for bit.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil

import torch

from orchestration.train.outputs import LM_META, LM_WEIGHTS, TOWER_FILE, TOWER_META, lm_metadata, tower_metadata
from vilau_model.config import LMConfig, VisionTowerConfig
from vilau_model.released_format import (
    VICUNA_V1,
    ConversationTemplate,
    ReleasedConfigs,
    ReleasedStateAdapter,
    UnmappedTensors,
    lm_config_from_released,
    released_sub_configs,
    released_top_config,
    siglip_config,
    tower_config_from_released,
)

log = logging.getLogger(__name__)

RELEASED_DIR = "released"
RELEASED_META = "released.json"
EXTRAS_FILE = "extras.safetensors"
SIGLIP_DIR = "siglip"
SUBDIRS = ("llm", "vision_tower", "mm_projector")
_TRANSFORMERS_META = {"format": "pt"}  # transformers refuses safetensors files without it


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def read_weights(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained directory: *.safetensors, else pytorch_model*.bin."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    state: dict[str, torch.Tensor] = {}
    if files:
        for path in files:
            state.update(load_file(path))
        return state
    files = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model*.bin weights")
    for path in files:
        state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def read_released_configs(src: str) -> ReleasedConfigs:
    for sub in SUBDIRS:
        if not os.path.isfile(os.path.join(src, sub, "config.json")):
            raise FileNotFoundError(f"{src}: not a released VILA-U directory (no {sub}/config.json)")
    vision_tower = _read_json(os.path.join(src, "vision_tower", "config.json"))
    if "rqvaesiglip" not in vision_tower or "rqtransformer" not in vision_tower:
        raise ValueError(f"{src}/vision_tower/config.json: no rqvaesiglip / rqtransformer sections")
    pretrained = vision_tower["rqvaesiglip"].get("pretrained_model", "google/siglip-large-patch16-256")
    processor = os.path.join(src, "vision_tower", "preprocessor_config.json")
    top = os.path.join(src, "config.json")
    return ReleasedConfigs(
        top=_read_json(top) if os.path.isfile(top) else {},
        vision_tower=vision_tower,
        mm_projector=_read_json(os.path.join(src, "mm_projector", "config.json")),
        llm=_read_json(os.path.join(src, "llm", "config.json")),
        siglip=siglip_config(pretrained, (src, os.path.join(src, "vision_tower"))),
        preprocessor=_read_json(processor) if os.path.isfile(processor) else None,
    )


def _special_ids(llm_dir: str, vocab_size: int):
    """The tokenizer's marker ids, checked where the reference looks for them: the last four ids."""
    from vilau_model.tokenizer import MARKERS, SpecialIds, load_tokenizer

    tokenizer = load_tokenizer(llm_dir)
    special = SpecialIds.from_tokenizer(tokenizer)
    if special.vocab_size != vocab_size:
        raise ValueError(f"{llm_dir}: tokenizer has {special.vocab_size} tokens (markers included), the LLM "
                         f"{vocab_size} rows: the release's tokenizer must carry {list(MARKERS)}")
    ids = [special.im_start, special.im_end, special.vi_start, special.vi_end]
    if ids != list(range(vocab_size - 4, vocab_size)):
        raise ValueError(f"{llm_dir}: markers {list(MARKERS)} have ids {ids}; the reference reads them as the "
                         f"last four ({vocab_size - 4}..{vocab_size - 1})")
    return special


def _siglip_source(cfgs: ReleasedConfigs, tower: VisionTowerConfig):
    from transformers import SiglipConfig

    from vilau_model.encoders import ClipSource

    model_cfg = SiglipConfig.from_dict(cfgs.siglip).to_dict()
    preprocess = {"mean": list(tower.image_mean), "std": list(tower.image_std)}
    return ClipSource("siglip_hf", tower.clip_model, None, model_cfg, preprocess)


def _check_against_model(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], what: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(n for n in set(state) & set(expected) if tuple(state[n].shape) != tuple(expected[n]))
    if missing or unexpected or wrong:
        raise UnmappedTensors(f"{what}: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                              f"wrong shape {[(n, tuple(state[n].shape), tuple(expected[n])) for n in wrong[:5]]}")


def import_released(src: str, out: str, lm_base: LMConfig | None = None) -> dict:
    """Write this project's stage-2 export (module docstring) from the released directory `src`."""
    from safetensors.torch import save_file

    from vilau_model.losses import TowerLossConfig
    from vilau_model.vision_tower import UnifiedVisionTower

    from vilau_model.encoders import SIGLIP_CONFIG_PREFIX

    cfgs = read_released_configs(src)
    tower_cfg = tower_config_from_released(cfgs, name=f"vila-u-{cfgs.siglip['vision_config']['image_size']}")
    # The SigLIP architecture as a transformers config directory inside the export, so that the tower config
    # alone rebuilds the encoders (stage 1 from the import); the weights stay in tower.safetensors.
    siglip_dir = os.path.abspath(os.path.join(out, SIGLIP_DIR))
    tower_cfg = dataclasses.replace(tower_cfg, clip_model=SIGLIP_CONFIG_PREFIX + siglip_dir)
    lm_cfg = lm_config_from_released(cfgs, tower_cfg, lm_base)
    vision_state = read_weights(os.path.join(src, "vision_tower"))
    projector_state = read_weights(os.path.join(src, "mm_projector"))
    mapped = ReleasedStateAdapter(tower_cfg, lm_cfg).from_released(vision_state, projector_state)

    source = _siglip_source(cfgs, tower_cfg)
    loss_cfg = TowerLossConfig(commitment_weight=tower_cfg.commitment_weight)
    with torch.device("meta"):
        tower = UnifiedVisionTower(tower_cfg, loss_cfg, source=source)
        expected_tower = {k: v.shape for k, v in tower.state_dict().items()}
    mapped.tower["pixel_mean"] = torch.tensor(tower_cfg.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    mapped.tower["pixel_std"] = torch.tensor(tower_cfg.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    _check_against_model(mapped.tower, expected_tower, "vision tower")

    os.makedirs(siglip_dir, exist_ok=True)
    _write_json(os.path.join(siglip_dir, "config.json"), source.model_cfg)
    _write_json(os.path.join(siglip_dir, "preprocessor_config.json"), _preprocessor(tower_cfg))
    llm_out = os.path.join(out, "llm")
    if os.path.exists(llm_out):
        shutil.rmtree(llm_out)
    shutil.copytree(os.path.join(src, "llm"), llm_out)
    special = _special_ids(llm_out, cfgs.llm["vocab_size"])
    from vilau_model.unified_lm import UnifiedLM

    with torch.device("meta"):
        lm = UnifiedLM(dataclasses.replace(lm_cfg, pretrained_path=None), tower, special)
        expected_heads = {k: v.shape for k, v in lm.state_dict().items() if k.startswith(("projector.", "depth."))}
    _check_against_model(mapped.heads, expected_heads, "projector + depth transformer")

    def contiguous(state):
        return {k: v.contiguous() for k, v in state.items()}

    save_file(contiguous(mapped.tower), os.path.join(out, TOWER_FILE),
              metadata={"config_name": tower_cfg.name, "clip_model": tower_cfg.clip_model,
                        "clip_source": source.to_json()})
    _write_json(os.path.join(out, TOWER_META), tower_metadata(tower_cfg, loss_cfg))
    save_file(contiguous(mapped.heads), os.path.join(out, LM_WEIGHTS))
    _write_json(os.path.join(out, LM_META), lm_metadata(lm_cfg, special, VICUNA_V1, imported_from=os.path.abspath(src)))
    released = os.path.join(out, RELEASED_DIR)
    os.makedirs(released, exist_ok=True)
    save_file(contiguous(mapped.extras), os.path.join(released, EXTRAS_FILE))
    _write_json(os.path.join(released, RELEASED_META), {
        "top": cfgs.top, "vision_tower": cfgs.vision_tower, "mm_projector": cfgs.mm_projector,
        "preprocessor": cfgs.preprocessor,
        "vision_tower_names": sorted(vision_state),
        "dtypes": {**{n: str(t.dtype).removeprefix("torch.") for n, t in vision_state.items()},
                   **{f"mm_projector:{n}": str(t.dtype).removeprefix("torch.") for n, t in projector_state.items()}},
        "notes": mapped.notes,
    })
    log.info("imported %s -> %s (%d tower, %d head tensors)", src, out, len(mapped.tower), len(mapped.heads))
    return {"tower_config": tower_cfg, "lm_config": lm_cfg, "notes": mapped.notes,
            "tower_tensors": len(mapped.tower), "head_tensors": len(mapped.heads), "extras": sorted(mapped.extras)}


def _preprocessor(tower: VisionTowerConfig) -> dict:
    size = tower.image_size
    return {"crop_size": {"height": size, "width": size}, "size": {"height": size, "width": size},
            "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
            "do_resize": True, "image_mean": list(tower.image_mean), "image_std": list(tower.image_std),
            "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1 / 255}


def export_released(export_dir: str, out: str) -> dict:
    """Write a released VILA-U directory from this project's stage-2 export (an import or a trained run)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vilau_model.encoders import ClipSource

    export_dir = next((d for d in (export_dir, os.path.join(export_dir, "export"))
                       if os.path.isfile(os.path.join(d, LM_META))), None)
    if export_dir is None:
        raise FileNotFoundError(f"not a stage-2 export (no {LM_META}); pass <storage_path>/<run_name>-lm/export")
    tower_meta = _read_json(os.path.join(export_dir, TOWER_META))
    tower_cfg = VisionTowerConfig(**tower_meta["tower_config"])
    lm_meta = _read_json(os.path.join(export_dir, LM_META))
    lm_cfg = LMConfig(**lm_meta["lm_config"])
    with safe_open(os.path.join(export_dir, TOWER_FILE), framework="pt") as f:
        source_json = (f.metadata() or {}).get("clip_source")
    source = ClipSource.from_json(source_json) if source_json else None
    if source is None or source.kind != "siglip_hf":
        raise UnmappedTensors(
            f"{export_dir}: the tower's encoder is {'unrecorded' if source is None else source.kind!r}; the release "
            "holds a transformers SigLIP (train from a transformers SigLIP directory or from an import)")
    released_dir = os.path.join(export_dir, RELEASED_DIR)
    previous = _read_json(os.path.join(released_dir, RELEASED_META)) if os.path.isdir(released_dir) else {}
    extras_path = os.path.join(released_dir, EXTRAS_FILE)
    extras = load_file(extras_path) if os.path.isfile(extras_path) else {}

    tower_state = load_file(os.path.join(export_dir, TOWER_FILE))
    heads = load_file(os.path.join(export_dir, LM_WEIGHTS))
    llm_config = _read_json(os.path.join(export_dir, "llm", "config.json"))
    adapter = ReleasedStateAdapter(tower_cfg, lm_cfg)
    vision, projector, notes = adapter.to_released(tower_state, heads, extras, previous.get("vision_tower_names"))
    dtypes = previous.get("dtypes", {})

    def cast(state: dict, prefix: str = "") -> dict:
        return {n: (t.to(getattr(torch, dtypes[prefix + n])) if prefix + n in dtypes else t).contiguous()
                for n, t in state.items()}

    sub = released_sub_configs(tower_cfg, source.model_cfg, lm_cfg, llm_config["hidden_size"], previous)
    os.makedirs(out, exist_ok=True)
    llm_out = os.path.join(out, "llm")
    if os.path.exists(llm_out):
        shutil.rmtree(llm_out)
    shutil.copytree(os.path.join(export_dir, "llm"), llm_out)
    for name, state, cfg in (("vision_tower", cast(vision), sub["vision_tower"]),
                             ("mm_projector", cast(projector, "mm_projector:"), sub["mm_projector"])):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        save_file(state, os.path.join(out, name, "model.safetensors"), metadata=_TRANSFORMERS_META)
        _write_json(os.path.join(out, name, "config.json"), cfg)
    _write_json(os.path.join(out, "vision_tower", "preprocessor_config.json"),
                previous.get("preprocessor") or _preprocessor(tower_cfg))
    top = released_top_config(sub, llm_config, tower_cfg, lm_cfg, previous.get("top"))
    _write_json(os.path.join(out, "config.json"), top)
    if not previous:
        notes.append(f"rqvaesiglip.pretrained_model={tower_cfg.clip_model!r}: the reference reads the SigLIP "
                     "architecture from that name; give it a directory holding this config.json: "
                     f"{json.dumps(source.model_cfg)[:80]}...")
    log.info("exported %s -> %s", export_dir, out)
    return {"vision_tower_tensors": len(vision), "mm_projector_tensors": len(projector), "notes": notes}


# ---------------------------------------------------------------- model.init_from


def export_tower_config(path: str, **overrides) -> VisionTowerConfig:
    """The tower config an export was written with (its tower.json), with the run's explicit overrides."""

    saved = VisionTowerConfig(**_read_json(os.path.join(path, TOWER_META))["tower_config"])
    return dataclasses.replace(saved, **overrides)


# Fields of LMConfig that fix the shapes of the weights (and the data layout): taken from the export.
ARCHITECTURE_FIELDS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size",
                       "max_position_embeddings", "rms_norm_eps", "rope_theta", "depth_layers", "depth_heads",
                       "depth_hidden_size", "frames_per_video")


def export_lm_config(path: str, base: LMConfig, rope_from_run: bool) -> LMConfig:
    """`base` (the run's preset and overrides) with the export's architecture; its RoPE scaling too unless
    the run sets model.rope_scaling."""

    saved = _read_json(os.path.join(path, LM_META))["lm_config"]
    fields = list(ARCHITECTURE_FIELDS) + ([] if rope_from_run else ["rope_scaling_type", "rope_scaling_factor"])
    return dataclasses.replace(base, **{k: saved[k] for k in fields})


def export_conversation(path: str) -> ConversationTemplate | None:

    saved = _read_json(os.path.join(path, LM_META)).get("conversation")
    return ConversationTemplate.from_dict(saved) if saved else None


@torch.no_grad()
def load_heads(model: torch.nn.Module, path: str) -> list[str]:
    """Projector + depth transformer from an export's vilau_lm.safetensors into `model` (plain or FSDP-sharded:
    each rank copies its own slices). Raises when the file and the model do not hold the same tensors."""
    from safetensors import safe_open

    from orchestration.train.weights import clean_name, copy_local_part

    targets = {clean_name(n): p for n, p in model.named_parameters() if clean_name(n).startswith(("projector.", "depth."))}
    with safe_open(os.path.join(path, LM_WEIGHTS), framework="pt") as f:
        names = set(f.keys())
        missing, unexpected = sorted(set(targets) - names), sorted(names - set(targets))
        if missing or unexpected:
            raise ValueError(f"{path}/{LM_WEIGHTS}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, target in targets.items():
            full = f.get_tensor(name)
            if tuple(full.shape) != tuple(target.shape):
                raise ValueError(f"{path}/{LM_WEIGHTS}: {name} has shape {tuple(full.shape)}, the model {tuple(target.shape)}")
            copy_local_part(target, full.to(target.dtype))
    return sorted(targets)


def tower_from_export(path: str, config: VisionTowerConfig, loss_config):
    """Stage 1 from an export: its tower (architecture from the export's recorded encoder source), every
    weight loaded; a discriminator the export lacks starts fresh (the release has none)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from vilau_model.encoders import ClipSource
    from vilau_model.vision_tower import UnifiedVisionTower

    file = os.path.join(path, TOWER_FILE)
    with safe_open(file, framework="pt") as f:
        source = ClipSource.from_json(f.metadata()["clip_source"])
    tower = UnifiedVisionTower(dataclasses.replace(config, pretrained=None), loss_config, source)
    if torch.empty(0).device.type == "meta":
        return tower
    missing, unexpected = tower.load_state_dict(load_file(file), strict=False)
    missing = [k for k in missing if not k.startswith(("discriminator.", "perceptual."))]
    if missing or unexpected:
        raise ValueError(f"{file}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return tower
