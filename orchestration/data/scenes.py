"""Generated scenes with captions that describe them.

A scene is one coloured shape at one of a few positions on a light background, so that the caption
carries real signal for contrastive learning and the pixels are simple enough for a tiny tower to
reconstruct. The class of a scene (for zero-shot evaluation) is its colour and shape.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 200, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
MOTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
# Share of scene captions that name the object only ("a photo of a red circle"), as alt-texts vary in
# detail. Without them every caption ends in its position, and a frozen (random) text tower weighs
# those words as much as the colour and shape: the object-only phrase then never occurs in training, and
# the tower learns position at the expense of shape.
OBJECT_ONLY_CAPTION_SHARE = 0.5


def class_names() -> list[str]:
    """All scene classes, e.g. "red circle", in a fixed order (index = label)."""
    return [f"{color} {shape}" for color in COLORS for shape in SHAPES]


def zero_shot_prompt(class_name: str) -> str:
    return f"a photo of a {class_name}"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        w = r / 2.5
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(200, 256, size=3))


def render_scene(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, str, int]:
    """One image (uint8 HxWx3), its caption and its class label."""
    label = int(rng.integers(len(COLORS) * len(SHAPES)))
    color, shape = class_names()[label].split(" ")
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    fx, fy = POSITIONS[position]
    image = Image.new("RGB", (size, size), _background(rng))
    radius = size * float(rng.uniform(0.14, 0.2))
    jitter = rng.uniform(-0.05, 0.05, size=2) * size
    _draw_shape(ImageDraw.Draw(image), shape, fx * size + jitter[0], fy * size + jitter[1], radius, COLORS[color])
    caption = zero_shot_prompt(f"{color} {shape}")
    if rng.random() >= OBJECT_ONLY_CAPTION_SHARE:
        caption = f"{caption} at the {position}"
    return np.asarray(image), caption, label


def render_clip(rng: np.random.Generator, num_frames: int, size: int = 64) -> tuple[np.ndarray, str]:
    """A clip (uint8 TxHxWx3) of one shape moving across a still background, and its caption."""
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    motion = list(MOTIONS)[int(rng.integers(len(MOTIONS)))]
    dx, dy = MOTIONS[motion]
    background = _background(rng)
    radius = size * 0.15
    frames = []
    for t in range(num_frames):
        progress = t / max(num_frames - 1, 1) - 0.5  # -0.5 .. 0.5
        cx = size * (0.5 + 0.5 * dx * progress)
        cy = size * (0.5 + 0.5 * dy * progress)
        image = Image.new("RGB", (size, size), background)
        _draw_shape(ImageDraw.Draw(image), shape, cx, cy, radius, COLORS[color])
        frames.append(np.asarray(image))
    return np.stack(frames), f"a {color} {shape} moving {motion}"
