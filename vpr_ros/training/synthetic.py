"""Procedural training images: the dead-leaves model, for label-free distillation.

A dead-leaves image (Matheron; Lee, Mumford & Huang, "Occlusion models for natural images", IJCV 2001) is
a stack of opaque random shapes whose sizes follow ``p(r) ~ r^-3`` on ``[r_min, r_max]``: the one size law
that makes the image's statistics scale-invariant, as natural images are (a 1/f^2 power spectrum, edges
at every scale). Shapes are painted back to front until the canvas is covered many times over, so the
visible mosaic is the model's stationary state. Here half the leaves are disks and half rotated
rectangles (street and indoor scenes have straight edges), each a flat, muted colour (a grey level plus a
small tint), under one gentle illumination gradient.

What they are for: the general student (``methods/general.py``) learns to give a degraded image the
descriptor its teacher gives the clean one. The pool's real images are few and small (IE tower 320x180,
Nordland 64x32), so a downscaled link often removes detail those images never had; dead leaves have
detail at every scale up to the canvas size. Achddou et al. ("Synthetic images as a regularity prior for
image restoration neural networks", SSVM 2021) train restoration networks on such images alone.
Every image is a pure function of (seed, index): nothing is stored, and pools are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from vpr_ros.data.places import ImageRecord

#: ``path`` of every dead-leaves record (the pair store's key hashes path, name and the recipe).
DEAD_LEAVES_PATH = Path("<dead_leaves>")


def leaf_radii(rng: np.random.Generator, n: int, r_min: float, r_max: float) -> np.ndarray:
    """``n`` radii with density ``p(r) = c r^-3`` on ``[r_min, r_max]`` (inverse-CDF sampling)."""
    if not 0 < r_min < r_max:
        raise ValueError(f"need 0 < r_min < r_max, got {r_min}, {r_max}")
    u = rng.random(n)
    a, b = r_min ** -2.0, r_max ** -2.0
    return (a - u * (a - b)) ** -0.5


def dead_leaves(seed: int, index: int, size: tuple[int, int] = (240, 320), *, r_min: float = 2.0,
                r_max: float | None = None, coverage: float = 6.0) -> np.ndarray:
    """The dead-leaves image ``index`` of ``seed``: (H, W, 3) uint8 RGB.

    ``r_max`` defaults to a third of the shorter side; ``coverage``: the leaves' mean total area over the
    canvas area (6: a pixel is left as the background with probability about e^-6).
    """
    h, w = int(size[0]), int(size[1])
    r_max = float(r_max) if r_max is not None else min(h, w) / 3.0
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 11, int(index)])
    # E[pi r^2] under r^-3 on [a, b]: 2 pi ln(b/a) / (a^-2 - b^-2)
    mean_area = 2 * np.pi * np.log(r_max / r_min) / (r_min ** -2.0 - r_max ** -2.0)
    n = int(np.ceil(coverage * h * w / mean_area))
    radii = leaf_radii(rng, n, r_min, r_max)  # in random order: sizes independent of depth
    centres = rng.random((n, 2)) * [w, h]
    # muted colours, as in natural scenes: a grey level plus a small tint
    colours = np.clip(rng.uniform(0, 255, (n, 1)) + rng.normal(0, 25, (n, 3)), 0, 255)
    square = rng.random(n) < 0.5
    angles = rng.random(n) * np.pi
    aspect = np.exp(rng.uniform(-0.7, 0.7, n))  # rectangles from 1:2 to 2:1
    canvas = np.empty((h, w, 3), np.uint8)
    canvas[:] = rng.integers(0, 256, 3)
    for i in range(n):
        cx, cy, r = centres[i, 0], centres[i, 1], radii[i]
        colour = tuple(int(c) for c in colours[i])
        if square[i]:
            hx, hy = r * aspect[i] ** 0.5, r / aspect[i] ** 0.5
            c, s = np.cos(angles[i]), np.sin(angles[i])
            corners = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]]) @ np.array([[c, s], [-s, c]])
            cv2.fillConvexPoly(canvas, np.rint((corners + [cx, cy]) * 16).astype(np.int32), colour,
                               lineType=cv2.LINE_AA, shift=4)
        else:
            cv2.circle(canvas, (int(round(cx * 16)), int(round(cy * 16))), max(1, int(round(r * 16))), colour,
                       thickness=-1, lineType=cv2.LINE_AA, shift=4)
    # a gentle illumination gradient over the whole image, as from a light to one side
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = rng.normal(size=2)
    ramp = 1.0 + 0.25 * ((gx / w - 0.5) * d[0] + (gy / h - 0.5) * d[1])
    return np.clip(canvas * ramp[..., None], 0, 255).astype(np.uint8)


@dataclass
class DeadLeavesRecord(ImageRecord):
    """One dead-leaves image: generated on ``load()`` from (``seed``, ``index``)."""

    seed: int = 0
    index: int = 0
    size: tuple[int, int] = (240, 320)

    def load(self) -> np.ndarray:
        return dead_leaves(self.seed, self.index, self.size)


def dead_leaves_records(count: int, *, seed: int = 0,
                        size: tuple[int, int] = (240, 320)) -> list[DeadLeavesRecord]:
    """``count`` dead-leaves records, named ``dead_leaves/<seed>/<size>/<index>``."""
    h, w = int(size[0]), int(size[1])
    return [DeadLeavesRecord(path=DEAD_LEAVES_PATH, name=f"dead_leaves/{seed}/{h}x{w}/{i:06d}", seed=seed,
                             index=i, size=(h, w)) for i in range(int(count))]
