"""Pieces of the bundled-dataset generator (:mod:`mats_scale.data.synth`) that need nothing of it: soft
boxes, the fine texture, and the editing effects painted over rendered frames (a large fast object, a
flash).
"""

from __future__ import annotations

import numpy as np

TEXTURE_CELL = 4.0  # px between the lattice points of the fine texture


def soft_box(ys: np.ndarray, xs: np.ndarray, y0: float, x0: float, h: float, w: float) -> np.ndarray:
    """(H, W) coverage of an axis-aligned box with 2 px linear edges (coarse, not aliased)."""
    return (
        np.clip((ys - y0) / 2, 0, 1)
        * np.clip((y0 + h - ys) / 2, 0, 1)
        * np.clip((xs - x0) / 2, 0, 1)
        * np.clip((x0 + w - xs) / 2, 0, 1)
    )


def value_noise(fx: np.random.Generator, lo: np.ndarray, hi: np.ndarray):
    """A texture in [-1, 1] over the scene box [lo, hi] (y, x): random values on a lattice of
    :data:`TEXTURE_CELL` px, interpolated with smoothstep weights (continuous, so sub-pixel camera
    moves give sub-pixel texture moves). Returns f(ys, xs) -> (H, W) float32."""
    origin = np.floor(lo) - 2 * TEXTURE_CELL
    n = (np.ceil((hi - origin) / TEXTURE_CELL) + 3).astype(int)
    lattice = fx.uniform(-1.0, 1.0, (n[0], n[1])).astype(np.float32)

    def f(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        gy, gx = (ys - origin[0]) / TEXTURE_CELL, (xs - origin[1]) / TEXTURE_CELL
        iy, ix = np.floor(gy).astype(int), np.floor(gx).astype(int)
        fy, fx_ = gy - iy, gx - ix
        wy, wx = fy * fy * (3 - 2 * fy), fx_ * fx_ * (3 - 2 * fx_)
        top = lattice[iy, ix] * (1 - wx) + lattice[iy, ix + 1] * wx
        bottom = lattice[iy + 1, ix] * (1 - wx) + lattice[iy + 1, ix + 1] * wx
        return (top * (1 - wy) + bottom * wy).astype(np.float32)

    return f


def add_fast_object(frames: np.ndarray, speed: float, fx: np.random.Generator) -> None:
    """Paint a large flat box crossing `frames` (L, H, W, 3) uint8 horizontally at `speed` px/frame, in
    place: its size, colour, height on screen and direction drawn from `fx`, entering the screen at a
    frame drawn in the first half of the clip."""
    L, H, W, _ = frames.shape
    h, w = fx.uniform(0.5, 0.8) * H, fx.uniform(0.4, 0.6) * W
    y0 = fx.uniform(0, H - h)
    colour = fx.uniform(0, 1, 3).astype(np.float32) * 255.0
    sign = 1.0 if fx.uniform() < 0.5 else -1.0
    enter = fx.uniform(0, L / 2)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    for t in range(L):
        travel = speed * (t - enter)  # how far the leading edge is past the screen's edge
        x0 = travel - w if sign > 0 else W - travel
        alpha = soft_box(ys, xs, y0, x0, h, w)[..., None]
        if alpha.any():
            frames[t] = np.clip(frames[t] * (1 - alpha) + colour * alpha + 0.5, 0, 255).astype(np.uint8)


def add_flash(frames: np.ndarray, fx: np.random.Generator) -> None:
    """Brighten one frame of `frames` (L, H, W, 3) uint8 (drawn from `fx`, not the first or last) by
    50-80% of the way to white, in place."""
    k, gain = int(fx.integers(1, len(frames) - 1)), fx.uniform(0.5, 0.8)
    frames[k] = np.clip(frames[k] + gain * (255.0 - frames[k]) + 0.5, 0, 255).astype(np.uint8)


__all__ = ["TEXTURE_CELL", "add_fast_object", "add_flash", "soft_box", "value_noise"]
