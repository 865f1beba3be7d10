"""Scoring generated shape images against their prompts, with simple documented measures:

- background colour: the palette colour nearest to the median of the 3-pixel border;
- object: pixels whose colour is far from that background colour; its colour is the palette colour
  nearest to their median;
- position: the 3x3 grid cell holding the object's centroid;
- shape: a softmax (multinomial logistic) classifier over the object's mask, cropped to its bounding
  box and resampled to 20x20, trained on renders of the same generator;
- size: small or large by the longer side of the object's bounding box, split at the midpoint of the
  two sizes' mean extents (area would mix size with shape: a star covers less than a square).

`Scorer.fit()` trains the shape classifier and the size threshold; on real renders every measure
scores close to 1 (the ceiling reported beside the model's scores).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image

from training import shapes

PALETTE_ARRAY = np.array([shapes.PALETTE[c] for c in shapes.COLORS], dtype=np.float32)
CROP = 20


def nearest_color(rgb: np.ndarray) -> str:
    return shapes.COLORS[int(np.argmin(((PALETTE_ARRAY - rgb) ** 2).sum(axis=1)))]


@dataclass
class Reading:
    color: str | None
    background: str
    cell: tuple[int, int] | None
    shape: str | None
    size: str | None


def object_mask(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of object pixels, background RGB) of an (H, W, 3) uint8 image."""
    border = np.concatenate([pixels[:3].reshape(-1, 3), pixels[-3:].reshape(-1, 3),
                             pixels[:, :3].reshape(-1, 3), pixels[:, -3:].reshape(-1, 3)]).astype(np.float32)
    background = np.median(border, axis=0)
    distance = np.sqrt(((pixels.astype(np.float32) - background) ** 2).sum(axis=-1))
    return distance > 80, background


def extent(mask: np.ndarray) -> int:
    ys, xs = np.nonzero(mask)
    return max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 if len(ys) else 0


def mask_features(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if len(ys) < 4:
        return None
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8) * 255
    small = np.asarray(Image.fromarray(crop).resize((CROP, CROP), Image.BILINEAR), dtype=np.float32) / 255
    return np.append(small.ravel(), [crop.shape[0] / max(crop.shape[1], 1), 1.0])


class Scorer:
    def __init__(self):
        self.weights: np.ndarray | None = None
        self.size_threshold = 0.0

    def fit(self, samples: int = 3000, seed: int = 7, epochs: int = 300) -> Scorer:
        rng = random.Random(seed)
        features, labels, areas = [], [], {"small": [], "large": []}
        for _ in range(samples):
            scene = shapes.random_scene(rng, set())
            mask, _ = object_mask(np.asarray(shapes.render(scene, rng)))
            feature = mask_features(mask)
            if feature is None:
                continue
            features.append(feature)
            labels.append(shapes.SHAPES.index(scene.shape))
            areas[scene.size].append(extent(mask))
        x, y = np.stack(features), np.array(labels)
        onehot = np.eye(len(shapes.SHAPES))[y]
        w = np.zeros((x.shape[1], len(shapes.SHAPES)))
        for _ in range(epochs):  # full-batch gradient descent on the softmax cross-entropy
            logits = x @ w
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            w -= 0.5 * (x.T @ (p - onehot) / len(x) + 1e-4 * w)
        self.weights = w
        self.size_threshold = (np.mean(areas["small"]) + np.mean(areas["large"])) / 2
        return self

    def read(self, image: Image.Image) -> Reading:
        pixels = np.asarray(image.convert("RGB").resize((shapes.SIZE, shapes.SIZE), Image.BILINEAR))
        mask, background = object_mask(pixels)
        background_name = nearest_color(background)
        feature = mask_features(mask)
        if feature is None:
            return Reading(None, background_name, None, None, None)
        color = nearest_color(np.median(pixels[mask].astype(np.float32), axis=0))
        ys, xs = np.nonzero(mask)
        cell = (min(2, int(ys.mean() * 3 / pixels.shape[0])), min(2, int(xs.mean() * 3 / pixels.shape[1])))
        shape = shapes.SHAPES[int(np.argmax(feature @ self.weights))]
        size = "large" if extent(mask) > self.size_threshold else "small"
        return Reading(color, background_name, cell, shape, size)

    def score(self, images: list[Image.Image], scenes: list[shapes.Scene]) -> dict[str, float]:
        """Share of images whose measured attribute matches the prompt, per attribute."""
        hits = {"color": 0, "background": 0, "shape": 0, "size": 0, "position": 0}
        for image, scene in zip(images, scenes):
            reading = self.read(image)
            hits["color"] += reading.color == scene.color
            hits["background"] += reading.background == scene.background
            hits["shape"] += reading.shape == scene.shape
            hits["size"] += reading.size == scene.size
            hits["position"] += reading.cell == scene.cell
        return {key: value / max(1, len(scenes)) for key, value in hits.items()}
