"""Loaders for fine-tuning and evaluation on labelled videos (the VideoMAE recipe's views).

    train = build_finetune_loader(cfg, rank=rank, world_size=world_size)
    for batch in train:             # as the pre-training loader (same order, resume, bad-file skips)
        batch["video"]              # (B, 3, T, S, S) uint8 (data.device.to_model_input normalises it):
                                    # short-side resize to S * 256/224, random S x S crop, flip unless
        batch["label"]              # segment sampling; (B,) int64 labels >= 0

    val = build_eval_loader(cfg, rank=rank, world_size=world_size)
    for batch in val:
        batch["views"]              # (B, V, 3, T, S, S), V = data.eval_clips * data.eval_crops
        batch["label"]              # (B,) int64
        batch["index"]              # (B,) int64 position of the video in the list

Training reuses :class:`mats_scale.data.loader.TrainLoader` with the fine-tuning view, so it keeps
its determinism, resumable position and bad-file handling. Evaluation is different on purpose: every
rank reads videos ``rank, rank + world_size, ...`` of the list in order (no padding, so each video is
scored exactly once over all ranks; ranks may get one batch more or less than others, so reduce the
metrics once at the end, not per batch). A file that cannot be read is left out, never replaced
(replacing a test video would change the reported accuracy unnoticed): the evaluation names it and
reports how many videos and views it lost, and stops when more than data.max_bad_fraction of them did.
A clip's views are averaged by the caller (VideoMAE averages the softmax scores of all views).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from mats_scale.config import Config
from mats_scale.data.errors import DataError, VideoReadError
from mats_scale.data.lists import VideoItem
from mats_scale.data.loader import LoaderOptions, TrainLoader, wants_pinned_memory
from mats_scale.data.sources import resolve_items, train_items
from mats_scale.data.video import read_eval_views
from mats_scale.data.workers import init_worker


def require_labels(items: list[VideoItem], what: str) -> None:
    """Raise :class:`DataError` when a video of `items` has no label (-1)."""
    missing = [it.path for it in items if it.label < 0]
    if missing:
        raise DataError(
            f"{what}: {len(missing)} of {len(items)} videos have no label (first: {missing[0]}); "
            "fine-tuning and evaluation need 'path label' list lines or class sub-folders"
        )


def build_finetune_loader(cfg: Config, *, rank: int = 0, world_size: int = 1) -> TrainLoader:
    """The fine-tuning training loader of `rank` (data.dataset, split "train"); see the module doc."""
    items = train_items(cfg)
    if items is not None:  # in-memory synthetic clips are labelled by the square's direction
        require_labels(items, f"data.dataset={cfg.data.dataset} (train)")
    opts = LoaderOptions.from_config(cfg, augment="finetune")
    return TrainLoader(items, opts, rank=rank, world_size=world_size)


class EvalVideos(Dataset):
    """Map-style dataset: video index -> all its test views (see :func:`read_eval_views`)."""

    def __init__(self, cfg: Config, items: list[VideoItem]) -> None:
        d, m = cfg.data, cfg.model
        self.items = items
        self.kw = dict(
            length=m.num_frames,
            rate=d.sampling_rate,
            size=m.img_size,
            num_clips=d.eval_clips,
            num_crops=d.eval_crops,
            segments=d.segment_sampling,
            min_frames=d.min_frames,
            decoder=d.decoder,
            cache_bytes=int(d.cache_gib * 1024**3),
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        try:
            views = read_eval_views(item.path, **self.kw)  # (V, 3, T, S, S)
        except VideoReadError as e:  # left out and counted by the evaluation, never replaced
            return {"views": None, "label": item.label, "index": index, "error": (e.path, e.reason)}
        return {"views": views, "label": item.label, "index": index}


def eval_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the readable videos; ``skipped`` lists (path, reason) of the others (views may be empty)."""
    good = [s for s in samples if s["views"] is not None]
    return {
        "views": torch.stack([s["views"] for s in good]) if good else None,
        "label": torch.tensor([s["label"] for s in good], dtype=torch.int64),
        "index": torch.tensor([s["index"] for s in good], dtype=torch.int64),
        "skipped": [s["error"] for s in samples if s["views"] is None],
    }


def build_eval_loader(cfg: Config, *, rank: int = 0, world_size: int = 1, split: str = "val") -> DataLoader:
    """This rank's evaluation batches of `split` (data.batch_size videos each); see the module doc."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    items = resolve_items(cfg, split)
    require_labels(items, f"data.dataset={cfg.data.dataset} ({split})")
    mine = list(range(rank, len(items), world_size))
    if not mine:
        raise DataError(f"{len(items)} {split} videos leave rank {rank} of {world_size} with none")
    workers = cfg.data.num_workers
    return DataLoader(
        Subset(EvalVideos(cfg, items), mine),
        batch_size=cfg.data.batch_size,
        shuffle=False,
        collate_fn=eval_collate,
        num_workers=workers,
        pin_memory=wants_pinned_memory(cfg),
        prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
        worker_init_fn=init_worker if workers > 0 else None,
    )


__all__ = ["EvalVideos", "build_eval_loader", "build_finetune_loader", "eval_collate", "require_labels"]
