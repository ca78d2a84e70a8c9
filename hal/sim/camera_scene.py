"""The synthetic scene of a camera source with `simulate: true`: two objects crossing a textured
background, plus sensor noise. Motion for demos and CI without a camera."""
from __future__ import annotations

import numpy as np


def render(t: float, size: tuple[int, int], rng: np.random.Generator, gray: bool) -> np.ndarray:
    """The frame at t seconds: uint8, (height, width) gray or (height, width, 3) BGR."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    frame = (96 + 32 * np.sin(x / 7.0) * np.cos(y / 11.0)).astype(np.float32)
    for speed, phase, row, radius in ((0.21, 0.6, 0.35, 0.10), (0.13, 0.9, 0.7, 0.07)):
        cx = ((t * speed + phase) % 1.4 - 0.2) * w     # fraction of the width per second
        cy, r = row * h, radius * min(w, h)
        frame[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = 220
    frame += rng.normal(0, 2.0, frame.shape)
    out = np.clip(frame, 0, 255).astype(np.uint8)
    return out if gray else np.repeat(out[:, :, None], 3, axis=2)
