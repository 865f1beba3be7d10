"""The synthetic captioned dataset the default model is trained on: coloured shapes on coloured
backgrounds, two sizes, a 3x3 grid of positions. Drawn here, seeded and reproducible.

A set of (shape, colour, background) combinations never appears in training; the evaluation uses it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 200),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLORS = tuple(PALETTE)
SIZES = {"small": 0.2, "large": 0.36}  # shape radius as a share of the image side
POSITIONS = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)
TEMPLATES = (
    "a {size} {color} {shape} on a {background} background, {position}",
    "{size} {color} {shape}, {background} background, {position}",
    "a {color} {shape}, {size}, on {background}, {position}",
    "{position}, a {size} {color} {shape} on a {background} background",
)
EMPTY_CAPTION_SHARE = 0.1
PARTIAL_CAPTION_SHARE = 0.15


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    size: str
    position: str

    @property
    def cell(self) -> tuple[int, int]:
        index = POSITIONS.index(self.position)
        return index // 3, index % 3  # (row, column)

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template].format(**self.__dict__)


def held_out_triples(seed: int = 1234, count: int = 24) -> set[tuple[str, str, str]]:
    """(shape, colour, background) combinations kept out of training, for evaluation."""
    triples = [(s, c, b) for s, c, b in product(SHAPES, COLORS, COLORS) if c != b]
    return set(random.Random(seed).sample(triples, count))


def random_scene(rng: random.Random, exclude: set[tuple[str, str, str]]) -> Scene:
    while True:
        color, background = rng.sample(COLORS, 2)
        scene = Scene(rng.choice(SHAPES), color, background, rng.choice(tuple(SIZES)), rng.choice(POSITIONS))
        if (scene.shape, scene.color, scene.background) not in exclude:
            return scene


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        a, b = r * 0.33, r
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
                (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
                (cx - b, cy - a), (cx - a, cy - a)]
    raise ValueError(shape)


STYLES = ("solid", "outlined")


def render(scene: Scene, rng: random.Random | None = None, size: int = SIZE, style: str = "solid") -> Image.Image:
    """Draw a scene, with a little jitter of position and size when `rng` is given.

    `style="outlined"` draws only the shape's outline (the demo LoRA's style)."""
    jitter = (lambda spread: rng.uniform(-spread, spread)) if rng else (lambda spread: 0.0)
    scale = 4  # draw large, then downsample: smooth edges
    canvas = Image.new("RGB", (size * scale, size * scale), PALETTE[scene.background])
    draw = ImageDraw.Draw(canvas)
    row, column = scene.cell
    cell = size / 3
    cx = (column + 0.5) * cell + jitter(cell * 0.08)
    cy = (row + 0.5) * cell + jitter(cell * 0.08)
    r = SIZES[scene.size] * size / 2 * 1.0 + jitter(SIZES[scene.size] * size * 0.05)
    cx, cy, r = cx * scale, cy * scale, r * scale
    fill = PALETTE[scene.color] if style == "solid" else None
    outline = PALETTE[scene.color] if style == "outlined" else None
    width = round(2.2 * scale) if style == "outlined" else 1
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r), fill=fill, outline=outline, width=width)
    return canvas.resize((size, size), Image.LANCZOS)


def caption_for(scene: Scene, rng: random.Random) -> str:
    """A caption variant; some leave attributes out, some are empty (for classifier-free guidance)."""
    roll = rng.random()
    if roll < EMPTY_CAPTION_SHARE:
        return ""
    if roll < EMPTY_CAPTION_SHARE + PARTIAL_CAPTION_SHARE:
        text = f"a {scene.color} {scene.shape}"
        if rng.random() < 0.5:
            text += f" on a {scene.background} background"
        if rng.random() < 0.5:
            text += f", {scene.position}"
        return text
    return scene.caption(rng.randrange(len(TEMPLATES)))


def sample_batch(
    rng: random.Random, count: int, exclude: set, style: str = "solid"
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """`count` rendered scenes as a (count, 64, 64, 3) uint8 array, their captions and scenes."""
    scenes = [random_scene(rng, exclude) for _ in range(count)]
    pixels = np.stack([np.asarray(render(scene, rng, style=style)) for scene in scenes])
    return pixels, [caption_for(scene, rng) for scene in scenes], scenes
