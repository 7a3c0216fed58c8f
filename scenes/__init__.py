"""Procedurally generated scenes for training and evaluating the bundled model (numpy + OpenCV).

Every scene is a deterministic function of its seed: a smooth, noisy two-colour background with
one to four coloured, textured shapes (disc, square, triangle, star) at random sizes, positions and
rotations, later shapes occluding earlier ones. The class of a shape is its outline, never its
colour, so a network must learn shape; object colours differ from the background, so image edges
carry the boundaries that a dense CRF can snap to.

Three disjoint seed ranges, one per use: training draws seeds 0.. (10,000,000 per training seed,
export/training.py), held-out evaluation scenes HELD_OUT_SEED + i, INT8 calibration scenes
CALIBRATION_SEED + i. A leaf package (numpy and OpenCV only): training, evaluation, calibration
and the benchmarks all draw from it, so none of them imports another for its data.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

CLASS_NAMES = ("background", "disc", "square", "triangle", "star")
# Colours used to draw masks for these classes (RGB), VOC-like.
PALETTE = ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128))


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    if kind == "square":
        angles = angle + np.arange(4) * math.pi / 2 + math.pi / 4
        radii = np.full(4, r)
    elif kind == "triangle":
        angles = angle + np.arange(3) * 2 * math.pi / 3
        radii = np.full(3, r * 1.15)
    elif kind == "star":
        angles = angle + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r * 1.15, r * 0.5)
    else:
        raise ValueError(kind)
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return np.round(pts * 16).astype(np.int32)  # 4 fractional bits for cv2 shift=4


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c0, c1 = rng.uniform(30, 225, size=(2, 3))
    t = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (np.cos(t) * xx / max(w, 1) + np.sin(t) * yy / max(h, 1))
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    img = c0[None, None] * (1 - ramp[..., None]) + c1[None, None] * ramp[..., None]
    # Low-frequency clutter, so that the background is not flat.
    blobs = rng.normal(0, 25, size=(max(2, h // 24), max(2, w // 24), 3)).astype(np.float32)
    img += cv2.resize(blobs, (w, h), interpolation=cv2.INTER_CUBIC)
    return img


def make_scene(seed: int, height: int = 161, width: int = 161) -> tuple[np.ndarray, np.ndarray]:
    """Return (image H x W x 3 uint8 BGR, labels H x W uint8 with values < len(CLASS_NAMES))."""
    rng = np.random.default_rng(seed)
    img = _background(rng, height, width)
    labels = np.zeros((height, width), np.uint8)
    side = min(height, width)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        r = float(rng.uniform(0.08, 0.25) * side)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        mask = np.zeros((height, width), np.uint8)
        if CLASS_NAMES[cls] == "disc":
            cv2.circle(mask, (int(cx * 16), int(cy * 16)), int(r * 16), 1, -1, cv2.LINE_8, 4)
        else:
            pts = _polygon(CLASS_NAMES[cls], cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
            cv2.fillPoly(mask, [pts], 1, cv2.LINE_8, 4)
        on = mask.astype(bool)
        if not on.any():
            continue
        # An object colour far enough from the background under it.
        under = img[on].mean(axis=0)
        for _ in range(20):
            colour = rng.uniform(0, 255, size=3)
            if np.linalg.norm(colour - under) > 90:
                break
        img[on] = colour + rng.normal(0, 10, size=(int(on.sum()), 3))
        labels[on] = cls
    img = cv2.GaussianBlur(img, (0, 0), 0.7) + rng.normal(0, 5, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), labels


def scene_for_seed(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """make_scene with its height and width (each 193..385) drawn from the seed as well: most sides
    are not of the form 8k+1 and scenes are square only by chance (held-out and calibration scenes)."""
    h, w = (int(v) for v in np.random.default_rng(seed).integers(193, 386, size=2))
    return make_scene(seed, h, w)


#: Seeds of the held-out scenes: past any realistic training run (seeds 10,000,000 * seed + iteration
#: * batch, from 0).
HELD_OUT_SEED = 1_000_000
#: Seeds of the INT8 calibration scenes: apart from training (0..) and evaluation (1,000,000..).
CALIBRATION_SEED = 2_000_000


def held_out_scene(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out scene number i (seed HELD_OUT_SEED + i, sides drawn from the seed): (image, labels)."""
    return scene_for_seed(HELD_OUT_SEED + i)


def calibration_scenes(count: int) -> list[tuple[str, np.ndarray]]:
    """(name, image) of ``count`` calibration scenes: seeds CALIBRATION_SEED + i, sides 193..385 drawn
    from the seed, as the held-out scenes; named scene_<seed>_<H>x<W>."""
    scenes = []
    for seed in range(CALIBRATION_SEED, CALIBRATION_SEED + count):
        image = scene_for_seed(seed)[0]
        h, w = image.shape[:2]
        scenes.append((f"scene_{seed}_{h}x{w}", image))
    return scenes
