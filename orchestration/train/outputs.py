"""What a stage leaves on disk: the export layout, its metadata, and the loaders. No Ray.

A stage-1 export (``<storage_path>/<run_name>-tower/export``)::

    tower.safetensors     the consolidated vision tower
    tower.json            {"tower_config": ..., "loss_config": ...}: enough to rebuild it

A stage-2 export (``<storage_path>/<run_name>-lm/export``) holds the frozen tower the same way, plus::

    llm/                  the LLM in the Hugging Face layout (save_pretrained), with its tokenizer
    vilau_lm.safetensors  projector + depth transformer
    vilau_lm.json         {"lm_config": ..., "special_ids": ..., ["conversation": ...]}

Everything that writes (the in-process savers here, the streaming export from a sharded checkpoint in
export.py, the released-checkpoint import in orchestration/released.py) builds its metadata with the
functions below, so the three cannot drift apart; everything that reads uses the loaders.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import torch
from torch import nn

from orchestration.config import Config
from orchestration.storage import filesystem, is_s3, join
from vilau_model.config import LMConfig, VisionTowerConfig

TOWER_FILE = "tower.safetensors"
TOWER_META = "tower.json"
LM_WEIGHTS = "vilau_lm.safetensors"
LM_META = "vilau_lm.json"
LLM_DIR = "llm"
HEAD_PREFIXES = ("projector.", "depth.")  # the stage-2 weights outside the LLM and the tower


def tower_metadata(tower_config: VisionTowerConfig, loss_config) -> dict:
    """The contents of ``tower.json``."""
    return {"tower_config": dataclasses.asdict(tower_config), "loss_config": dataclasses.asdict(loss_config)}


def lm_metadata(lm_config: LMConfig, special_ids, conversation=None, **extra) -> dict:
    """The contents of ``vilau_lm.json`` (``conversation``: an imported release's chat template)."""
    meta = {"lm_config": dataclasses.asdict(lm_config), "special_ids": dataclasses.asdict(special_ids)}
    if conversation is not None:
        meta["conversation"] = conversation.to_dict()
    meta.update(extra)
    return meta


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- stage 1


def save_tower_export(tower, directory: str) -> str:
    """The consolidated tower: safetensors weights + the config needed to rebuild it."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TOWER_FILE)
    tower.save(path)
    _write_json(os.path.join(directory, TOWER_META), tower_metadata(tower.config, tower.loss_config))
    return path


def load_tower_export(path: str):
    """The tower a stage-1 export holds: the export directory or its tower.safetensors."""
    from vilau_model.losses import TowerLossConfig
    from vilau_model.vision_tower import UnifiedVisionTower

    directory = path if os.path.isdir(path) else os.path.dirname(path)
    meta = _read_json(os.path.join(directory, TOWER_META))
    cfg = meta["tower_config"]
    cfg["decoder_channels"] = tuple(cfg["decoder_channels"])
    return UnifiedVisionTower.load(
        os.path.join(directory, TOWER_FILE), VisionTowerConfig(**cfg), TowerLossConfig(**meta["loss_config"])
    )


# ---------------------------------------------------------------- stage 2


def save_lm_export(model: nn.Module, tokenizer, directory: str) -> None:
    """LLM via save_pretrained (+ tokenizer), projector + depth transformer as safetensors, the tower."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    llm_dir = os.path.join(directory, LLM_DIR)
    model.llm.save_pretrained(llm_dir, safe_serialization=True)
    tokenizer.save_pretrained(llm_dir)
    heads = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIXES)}
    save_file(heads, os.path.join(directory, LM_WEIGHTS))
    save_tower_export(model.tower, directory)
    meta = lm_metadata(model.config, model.special, getattr(model, "conversation", None))
    _write_json(os.path.join(directory, LM_META), meta)


def read_lm_export(directory: str):
    """(UnifiedLM in eval mode on the CPU, tokenizer) from the export's files."""
    from safetensors.torch import load_file

    from vilau_model.tokenizer import SpecialIds, load_tokenizer
    from vilau_model.unified_lm import UnifiedLM

    meta = _read_json(os.path.join(directory, LM_META))
    llm_dir = os.path.join(directory, LLM_DIR)
    lm_cfg = dataclasses.replace(LMConfig(**meta["lm_config"]), pretrained_path=llm_dir)
    tokenizer = load_tokenizer(llm_dir)
    model = UnifiedLM(lm_cfg, load_tower_export(directory), SpecialIds(**meta["special_ids"]))
    missing, unexpected = model.load_state_dict(load_file(os.path.join(directory, LM_WEIGHTS)), strict=False)
    missing = [k for k in missing if k.startswith(HEAD_PREFIXES)]
    if missing or unexpected:
        raise RuntimeError(f"{directory}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if meta.get("conversation"):  # an imported release's template, for generation (orchestration.released)
        from vilau_model.released_format import ConversationTemplate

        model.conversation = ConversationTemplate.from_dict(meta["conversation"])
    return model.eval(), tokenizer


def load_lm_export(directory: str, device: str | torch.device | None = None):
    """(UnifiedLM, tokenizer) from a stage-2 export directory, on ``device`` (default CPU)."""
    model, tokenizer = read_lm_export(directory)
    if device is not None:
        model.to(device)
    return model, tokenizer


def stage_export_uri(config: Config, stage: str) -> str:
    """Where a stage's run leaves its export: ``<storage_path>/<run_name>-<stage>/export``."""
    return join(config.cluster.storage_path, f"{config.run_name}-{stage}", "export")


def local_export(export_uri: str, s3) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A local directory holding the export: the export itself, or a temporary copy of one on S3
    (removed with the returned TemporaryDirectory)."""
    if not is_s3(export_uri):
        return export_uri, None
    tmp = tempfile.TemporaryDirectory(prefix="vilau-lm-export-")
    fs, path = filesystem(export_uri, s3)
    fs.get(path.rstrip("/") + "/", tmp.name, recursive=True)
    return tmp.name, tmp


def resolve_export(path: str) -> str:
    """A stage-2 export directory from the export itself or the run directory that holds it."""
    for candidate in (path, os.path.join(path, "export")):
        if os.path.isfile(os.path.join(candidate, LM_META)):
            return candidate
    raise FileNotFoundError(f"{path}: not a stage-2 export (no {LM_META}); pass <storage_path>/<run_name>-lm/export")
