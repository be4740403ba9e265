"""Evaluation metrics for the unified vision tower, in plain PyTorch.

What a tower is judged on (VILA-U trains it on contrastive + reconstruction loss, so it is scored on
both sides):

- understanding: zero-shot classification accuracy and image<->text retrieval recall@k;
- reconstruction: PSNR, SSIM and an rFID-style Frechet distance between features of the originals
  and of their reconstructions;
- the quantizer: codebook usage share and perplexity on the eval set.

The unified LM's understanding is scored on its text answers about held-back images
(`answer_accuracy`): an answer names a class when it names each of the class's words (e.g. the colour
and the shape of "red circle"), read off the answer as the first word of each word slot that occurs in it.

`evaluate_tower` runs all of them against a tower through its public API. Every metric function
takes tensors and returns Python floats, so callers (training loops, Tune) can log them directly.
Metric keys only use characters MLflow accepts in metric names (no "@").

rFID needs an Inception network. No machine here reaches a model hub, so its weights come from a
local file (`load_frechet_feature_net(path)`). Without one we use a *declared* fallback, a fixed-seed
random conv net, and the metric is named `recon_frechet_distance_random_net` so it can never be mistaken for
real rFID: random-network features do rank reconstructions sensibly, but the numbers are not
comparable with published rFID values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FrechetFeatureNet",
    "answer_accuracy",
    "parse_answer",
    "InceptionFeatureNet",
    "RandomConvFeatureNet",
    "codebook_usage",
    "evaluate_tower",
    "frechet_distance",
    "load_frechet_feature_net",
    "psnr",
    "psnr_per_image",
    "retrieval_recall",
    "ssim",
    "ssim_per_image",
    "zero_shot_accuracy",
]


# --------------------------------------------------------------------------------------------
# Reconstruction quality
# --------------------------------------------------------------------------------------------


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(a.shape)}")


def psnr_per_image(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR of each image pair, [B]. An exact reconstruction gives +inf."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    # mse == 0 divides to +inf, and log10(+inf) == +inf: a perfect reconstruction is infinitely good.
    return 10.0 * torch.log10(data_range**2 / mse)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean over the batch of per-image PSNR (dB) for images in [0, data_range]."""
    return float(psnr_per_image(a, b, data_range).mean())


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_per_image(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """SSIM (Wang et al. 2004) of each image pair, [B]: 11x11 Gaussian window (sigma 1.5), K1=0.01,
    K2=0.03, valid windows only, averaged over positions and channels. 1.0 for identical images."""
    _check_pair(a, b)
    a, b = a.double(), b.double()
    channels, height, width = a.shape[1:]
    # Small images (the tiny preset is 32 px) still work: shrink the window to fit, keeping it odd.
    size = min(window_size, height, width)
    size -= (size + 1) % 2
    window = _gaussian_window(size, sigma, a.dtype, a.device).expand(channels, 1, size, size)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov_ab = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / (
        (mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2)
    )
    return ssim_map.flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window_size: int = 11) -> float:
    """Mean over the batch of per-image SSIM for images in [0, data_range]."""
    return float(ssim_per_image(a, b, data_range, window_size).mean())


# --------------------------------------------------------------------------------------------
# Frechet distance and its feature networks
# --------------------------------------------------------------------------------------------


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix via its eigendecomposition."""
    eigvals, eigvecs = torch.linalg.eigh(m)
    return (eigvecs * eigvals.clamp_min(0).sqrt()) @ eigvecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, F] (FID's formula):

        |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))

    Covariances are unbiased (N-1), as in the reference FID code. The trace term uses
    tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): the inner matrix is symmetric PSD, so
    eigh gives it exactly, without the complex round-off a general sqrtm produces. Computed in
    float64 on the CPU. Note that with N much smaller than F the covariances are rank-deficient and
    the value is biased upwards; compare numbers only at equal N.
    """
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"expected [N, F] feature sets, got {tuple(feats_a.shape)}, {tuple(feats_b.shape)}")
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError("each feature set needs at least 2 samples for a covariance")
    a = feats_a.detach().to("cpu", torch.float64)
    b = feats_b.detach().to("cpu", torch.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    sqrt_a = _sqrtm_psd(cov_a)
    inner = sqrt_a @ cov_b @ sqrt_a
    inner = (inner + inner.T) / 2  # remove round-off asymmetry before eigvalsh
    tr_covmean = torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum()
    dist = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean
    # Round-off can leave a tiny negative number for identical sets; a distance is never negative.
    return max(float(dist), 0.0)


class FrechetFeatureNet(nn.Module):
    """Maps images in [0, 1], [B, 3, H, W], to features [B, F] for a Frechet distance.

    `metric_name` is the key the distance is reported under, so the metric always says which
    network produced it.
    """

    metric_name: str
    feature_dim: int


class InceptionFeatureNet(FrechetFeatureNet):
    """torchvision Inception-v3, 2048-d pool features at 299 px: the network of real rFID."""

    metric_name = "rfid"
    feature_dim = 2048

    def __init__(self, inception: nn.Module):
        super().__init__()
        inception.fc = nn.Identity()  # the pool features are what FID compares, not the logits
        self.inception = inception.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        # The Inception weights expect pixels scaled to [-1, 1] (what torchvision's
        # transform_input=True produces from ImageNet-normalised input).
        return self.inception(x * 2 - 1)


class RandomConvFeatureNet(FrechetFeatureNet):
    """The declared fallback when no Inception weights are configured: a small conv net with
    fixed-seed random weights (identical on every machine and run), 256-d average-pooled features
    at 64 px. Random conv features are sensitive to blur and texture loss, which is what
    reconstruction quality needs, but their distances are not on the rFID scale."""

    metric_name = "recon_frechet_distance_random_net"
    feature_dim = 256

    def __init__(self, seed: int = 0, input_size: int = 64):
        super().__init__()
        self.input_size = input_size
        channels = (3, 32, 64, 128, 256)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        # Our own generator: the weights must not depend on the global RNG state of the caller.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.features:
                if isinstance(module, nn.Conv2d):
                    fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                    module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=gen)
                    module.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.input_size, self.input_size)
        x = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
        return self.features(x * 2 - 1).mean(dim=(2, 3))


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Accept a bare state dict or a checkpoint that wraps one.
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def load_frechet_feature_net(path: str | None) -> FrechetFeatureNet:
    """The feature network for the rFID-style metric.

    `path`: a local torchvision Inception-v3 state dict (`.pt`/`.pth` via torch.load, or
    `.safetensors`), e.g. torchvision's IMAGENET1K_V1 weights copied onto the machine; the result
    reports "rfid". None: the fixed-seed random conv fallback, reported as "recon_frechet_distance_random_net".
    """
    if path is None:
        return RandomConvFeatureNet()
    from torchvision.models import inception_v3

    state = _load_state_dict(Path(path))
    has_aux = any(key.startswith("AuxLogits.") for key in state)
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
    model = inception_v3(weights=None, aux_logits=has_aux, init_weights=False, num_classes=num_classes)
    model.load_state_dict(state, strict=True)  # a wrong file must fail loudly, not give random rFID
    model.aux_logits, model.AuxLogits = False, None  # only the main branch is used
    net = InceptionFeatureNet(model)
    net.requires_grad_(False)
    return net


# --------------------------------------------------------------------------------------------
# Understanding: retrieval and zero-shot classification
# --------------------------------------------------------------------------------------------


def retrieval_recall(
    image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Recall@k both ways for N paired embeddings (image i belongs with text i).

    Keys: `i2t_recall_at_{k}` (each image retrieves among all texts) and `t2i_recall_at_{k}`.
    A pair counts at k when fewer than k wrong candidates score at least as high as the right one:
    ties count against the match, so a collapsed tower (all embeddings equal) cannot score well.
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"expected two [N, E] embeddings, got {tuple(image_emb.shape)}, {tuple(text_emb.shape)}")
    sim = image_emb.float() @ text_emb.float().T
    out: dict[str, float] = {}
    for direction, scores in (("i2t", sim), ("t2i", sim.T)):
        correct = scores.diagonal().unsqueeze(1)
        beaten_by = scores >= correct
        beaten_by.fill_diagonal_(False)
        rank = beaten_by.sum(1)  # 0 = the right candidate is strictly first
        for k in ks:
            out[f"{direction}_recall_at_{k}"] = float((rank < k).float().mean())
    return out


def zero_shot_accuracy(
    image_emb: torch.Tensor, class_text_emb: torch.Tensor, labels: torch.Tensor
) -> float:
    """Top-1 accuracy of classifying each image as the class whose text embedding is most similar."""
    pred = (image_emb.float() @ class_text_emb.float().T).argmax(1)
    return float((pred == labels.to(pred.device)).float().mean())


# --------------------------------------------------------------------------------------------
# Understanding by the LM: answers parsed for the class words
# --------------------------------------------------------------------------------------------


def _slot_vocabularies(class_names: Sequence[str]) -> list[list[str]]:
    """Per word position of the class names, the words that occur there ("red circle": colours, shapes)."""
    words = [name.lower().split() for name in class_names]
    if len({len(w) for w in words}) != 1:
        words = [[" ".join(w)] for w in words]  # names of differing length: one slot, the whole name
    return [sorted({w[i] for w in words}) for i in range(len(words[0]))]


def parse_answer(answer: str, class_names: Sequence[str]) -> list[str | None]:
    """The word of each slot that the answer names first (None: the answer names none of that slot)."""
    text = " " + " ".join("".join(c if c.isalnum() else " " for c in answer.lower()).split()) + " "
    found = []
    for vocabulary in _slot_vocabularies(class_names):
        hits = [(text.find(f" {word} "), word) for word in vocabulary if f" {word} " in text]
        found.append(min(hits)[1] if hits else None)
    return found


def answer_accuracy(answers: Sequence[str], labels: Sequence[int], class_names: Sequence[str]) -> dict:
    """How often answers name the true class, and each of its word slots, with the chance levels of a
    uniform guess: {"class_acc", "class_chance", "slot_acc": [...], "slot_chance": [...], "named": [...]}.

    An answer is right when every slot's first-named word is the true one ("a red circle" for "red
    circle"; "a red square" or "a circle" are wrong)."""
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers for {len(labels)} labels")
    vocabularies = _slot_vocabularies(class_names)
    truth = [parse_answer(class_names[label], class_names) for label in labels]
    named = [parse_answer(answer, class_names) for answer in answers]
    n = max(len(answers), 1)
    return {
        "class_acc": sum(p == t for p, t in zip(named, truth)) / n,
        "class_chance": 1.0 / len(class_names),
        "slot_acc": [sum(p[i] == t[i] for p, t in zip(named, truth)) / n for i in range(len(vocabularies))],
        "slot_chance": [1.0 / len(v) for v in vocabularies],
        "named": named,
    }


# --------------------------------------------------------------------------------------------
# Quantizer health
# --------------------------------------------------------------------------------------------


def _usage_of(flat: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    counts = torch.bincount(flat, minlength=codebook_size).double()
    probs = counts / counts.sum()
    nz = probs[probs > 0]
    entropy = -(nz * nz.log()).sum()
    return float((counts > 0).double().mean()), float(entropy.exp())


def codebook_usage(codes: torch.Tensor, codebook_size: int, shared: bool = True) -> dict[str, float]:
    """Share of codebook entries used at least once, and the perplexity exp(H) of the code
    histogram (codebook_size when all entries are used equally, 1 when one entry takes all).

    codes: [..., D]. With a shared codebook (VILA-U's) all residual depths count together; with one
    codebook per depth (`shared=False`) each depth is measured alone and the results averaged.
    """
    codes = codes.detach().to("cpu", torch.long)
    if codes.numel() == 0:
        raise ValueError("no codes given")
    if int(codes.min()) < 0 or int(codes.max()) >= codebook_size:
        raise ValueError(f"codes outside [0, {codebook_size})")
    if shared:
        usage, perplexity = _usage_of(codes.flatten(), codebook_size)
    else:
        per_depth = [_usage_of(codes[..., d].flatten(), codebook_size) for d in range(codes.shape[-1])]
        usage = sum(u for u, _ in per_depth) / len(per_depth)
        perplexity = sum(p for _, p in per_depth) / len(per_depth)
    return {"codebook_usage": usage, "codebook_perplexity": perplexity}


# --------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------


def _encode_class_prompts(tower, class_prompt_tokens: torch.Tensor, device) -> torch.Tensor:
    """Class embeddings [C, E] from prompts [C, L], or [C, T, L] for T templates per class
    (CLIP-style prompt ensembling: mean of the template embeddings, renormalised)."""
    tokens = class_prompt_tokens.to(device)
    if tokens.dim() == 2:
        return tower.encode_text(tokens).float()
    n_classes, n_templates = tokens.shape[:2]
    emb = tower.encode_text(tokens.flatten(0, 1)).float().view(n_classes, n_templates, -1).mean(1)
    return F.normalize(emb, dim=-1)


@torch.no_grad()
def evaluate_tower(
    tower,
    images: torch.Tensor,
    captions_tokens: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    class_prompt_tokens: torch.Tensor | None = None,
    frechet_net: FrechetFeatureNet | None = None,
    batch_size: int = 64,
    recall_ks: Sequence[int] = (1, 5),
    rank: int = 0,
    world: int = 1,
    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """All tower metrics on one eval split.

    images: [N, 3, S, S] in [0, 1]; captions_tokens: [N, L] text tokens paired with the images
    (retrieval); labels: [N] class ids with class_prompt_tokens [C, L] or [C, T, L] (zero-shot).
    Retrieval and zero-shot are skipped when their inputs are None. frechet_net: from
    `load_frechet_feature_net`; None uses the declared fallback (keyed as such).

    Uses the tower API: encode_image / encode_text (L2-normalised embeddings), encode_codes
    ([B, H, W, D] codes), decode_codes ([B, 3, S, S] in [0, 1]), config.codebook_size.
    The tower is put in eval mode for the call and restored afterwards.

    Data parallel (world > 1): every rank passes the whole split and encodes its own contiguous share
    of the images and captions, padded to the same size so that every rank runs the same forward calls
    (FSDP's collectives must match); ``all_gather`` concatenates a [n, ...] CPU tensor over the ranks
    in rank order. Every rank returns the same metrics as one process on the whole split.
    """
    if world > 1 and all_gather is None:
        raise ValueError("evaluate_tower: world > 1 needs an all_gather function")
    if frechet_net is None:
        frechet_net = load_frechet_feature_net(None)
    device = next(tower.parameters()).device
    frechet_net = frechet_net.to(device).eval()
    was_training = tower.training
    tower.eval()
    try:
        n_images = images.shape[0]
        image_embs, all_codes, psnrs, ssims, feats_real, feats_recon = [], [], [], [], [], []
        mine = images[_share(n_images, rank, world)]
        for start in range(0, mine.shape[0], batch_size):
            x = mine[start : start + batch_size].to(device)
            image_embs.append(tower.encode_image(x).float().cpu())
            codes = tower.encode_codes(x)
            all_codes.append(codes.cpu())
            recon = tower.decode_codes(codes).clamp(0, 1)
            x = x.to(recon.dtype)
            psnrs.append(psnr_per_image(x, recon).cpu())
            ssims.append(ssim_per_image(x, recon).cpu())
            feats_real.append(frechet_net(x).double().cpu())
            feats_recon.append(frechet_net(recon).double().cpu())

        def whole(parts: list[torch.Tensor]) -> torch.Tensor:
            """This rank's results -> the whole split's, in the split's order (padding dropped)."""
            local = torch.cat(parts)
            return (all_gather(local) if world > 1 else local)[:n_images]

        metrics: dict[str, float] = {
            "psnr": float(whole(psnrs).mean()),
            "ssim": float(whole(ssims).mean()),
            frechet_net.metric_name: frechet_distance(whole(feats_real), whole(feats_recon)),
        }
        shared = getattr(tower.config, "shared_codebook", True)
        metrics.update(codebook_usage(whole(all_codes), tower.config.codebook_size, shared))
        image_emb = whole(image_embs)

        if captions_tokens is not None:
            my_captions = captions_tokens[_share(captions_tokens.shape[0], rank, world)]
            text_emb = whole(
                [
                    tower.encode_text(my_captions[s : s + batch_size].to(device)).float().cpu()
                    for s in range(0, my_captions.shape[0], batch_size)
                ]
            )
            metrics.update(retrieval_recall(image_emb, text_emb, recall_ks))

        if labels is not None and class_prompt_tokens is not None:
            class_emb = _encode_class_prompts(tower, class_prompt_tokens, device).cpu()
            metrics["zero_shot_acc"] = zero_shot_accuracy(image_emb, class_emb, labels)
        return metrics
    finally:
        tower.train(was_training)


def _share(n: int, rank: int, world: int) -> torch.Tensor:
    """Indices of ``rank``'s contiguous share of n items, all shares ceil(n / world) long: a short last
    share repeats its last index (or item n - 1), dropped again after the gather."""
    per = -(-n // world)
    return torch.arange(rank * per, (rank + 1) * per).clamp(max=n - 1)
