"""Token selection strategies: pure functions of (grid, ratios, torch.Generator[, scores]) returning a
:class:`Selection` of fixed-length int64 index tensors; the loop calls :func:`select_tokens` and
:func:`selection_counts` gives the shapes without drawing random numbers."""

from mats_scale.masking.common import Selection, TokenGrid
from mats_scale.masking.compensated import compensated_motion_scores, global_shifts
from mats_scale.masking.frames import (
    candidate_frame_count,
    select_frames,
    weighted_sample_without_replacement,
)
from mats_scale.masking.mats import finetune_selection, mats_dual_selection, mats_selection
from mats_scale.masking.motion import embed_motion_scores, pixel_motion_scores, valid_transitions
from mats_scale.masking.random_mask import random_masking
from mats_scale.masking.running_cell import (
    decoder_kept_count,
    draw_phases,
    dual_masking,
    lean_target_range,
    running_cell_drop,
)
from mats_scale.masking.scores import LOADER_SCORES, loader_motion_scores
from mats_scale.masking.select import select_tokens, selection_counts
from mats_scale.masking.tube import tube_masking

__all__ = [
    "LOADER_SCORES",
    "Selection",
    "TokenGrid",
    "candidate_frame_count",
    "compensated_motion_scores",
    "decoder_kept_count",
    "draw_phases",
    "dual_masking",
    "global_shifts",
    "loader_motion_scores",
    "valid_transitions",
    "embed_motion_scores",
    "finetune_selection",
    "lean_target_range",
    "mats_dual_selection",
    "mats_selection",
    "pixel_motion_scores",
    "random_masking",
    "running_cell_drop",
    "select_frames",
    "select_tokens",
    "selection_counts",
    "tube_masking",
    "weighted_sample_without_replacement",
]
