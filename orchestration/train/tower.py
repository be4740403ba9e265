"""Stage 1: the unified vision tower (encoder -> residual quantizer -> decoder), contrastive +
reconstruction loss, on FSDP2 workers.

FSDP units: each vision block, each (frozen) text block, each block of the pixel decoder, and the root
(patch embedding, heads, logit scale, the decoder's input projection and output head, the frozen LPIPS
network). The decoder's output head stays in the root so that the adaptive GAN weight, a gradient at
its last conv taken inside the forward, crosses no unit boundary. The quantizer's codebook is a buffer,
never sharded, kept identical on every rank by the quantizer itself.

The PatchGAN discriminator (tower_train.gan_weight > 0) is small (2.8 M parameters at the default 3
layers x 64 channels: 44 MB with its gradients and AdamW state) and is replicated, not sharded: FSDP2
ignores its parameters, every rank holds all of it, and its gradients are averaged over the ranks with
one all-reduce per step. It trains with its own AdamW (``TowerTask.extra_optimizers``) on the hinge loss
of real images vs the step's reconstructions, one step per optimizer step from gan_start_step on, after
the tower's step; the checkpoint holds it and its optimizer state with the rest.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from orchestration.config import Config
from orchestration.data.tower_data import tower_config
from orchestration.train.artifacts import image_grid
from orchestration.train.trainer import Task, Trainer
from vilau_model.losses import TowerLossConfig
from vilau_model.vision_tower import UnifiedVisionTower

log = logging.getLogger(__name__)

GRID_IMAGES = 8


def tower_loss_config(config: Config) -> TowerLossConfig:
    t = config.tower_train
    return TowerLossConfig(
        w_contra=t.w_contra, w_recon=t.w_recon, contrastive=t.contrastive, pixel_loss=t.pixel_loss,
        perceptual_weight=t.perceptual_weight, perceptual_weights_path=t.perceptual_weights_path,
        gan_weight=t.gan_weight, gan_start_step=t.gan_start_step, discriminator_layers=t.discriminator_layers,
        discriminator_channels=t.discriminator_channels, commitment_weight=t.commitment_weight,
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
        self.tower_cfg = tower_config(config)
        self._eval: EvalSplit | None = None
        self.discriminator_optimizer: torch.optim.Optimizer | None = None

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
        return model.decoder.shard_units()

    def ignored_params(self, model: nn.Module) -> set[nn.Parameter] | None:
        return set(model.discriminator_parameters()) or None  # replicated on every rank (module docstring)

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

    # -- the discriminator ------------------------------------------------------------------------

    def _gan_active(self, step: int) -> bool:
        t = self.config.tower_train
        return t.gan_weight > 0 and step >= t.gan_start_step

    def extra_optimizers(self, model: nn.Module) -> list[torch.optim.Optimizer]:
        params = model.discriminator_parameters()
        if not params:
            return []
        t = self.config.tower_train
        self.discriminator_optimizer = torch.optim.AdamW(
            params, lr=t.discriminator_lr or t.optim.lr, betas=tuple(t.discriminator_betas), weight_decay=0.0,
            foreach=True,
        )
        _create_adam_state(self.discriminator_optimizer)
        return [self.discriminator_optimizer]

    def after_backward(self, model: nn.Module, batch: dict, out: dict, step: int, scale: float) -> dict[str, torch.Tensor]:
        """The discriminator's hinge loss on this micro-batch's real images and (detached) reconstructions,
        backwarded into its own gradients (the tower's gradients are not touched: the reconstructions are
        detached and the tower's parameters are not in this graph)."""
        if self.discriminator_optimizer is None:
            return {}
        if not self._gan_active(step):
            return {"loss_discriminator": out["loss"].new_zeros(())}
        reconstructions = out["reconstruction"]
        # compute in the reconstructions' precision (bf16 under FSDP2 mixed precision on GPU)
        images = batch["pixels"].to(reconstructions.dtype) / 255.0
        loss = model.discriminator_loss(images, reconstructions, step)
        (loss * scale).backward()
        return {"loss_discriminator": loss.detach()}

    def after_optimizer_step(self, model: nn.Module, step: int, applied: bool) -> dict[str, torch.Tensor]:
        """Average the discriminator's gradients over the ranks (one all-reduce), clip them like the tower's,
        and step it, unless the tower's step was skipped as non-finite or its own gradients are."""
        optimizer = self.discriminator_optimizer
        if optimizer is None:
            return {}
        if not self._gan_active(step):
            return {"discriminator_grad_norm": torch.zeros((), device=model.discriminator_parameters()[0].device)}
        norm = self.average_and_clip_discriminator_gradients(model)
        if applied and bool(torch.isfinite(norm)):  # the same on every rank: the gradients are the averaged ones
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"discriminator_grad_norm": norm.detach().float()}

    def average_and_clip_discriminator_gradients(self, model: nn.Module) -> torch.Tensor:
        """Collective: the discriminator's gradients averaged over the ranks in one all-reduce, then clipped
        to optim.grad_clip; returns their norm before clipping."""
        params = model.discriminator_parameters()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat.div_(dist.get_world_size())
            grads = list(torch._utils._unflatten_dense_tensors(flat, grads))
        for p, g in zip(params, grads):
            p.grad = g
        return torch.nn.utils.clip_grad_norm_(params, self.config.tower_train.optim.grad_clip, foreach=True)

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
        statistics so that every rank holds the same one. The discriminator (if any) is replicated and
        steps on averaged gradients. Max minus min of checksums across ranks, per part."""
        q = model.quantizer
        parts = {"codebook_rank_divergence": [q.embed, q.ema_count, q.ema_sum]}
        if model.discriminator_parameters():
            parts["discriminator_rank_divergence"] = model.discriminator_parameters()
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return {name: 0.0 for name in parts}
        sums = torch.stack([t.detach().double().sum() for tensors in parts.values() for t in tensors])
        high, low = sums.clone(), sums.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        spread, out, start = (high - low).abs(), {}, 0
        for name, tensors in parts.items():
            out[name] = float(spread[start:start + len(tensors)].max())
            start += len(tensors)
        return out

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


@torch.no_grad()
def _create_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its AdamW state now (one step of zero gradients at learning rate 0: nothing
    moves), as a resume does before it loads a checkpoint. A checkpoint saved before the discriminator's
    first step then holds its state too, and so loads into a fresh run."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


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
