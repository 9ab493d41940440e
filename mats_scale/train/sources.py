"""The endless, resumable stream of batches the training loop reads.

The loader is ``mats_scale.data.build_pretrain_loader``: iterating yields the rest of the current epoch
as batch dicts ``{"video": (B, 3, T, H, W) float32 normalised, "label", "skipped": [(path, reason)],
optional "scores"}`` and then moves itself to the next epoch; ``state_dict``/``load_state_dict`` give
the exact position (epoch, batches consumed), so a resumed run reads the batches an uninterrupted one
would.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Optional

from mats_scale.config import Config
from mats_scale.data.errors import DataError


class LeaveStopSignalsToTrainer:
    """DataLoader ``worker_init_fn`` wrapper: workers ignore SIGTERM and SIGINT.

    DeepSpeed's launcher terminates a rank's whole process tree, its loader workers first, and torch
    makes a worker die of SIGTERM; the trainer then raises "DataLoader worker ... killed" before it
    can save. The trainer handles the signal (checkpoint, clean exit) and its loader stops the
    workers (they also exit when their parent dies). A class, not a closure, so it pickles for
    spawn-started workers too.
    """

    def __init__(self, inner: Optional[Callable[[int], None]]) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def build_loader(cfg: Config, rank: int, world_size: int):
    from mats_scale.data.loader import build_pretrain_loader

    loader = build_pretrain_loader(cfg, rank=rank, world_size=world_size)
    if cfg.data.num_workers > 0:
        workers = loader.loader  # the torch DataLoader inside PretrainLoader
        workers.worker_init_fn = LeaveStopSignalsToTrainer(workers.worker_init_fn)
    return loader


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
        raise DataError(f"the data loader yields no batch in a whole epoch "
                        f"({len(self.loader)} batches per epoch)")

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None
