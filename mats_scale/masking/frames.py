"""Adaptive frame selection (MATS / EVEREST paper; not in the public code).

From 2 * alpha * tau decoded candidate frames, count per candidate pair (one 2-frame tubelet) the
high-motion tokens c_i, then draw tau pairs without replacement with probability c_i / sum(c) and keep
them in temporal order.
"""

from __future__ import annotations

import math

import torch

from mats_scale.masking.common import rand
from mats_scale.masking.motion import pixel_motion_scores

PAIR = 2  # frames per candidate pair (one tubelet)


def candidate_frame_count(num_pairs: int, alpha: float) -> int:
    """Frames to decode for `num_pairs` pairs: 2 * ceil(alpha * num_pairs) (= 24 for tau=8, alpha=1.5)."""
    if alpha < 1.0:
        raise ValueError(f"frame selection alpha={alpha!r}: must be >= 1")
    return PAIR * max(num_pairs, math.ceil(alpha * num_pairs - 1e-9))


def weighted_sample_without_replacement(
    weights: torch.Tensor, k: int, generator: torch.Generator
) -> torch.Tensor:
    """k distinct indices of `weights` (P,) >= 0, drawn one after another with p_i = w_i / sum(w)
    over those not drawn yet (what multinomial without replacement does).

    Exponential race: index i gets key E_i / w_i, E_i ~ Exp(1); the k smallest keys are such a draw.
    Zero weights get key +inf, so they come only after every positive one, uniformly at random
    (a random permutation breaks their ties); all-zero weights give a uniform draw.
    Unlike torch.multinomial this never fails when fewer than k weights are positive.
    """
    P = weights.shape[0]
    if not 0 <= k <= P:
        raise ValueError(f"cannot draw {k} of {P} items without replacement")
    w = weights.float()
    u = rand((P,), generator, w.device).clamp_min(torch.finfo(torch.float32).tiny)
    keys = torch.where(w > 0, -u.log() / w.clamp_min(torch.finfo(torch.float32).tiny), torch.inf)
    perm = rand((P,), generator, w.device).argsort()  # random order, so ties among +inf are random
    order = keys[perm].argsort(stable=True)
    return perm[order[:k]]


def pair_motion_counts(
    candidates: torch.Tensor, patch: int, keep_ratio: float, cuts: torch.Tensor | None = None
) -> torch.Tensor:
    """c_i: high-motion tokens per candidate pair, (P,) int64.

    candidates: (C, F, H, W), F even; the frame is cropped to whole patches (top-left). A token is
    high-motion when its pixel score is among the top keep_ratio of all P * H'W' candidate tokens
    (score >= the k-th largest) and > 0: an unchanged patch never counts, whatever the ties.
    cuts: optional (F-1,) bool shot cuts between the candidates; no difference across one counts (a
    pair after a cut takes its successor's count, a pair holding a cut counts 0).
    """
    C, F, H, W = candidates.shape
    if F % PAIR:
        raise ValueError(f"candidate frames: need an even count (pairs of {PAIR}), got {F}")
    if patch > H or patch > W:
        raise ValueError(f"candidate frames of {H}x{W} are smaller than one {patch}x{patch} patch")
    video = candidates[None, :, :, : H - H % patch, : W - W % patch]  # (1, C, F, H', W') whole patches
    scores = pixel_motion_scores(video, PAIR, patch, None if cuts is None else cuts[None])
    scores = scores.view(F // PAIR, -1)  # (P, H'W')
    k = max(1, int(keep_ratio * scores.numel()))
    threshold = scores.flatten().topk(k).values[-1]
    return ((scores >= threshold) & (scores > 0)).sum(dim=1)


def select_frames(
    candidates: torch.Tensor,
    num_pairs: int,
    generator: torch.Generator,
    *,
    patch: int,
    keep_ratio: float,
    cuts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adaptive frame selection for ONE video.

    candidates: (C, 2 * alpha * tau, H, W) decoded candidate frames, uint8 or float; tau = num_pairs.
    Returns the selected frame indices into the candidates, (2 * num_pairs,) int64, ascending: the two
    frames of each drawn pair, pairs in temporal order. cuts: optional (F-1,) bool shot cuts between
    the candidates (:func:`pair_motion_counts`).
    """
    if candidates.dim() != 4:
        raise ValueError(f"select_frames expects one video (C, F, H, W), got shape {tuple(candidates.shape)}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"frame selection keep_ratio={keep_ratio!r}: must be in (0, 1]")
    num_candidates = candidates.shape[1] // PAIR
    if num_pairs < 1 or num_pairs > num_candidates:
        raise ValueError(
            f"select_frames: num_pairs={num_pairs} must be in 1..{num_candidates} "
            f"(the {candidates.shape[1]} candidate frames hold {num_candidates} pairs)"
        )
    counts = pair_motion_counts(candidates, patch, keep_ratio, cuts)
    pairs = weighted_sample_without_replacement(counts, num_pairs, generator).sort().values  # (tau,)
    return (pairs[:, None] * PAIR + torch.arange(PAIR, device=pairs.device)).flatten()
