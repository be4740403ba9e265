"""Loss terms of the vision tower: contrastive (image vs frozen text) and reconstruction.

    loss = w_contra * L_contra + w_recon * L_recon + commitment_weight * L_commit
    L_recon = L_pixel + perceptual_weight * L_perceptual + gan_weight * adaptive_weight * L_gan
    (L_pixel on pixels in [-1, 1], RQ-VAE's scale)

The contrastive terms reuse open_clip's SigLipLoss / ClipLoss with this process's rank and world
size, so the negatives come from the whole global batch. With W ranks, the mean over ranks of the
per-rank loss equals the single-process loss on the concatenated batch (for both kinds), which is what
data-parallel gradient averaging optimises.

The perceptual term is an LPIPS-style VGG16 feature distance whose weights come from a local file; with
none configured it is OFF (logged once, and `perceptual_enabled` = 0 in the tower's output), never a
silently random network. The optional PatchGAN uses hinge losses and the VQGAN adaptive weight.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TowerLossConfig:
    w_contra: float = 1.0
    w_recon: float = 1.0
    contrastive: str = "sigmoid"  # "sigmoid" (SigLIP) | "softmax" (CLIP)
    siglip_dist_impl: str = "gather"  # open_clip SigLipLoss exchange: gather | bidir | shift | reduce
    pixel_loss: str = "mse"  # "mse" | "l1"
    perceptual_weight: float = 0.0
    perceptual_weights_path: str | None = None  # local VGG16 (+ optional LPIPS lin) state dict
    gan_weight: float = 0.0  # 0 = no discriminator at all
    gan_start_step: int = 0
    discriminator_layers: int = 3
    discriminator_channels: int = 64
    commitment_weight: float = 0.25

    def __post_init__(self):
        if self.contrastive not in ("sigmoid", "softmax"):
            raise ValueError(f"contrastive must be 'sigmoid' or 'softmax', got {self.contrastive!r}")
        if self.pixel_loss not in ("mse", "l1"):
            raise ValueError(f"pixel_loss must be 'mse' or 'l1', got {self.pixel_loss!r}")


def dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ContrastiveLoss(nn.Module):
    """SigLIP sigmoid or CLIP softmax loss on L2-normalised embeddings, negatives from all ranks.

    The open_clip loss object is (re)built for the current process group, so the same module works
    in one process and under torch.distributed.
    """

    def __init__(self, kind: str = "sigmoid", siglip_dist_impl: str = "gather"):
        super().__init__()
        self.kind = kind
        self.siglip_dist_impl = siglip_dist_impl
        self._loss: nn.Module | None = None
        self._world: tuple[int, int] | None = None

    def _get(self) -> nn.Module:
        world = dist_rank_world()
        if self._loss is None or world != self._world:
            rank, size = world
            if self.kind == "sigmoid":
                self._loss = SigLipLoss(rank=rank, world_size=size, dist_impl=self.siglip_dist_impl)
            else:
                # gather_with_grad: the gathered features keep their autograd path, so every rank's
                # loss (the full global loss) sends gradients back to the rank that made them.
                self._loss = ClipLoss(rank=rank, world_size=size, gather_with_grad=True, local_loss=False)
            self._world = world
        return self._loss

    def forward(self, image_emb, text_emb, logit_scale, logit_bias=None) -> torch.Tensor:
        loss = self._get()
        if self.kind == "sigmoid":
            return loss(image_emb, text_emb, logit_scale, logit_bias)
        # ClipLoss gives every rank the full global loss, so its mean over ranks is that loss too.
        return loss(image_emb, text_emb, logit_scale)


def pixel_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """MSE or L1 between images given in [0, 1], measured on [-1, 1] as RQ-VAE / VQGAN do, so that a
    reconstruction weight means what it means there (MSE: 4x the [0, 1] value, L1: 2x)."""
    reconstruction, target = reconstruction * 2 - 1, target * 2 - 1
    if kind == "l1":
        return F.l1_loss(reconstruction, target)
    return F.mse_loss(reconstruction, target)


# -- perceptual ----------------------------------------------------------------------------------

# VGG16 `features` indices that end the five LPIPS slices (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_VGG_SLICE_ENDS = (4, 9, 16, 23, 30)
_VGG_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS feeds VGG (2x - 1 - shift) / scale with shift (-.030, -.088, -.188), scale (.458, .448, .450): on
# images in [0, 1] that is ImageNet's (x - mean) / std.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _vgg_trunk_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VGG16 conv trunk's weights keyed by `features` index, from torchvision keys (`features.N.*`) or
    from an `lpips.LPIPS(net="vgg")` state dict (`net.sliceK.N.*`, N being the same index)."""
    trunk = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    for k, v in state.items():
        if k.startswith("net.slice"):
            trunk.setdefault(k.split(".", 2)[2], v)
    return trunk


def _vgg_layout(trunk: dict[str, torch.Tensor]) -> list:
    """torchvision's VGG16 layer list ("D") with each conv's width read from the weights, so a narrower
    stand-in trunk of the same layout loads like the real one."""
    from torchvision.models.vgg import cfgs

    layout, index = [], 0
    for entry in cfgs["D"]:
        if entry == "M":
            layout.append("M")
            index += 1
            continue
        if f"{index}.weight" not in trunk:
            raise KeyError(f"features.{index}.weight")
        layout.append(trunk[f"{index}.weight"].shape[0])
        index += 2  # conv, ReLU
    return layout


def _lpips_package_lins() -> dict[str, torch.Tensor]:
    """LPIPS's calibrated VGG linear layers, shipped inside the `lpips` package (a local file: no hub), or
    {} when the package is not installed."""
    try:
        import lpips
    except ImportError:
        return {}
    path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    return _load_state_dict(path) if os.path.exists(path) else {}


def save_stand_in_perceptual_weights(path: str, channels: tuple[int, ...] = (8, 16, 32, 64, 64), seed: int = 0) -> str:
    """A random VGG16-layout trunk with `channels` widths per block instead of (64, 128, 256, 512, 512),
    saved in torchvision's key layout (safetensors): a small stand-in for the real weights in tests and tiny
    runs. Random features make no perceptual metric; this exercises the loss path only."""
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    widths = {64: channels[0], 128: channels[1], 256: channels[2], 512: channels[3]}
    layout, block = [], 0
    for entry in cfgs["D"]:
        if entry == "M":
            layout.append("M")
            block += 1
        else:
            layout.append(channels[4] if block == 4 else widths[entry])
    torch.manual_seed(seed)
    features = make_layers(layout)
    save_file({f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}, path)
    return path


class PerceptualLoss(nn.Module):
    """LPIPS distance: unit-normalised VGG16 features at five depths, squared difference weighted per
    channel by LPIPS's `lin` layers, spatial mean, summed over depths (as `lpips.LPIPS(net="vgg")` computes it).

    The weights file (safetensors or torch) holds the VGG16 trunk with torchvision keys (`features.N.*`) or
    an `lpips.LPIPS(net="vgg")` state dict (`net.sliceK.N.*`), and optionally the lin layers
    (`lin{k}.model.1.weight` or `lin{k}.weight`, [1, C, 1, 1]). Lin layers not in the file come from the
    `lpips` package's bundled file when it is installed, else are uniform (1/C). A trunk of VGG16's layout
    with fewer channels (`save_stand_in_perceptual_weights`) loads the same way. The network is frozen.
    """

    def __init__(self, weights_path: str):
        super().__init__()
        from torchvision.models.vgg import make_layers

        if not os.path.exists(weights_path):
            raise FileNotFoundError(f"perceptual_weights_path {weights_path!r} does not exist")
        state = _load_state_dict(weights_path)
        trunk = _vgg_trunk_state(state)
        try:
            layout = _vgg_layout(trunk)
        except KeyError as missing:
            raise ValueError(f"{weights_path}: VGG16 weights missing {missing}") from None
        # VGG16's conv trunk only (torchvision's layout, without the 100M-parameter classifier)
        features = make_layers(layout)[: _VGG_SLICE_ENDS[-1]]
        if next(features.parameters()).is_meta:  # a shapes-only build (meta device): nothing to copy
            missing = sorted(set(features.state_dict()) - set(trunk))
        else:
            missing, _ = features.load_state_dict(trunk, strict=False)
        if missing:
            raise ValueError(f"{weights_path}: VGG16 weights missing {missing[:4]}...")
        self.slices = nn.ModuleList(
            features[start:end] for start, end in zip((0,) + _VGG_SLICE_ENDS[:-1], _VGG_SLICE_ENDS)
        )
        channels = [trunk[f"{end - 2}.weight"].shape[0] for end in _VGG_SLICE_ENDS]  # the conv before each slice's ReLU

        def lin(source: dict, k: int) -> torch.Tensor | None:
            return source.get(f"lin{k}.model.1.weight", source.get(f"lin{k}.weight"))

        if all(lin(state, k) is not None for k in range(5)):
            lins, self.lin_source = [lin(state, k) for k in range(5)], "weights file"
        elif channels == list(_VGG_CHANNELS) and (package := _lpips_package_lins()):
            lins, self.lin_source = [lin(package, k) for k in range(5)], "lpips package"
        else:
            lins, self.lin_source = [None] * 5, "uniform"
        for k, (w, ch) in enumerate(zip(lins, channels)):
            w = w.reshape(1, ch, 1, 1).float() if w is not None else torch.full((1, ch, 1, 1), 1.0 / ch)
            self.register_buffer(f"lin{k}", w)
        self.has_lpips_lin = self.lin_source != "uniform"
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()
        log.info("perceptual loss ON: VGG16-layout trunk %s from %s (lin layers: %s)", channels, weights_path,
                 self.lin_source)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen feature net: always eval

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # In the trunk's precision: bf16 when a mixed-precision (FSDP2) tower casts its parameters, while
        # the normalization buffers stay fp32.
        dtype = self.slices[0][0].weight.dtype
        x = ((reconstruction - self.mean) / self.std).to(dtype)
        y = ((target - self.mean) / self.std).to(dtype)
        total = x.new_zeros(())
        for k, block in enumerate(self.slices):
            x, y = block(x), block(y)
            fx = x / (x.norm(dim=1, keepdim=True) + 1e-10)
            fy = y / (y.norm(dim=1, keepdim=True) + 1e-10)
            total = total + ((fx - fy) ** 2 * getattr(self, f"lin{k}")).sum(dim=1).mean()
        return total


# -- PatchGAN ------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """pix2pix/VQGAN PatchGAN: strided 4x4 convs, one real/fake logit per patch.

    GroupNorm instead of BatchNorm: no running statistics to keep in sync across ranks.
    """

    def __init__(self, layers: int = 3, channels: int = 64):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            seq += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            ch = out
        seq.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1  # images in [0, 1] -> [-1, 1]
        weight_dtype = self.net[0].weight.dtype
        if x.dtype != weight_dtype and x.is_floating_point():
            # bf16 images from a mixed-precision tower (FSDP2 casts only the parameters it shards; this
            # small network is kept whole, in fp32): compute in the images' precision, logits in fp32.
            with torch.autocast(x.device.type, dtype=x.dtype):
                return self.net(x).float()
        return self.net(x)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN: ||grad_last(rec)|| / ||grad_last(gan)||, so the GAN term pushes the decoder's last layer
    about as hard as the reconstruction term does."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach()
