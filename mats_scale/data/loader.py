"""The pre-training loader: decode -> augment -> collate, deterministic, resumable, and robust to
bad files (the fine-tuning training loader, :mod:`mats_scale.data.finetune`, is this one with another view).

    loader = build_pretrain_loader(cfg, rank=rank, world_size=world_size)
    for batch in loader:            # the rest of the current epoch; then the loader moves to the next
        batch["video"]              # (B, 3, T, S, S) uint8 (data.normalize_on_device, the default) or
                                    # float32 ImageNet-normalised; B = data.batch_size
        to_model_input(batch, dev)  # mats_scale.data.device: float32 normalised on the training device
        batch["label"]              # (B,) int64 (-1 where the source has no labels)
        batch["index"]              # (B,) int64 dataset index of the video each clip came from
        batch["frame_index"]        # (B, T) int64 frame numbers in that video
        batch["skipped"]            # [(path, reason), ...] read failures behind this batch
        batch["shot_cuts"]          # [(path, cuts), ...] windows that crossed a shot cut (limited)
        batch["scores"]             # (B, N) float32 motion scores (masking.strategy=mats and
                                    # masking.score=pixel or compensated only), for select_tokens
    state = loader.state_dict()     # epoch + batches consumed in it (+ skip counters)

Determinism: the epoch order is a permutation seeded by (seed, epoch), padded to a multiple of the
world size and dealt round-robin to the ranks (as ``DistributedSampler``); global position ``pos`` of
that order is the "sample". Every random choice for a sample (temporal offset, crop, flip, frame
selection, the replacement drawn for a bad file) comes from generators seeded by
(seed, epoch, pos, attempt, repeat), so clips depend neither on the number of workers nor on which
worker made them; ranks get disjoint positions, hence different clips; and restarting at batch k of
epoch e (``load_state_dict``) yields exactly the batches an uninterrupted run would.

Adaptive frame selection (``masking.frame_selection``): the sampler picks 2 * ceil(alpha * tau)
candidate frames instead of T (tau = T / 2 pairs; same stride or segments), and
:func:`mats_scale.masking.select_frames` keeps tau pairs by their pixel motion, once per video on
the decoded frames before cropping, so the ``num_sample`` clips of a video share their frames.

Bad files: a read that fails (:class:`VideoReadError`: missing, empty,
truncated, not a video, too few frames) is recorded as a skip event and a replacement video is drawn
deterministically, up to :data:`MAX_ATTEMPTS` times per sample. Workers only report; the main process
aggregates the events of every batch (:class:`SkipStats`), logs one warning per bad file, and raises a
:class:`DataError` listing the first bad files once more than ``data.max_bad_fraction`` of the reads
so far failed (checked after ``min(MIN_READS, dataset size)`` reads, so one early bad file in a large
dataset does not stop a run).

Shot cuts (``data.shot_cuts=limit``, the default; :mod:`mats_scale.data.cuts`): the decoded frames
are checked for hard cuts; a window that crosses one is re-drawn inside its longest cut-free stretch
(one more decode), so clips stay within one shot and no motion score or frame selection counts an
edit as motion (cuts still found after that are masked out of the loader's scores and the frame
selection). Workers report ``(path, cuts)``; the main process counts them (``loader.cut_stats``)
and logs the first videos and then every power of two of limited windows.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mats_scale.config import IMAGENET_STD, Config
from mats_scale.data import synth
from mats_scale.data.cuts import CutStats, cuts_between, limit_to_shot
from mats_scale.data.errors import DataError, ListFileError, VideoReadError
from mats_scale.data.inmemory import moving_square_clips
from mats_scale.data.lists import VideoItem, read_list_file, scan_folder
from mats_scale.data.transforms import ClipRandAugment, finetune_augment, pretrain_augment
from mats_scale.data.video import clip_indices, open_video, read_frames, segment_indices
from mats_scale.data.workers import close_workers, explain_worker_failure, init_worker, kill_workers, track
from mats_scale.masking import candidate_frame_count, loader_motion_scores, select_frames

log = logging.getLogger("mats_scale.data")

MAX_ATTEMPTS = 16
"""Reads tried per sample (the drawn video, then replacements) before the batch is marked failed."""
MIN_READS = 50
"""Reads before the bad-fraction check applies (or the dataset size, if smaller)."""
MAX_LISTED_BAD = 10
"""Bad files named in the DataError message."""
SYNTHETIC_CLIPS = 1024
"""Clips per epoch of data.dataset=synthetic."""
DEFAULT_BUNDLED_ROOT = os.path.join("data", "bundled")
BUNDLED_PARAMS = synth.SynthParams()
"""What the loader generates when the bundled dataset is missing (the generator CLI's defaults)."""

# Stream tags for :func:`sample_seed`, so that no two random choices share a stream.
_ORDER, _TEMPORAL, _SPATIAL, _REDRAW, _WORKER, _SELECT = range(6)


def sample_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, well mixed (numpy SeedSequence): (tag, seed, epoch, pos, ...)."""
    words = np.random.SeedSequence([k % (1 << 63) for k in keys]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


def make_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(*keys))


# ---- the bundled dataset ------------------------------------------------------------------------
def bundled_root(cfg: Config) -> str:
    return cfg.data.root or os.path.join(os.getcwd(), DEFAULT_BUNDLED_ROOT)


# What a (possibly interrupted) generation leaves in its directory; anything else means foreign data.
_GENERATED_NAMES = {
    ".lock",
    "train",
    "val",
    "train.txt",
    "val.txt",
    "classes.txt",
    "meta.json",
    "meta.json.part",
}


def ensure_bundled(root: str, params: synth.SynthParams | None = None, workers: int = 0) -> str:
    """Generate the bundled dataset into `root` unless it is complete; safe to call from every rank.

    An exclusive ``flock`` on ``root/.lock`` serialises the callers (no torch.distributed needed):
    the first one generates, the others wait on the lock and then find ``meta.json`` (the done-marker,
    written last). A run that died mid-generation leaves no marker, so the next caller regenerates.
    A non-empty `root` with other files than a generation writes is refused (DataError).
    """
    if synth.is_complete(root):
        return root
    foreign = sorted(set(os.listdir(root)) - _GENERATED_NAMES) if os.path.isdir(root) else []
    if foreign:  # never write sample videos into somebody's data directory
        raise DataError(
            f"data.root={root!r} is not a bundled dataset (no meta.json, and it holds "
            f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): point data.root "
            "at an empty or new directory, or use data.dataset=list / folder for your videos"
        )
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not synth.is_complete(root):
                log.warning("bundled dataset missing in %s: generating it (first use)", root)
                synth.generate(root, params or BUNDLED_PARAMS, workers=workers or min(4, os.cpu_count() or 1))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def resolve_items(cfg: Config, split: str = "train") -> list[VideoItem]:
    """The videos of `split` for data.dataset = bundled, list or folder (start-up errors raise)."""
    d = cfg.data
    if d.dataset == "bundled":
        root = ensure_bundled(bundled_root(cfg))
        return read_list_file(os.path.join(root, f"{split}.txt"), root)
    if d.dataset == "list":
        path = d.train_list if split == "train" else d.val_list
        if not path:
            raise DataError(f"data.{split}_list is empty: data.dataset=list needs a list file")
        items = read_list_file(path, d.root)
        log.info("data: %d videos from %s, read as %s", len(items), path, items.source_format)
        return items
    if d.dataset == "folder":
        items = scan_folder(d.root)
        log.info("data: %d videos from %s, %s", len(items), d.root, items.source_format)
        return items
    raise DataError(f"data.dataset={d.dataset!r} has no file list")


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


# ---- the dataset (runs in the workers) ----------------------------------------------------------
AUGMENTS = ("pretrain", "finetune")
"""Training views: multi-scale crop (pre-training) or short-side resize + random crop (fine-tuning)."""


class PretrainClips(Dataset):
    """Map-style dataset over work items ``(epoch, pos, index)``; one item = one video ->
    ``num_sample`` augmented clips. Pure function of the item: no state changes between calls.
    `augment` picks the training view (:data:`AUGMENTS`); everything else is shared."""

    def __init__(
        self, cfg: Config, items: list[VideoItem] | None, *, seed: int, augment: str = "pretrain"
    ) -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"augment={augment!r}: allowed {', '.join(AUGMENTS)}")
        d, m = cfg.data, cfg.model
        self.augment = pretrain_augment
        if augment == "finetune":
            rand_aug = ClipRandAugment(cfg.finetune.rand_aug, m.img_size) if cfg.finetune.rand_aug else None
            self.augment = functools.partial(finetune_augment, rand_aug=rand_aug)
        self.items = items  # None: in-memory synthetic clips
        self.seed = seed
        self.num_frames = m.num_frames
        self.size = m.img_size
        self.rate = d.sampling_rate
        self.segments = d.segment_sampling
        self.flip = d.flip and not d.segment_sampling  # SSv2-style data: flipping changes the label
        self.num_sample = d.num_sample
        self.min_frames = d.min_frames
        self.decoder = d.decoder
        self.cache_bytes = int(d.cache_gib * 1024**3)
        # Workers send uint8 clips unless the config asks them to normalise (float32, 4x the bytes).
        self.normalize = not d.normalize_on_device
        self.tubelet, self.patch = m.tubelet_size, m.patch
        # Scores computed here (on the augmented clips) rather than in the training step.
        self.loader_score = cfg.masking.score if cfg.masking.strategy == "mats" else None
        self.shot_cuts = d.shot_cuts == "limit"
        # Adaptive frame selection: decode 2 * ceil(alpha * tau) candidates, keep tau pairs.
        self.frame_selection = cfg.masking.frame_selection
        self.frame_keep_ratio = cfg.masking.frame_keep_ratio
        self.decode_frames = (
            candidate_frame_count(m.num_frames // 2, cfg.masking.frame_alpha)
            if self.frame_selection
            else m.num_frames
        )

    def __len__(self) -> int:
        return SYNTHETIC_CLIPS if self.items is None else len(self.items)

    # -- reading ---------------------------------------------------------------------------
    def _frame_indices(self, n: int, gen: torch.Generator) -> list[int]:
        if self.segments:
            return segment_indices(n, self.decode_frames, gen)
        return clip_indices(n, self.decode_frames, self.rate, gen)

    def _decode(
        self, index: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, list[int], int, torch.Tensor, tuple[str, int] | None]:
        """(F, H, W, 3) uint8 frames of video `index` (F = T, or the frame-selection candidates), their
        frame numbers in the video, its label, the shot cuts (F-1,) bool left among the frames and the
        (path, cuts) event of a window limited to one shot (or None); VideoReadError if the video is
        unusable."""
        if self.items is None:
            # In-memory clip rendered a bit larger than the input so the multi-scale crop has room.
            video, pos = moving_square_clips(1, self.decode_frames, self.size * 8 // 7, gen)
            v = pos[0, -1] - pos[0, 0]
            label = int(v[1] < 0) + 2 * int(v[0] < 0)  # quadrant of the square's direction
            frames = (video[0] * 255 + 0.5).to(torch.uint8).permute(1, 2, 3, 0).contiguous()
            no_cuts = torch.zeros(len(frames) - 1, dtype=torch.bool)
            return frames, list(range(self.decode_frames)), label, no_cuts, None
        item = self.items[index]
        vr = open_video(
            item.path,
            min_frames=self.min_frames,
            start=item.start,
            frames=item.frames,
            decoder=self.decoder,
            cache_bytes=self.cache_bytes,
        )
        ids = self._frame_indices(len(vr), gen)
        frames = read_frames(vr, ids, item.path)  # (T, H, W, 3)
        # The multi-scale crop needs 2 pixels a side; frame selection scores whole patches of the frames.
        need = self.patch if self.frame_selection else 2
        if min(frames.shape[1:3]) < need:
            raise VideoReadError(
                item.path,
                f"its {frames.shape[2]}x{frames.shape[1]} frames cannot give a clip (each side needs at "
                f"least {need} pixels{' for frame selection' if self.frame_selection else ''})",
            )
        if not self.shot_cuts:
            return frames, ids, item.label, torch.zeros(len(ids) - 1, dtype=torch.bool), None
        frames, ids, met, cuts = limit_to_shot(
            frames,
            ids,
            lambda n: self._frame_indices(n, gen),
            lambda new: read_frames(vr, new, item.path),
            video=item.path,
        )
        return frames, ids, item.label, cuts, (item.path, met) if met else None

    def __getitem__(self, work: tuple[int, int, int]) -> dict[str, Any]:
        epoch, pos, index = work
        skipped: list[tuple[str, str]] = []
        for attempt in range(MAX_ATTEMPTS):
            if attempt:  # a deterministic replacement for the bad video
                gen = make_generator(_REDRAW, self.seed, epoch, pos, attempt)
                index = int(torch.randint(len(self), (1,), generator=gen))
            try:
                temporal = make_generator(_TEMPORAL, self.seed, epoch, pos, attempt)
                frames, ids, label, cuts, cut = self._decode(index, temporal)
            except VideoReadError as e:
                skipped.append((e.path, e.reason))
                continue
            if self.frame_selection:
                # Once per video, on the decoded candidates (before cropping), so the num_sample clips
                # of a video share their frames as in VideoMAE V2's repeated sampling.
                keep = select_frames(
                    frames.permute(3, 0, 1, 2),
                    self.num_frames // 2,
                    make_generator(_SELECT, self.seed, epoch, pos, attempt),
                    patch=self.patch,
                    keep_ratio=self.frame_keep_ratio,
                    cuts=cuts,
                )
                frames, ids = frames[keep], [ids[k] for k in keep.tolist()]  # (T, H, W, 3), T numbers
                cuts = cuts_between(cuts, keep)
            clips = [
                self.augment(
                    frames,
                    self.size,
                    make_generator(_SPATIAL, self.seed, epoch, pos, attempt, r),
                    flip=self.flip,
                    normalize=self.normalize,
                )
                for r in range(self.num_sample)
            ]
            video = torch.stack(clips)  # (S, 3, T, H, W) uint8, or float32 normalised
            return self._sample(
                video, label, index, ids, skipped, attempt + 1, failed=False, cuts=cuts, cut=cut
            )
        # Every attempt failed: the main process raises DataError on this flag (with the file list).
        video = torch.zeros(
            self.num_sample,
            3,
            self.num_frames,
            self.size,
            self.size,
            dtype=torch.float32 if self.normalize else torch.uint8,
        )
        return self._sample(video, -1, index, [0] * self.num_frames, skipped, MAX_ATTEMPTS, failed=True)

    def _sample(
        self, video, label, index, frame_ids, skipped, reads, failed, cuts=None, cut=None
    ) -> dict[str, Any]:
        S = video.shape[0]
        out = {
            "video": video,
            "label": torch.full((S,), label, dtype=torch.int64),
            "index": torch.full((S,), index, dtype=torch.int64),
            "frame_index": torch.tensor(frame_ids, dtype=torch.int64).expand(S, -1),
            "skipped": skipped,
            "reads": reads,
            "failed": int(failed),
            "shot_cuts": [cut] if cut else [],
        }
        if self.loader_score is not None:
            scores = loader_motion_scores(
                self.loader_score,
                _score_units(video),
                self.tubelet,
                self.patch,
                None if cuts is None else cuts.expand(S, -1),
            )
            if scores is not None:
                out["scores"] = scores
        return out


def _score_units(video: torch.Tensor) -> torch.Tensor:
    """A uint8 clip in the units of the normalised one for the pixel score: x / (255 std) per channel.
    The mean cancels in the tubelet differences, so the scores equal the float path's (up to float
    rounding) and the top-k choice does not depend on data.normalize_on_device."""
    if video.dtype != torch.uint8:
        return video
    return video.float() / (torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1) * 255.0)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate per-video samples (each S clips) into one batch of B = videos * S clips."""
    out: dict[str, Any] = {
        k: torch.cat([s[k] for s in samples]) for k in ("video", "label", "index", "frame_index")
    }
    if "scores" in samples[0]:
        out["scores"] = torch.cat([s["scores"] for s in samples])
    out["skipped"] = [e for s in samples for e in s["skipped"]]
    out["shot_cuts"] = [e for s in samples for e in s["shot_cuts"]]
    out["reads"] = sum(s["reads"] for s in samples)
    out["failed"] = sum(s["failed"] for s in samples)
    return out


# ---- epoch order (main process) -----------------------------------------------------------------
class EpochBatches:
    """Batch sampler: this rank's work items of one epoch, from batch `start` on (mutable: the
    loader sets epoch/start before each pass; persistent workers re-read it on every pass)."""

    def __init__(
        self, num_items: int, *, rank: int, world_size: int, videos_per_batch: int, seed: int
    ) -> None:
        self.num_items, self.rank, self.world_size = num_items, rank, world_size
        self.videos_per_batch, self.seed = videos_per_batch, seed
        self.epoch, self.start = 0, 0

    def batches_per_epoch(self) -> int:
        return math.ceil(self.num_items / self.world_size) // self.videos_per_batch

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        order = torch.randperm(
            self.num_items, generator=make_generator(_ORDER, self.seed, self.epoch)
        ).tolist()
        per_rank = math.ceil(self.num_items / self.world_size)
        # Global positions of this rank (round-robin); positions past the end wrap (padding).
        positions = range(self.rank, per_rank * self.world_size, self.world_size)
        vpb = self.videos_per_batch
        for b in range(self.start, self.batches_per_epoch()):
            yield [(self.epoch, p, order[p % self.num_items]) for p in positions[b * vpb : (b + 1) * vpb]]


# ---- the loader ---------------------------------------------------------------------------------
class PretrainLoader:
    """Iterable over pre-training batches with epoch/position state; see the module doc."""

    def __init__(
        self,
        cfg: Config,
        items: list[VideoItem] | None,
        *,
        rank: int,
        world_size: int,
        pin_memory: bool = False,
        augment: str = "pretrain",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        d = cfg.data
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.max_bad_fraction = d.max_bad_fraction
        self.dataset = PretrainClips(cfg, items, seed=cfg.train.seed, augment=augment)
        self.num_items = len(self.dataset)
        self.min_reads = min(MIN_READS, self.num_items)
        videos_per_batch = d.batch_size // d.num_sample
        self.sampler = EpochBatches(
            self.num_items,
            rank=rank,
            world_size=world_size,
            videos_per_batch=videos_per_batch,
            seed=cfg.train.seed,
        )
        if self.sampler.batches_per_epoch() == 0:
            raise DataError(
                f"{self.num_items} videos over {world_size} ranks give no full batch of "
                f"{videos_per_batch} videos (data.batch_size={d.batch_size}, "
                f"data.num_sample={d.num_sample}): add videos or lower the batch size"
            )
        workers = d.num_workers
        self.loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
            prefetch_factor=d.prefetch_factor if workers > 0 else None,
            worker_init_fn=init_worker if workers > 0 else None,
            # Own generator: worker seeds never consume the trainer's global torch RNG, so a resumed
            # run's RNG stream matches an uninterrupted one.
            generator=make_generator(_WORKER, cfg.train.seed, rank),
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
        too_many = st.reads >= self.min_reads and st.fraction > self.max_bad_fraction
        if batch["failed"] or too_many:
            listed = "\n".join(f"  {p}: {r}" for p, r in st.first_bad())
            why = (
                f"{MAX_ATTEMPTS} reads in a row failed for one sample"
                if batch["failed"]
                else f"more than data.max_bad_fraction={self.max_bad_fraction} of the reads failed"
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
            "batch_size": self.cfg.data.batch_size,
            "skip_stats": self.skip_stats.state_dict(),
            "cut_stats": self.cut_stats.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Continue at batch `sd['batch']` of epoch `sd['epoch']`; refuses a different data layout."""
        mine = {
            "num_items": self.num_items,
            "world_size": self.world_size,
            "batch_size": self.cfg.data.batch_size,
        }
        theirs = {k: sd.get(k) for k in mine}
        if theirs != mine:
            raise DataError(f"cannot resume the data position: saved with {theirs}, this run has {mine}")
        self.epoch, self.batch = int(sd["epoch"]), int(sd["batch"])
        self.skip_stats.load_state_dict(sd["skip_stats"])
        if "cut_stats" in sd:  # absent in checkpoints from before shot-cut handling
            self.cut_stats.load_state_dict(sd["cut_stats"])


def wants_pinned_memory(cfg: Config) -> bool:
    """Pinned host memory for the batches when the run trains on CUDA."""
    return cfg.train.device in ("auto", "cuda") and torch.cuda.is_available()


def build_pretrain_loader(cfg: Config, *, rank: int = 0, world_size: int = 1) -> PretrainLoader:
    """The pre-training loader of `rank` for data.dataset (bundled data is generated on first use).

    Start-up problems (missing or malformed list file, empty folder) raise
    :class:`ListFileError` (a :class:`DataError`) or :class:`DataError` before any worker starts.
    """
    items = None if cfg.data.dataset == "synthetic" else resolve_items(cfg, "train")
    return PretrainLoader(cfg, items, rank=rank, world_size=world_size, pin_memory=wants_pinned_memory(cfg))


__all__ = [
    "DataError",
    "ListFileError",
    "PretrainLoader",
    "SkipStats",
    "build_pretrain_loader",
    "init_worker",
    "explain_worker_failure",
    "bundled_root",
    "ensure_bundled",
    "resolve_items",
    "wants_pinned_memory",
]
