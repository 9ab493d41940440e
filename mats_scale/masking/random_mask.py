"""Random masking: an independent random subset of tokens per clip (VideoMAE's `random` mask)."""

from __future__ import annotations

import torch

from mats_scale.masking.common import Selection, TokenGrid, rand, sorted_ids


def random_masking(grid: TokenGrid, ratio: float, batch_size: int, generator: torch.Generator) -> Selection:
    """int(ratio * N) tokens masked per clip (VideoMAE's count), the other N - int(ratio * N) visible.

    Returns visible ids (B, N - n_mask) and target ids (B, n_mask), both ascending.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"random mask ratio={ratio!r}: must be in (0, 1)")
    n = grid.num_tokens
    n_mask = int(ratio * n)
    order = rand((batch_size, n), generator).argsort(dim=1)  # (B, N): a random permutation per clip
    return Selection(sorted_ids(order[:, n_mask:]), sorted_ids(order[:, :n_mask]))
