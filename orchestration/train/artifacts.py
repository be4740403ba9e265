"""Images and plots logged to MLflow: reconstruction grids, generated samples, codebook usage."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def image_grid(rows: list[torch.Tensor], scale: int = 2, pad: int = 2) -> Image.Image:
    """One image of several rows of images (each [N, 3, S, S] in [0, 1]), e.g. originals over
    reconstructions. Small images are upscaled (nearest) so they stay visible."""
    n, _, s, _ = rows[0].shape
    cell = s * scale
    canvas = np.full((len(rows) * (cell + pad) + pad, n * (cell + pad) + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        pixels = (row.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for i, img in enumerate(pixels):
            img = img.repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = pad + r * (cell + pad), pad + i * (cell + pad)
            canvas[y : y + cell, x : x + cell] = img
    return Image.fromarray(canvas)


def codebook_usage_figure(ema_count: torch.Tensor, title: str):
    """Sorted EMA usage count of every code (log scale): a flat curve = a well-used codebook, a cliff =
    dead codes. ``ema_count``: [num_codebooks, K]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = ema_count.detach().float().cpu()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for book in range(counts.shape[0]):
        values = counts[book].sort(descending=True).values.clamp_min(1e-3).numpy()
        ax.plot(np.arange(len(values)), values, label=f"codebook {book}" if counts.shape[0] > 1 else None)
    used = float((counts > 1.0).float().mean())
    ax.set_yscale("log")
    ax.set_xlabel("code rank")
    ax.set_ylabel("EMA assignment count")
    ax.set_title(f"{title}: {100 * used:.1f}% of codes with EMA count > 1")
    if counts.shape[0] > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
