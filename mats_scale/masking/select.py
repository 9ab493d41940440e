"""The one dispatch the training loop calls: ``masking.*`` config -> :class:`Selection` (docs/masking.md
tabulates what each strategy and decoder mode selects)."""

from __future__ import annotations

import torch

from mats_scale import tokens
from mats_scale.masking.common import Selection, TokenGrid
from mats_scale.masking.mats import mats_dual_selection, mats_selection
from mats_scale.masking.random_mask import random_masking
from mats_scale.masking.running_cell import draw_phases, dual_masking, lean_target_range
from mats_scale.masking.tube import tube_masking


def selection_counts(cfg: tokens.MaskingSpec, grid: TokenGrid) -> tuple[int, int]:
    """(visible ids, target ids) per clip for `cfg` on `grid`, without drawing random numbers
    (the torch-free :func:`mats_scale.tokens.selection_counts`)."""
    return tokens.selection_counts(cfg, grid)


def select_tokens(
    cfg: tokens.MaskingSpec,
    grid: TokenGrid,
    batch_size: int,
    generator: torch.Generator,
    scores: torch.Tensor | None = None,
) -> Selection:
    """Visible / target ids (and loss weights) for one batch, as `cfg` says.

    `scores` (B, N) motion scores are required for ``mats`` (embed_motion_scores or
    pixel_motion_scores); the result lives on the scores' device, otherwise on the generator's.
    Shapes always equal :func:`selection_counts`.
    """
    tokens.check_combination(cfg)
    if cfg.strategy == "mats":
        if scores is None:
            raise ValueError("masking.strategy=mats needs motion scores (B, N)")
        if scores.shape != (batch_size, grid.num_tokens):
            raise ValueError(
                f"MATS scores of shape {tuple(scores.shape)}, expected "
                f"({batch_size}, {grid.num_tokens}) for the grid {grid}"
            )
        if cfg.decoder == "running_cell":
            return mats_dual_selection(
                grid, scores, cfg.ratio, cfg.keep_ratio, cfg.decoder_ratio, generator, cfg.context_ratio
            )
        return mats_selection(scores, cfg.ratio, cfg.keep_ratio, generator, cfg.context_ratio)
    if cfg.strategy == "tube":
        sel = tube_masking(grid, cfg.ratio, batch_size, generator)
    elif cfg.strategy == "random":
        sel = random_masking(grid, cfg.ratio, batch_size, generator)
    else:
        raise ValueError(f"masking.strategy={cfg.strategy!r}: allowed: tube, random, mats")
    if cfg.decoder == "none":
        return sel
    phases = draw_phases(batch_size, generator)
    if cfg.decoder_mode == "reference":
        return dual_masking(grid, sel.visible_ids, cfg.decoder_ratio, "reference", phases)
    low, high = lean_target_range(grid, cfg.ratio, cfg.decoder_ratio, cfg.strategy)
    out = dual_masking(grid, sel.visible_ids, cfg.decoder_ratio, "lean", phases, num_targets=high)
    # Fixed loss count (tube with T' % 4 == 0): every weight is 1 by construction.
    return out._replace(target_weights=None) if low == high else out
