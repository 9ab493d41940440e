"""MATS / EVEREST motion-aware token selection, its fine-tuning variant, and MATS + dual masking.

Pre-training (DESIGN.md): keep the n_keep = int(rho_pre * N) highest-motion tokens, shuffle them; the
first n_vis = int((1 - rho) * N) go to the encoder, the other n_keep - n_vis are the reconstruction
targets; the low-motion rest is neither encoded nor reconstructed. rho_pre=0.3, rho=0.9, N=1568 ->
156 visible + 314 targets. With ``masking.context_ratio`` c > 0, int(c * n_keep) of the kept tokens are
drawn uniformly from outside the top set instead (context tokens; c = 0 is the selection above).
"""

from __future__ import annotations

import torch

from mats_scale.masking.common import Selection, TokenGrid, rand, sorted_ids
from mats_scale.masking.running_cell import draw_phases, running_cell_drop
from mats_scale.tokens import finetune_count, mats_context_count, mats_counts, mats_dual_target_count


def top_motion(scores: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """(B, N) scores -> ids (B, n) of the n highest scores, ties broken at random (unordered)."""
    B, N = scores.shape
    perm = rand((B, N), generator, scores.device).argsort(dim=1)  # random order of the tokens
    # A stable sort by score keeps the random order among equal scores: random tie-breaking.
    order = scores.gather(1, perm).argsort(dim=1, descending=True, stable=True)[:, :n]
    return perm.gather(1, order)


def top_motion_with_context(
    scores: torch.Tensor, n: int, n_context: int, generator: torch.Generator
) -> torch.Tensor:
    """(B, N) scores -> ids (B, n): the n - n_context highest scores (as :func:`top_motion`) and
    n_context tokens drawn uniformly from the rest. With n_context = 0 this is :func:`top_motion`,
    random draws included."""
    if n_context == 0:
        return top_motion(scores, n, generator)
    B, N = scores.shape
    ranked = top_motion(scores, N, generator)  # every token, highest score first
    rest = ranked[:, n - n_context :]
    pick = rand(rest.shape, generator, scores.device).argsort(dim=1)[:, :n_context]
    return torch.cat([ranked[:, : n - n_context], rest.gather(1, pick)], dim=1)


def mats_selection(
    scores: torch.Tensor,
    ratio: float,
    keep_ratio: float,
    generator: torch.Generator,
    context_ratio: float = 0.0,
) -> Selection:
    """MATS pre-training selection from motion scores (B, N); visible (B, n_vis) and targets
    (B, n_keep - n_vis), both ascending, on the scores' device. `context_ratio` > 0 draws that share of
    the kept tokens from outside the motion top set (:func:`top_motion_with_context`); the shuffle then
    spreads them over the visible tokens and the targets alike."""
    if scores.dim() != 2:
        raise ValueError(f"MATS scores must be (B, N), got shape {tuple(scores.shape)}")
    B, N = scores.shape
    n_vis, n_tgt = mats_counts(N, ratio, keep_ratio)
    n_keep = n_vis + n_tgt
    kept = top_motion_with_context(scores, n_keep, mats_context_count(n_keep, context_ratio), generator)
    shuffle = rand(kept.shape, generator, scores.device).argsort(dim=1)
    kept = kept.gather(1, shuffle)
    return Selection(sorted_ids(kept[:, :n_vis]), sorted_ids(kept[:, n_vis:]))


def mats_dual_selection(
    grid: TokenGrid,
    scores: torch.Tensor,
    ratio: float,
    keep_ratio: float,
    decoder_ratio: float,
    generator: torch.Generator,
    context_ratio: float = 0.0,
) -> Selection:
    """MATS + running-cell dual masking (ours): fixed counts, lean decoder.

    The exact rule, in the order random numbers are drawn from `generator`:
    1. MATS as :func:`mats_selection` (tie-break permutation, shuffle): visible V (n_vis), targets
       T (n_t).
    2. One running-cell phase per clip (``draw_phases``) gives the decoder-kept set R over the full grid.
    3. Keep M = n_t - floor(n_t * k / 4) targets: T AND R first, then T minus R, each group in a
       random order (one uniform draw per target): if |T AND R| > M a random subset of them is kept;
       if fewer, random cell-dropped targets fill up to M.
    The decoder gets V + the M kept targets, all with loss weight 1. (VideoMAE V2's reference mode has
    no counterpart: it places mask tokens over a full-grid decoder mask, while MATS has already
    discarded 1 - rho_pre of the grid; the config refuses decoder_mode=reference with mats.)
    """
    sel = mats_selection(scores, ratio, keep_ratio, generator, context_ratio)
    B, n_t = sel.target_ids.shape
    m = mats_dual_target_count(n_t, decoder_ratio)
    phases = draw_phases(B, generator).to(scores.device)
    dropped = running_cell_drop(grid, decoder_ratio, phases).gather(1, sel.target_ids)  # (B, n_t)
    key = dropped.float() + rand((B, n_t), generator, scores.device)  # kept in [0, 1), dropped in [1, 2)
    choice = key.argsort(dim=1)[:, :m]
    return Selection(sel.visible_ids, sorted_ids(sel.target_ids.gather(1, choice)))


def finetune_selection(scores: torch.Tensor, keep_ratio: float, keep_all: bool = False) -> torch.Tensor:
    """Fine-tuning token ids: the top int(keep_ratio * N) scores, deterministic (ties go to the lower
    id), ascending: (B, n) int64. ``keep_all`` returns every id (evaluation on all tokens)."""
    B, N = scores.shape
    if keep_all:
        return torch.arange(N, device=scores.device).expand(B, N).contiguous()
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"fine-tuning keep_ratio={keep_ratio!r}: must be in (0, 1]")
    n = finetune_count(N, keep_ratio)
    return sorted_ids(scores.argsort(dim=1, descending=True, stable=True)[:, :n])
