"""Clips generated in memory: squares moving over static textured backgrounds.

Used by the in-memory dataset (``data.dataset=synthetic``), the tests and the benchmarks. Pixels are
float32 in [0, 1]; :func:`normalize` applies the ImageNet normalisation the model expects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mats_scale.config import IMAGENET_MEAN, IMAGENET_STD


def textured_background(
    batch: int, height: int, width: int, generator: torch.Generator, cells: int = 8
) -> torch.Tensor:
    """(B, 3, H, W) static texture: a random sinusoidal grating (orientation, period 6-24 px, colours)
    over smooth noise (bilinearly upsampled from a cells x cells lattice).

    The grating repeats across patches, so a masked patch is predictable from visible ones; the noise
    keeps every patch distinct.
    """
    angle = torch.rand(batch, generator=generator) * torch.pi
    period = 6 + 18 * torch.rand(batch, generator=generator)
    ys = torch.arange(height, dtype=torch.float32)[None, :, None]
    xs = torch.arange(width, dtype=torch.float32)[None, None, :]
    phase = (xs * angle.cos()[:, None, None] + ys * angle.sin()[:, None, None]) * (
        2 * torch.pi / period[:, None, None]
    )
    wave = 0.5 + 0.5 * torch.sin(phase)[:, None]  # (B, 1, H, W)
    c0, c1 = torch.rand(2, batch, 3, 1, 1, generator=generator)
    coarse = torch.rand(batch, 3, cells, cells, generator=generator)
    noise = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return 0.8 * (c0 + (c1 - c0) * wave) + 0.2 * noise


def square_positions(num_frames: int, start: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """Top-left corners (B, T, 2) as (y, x) for straight-line motion: start (B, 2) + t * velocity (B, 2)."""
    t = torch.arange(num_frames, dtype=torch.float32)[None, :, None]
    return start[:, None, :].float() + t * velocity[:, None, :].float()


def render_squares(
    background: torch.Tensor, positions: torch.Tensor, square: int, color: torch.Tensor
) -> torch.Tensor:
    """Paint a square of side `square` at `positions` (B, T, 2) over a static background (B, 3, H, W).

    Returns (B, 3, T, H, W). Positions are rounded to pixels and may leave the frame partly.
    """
    B, C, H, W = background.shape
    T = positions.shape[1]
    ys = torch.arange(H)[None, None, :, None]  # (1, 1, H, 1)
    xs = torch.arange(W)[None, None, None, :]  # (1, 1, 1, W)
    y0 = positions[..., 0].round()[..., None, None]  # (B, T, 1, 1)
    x0 = positions[..., 1].round()[..., None, None]
    inside = (ys >= y0) & (ys < y0 + square) & (xs >= x0) & (xs < x0 + square)  # (B, T, H, W)
    video = background[:, :, None].expand(B, C, T, H, W)
    return torch.where(inside[:, None], color[:, :, None, None, None], video)


def moving_square_clips(
    batch: int, num_frames: int, size: int, generator: torch.Generator, square: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of clips (B, 3, T, S, S) in [0, 1] and the square's top-left corners (B, T, 2).

    Each clip has its own texture, colour, start and velocity; the square stays inside the frame.
    """
    square = square or max(size // 4, 2)
    span = size - square
    velocity = (torch.rand(batch, 2, generator=generator) * 2 - 1) * span / max(num_frames - 1, 1)
    # Start so that start + (T-1) * v stays inside [0, span] on both axes.
    end_shift = velocity * (num_frames - 1)
    low = torch.clamp(-end_shift, min=0)
    high = span - torch.clamp(end_shift, min=0)
    start = low + torch.rand(batch, 2, generator=generator) * (high - low)
    positions = square_positions(num_frames, start, velocity)
    background = textured_background(batch, size, size, generator)
    color = torch.rand(batch, 3, generator=generator)
    return render_squares(background, positions, square, color), positions


def normalize(video: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of (B, 3, T, H, W) pixels in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=video.dtype, device=video.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=video.dtype, device=video.device).view(1, 3, 1, 1, 1)
    return (video - mean) / std
