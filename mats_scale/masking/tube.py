"""Tube masking (VideoMAE): one random spatial mask per clip, repeated in every temporal slice."""

from __future__ import annotations

import torch

from mats_scale.masking.common import Selection, TokenGrid


def tube_masking(grid: TokenGrid, ratio: float, batch_size: int, generator: torch.Generator) -> Selection:
    """int(ratio * H'W') spatial positions are masked in every slice; the rest are visible.

    Returns visible ids (B, T' * (H'W' - n_mask)) and target ids (B, T' * n_mask), both ascending.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"tube mask ratio={ratio!r}: must be in (0, 1)")
    hw = grid.spatial
    n_mask = int(ratio * hw)
    noise = torch.rand(batch_size, hw, generator=generator, device=generator.device)
    order = noise.argsort(dim=1)  # (B, HW): a random permutation of spatial positions per clip
    masked = order[:, :n_mask].sort(dim=1).values
    visible = order[:, n_mask:].sort(dim=1).values
    offsets = torch.arange(grid.t, device=order.device) * hw  # (T',)

    def expand(spatial: torch.Tensor) -> torch.Tensor:  # (B, k) -> (B, T' * k), time-major
        return (offsets[None, :, None] + spatial[:, None, :]).flatten(1)

    return Selection(expand(visible), expand(masked))
