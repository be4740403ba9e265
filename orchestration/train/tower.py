"""Stage 1: the unified vision tower (encoder -> residual quantizer -> decoder), contrastive +
reconstruction loss, on FSDP2 workers.

FSDP units: each vision block, each (frozen) text block, the pixel decoder, and the root (patch
embedding, heads, logit scale). The quantizer's codebook is a buffer, never sharded, kept identical on
every rank by the quantizer itself.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from orchestration.config import Config
from orchestration.train.artifacts import image_grid
from orchestration.train.trainer import Task, Trainer
from vilau_model.config import VisionTowerConfig, get_tower_config
from vilau_model.losses import TowerLossConfig
from vilau_model.vision_tower import UnifiedVisionTower

log = logging.getLogger(__name__)

GRID_IMAGES = 8


def tower_config(config: Config) -> VisionTowerConfig:
    overrides = config.model.tower_overrides()
    if config.model.tower_text_tokenizer:
        overrides["tokenizer_path"] = config.model.tower_text_tokenizer
    if config.model.init_from:  # the export's tower (orchestration.released), the run's explicit overrides on top
        from orchestration.released import export_tower_config

        return export_tower_config(config.model.init_from, **overrides)
    return get_tower_config(config.model.tower, **overrides)


def tower_loss_config(config: Config) -> TowerLossConfig:
    t = config.tower_train
    return TowerLossConfig(
        w_contra=t.w_contra, w_recon=t.w_recon, contrastive=t.contrastive, pixel_loss=t.pixel_loss,
        perceptual_weight=t.perceptual_weight, perceptual_weights_path=t.perceptual_weights_path,
        gan_weight=t.gan_weight, gan_start_step=t.gan_start_step, commitment_weight=t.commitment_weight,
    )


class EvalSplit:
    """The held-out images, captions and class prompts, on every rank (same data everywhere)."""

    def __init__(self, config: Config, device: torch.device):
        from orchestration.data.tower_data import build_eval_split

        split = build_eval_split(config)
        self.images = torch.from_numpy(split["pixels"]).float().div_(255.0).to(device)
        self.caption_tokens = torch.from_numpy(split["text_tokens"]).to(device)
        self.labels = torch.from_numpy(split["labels"])
        self.class_prompt_tokens = torch.from_numpy(split["class_prompt_tokens"]).to(device)


class TowerTask(Task):
    stage = "tower"
    columns = {"pixels": torch.uint8, "text_tokens": torch.int64}

    def __init__(self, config: Config):
        super().__init__(config, config.tower_train)
        if config.tower_train.gan_weight > 0:
            raise NotImplementedError(
                "tower_train.gan_weight > 0: the PatchGAN discriminator step is not wired into the FSDP "
                "trainer yet; set tower_train.gan_weight=0"
            )
        self.tower_cfg = tower_config(config)
        self._eval: EvalSplit | None = None

    def build_model(self) -> nn.Module:
        if self.config.model.init_from:
            from orchestration.released import tower_from_export

            return tower_from_export(self.config.model.init_from, self.tower_cfg, tower_loss_config(self.config))
        return UnifiedVisionTower(self.tower_cfg, tower_loss_config(self.config))

    def host_batch(self, batch: dict) -> dict:
        from orchestration.data.tower_data import with_text_tokens

        return with_text_tokens(self.tower_cfg, batch)

    def block_lists(self, model: nn.Module) -> list[nn.ModuleList]:
        from vilau_model.encoders import block_lists

        return block_lists(model.clip)  # open_clip ViT, timm trunk (SigLIP) or transformers SigLIP

    def extra_units(self, model: nn.Module) -> list[nn.Module]:
        return [model.decoder]

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        params = model.trainable_parameters()
        if self.config.tower_train.contrastive == "softmax":
            # The softmax loss never uses the sigmoid loss's bias. A parameter without gradients gets no
            # optimizer state, so checkpoints would lack it and a resume (which initialises the state
            # of every optimized parameter) would refuse them: leave it out of the optimizer.
            bias = getattr(model.clip, "logit_bias", None)
            params = [p for p in params if p is not bias]
        return params

    def forward(self, model: nn.Module, batch: dict, step: int) -> dict[str, torch.Tensor]:
        images = batch["pixels"].float().div_(255.0)
        return model(images, batch["text_tokens"], step=step)

    def count(self, batch: dict) -> tuple[int, int]:
        n = batch["pixels"].shape[0]
        return n, n * self.tower_cfg.grid_size**2

    def flops_per_token(self, model: nn.Module) -> float:
        # ~6 FLOPs per parameter per token (forward + backward) over the parts every image token crosses.
        params = sum(p.numel() for p in model.clip.visual.parameters()) + sum(p.numel() for p in model.decoder.parameters())
        return 6.0 * params

    @torch.no_grad()
    def replica_checks(self, model: nn.Module) -> dict[str, float]:
        """The EMA codebook is a buffer FSDP2 leaves whole on every rank; the quantizer all-reduces its
        statistics so that every rank holds the same one. Max minus min of checksums across ranks."""
        q = model.quantizer
        sums = torch.stack([q.embed.double().sum(), q.ema_count.double().sum(), q.ema_sum.double().sum()])
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return {"codebook_rank_divergence": 0.0}
        high, low = sums.clone(), sums.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        return {"codebook_rank_divergence": float((high - low).abs().max())}

    # -- evaluation -------------------------------------------------------------------------------

    def wants_eval(self, step: int, total: int) -> bool:
        return step % self.config.tower_train.eval_every == 0 or step == total

    @contextmanager
    def _unsharded(self, trainer: Trainer):
        """Outside forward, FSDP2 leaves the root's parameters sharded: gather them for eval calls
        (the blocks gather themselves in their own forward). Collective: every rank enters."""
        model = trainer.model
        sharded = hasattr(model, "unshard")  # a single rank runs without FSDP
        if sharded:
            model.unshard()
        try:
            if trainer.device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    yield model
            else:
                yield model
        finally:
            if sharded:
                model.reshard()

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, step: int) -> dict[str, float]:
        from vilau_model.evaluation import evaluate_tower, load_frechet_feature_net

        with self._unsharded(trainer) as model:
            if self._eval is None:
                self._eval = EvalSplit(self.config, trainer.device)
            ev = self._eval
            # Each rank encodes its share of the split (the forward calls are collective either way).
            metrics = evaluate_tower(
                model, ev.images, captions_tokens=ev.caption_tokens, labels=ev.labels,
                class_prompt_tokens=ev.class_prompt_tokens,
                frechet_net=load_frechet_feature_net(self.config.tower_train.frechet_weights_path),
                rank=trainer.rank, world=trainer.world, all_gather=_all_gather_over(trainer.device),
            )
            model.eval()
            originals = ev.images[:GRID_IMAGES]
            reconstructions = model.decode_codes(model.encode_codes(originals))
            model.train()
        if trainer.rank == 0:
            grid = image_grid([originals, reconstructions], row_labels=["original", "reconstructed"])
            trainer.logger.log_image(grid, f"reconstructions/step_{step:07d}.png")
        return {f"eval/{k}": float(v) for k, v in metrics.items()}


def _all_gather_over(device: torch.device):
    """[n, ...] CPU tensor of this rank -> [world * n, ...] on CPU, in rank order (through ``device``,
    as NCCL gathers device tensors)."""

    def gather(local: torch.Tensor) -> torch.Tensor:
        local = local.to(device)
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        return torch.cat(parts).cpu()

    return gather


def tower_worker(loop_config: dict) -> dict:
    """Ray Train entry point of stage 1 (every worker runs it)."""
    config: Config = loop_config["config"]
    return Trainer(TowerTask(config), config, loop_config["run"]).fit()
