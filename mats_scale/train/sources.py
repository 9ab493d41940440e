"""The endless, resumable stream of batches the training loop reads.

The loader is ``mats_scale.data.build_pretrain_loader``: iterating yields the rest of the current epoch
as batch dicts ``{"video": (B, 3, T, H, W) uint8 (or float32), "label", "skipped": [(path, reason)],
optional "scores"}`` and then moves itself to the next epoch; ``state_dict``/``load_state_dict`` give
the exact position (epoch, batches consumed), so a resumed run reads the batches an uninterrupted one
would.
"""

from __future__ import annotations

from typing import Any

from mats_scale.data.errors import DataError


class BatchStream:
    """Endless iteration over the epochs of a loader; its state is the loader's position."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self._it = None

    def next(self) -> dict[str, Any]:
        for _ in range(2):  # at most one epoch boundary per batch
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise DataError(
            f"the data loader yields no batch in a whole epoch ({len(self.loader)} batches per epoch)"
        )

    @property
    def stop_error(self):
        """The loader's deferred bad-data stop (a DataError), once it happened; None before."""
        return getattr(self.loader, "stop_error", None)

    def close(self) -> None:
        """Stop the loader's worker processes (on any error of the trainer)."""
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None
