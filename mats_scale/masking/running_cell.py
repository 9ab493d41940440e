"""Running-cell decoder masking (VideoMAE V2 "dual masking").

The cell (DESIGN.md): queue q = [1]*k + [0]*(4-k), k = int(4 * rho_d), 1 = dropped by the decoder.
At temporal slice t (0-based) of phase p (0..3, one per clip) the cell is c[j] = q[(j + p + t + 1) % 4],
j = 0..3 read row-major as a 2x2 block; token (t, h, w) is dropped iff c[2*(h % 2) + (w % 2)] = 1.
Every spatial position is therefore kept in exactly 4-k of any 4 consecutive slices, and every slice
keeps exactly (4-k)/4 of its H'W' positions, whatever the phase.

Given the encoder's visible ids, :func:`dual_masking` builds the decoder side in one of two modes:

- ``reference`` (VideoMAE V2 exactly): mask tokens at EVERY decoder-kept position, also those the
  encoder saw, with loss weight 0 there; target count K = T' * H'W' * (4-k) / 4, fixed.
- ``lean``: mask tokens only where the loss is taken (encoder-masked AND decoder-kept). That count is
  fixed per sample for tube masking with T' divisible by 4; otherwise every row is padded to the
  largest count the strategy can produce, with padding taken from the reference mode's zero-weight
  positions (decoder-kept, encoder-visible) and returned with weight 0.
"""

from __future__ import annotations

import torch

from mats_scale.masking.common import Selection, TokenGrid, ids_to_mask
from mats_scale.tokens import (  # noqa: F401 - counts are torch-free, re-exported here
    CELL,
    cell_drop_count,
    check_even_grid,
    decoder_kept_count,
    lean_target_range,
)


def draw_phases(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """One phase in 0..3 per clip: (B,) int64 on the generator's device."""
    return torch.randint(CELL, (batch_size,), generator=generator, device=generator.device)


def running_cell_drop(grid: TokenGrid, ratio: float, phases: torch.Tensor) -> torch.Tensor:
    """(B,) phases -> (B, N) bool, True where the decoder drops the token (flat id order)."""
    check_even_grid(grid)
    k = cell_drop_count(ratio)
    dev = phases.device
    t = torch.arange(grid.t, device=dev)[:, None, None]  # (T', 1, 1)
    h = torch.arange(grid.h, device=dev)[None, :, None]  # (1, H', 1)
    w = torch.arange(grid.w, device=dev)[None, None, :]  # (1, 1, W')
    j = 2 * (h % 2) + (w % 2)  # (1, H', W'): the cell entry each position reads
    queue_pos = (j + t + 1 + phases.view(-1, 1, 1, 1)) % CELL  # (B, T', H', W')
    return (queue_pos < k).flatten(1)  # q[i] = 1 (dropped) iff i < k


def dual_masking(
    grid: TokenGrid,
    visible_ids: torch.Tensor,
    decoder_ratio: float,
    mode: str,
    phases: torch.Tensor,
    num_targets: int | None = None,
) -> Selection:
    """Decoder side of dual masking for an encoder selection `visible_ids` (B, Nv).

    reference: targets = every decoder-kept position (B, K) ascending, weights 1 where the encoder
    masked the token, 0 where it saw it. lean: targets = loss positions, padded to `num_targets` (the
    maximum of :func:`lean_target_range`) with zero-weight decoder-kept visible positions; weights are
    None when no row needs padding by construction (min == max).
    """
    n = grid.num_tokens
    dropped = running_cell_drop(grid, decoder_ratio, phases.to(visible_ids.device))  # (B, N)
    visible = ids_to_mask(visible_ids, n)  # (B, N)
    if mode == "reference":
        K = decoder_kept_count(grid, decoder_ratio)
        # Stable argsort of the drop flag lists kept positions first, in ascending id order.
        targets = dropped.to(torch.uint8).argsort(dim=1, stable=True)[:, :K]  # (B, K)
        weights = (~visible.gather(1, targets)).float()
        return Selection(visible_ids, targets, weights)
    if mode != "lean":
        raise ValueError(f"decoder mode={mode!r}: allowed: reference, lean")
    if num_targets is None:
        raise ValueError("lean dual masking needs num_targets (see lean_target_range)")
    # Rank: 0 = loss position, 1 = kept but visible (the reference's zero-weight slots), 2 = dropped.
    rank = torch.where(dropped, 2, visible.to(torch.uint8))  # (B, N) in {0, 1, 2}
    targets = rank.argsort(dim=1, stable=True)[:, :num_targets]  # (B, M)
    targets = targets.sort(dim=1).values
    weights = (rank.gather(1, targets) == 0).float()
    return Selection(visible_ids, targets, weights)
