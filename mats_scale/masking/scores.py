"""The motion scores a data loader computes without the model (``masking.score`` pixel / compensated /
compensated_zoom);
the embedding score needs the model's patch embedding (:func:`.motion.embed_motion_scores`)."""

from __future__ import annotations

import torch

from mats_scale.masking.compensated import compensated_motion_scores
from mats_scale.masking.motion import pixel_motion_scores

LOADER_SCORES = ("pixel", "compensated", "compensated_zoom")
"""``masking.score`` values the data loader computes (no model needed)."""


def loader_motion_scores(
    score: str, video: torch.Tensor, tubelet: int, patch: int, cuts: torch.Tensor | None = None
) -> torch.Tensor | None:
    """``masking.score`` computed without the model, (B, N): ``pixel_motion_scores`` (pixel) or
    ``compensated_motion_scores`` (compensated; compensated_zoom: with zooms) of `video`
    (B, C, T, H, W), not counting differences across the shot cuts (B, T-1) if given; None for a
    score that needs the model (embed)."""
    if score == "pixel":
        return pixel_motion_scores(video, tubelet, patch, cuts)
    if score in ("compensated", "compensated_zoom"):
        return compensated_motion_scores(video, tubelet, patch, cuts, zoom=score == "compensated_zoom")
    return None
