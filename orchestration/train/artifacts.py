"""Images and plots logged to MLflow: reconstruction grids, generated samples, codebook usage."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def image_grid(rows: list[torch.Tensor], scale: int = 2, pad: int = 2, column_labels: list[str] | None = None,
               row_labels: list[str] | None = None) -> Image.Image:
    """One image of several rows of images (each [N, 3, S, S] in [0, 1]), e.g. originals over
    reconstructions, with a label over each column (e.g. the prompt) and before each row. Small images
    are upscaled (nearest) so they stay visible."""
    from PIL import ImageDraw, ImageFont

    n, _, s, _ = rows[0].shape
    scale = max(scale, -(-96 // s))  # cells of at least 96 px, so a label fits under a few words
    cell = s * scale
    font = ImageFont.load_default(size=11)
    column_lines = [_wrap(label, font, cell) for label in column_labels] if column_labels else []
    header = (max(len(lines) for lines in column_lines) * 13 + pad) if column_lines else 0
    left = (max(int(font.getlength(label)) for label in row_labels) + 2 * pad) if row_labels else 0
    canvas = np.full((header + len(rows) * (cell + pad) + pad, left + n * (cell + pad) + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        pixels = (row.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for i, img in enumerate(pixels):
            img = img.repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = header + pad + r * (cell + pad), left + pad + i * (cell + pad)
            canvas[y : y + cell, x : x + cell] = img
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for i, lines in enumerate(column_lines):
        for k, line in enumerate(lines):
            draw.text((left + pad + i * (cell + pad), pad + 13 * k), line, fill=(0, 0, 0), font=font)
    for r, label in enumerate(row_labels or []):
        draw.text((pad, header + pad + r * (cell + pad) + cell // 2 - 6), label, fill=(0, 0, 0), font=font)
    return image


def _wrap(text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (a word longer than that stands alone)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


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
