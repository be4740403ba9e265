"""Stage 2: the unified LM (LLM + projector + depth transformer) over the frozen stage-1 tower.

FSDP units: each LLM decoder layer, each depth-transformer block, and the root (embeddings, LM head,
projector, depth input/output layers). The frozen tower is left out of FSDP (``ignored_params``): every
rank keeps it whole, it is never all-gathered, and checkpoints skip it (it comes from the stage-1
export named in the config).

The export is self-contained and Ray-free: ``llm/`` (transformers ``save_pretrained``, with the
tokenizer), ``vilau_lm.safetensors`` (projector + depth transformer), ``tower.safetensors`` +
``tower.json`` (the frozen tower) and ``vilau_lm.json``; :func:`load_lm_export` rebuilds the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from orchestration.config import Config
from orchestration.train.trainer import Task, Trainer
from vilau_model.config import LMConfig
from vilau_model.sequence import ROW_COLUMNS

LM_WEIGHTS = "vilau_lm.safetensors"
LM_META = "vilau_lm.json"


def _write_files(files: dict[str, bytes]) -> str:
    directory = tempfile.mkdtemp(prefix="vilau-lm-tokenizer-")
    for name, data in files.items():
        Path(directory, name).write_bytes(data)
    return directory


class LMTask(Task):
    stage = "lm"
    columns = {name: (torch.bool if name == "is_visual" else torch.int64) for name in ROW_COLUMNS}
    ignore_frozen = True

    def __init__(self, config: Config, tokenizer_files: dict[str, bytes]):
        super().__init__(config, config.lm_train)
        from orchestration.data.lm_data import lm_config, tower_source
        from vilau_model.tokenizer import load_tokenizer

        self.tokenizer_files = tokenizer_files
        self.tokenizer = load_tokenizer(_write_files(tokenizer_files))
        self.lm_cfg: LMConfig = lm_config(config)
        self.tower_source = tower_source(config, config.model.tower_checkpoint)

    def _tower(self) -> nn.Module:
        from orchestration.data.sources import s3_settings

        return self.tower_source.load(s3_settings(self.config))

    def build_model(self) -> nn.Module:
        from vilau_model.tokenizer import SpecialIds
        from vilau_model.unified_lm import UnifiedLM

        return UnifiedLM(self.lm_cfg, self._tower(), SpecialIds.from_tokenizer(self.tokenizer))

    def block_lists(self, model: nn.Module) -> list[nn.ModuleList]:
        return [model.llm.get_decoder().layers, model.depth.blocks]

    def ignored_params(self, model: nn.Module) -> set[nn.Parameter]:
        return set(model.tower.parameters())

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return model.trainable_parameters()

    def forward(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        out = model(**batch)
        # Per-rank means; FSDP averages the gradients over ranks (a mean of rank means).
        return {k: out[k] for k in ("loss", "loss_text", "loss_image")} | {
            "supervised_text_tokens": out["num_text"].float(),
            "supervised_image_positions": out["num_image"].float(),
        }

    def count(self, batch: dict) -> tuple[int, int]:
        segments = batch["segment_ids"]
        samples = int(segments.max(dim=1).values.sum())  # segment ids are 1..n per row, 0 = padding
        return samples, int((segments > 0).sum())

    def flops_per_token(self, model: nn.Module) -> float:
        return 6.0 * sum(p.numel() for p in model.trainable_parameters())

    def rows_skipped(self) -> dict[str, int]:
        from orchestration.data.stats import skip_counts

        return skip_counts("lm")


def lm_worker(loop_config: dict) -> dict:
    """Ray Train entry point of stage 2 (every worker runs it)."""
    config: Config = loop_config["config"]
    task = LMTask(config, loop_config["tokenizer_files"])
    return Trainer(task, config, loop_config["run"]).fit()


# ---------------------------------------------------------------- export, load, generate


def save_lm_export(model: nn.Module, tokenizer, directory: str) -> None:
    """LLM via save_pretrained (+ tokenizer), projector + depth transformer as safetensors, the tower."""
    from safetensors.torch import save_file

    from orchestration.train.tower import save_tower_export

    os.makedirs(directory, exist_ok=True)
    llm_dir = os.path.join(directory, "llm")
    model.llm.save_pretrained(llm_dir, safe_serialization=True)
    tokenizer.save_pretrained(llm_dir)
    heads = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k.startswith(("projector.", "depth."))}
    save_file(heads, os.path.join(directory, LM_WEIGHTS))
    save_tower_export(model.tower, directory)
    meta = {"lm_config": dataclasses.asdict(model.config), "special_ids": dataclasses.asdict(model.special)}
    with open(os.path.join(directory, LM_META), "w") as f:
        json.dump(meta, f, indent=1)


def load_lm_export(directory: str):
    """(UnifiedLM, tokenizer) from a stage-2 export directory, without Ray."""
    from safetensors.torch import load_file

    from orchestration.train.tower import load_tower_export
    from vilau_model.tokenizer import SpecialIds, load_tokenizer
    from vilau_model.unified_lm import UnifiedLM

    with open(os.path.join(directory, LM_META)) as f:
        meta = json.load(f)
    llm_dir = os.path.join(directory, "llm")
    lm_cfg = dataclasses.replace(LMConfig(**meta["lm_config"]), pretrained_path=llm_dir)
    tokenizer = load_tokenizer(llm_dir)
    model = UnifiedLM(lm_cfg, load_tower_export(directory), SpecialIds(**meta["special_ids"]))
    missing, unexpected = model.load_state_dict(load_file(os.path.join(directory, LM_WEIGHTS)), strict=False)
    missing = [k for k in missing if k.startswith(("projector.", "depth."))]
    if missing or unexpected:
        raise RuntimeError(f"{directory}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], seed: int = 0, num_frames: int = 1, **kwargs) -> list:
    """PIL images (num_frames = 1) or lists of frames (video) for text prompts, with CFG."""
    from vilau_model.sequence import SequenceBuilder

    builder = SequenceBuilder(tokenizer, code_depth=model.code_depth)
    generator = torch.Generator().manual_seed(seed)
    ids = [builder.generation_prompt(p) for p in prompts]
    return model.generate_images(ids, generator=generator, num_frames=num_frames, **kwargs).images


def generate_to_files(export_dir: str, prompts: list[str], out_dir: str, video: bool = False, seed: int = 0,
                      **kwargs) -> list[str]:
    """Write one PNG per prompt (or a folder of frame PNGs per prompt for video); returns the paths."""
    model, tokenizer = load_lm_export(export_dir)
    frames = model.config.frames_per_video if video else 1
    results = generate(model, tokenizer, prompts, seed=seed, num_frames=frames, **kwargs)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, result in enumerate(results):
        if video:
            folder = os.path.join(out_dir, f"video_{i:02d}")
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            for t, frame in enumerate(result):
                paths.append(os.path.join(folder, f"frame_{t:02d}.png"))
                frame.save(paths[-1])
        else:
            paths.append(os.path.join(out_dir, f"image_{i:02d}.png"))
            result.save(paths[-1])
    with open(os.path.join(out_dir, "prompts.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    return paths


def resolve_export(path: str) -> str:
    """A stage-2 export directory from the export itself or the run directory that holds it."""
    for candidate in (path, os.path.join(path, "export")):
        if os.path.isfile(os.path.join(candidate, LM_META)):
            return candidate
    raise FileNotFoundError(f"{path}: not a stage-2 export (no {LM_META}); pass <storage_path>/<run_name>-lm/export")
