"""The training loader (pre-training, and fine-tuning's with another view): batches with epoch/position
state, bad-file and shot-cut accounting, resume. One module per stage; docs/data.md explains them:

    sources.py   which videos          resolve_items(cfg, split) -> [VideoItem] (None: synthetic)
        |
    sampler.py   epoch order, seeds    EpochBatches -> [(epoch, pos, index)] per batch
        |
    clips.py     one sample            TrainClips[(epoch, pos, index)] -> num_sample clips; collate
        |
    workers.py   worker processes      init_worker, track / close_workers / kill_workers
        |
    loader.py    batches               TrainLoader: SkipStats, CutStats, state_dict; build_pretrain_loader

    loader = build_pretrain_loader(cfg, rank=rank, world_size=world_size)
    for batch in loader:  # the rest of the current epoch, then the loader moves to the next
        batch["video"], batch["label"], batch["index"], batch["frame_index"], batch["scores"], ...
    loader.state_dict()   # epoch + batches consumed in it (+ skip and cut counters)
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from mats_scale.config import Config
from mats_scale.data.clips import MAX_ATTEMPTS, ClipOptions, TrainClips, collate
from mats_scale.data.cuts import CutStats
from mats_scale.data.errors import DataError, ListFileError
from mats_scale.data.lists import VideoItem
from mats_scale.data.sampler import _WORKER, EpochBatches, make_generator
from mats_scale.data.sources import SYNTHETIC_CLIPS, bundled_root, resolve_items, train_items
from mats_scale.data.workers import close_workers, explain_worker_failure, init_worker, kill_workers, track

log = logging.getLogger("mats_scale.data")

MIN_READS = 50
"""Reads before the bad-fraction check applies (or the dataset size, if smaller)."""
MAX_LISTED_BAD = 10
"""Bad files named in the DataError message."""


@dataclass(frozen=True)
class LoaderOptions:
    """Everything the training loader reads from the config, read once (:meth:`from_config`)."""

    clips: ClipOptions  # what one sample is (the workers' stage)
    seed: int  # train.seed: the epoch order and every sample's streams
    batch_size: int  # data.batch_size, in clips (videos * num_sample)
    num_workers: int  # data.num_workers
    prefetch_factor: int  # data.prefetch_factor
    max_bad_fraction: float  # data.max_bad_fraction
    pin_memory: bool  # pinned host memory for the batches (CUDA runs)

    @property
    def videos_per_batch(self) -> int:
        return self.batch_size // self.clips.num_sample

    @classmethod
    def from_config(cls, cfg: Config, augment: str = "pretrain") -> LoaderOptions:
        d = cfg.data
        return cls(
            clips=ClipOptions.from_config(cfg, augment),
            seed=cfg.train.seed,
            batch_size=d.batch_size,
            num_workers=d.num_workers,
            prefetch_factor=d.prefetch_factor,
            max_bad_fraction=d.max_bad_fraction,
            pin_memory=wants_pinned_memory(cfg),
        )


def wants_pinned_memory(cfg: Config) -> bool:
    """Pinned host memory for the batches when the run trains on CUDA (not when they are decoded on the
    GPU already, data.decoder=nvdec)."""
    if cfg.data.decoder == "nvdec":
        return False
    return cfg.train.device in ("auto", "cuda") and torch.cuda.is_available()


# ---- skip bookkeeping (main process) ------------------------------------------------------------
class SkipStats:
    """Counters of read attempts and failures, aggregated in the main process from batch events."""

    def __init__(self) -> None:
        self.reads = 0  # read attempts, including replacements
        self.skipped = 0  # failed read attempts (a bad file drawn twice counts twice)
        self.bad_files: OrderedDict[str, str] = OrderedDict()  # path -> first reason, first seen first

    def update(self, events: Sequence[tuple[str, str]], reads: int) -> list[tuple[str, str]]:
        """Add one batch's events; returns the (path, reason) pairs of files not seen bad before."""
        self.reads += reads
        self.skipped += len(events)
        new = []
        for path, reason in events:
            if path not in self.bad_files:
                self.bad_files[path] = reason
                new.append((path, reason))
        return new

    @property
    def fraction(self) -> float:
        return self.skipped / self.reads if self.reads else 0.0

    def first_bad(self, k: int = MAX_LISTED_BAD) -> list[tuple[str, str]]:
        return list(self.bad_files.items())[:k]

    def state_dict(self) -> dict:
        return {"reads": self.reads, "skipped": self.skipped, "bad_files": list(self.bad_files.items())}

    def load_state_dict(self, sd: dict) -> None:
        self.reads, self.skipped = int(sd["reads"]), int(sd["skipped"])
        self.bad_files = OrderedDict((p, r) for p, r in sd["bad_files"])

    def __repr__(self) -> str:
        return f"SkipStats(reads={self.reads}, skipped={self.skipped}, bad_files={len(self.bad_files)})"


# ---- the loader ---------------------------------------------------------------------------------
class TrainLoader:
    """Iterable over training batches with epoch/position state; see the module doc and docs/data.md."""

    def __init__(
        self, items: list[VideoItem] | None, opts: LoaderOptions, *, rank: int, world_size: int
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.opts = opts
        self.rank, self.world_size = rank, world_size
        self.dataset = TrainClips(items, opts.clips, seed=opts.seed)
        self.num_items = len(self.dataset)
        self.min_reads = min(MIN_READS, self.num_items)
        self.sampler = EpochBatches(
            self.num_items,
            rank=rank,
            world_size=world_size,
            videos_per_batch=opts.videos_per_batch,
            seed=opts.seed,
        )
        if self.sampler.batches_per_epoch() == 0:
            raise DataError(
                f"{self.num_items} videos over {world_size} ranks give no full batch of "
                f"{opts.videos_per_batch} videos (data.batch_size={opts.batch_size}, "
                f"data.num_sample={opts.clips.num_sample}): add videos or lower the batch size"
            )
        workers = opts.num_workers
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=opts.pin_memory,
            persistent_workers=workers > 0,
            prefetch_factor=opts.prefetch_factor if workers > 0 else None,
            worker_init_fn=init_worker if workers > 0 else None,
            # Own generator: worker seeds never consume the trainer's global torch RNG, so a resumed
            # run's RNG stream matches an uninterrupted one.
            generator=make_generator(_WORKER, opts.seed, rank),
        )
        self.skip_stats = SkipStats()
        self.cut_stats = CutStats()
        self.epoch, self.batch = 0, 0
        self.defer_stop = False
        """True: a bad-data stop does not raise; it is kept in :attr:`stop_error` and the batch is still
        returned, so the trainer can agree on the stop with the other ranks at the end of the step."""
        self.stop_error: DataError | None = None

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self.sampler.batches_per_epoch()

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of `epoch` (a no-op when already in it, so it is safe after a resume)."""
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The remaining batches of the current epoch; at its end the loader moves to the next epoch."""
        self.sampler.epoch, self.sampler.start = self.epoch, self.batch
        batches = track(iter(self.loader))  # the exit hook kills its workers if nobody else does
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except RuntimeError as e:
                why = explain_worker_failure(e, self.rank)
                if why is None:
                    raise
                self.close()
                raise DataError(why) from None
            try:
                self._account(batch)
            except DataError as e:
                if not self.defer_stop:
                    self.close()  # the run ends here: stop the workers now, not at garbage collection
                    raise
                self.stop_error = self.stop_error or e
            self.batch += 1
            yield batch
        self.epoch, self.batch = self.epoch + 1, 0

    def endless(self) -> Iterator[dict[str, Any]]:
        """Batches across epochs without end, for timing a fixed count (benchmarks, the GPU check)."""
        while True:
            yield from self

    def close(self) -> None:
        """Shut the worker processes down now (they restart on the next iteration)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None:
            close_workers(it)
        self.loader._iterator = None

    def kill_workers(self) -> None:
        """SIGKILL every worker at once (exit paths: no grace period, nothing left to read)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None:
            kill_workers(it)

    def _account(self, batch: dict[str, Any]) -> None:
        self._account_cuts(batch.get("shot_cuts", ()))
        for path, reason in self.skip_stats.update(batch["skipped"], batch["reads"]):
            log.warning("skipped video %s: %s (%d skipped so far)", path, reason, self.skip_stats.skipped)
        st = self.skip_stats
        too_many = st.reads >= self.min_reads and st.fraction > self.opts.max_bad_fraction
        if batch["failed"] or too_many:
            listed = "\n".join(f"  {p}: {r}" for p, r in st.first_bad())
            why = (
                f"{MAX_ATTEMPTS} reads in a row failed for one sample"
                if batch["failed"]
                else f"more than data.max_bad_fraction={self.opts.max_bad_fraction} of the reads failed"
            )
            raise DataError(
                f"too many bad videos: {st.skipped} of {st.reads} reads failed "
                f"({len(st.bad_files)} distinct files); {why}. First bad files:\n{listed}"
            )

    def _account_cuts(self, events: Sequence[tuple[str, int]]) -> None:
        """Count the windows that met a shot cut; log the first videos by name, then a count each time
        the number of limited windows passes a power of two (cuts are common in edited footage)."""
        cs, before = self.cut_stats, self.cut_stats.windows
        for path, n in cs.update(events):
            if len(cs.videos) <= MAX_LISTED_BAD:
                log.info("shot cut in %s: %d cut(s) in the clip window, limited to one shot", path, n)
        if cs.windows.bit_length() > before.bit_length():
            log.info(
                "shot cuts: %d clip windows limited to one shot so far (%d cuts, %d videos)",
                cs.windows,
                cs.cuts,
                len(cs.videos),
            )

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "num_items": self.num_items,
            "world_size": self.world_size,
            "batch_size": self.opts.batch_size,
            "skip_stats": self.skip_stats.state_dict(),
            "cut_stats": self.cut_stats.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Continue at batch `sd['batch']` of epoch `sd['epoch']`; refuses a different data layout."""
        mine = {
            "num_items": self.num_items,
            "world_size": self.world_size,
            "batch_size": self.opts.batch_size,
        }
        theirs = {k: sd.get(k) for k in mine}
        if theirs != mine:
            raise DataError(f"cannot resume the data position: saved with {theirs}, this run has {mine}")
        self.epoch, self.batch = int(sd["epoch"]), int(sd["batch"])
        self.skip_stats.load_state_dict(sd["skip_stats"])
        if "cut_stats" in sd:  # absent in checkpoints from before shot-cut handling
            self.cut_stats.load_state_dict(sd["cut_stats"])


def build_pretrain_loader(cfg: Config, *, rank: int = 0, world_size: int = 1) -> TrainLoader:
    """The pre-training loader of `rank` for data.dataset (bundled data is generated on first use).

    Start-up problems (missing or malformed list file, empty folder) raise
    :class:`ListFileError` (a :class:`DataError`) or :class:`DataError` before any worker starts.
    """
    return TrainLoader(train_items(cfg), LoaderOptions.from_config(cfg), rank=rank, world_size=world_size)


__all__ = [
    "LoaderOptions",
    "SkipStats",
    "TrainLoader",
    "build_pretrain_loader",
    "wants_pinned_memory",
    # the other stages' names that callers import from here
    "SYNTHETIC_CLIPS",
    "DataError",
    "ListFileError",
    "bundled_root",
    "explain_worker_failure",
    "resolve_items",
]
