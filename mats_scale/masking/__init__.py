"""Token selection strategies: pure functions of (grid, ratios, torch.Generator[, scores]).

Each returns a :class:`Selection` of int64 index tensors with a fixed length per sample; the model
gathers by index.
"""

from mats_scale.masking.common import Selection, TokenGrid
from mats_scale.masking.tube import tube_masking

__all__ = ["Selection", "TokenGrid", "tube_masking"]
