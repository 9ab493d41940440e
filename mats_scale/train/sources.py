"""Batch sources of the training loop and the endless, resumable stream over their epochs.

Every source has the pre-training loader interface of ``mats_scale.data``: iterating yields batch
dicts ``{"video": (B, 3, T, H, W) float32 normalised, "label": (B,), "skipped": [(path, reason)]}``
(optionally ``"scores"``), plus ``set_epoch``, ``__len__`` and ``state_dict``/``load_state_dict``
giving the exact position (batches consumed in the current epoch).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from mats_scale.config import Config
from mats_scale.data.inmemory import moving_square_clips, normalize

SYNTHETIC_CLIPS = 256
"""Clips per epoch of the in-memory source, over all ranks."""


class InMemoryClips:
    """``data.dataset=synthetic``: moving squares generated in memory, no files, no workers.

    Batch i of epoch e on rank r is drawn from its own generator seeded by (seed, e, r, i), so the
    stream is the same however it is interrupted and resumed, and ranks see different clips.
    """

    def __init__(self, cfg: Config, rank: int, world_size: int) -> None:
        self.batch_size, self.frames, self.size = cfg.data.batch_size, cfg.model.num_frames, cfg.model.img_size
        self.seed, self.rank = cfg.train.seed, rank
        self.batches = max(SYNTHETIC_CLIPS // (self.batch_size * world_size), 1)
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.index = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.index < self.batches:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank, self.index)) & (2 ** 62 - 1))
            video, _ = moving_square_clips(self.batch_size, self.frames, self.size, g)
            self.index += 1  # counted when handed out: state_dict() after a batch resumes after it
            yield {"video": normalize(video), "label": torch.zeros(self.batch_size, dtype=torch.long),
                   "skipped": []}


def build_loader(cfg: Config, rank: int, world_size: int):
    if cfg.data.dataset == "synthetic":
        return InMemoryClips(cfg, rank, world_size)
    from mats_scale.data import build_pretrain_loader

    return build_pretrain_loader(cfg, rank=rank, world_size=world_size)


class BatchStream:
    """Endless iteration over epochs of a loader; its state is the epoch plus the loader's position."""

    def __init__(self, loader) -> None:
        self.loader, self.epoch = loader, 0
        self.loader.set_epoch(0)
        self._it = None

    def next(self) -> dict[str, Any]:
        for _ in range(2):  # at most one epoch boundary per batch
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.loader.set_epoch(self.epoch)
        raise RuntimeError(f"the data loader yields no batch in epoch {self.epoch} (len {len(self.loader)})")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.loader.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        self._it = None
