"""Stage 2: the unified LM (LLM + projector + depth transformer) over the frozen stage-1 tower.

FSDP units: each LLM decoder layer, the depth transformer (one unit, gathered once per micro-batch for
all its loss chunks: ``LMTask.extra_units``), and the root (embeddings, LM head, projector). Of the frozen tower, the training workers hold only the codebook
(:class:`TowerCodebook`, fp32, read alone from the stage-1 export): it is left out of FSDP
(``ignored_params``), every rank keeps it whole and it is never all-gathered. The LLM is built on the
meta device and read shard-wise from ``model.lm_path`` (see ``orchestration.train.weights``).

The export is self-contained and Ray-free: ``llm/`` (transformers ``save_pretrained``, with the
tokenizer), ``vilau_lm.safetensors`` (projector + depth transformer), ``tower.safetensors`` +
``tower.json`` (the frozen tower) and ``vilau_lm.json`` (orchestration/train/outputs.py, which also loads it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from orchestration.config import Config
from orchestration.train.trainer import Task, Trainer
from vilau_model.config import LMConfig, VisionTowerConfig
from vilau_model.sequence import ROW_COLUMNS



class LMTask(Task):
    stage = "lm"
    columns = {name: (torch.bool if name == "is_visual" else torch.int64) for name in ROW_COLUMNS}
    ignore_frozen = True

    def __init__(self, config: Config, tokenizer_files: dict[str, bytes] | None):
        """``tokenizer_files`` None: shapes only (the memory plan): the special ids of LLaMA-2's layout
        over the preset's text vocabulary, no tokenizer read or trained."""
        super().__init__(config, config.lm_train)
        from orchestration.data.lm_data import lm_config, tower_source
        from vilau_model.tokenizer import SpecialIds, load_tokenizer_from_files

        self.tokenizer_files = tokenizer_files
        self.lm_cfg: LMConfig = lm_config(config)
        if tokenizer_files is None:
            self.tokenizer = None
            self.special = SpecialIds.llama(self.lm_cfg.vocab_size)
        else:
            self.tokenizer = load_tokenizer_from_files(tokenizer_files)
            self.special = SpecialIds.from_tokenizer(self.tokenizer)
        self.tower_source = tower_source(config, config.model.tower_checkpoint)

    def host_batch(self, batch: dict) -> dict:
        """Caption dropout, drawn here and not stored anywhere: each generation sample's prompt is emptied
        with probability lm_train.caption_dropout, the draw seeded by (seed, record key, epoch), so a
        record's prompt is dropped in some epochs and kept in others whatever the rank, worker or cache
        that built its row (the rows, cached or streamed, always hold the whole prompt)."""
        rate = self.config.lm_train.caption_dropout
        if rate <= 0 or "keys" not in batch:
            return batch
        from vilau_model.sequence import ROW_COLUMNS, drop_spans, generation_prompts

        epoch, starts = int(batch.get("epoch", 0)), (self.special.im_start, self.special.vi_start)
        for i, keys in enumerate(batch["keys"]):
            row = {name: batch[name][i] for name in ROW_COLUMNS}
            prompts = generation_prompts(row, starts)
            if not prompts:
                continue
            if max(prompts) > len(keys):
                if len(keys) != 1:
                    raise ValueError(f"a packed row has segment {max(prompts)} but names {len(keys)} samples")
                # A row of the tokenized cache names itself, not its samples: (row, segment) is as stable
                # an identity of a sample from epoch to epoch.
                keys = [f"{keys[0]}#{segment}" for segment in range(1, max(prompts) + 1)]
            dropped = [span for segment, span in prompts.items()
                       if caption_dropped(self.config.seed, keys[segment - 1], epoch, rate)]
            if dropped:
                for name, value in drop_spans(row, dropped, self.special.pad).items():
                    if not batch[name].flags.writeable:  # a zero-copy view of the data's Arrow buffers
                        batch[name] = batch[name].copy()
                    batch[name][i] = value
        return batch

    def _tower(self) -> nn.Module:
        from orchestration.data.sources import s3_settings

        return self.tower_source.load(s3_settings(self.config))

    def build_model(self) -> nn.Module:
        """Under the trainer's meta build: the LM over :class:`TowerCodebook` (all that training needs of
        the frozen tower). Otherwise (export, generation): over the whole tower from its source."""
        from vilau_model.unified_lm import UnifiedLM

        if torch.empty(0).device.type == "meta":
            tower = TowerCodebook(self.tower_source.config)
        else:
            tower = self._tower()
        return UnifiedLM(self.lm_cfg, tower, self.special)

    def init_weights(self, model: nn.Module, seed: int) -> None:
        """LLM, projector and depth transformer: random init per module from (seed, name), the same
        whatever the world size; with ``model.lm_path`` the LLM is then read shard-wise from its
        safetensors (modules fully covered by the files are not initialized first). The frozen tower
        comes from its export (or the seeded preset the tokenization pool also uses)."""
        from orchestration.train.weights import (
            clean_name,
            default_module_init,
            init_by_name,
            load_pretrained,
        )

        path = self.lm_cfg.pretrained_path
        llm = model.llm

        def init_module(name: str, module: nn.Module) -> None:
            if name.startswith("llm.") and not hasattr(module, "rope_init_fn"):
                llm._init_weights(module)  # transformers' own init (N(0, initializer_range), norms at 1)
            else:
                default_module_init(name, module)

        def loaded_elsewhere(name: str, module: nn.Module) -> bool:
            return name.split(".")[0] == "tower" or (bool(path) and name.split(".")[0] == "llm")

        init_by_name(model, seed, init_module=init_module, skip=loaded_elsewhere)
        if path:
            embeddings = {llm.get_input_embeddings().weight, llm.get_output_embeddings().weight}
            grow = [clean_name(n) for n, p in llm.named_parameters() if any(p is e for e in embeddings)]
            load_pretrained(llm, path, seed, grow_rows=grow, init_module=lambda n, m: init_module(f"llm.{n}", m))
        if self.config.model.init_from:  # projector + depth transformer of the export too
            from orchestration.released import load_heads

            load_heads(model, self.config.model.init_from)
        codebook = self._codebook()
        with torch.no_grad():
            for name, t in model.tower.named_buffers():
                t.copy_(codebook[name].to(t.device))
        # The code vectors stay fp32 (16384 x width: tens of MB): a visual position's input is the sum of
        # its D code vectors, and in bf16 the deepest residuals vanish in the rounding, while the export
        # and generation sum them in fp32.

    def _codebook(self) -> dict[str, torch.Tensor]:
        """The tower's quantizer tensors (``quantizer.*``), read alone from the export's safetensors: the
        encoders, text tower, decoder and discriminator never load on the training workers. Without an
        export, the seeded preset (the same one the tokenization pool builds)."""
        from safetensors import safe_open

        from orchestration.data.sources import s3_settings
        from orchestration.storage import is_s3

        source, s3 = self.tower_source, s3_settings(self.config)
        if source.path is None:
            tower = source.load(s3)
            return {k: v for k, v in tower.state_dict().items() if k.startswith("quantizer.")}
        uri = source.safetensors_uri(s3)
        with tempfile.TemporaryDirectory() as tmp:
            if is_s3(uri):
                from orchestration.data.records import read_bytes

                local = os.path.join(tmp, "tower.safetensors")
                Path(local).write_bytes(read_bytes(uri, s3))
                uri = local
            with safe_open(uri, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if k.startswith("quantizer.")}

    loss_sums_over_step = True

    def prepare_step(self, micro_batches: list[dict]) -> None:
        """The step's supervised text tokens and visual positions over every rank and micro-batch (one
        all-reduce), so each token weighs the same whichever rank and row it is in."""
        counts = torch.stack([supervised_counts(b) for b in micro_batches]).sum(dim=0).float()
        self._world = 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
            self._world = dist.get_world_size()
        self._step_counts = counts.clamp(min=1.0)

    def block_lists(self, model: nn.Module) -> list[nn.ModuleList]:
        return lm_units(model)[0]

    def extra_units(self, model: nn.Module) -> list[nn.Module]:
        return lm_units(model)[1]

    def ignored_params(self, model: nn.Module) -> set[nn.Parameter]:
        return set(model.tower.parameters())

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return model.trainable_parameters()

    def forward(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """This micro-batch's share of the step's loss: CE sums over the step's global counts. FSDP
        averages gradients over ranks, hence the factor world (a mean of per-rank means would weigh a
        token on a sparse rank more than one on a dense rank)."""
        out = model(**batch)
        n_text, n_image = self._step_counts.unbind()
        loss_text = out["sum_text"] * (self._world / n_text)
        loss_image = out["sum_image"] * (self._world / (n_image * model.code_depth))
        return {
            "loss": loss_text + loss_image,
            "loss_text": loss_text,
            "loss_image": loss_image,
            "supervised_text_tokens": out["num_text"].float(),
            "supervised_image_positions": out["num_image"].float(),
        }

    def count(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        segments = batch["segment_ids"]
        samples = segments.max(dim=1).values.sum()  # segment ids are 1..n per row, 0 = padding
        return samples, (segments > 0).sum()

    def flops_per_token(self, model: nn.Module) -> float:
        return 6.0 * sum(p.numel() for p in model.trainable_parameters())


def lm_units(model: nn.Module) -> tuple[list[nn.ModuleList], list[nn.Module]]:
    """The FSDP units of the unified LM besides the root: (checkpointed block lists, other units).

    The decoder layers one by one; the whole depth transformer as one unit, listed last so that
    ``shard_model`` does not reshard it after forward. Its loss runs all chunks in one module call
    (``UnifiedLM.forward``), so its blocks and head are gathered once per micro-batch and kept until its
    backward, which comes first; only the head + loss are chunked (activations recomputed per chunk, the
    parameters never re-gathered). Not activation-checkpointed: the chunks already recompute."""
    return [model.llm.get_decoder().layers], [model.depth]


def caption_dropped(seed: int, key: str, epoch: int, rate: float) -> bool:
    """Whether the record ``key``'s generation prompt is dropped in ``epoch``: a uniform draw from a hash of
    (seed, key, epoch), the same on every rank and at every rerun."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}|{key}|{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


class TowerCodebook(nn.Module):
    """What stage-2 training needs of the frozen vision tower: its code vectors. The LLM input of a
    visual position is projector(sum of its D code vectors) and the depth transformer reads them too;
    both go through ``quantizer`` (``lookup``) and ``code_embeddings``, as on the whole tower."""

    def __init__(self, config: VisionTowerConfig):
        from vilau_model.quantizer import ResidualQuantizer

        super().__init__()
        self.config = config
        self.quantizer = ResidualQuantizer(
            dim=config.width, codebook_size=config.codebook_size, depth=config.code_depth,
            shared_codebook=config.shared_codebook, decay=config.ema_decay, eps=config.ema_eps,
            dead_code_threshold=config.dead_code_threshold, chunk_size=config.search_chunk_size,
        )

    def code_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        return self.quantizer.decode(codes)


def supervised_counts(batch: dict) -> torch.Tensor:
    """[text targets, visual targets] of a micro-batch, counted as ``UnifiedLM.forward`` counts them:
    position t+1's label is predicted from t, never across a sample boundary."""
    from vilau_model.sequence import IGNORE_INDEX

    target, segments = batch["labels"][:, 1:], batch["segment_ids"]
    valid = (target != IGNORE_INDEX) & (segments[:, 1:] == segments[:, :-1])
    visual = batch["is_visual"][:, 1:].bool()
    return torch.stack([(valid & ~visual).sum(), (valid & visual).sum()])


def lm_worker(loop_config: dict) -> dict:
    """Ray Train entry point of stage 2 (every worker runs it)."""
    config: Config = loop_config["config"]
    task = LMTask(config, loop_config["tokenizer_files"])
    return Trainer(task, config, loop_config["run"]).fit()
