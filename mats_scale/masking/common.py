"""Shared types of the masking strategies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


@dataclass(frozen=True)
class TokenGrid:
    """Token grid (T', H', W') of a clip; token (t, h, w) has flat id (t * H' + h) * W' + w."""

    t: int
    h: int
    w: int

    @property
    def spatial(self) -> int:
        return self.h * self.w

    @property
    def num_tokens(self) -> int:
        return self.t * self.h * self.w

    @classmethod
    def from_model(cls, model_cfg) -> "TokenGrid":
        return cls(*model_cfg.grid)


class Selection(NamedTuple):
    """Index tensors for one batch; every row has the same length."""

    visible_ids: torch.Tensor  # (B, Nv) int64: tokens the encoder sees
    target_ids: torch.Tensor  # (B, Nt) int64: positions the decoder predicts
    target_weights: Optional[torch.Tensor] = None  # (B, Nt) float32 loss weights; None = all 1
