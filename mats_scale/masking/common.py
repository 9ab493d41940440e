"""Shared types of the masking strategies (TokenGrid lives in the torch-free ``mats_scale.tokens``)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Selection(NamedTuple):
    """Index tensors for one batch; every row has the same length."""

    visible_ids: torch.Tensor  # (B, Nv) int64: tokens the encoder sees
    target_ids: torch.Tensor  # (B, Nt) int64: positions the decoder predicts
    target_weights: torch.Tensor | None = None  # (B, Nt) float32 loss weights; None = all 1


def rand(
    shape: tuple[int, ...], generator: torch.Generator, device: torch.device | None = None
) -> torch.Tensor:
    """Uniform [0, 1) noise drawn from `generator` (on its device), moved to `device` if given.

    Every random choice of the masking strategies goes through a generator, never the global RNG.
    """
    noise = torch.rand(shape, generator=generator, device=generator.device)
    return noise if device is None else noise.to(device)


def sorted_ids(ids: torch.Tensor) -> torch.Tensor:
    """Ascending ids per row: (B, n) -> (B, n). The model gathers by id, so order is cosmetic, but
    sorted ids make selections comparable and gathers cache-friendly."""
    return ids.sort(dim=1).values


def ids_to_mask(ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, n) int64 ids -> (B, N) bool membership mask (scatter, no boolean indexing)."""
    mask = torch.zeros(ids.shape[0], num_tokens, dtype=torch.bool, device=ids.device)
    return mask.scatter_(1, ids, True)
