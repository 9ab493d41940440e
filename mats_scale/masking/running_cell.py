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

from typing import Optional

import torch

from mats_scale.masking.common import Selection, TokenGrid, ids_to_mask

CELL = 4  # positions of the 2x2 cell, and the period of the running cell in slices


def cell_drop_count(ratio: float) -> int:
    """k = int(4 * rho_d): positions dropped per 2x2 cell; only 1..3 are meaningful."""
    k = int(CELL * ratio)
    if not 1 <= k <= CELL - 1:
        raise ValueError(f"running-cell decoder ratio={ratio!r}: k = int(4 * ratio) = {k} must be in 1..3, "
                         "i.e. a ratio in [0.25, 1)")
    return k


def check_even_grid(grid: TokenGrid) -> None:
    if grid.h % 2 or grid.w % 2:
        raise ValueError(f"running-cell decoder masking needs an even token grid, got {grid.h}x{grid.w} "
                         "patches (odd grids are refused, not padded)")


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


def decoder_kept_count(grid: TokenGrid, ratio: float) -> int:
    """K: decoder-kept tokens per clip (fixed: every slice keeps (4-k)/4 of an even grid)."""
    check_even_grid(grid)
    return grid.t * grid.spatial * (CELL - cell_drop_count(ratio)) // CELL


def _kept_per_position(grid: TokenGrid, ratio: float) -> torch.Tensor:
    """(4, H'W'): in how many slices each spatial position is decoder-kept, for each phase."""
    drop = running_cell_drop(grid, ratio, torch.arange(CELL)).view(CELL, grid.t, grid.spatial)
    return (~drop).sum(dim=1)


def lean_target_range(grid: TokenGrid, ratio: float, decoder_ratio: float, strategy: str) -> tuple[int, int]:
    """(min, max) number of loss positions (encoder-masked AND decoder-kept) per clip.

    loss = K - |visible AND kept|. Tube: the visible set is n_vis spatial positions in every slice, so
    |visible AND kept| is the sum of their per-position kept counts; the extremes take the n_vis
    smallest / largest counts over the 4 phases (equal when T' % 4 == 0). Random: any n_vis tokens.
    Computed without random numbers (the profilers call it).
    """
    K = decoder_kept_count(grid, decoder_ratio)
    if strategy == "tube":
        n_vis_spatial = grid.spatial - int(ratio * grid.spatial)
        counts = _kept_per_position(grid, decoder_ratio).sort(dim=1).values  # (4, HW) ascending
        low = counts[:, :n_vis_spatial].sum(dim=1).min().item()
        high = counts[:, grid.spatial - n_vis_spatial:].sum(dim=1).max().item()
        return K - high, K - low
    if strategy == "random":
        n = grid.num_tokens
        n_vis = n - int(ratio * n)
        return K - min(n_vis, K), K - max(0, n_vis - (n - K))
    raise ValueError(f"lean running-cell targets are defined for tube and random, not {strategy!r}")


def dual_masking(grid: TokenGrid, visible_ids: torch.Tensor, decoder_ratio: float, mode: str,
                 phases: torch.Tensor, num_targets: Optional[int] = None) -> Selection:
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
