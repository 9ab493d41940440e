"""One sample: the map-style dataset that decodes a video and makes its clips (frame sampling, shot-cut
limiting, frame selection, augmentation, motion scores), and :func:`collate`. Runs in the workers;
every random choice comes from the sample's streams (:mod:`mats_scale.data.sampler`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from mats_scale.config import IMAGENET_STD, Config
from mats_scale.data.cuts import cuts_between, limit_to_shot, loop_seams
from mats_scale.data.errors import VideoReadError
from mats_scale.data.inmemory import moving_square_clips
from mats_scale.data.lists import VideoItem
from mats_scale.data.sampler import _REDRAW, _SELECT, _SPATIAL, _TEMPORAL, make_generator
from mats_scale.data.sources import SYNTHETIC_CLIPS
from mats_scale.data.transforms import ClipRandAugment, finetune_augment, pretrain_augment
from mats_scale.data.video import clip_indices, open_video, read_frames, segment_indices
from mats_scale.masking import candidate_frame_count, loader_motion_scores, select_frames
from mats_scale.masking.scores import LOADER_SCORES

MAX_ATTEMPTS = 16
"""Reads tried per sample (the drawn video, then replacements) before the batch is marked failed."""
AUGMENTS = ("pretrain", "finetune")
"""Training views: multi-scale crop (pre-training) or short-side resize + random crop (fine-tuning)."""


@dataclass(frozen=True)
class ClipOptions:
    """What one sample is: the clip stage's settings, read once from the config (:meth:`from_config`)."""

    num_frames: int  # T, model.num_frames
    size: int  # S, model.img_size
    tubelet: int  # model.tubelet_size (motion scores)
    patch: int  # model.patch (motion scores, frame selection)
    augment: str  # the training view, one of AUGMENTS
    rand_aug: str  # finetune.rand_aug (fine-tuning view only; "": off)
    rate: int  # data.sampling_rate
    segments: bool  # data.segment_sampling
    flip: bool  # data.flip, never with segment sampling (SSv2-style data: it changes the label)
    num_sample: int  # clips per decoded video (repeated sampling)
    min_frames: int  # data.min_frames (shorter videos are bad input)
    decoder: str  # data.decoder
    cache_bytes: int  # data.cache_gib in bytes
    normalize: bool  # workers send float32 normalised clips (not data.normalize_on_device)
    loader_score: str | None  # masking.score computed here (masking.strategy=mats), or None
    shot_cuts: bool  # data.shot_cuts=limit
    frame_selection: bool  # masking.frame_selection
    frame_alpha: float  # masking.frame_alpha
    frame_keep_ratio: float  # masking.frame_keep_ratio

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment={self.augment!r}: allowed {', '.join(AUGMENTS)}")

    @property
    def model_score(self) -> bool:
        """MATS with a score the model computes in the step (embed): the clips carry their cuts to it."""
        return self.loader_score is not None and self.loader_score not in LOADER_SCORES

    @classmethod
    def from_config(cls, cfg: Config, augment: str = "pretrain") -> ClipOptions:
        d, m, mk = cfg.data, cfg.model, cfg.masking
        return cls(
            num_frames=m.num_frames,
            size=m.img_size,
            tubelet=m.tubelet_size,
            patch=m.patch,
            augment=augment,
            rand_aug=cfg.finetune.rand_aug if augment == "finetune" else "",
            rate=d.sampling_rate,
            segments=d.segment_sampling,
            flip=d.flip and not d.segment_sampling,
            num_sample=d.num_sample,
            min_frames=d.min_frames,
            decoder=d.decoder,
            cache_bytes=int(d.cache_gib * 1024**3),
            normalize=not d.normalize_on_device,
            loader_score=mk.score if mk.strategy == "mats" else None,
            shot_cuts=d.shot_cuts == "limit",
            frame_selection=mk.frame_selection,
            frame_alpha=mk.frame_alpha,
            frame_keep_ratio=mk.frame_keep_ratio,
        )

    @property
    def decode_frames(self) -> int:
        """Frames decoded per sample: T, or 2 * ceil(alpha * tau) candidates with frame selection."""
        if self.frame_selection:
            return candidate_frame_count(self.num_frames // 2, self.frame_alpha)
        return self.num_frames


class TrainClips(Dataset):
    """Map-style dataset over work items ``(epoch, pos, index)``; one item = one video ->
    ``num_sample`` augmented clips, a pure function of the item (no state changes between calls).
    A video that cannot be read is replaced by one drawn from the sample's stream, up to
    :data:`MAX_ATTEMPTS` reads; the sample reports the failures (``skipped``) to the main process."""

    def __init__(self, items: list[VideoItem] | None, opts: ClipOptions, *, seed: int) -> None:
        self.items = items  # None: in-memory synthetic clips
        self.opts = opts
        self.seed = seed
        self.augment = pretrain_augment
        if opts.augment == "finetune":
            rand_aug = ClipRandAugment(opts.rand_aug, opts.size) if opts.rand_aug else None
            self.augment = functools.partial(finetune_augment, rand_aug=rand_aug)
        self.decode_frames = opts.decode_frames

    @classmethod
    def from_config(
        cls, cfg: Config, items: list[VideoItem] | None, *, seed: int, augment: str = "pretrain"
    ) -> TrainClips:
        return cls(items, ClipOptions.from_config(cfg, augment), seed=seed)

    def __len__(self) -> int:
        return SYNTHETIC_CLIPS if self.items is None else len(self.items)

    # -- reading ---------------------------------------------------------------------------
    def _frame_indices(self, n: int, gen: torch.Generator) -> list[int]:
        if self.opts.segments:
            return segment_indices(n, self.decode_frames, gen)
        return clip_indices(n, self.decode_frames, self.opts.rate, gen)

    def _decode(
        self, index: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, list[int], int, torch.Tensor, tuple[str, int] | None]:
        """(F, H, W, 3) uint8 frames of video `index` (F = T, or the frame-selection candidates), their
        frame numbers in the video, its label, the shot cuts and loop seams (F-1,) bool left among the
        frames and the (path, cuts) event of a window limited to one shot (or None); VideoReadError if
        the video is unusable."""
        o = self.opts
        if self.items is None:
            # In-memory clip rendered a bit larger than the input so the multi-scale crop has room.
            video, pos = moving_square_clips(1, self.decode_frames, o.size * 8 // 7, gen)
            v = pos[0, -1] - pos[0, 0]
            label = int(v[1] < 0) + 2 * int(v[0] < 0)  # quadrant of the square's direction
            frames = (video[0] * 255 + 0.5).to(torch.uint8).permute(1, 2, 3, 0).contiguous()
            no_cuts = torch.zeros(len(frames) - 1, dtype=torch.bool)
            return frames, list(range(self.decode_frames)), label, no_cuts, None
        item = self.items[index]
        vr = open_video(
            item.path,
            min_frames=o.min_frames,
            start=item.start,
            frames=item.frames,
            decoder=o.decoder,
            cache_bytes=o.cache_bytes,
        )
        ids = self._frame_indices(len(vr), gen)
        frames = read_frames(vr, ids, item.path)  # (T, H, W, 3)
        # The multi-scale crop needs 2 pixels a side; frame selection scores whole patches of the frames.
        need = o.patch if o.frame_selection else 2
        if min(frames.shape[1:3]) < need:
            raise VideoReadError(
                item.path,
                f"its {frames.shape[2]}x{frames.shape[1]} frames cannot give a clip (each side needs at "
                f"least {need} pixels{' for frame selection' if o.frame_selection else ''})",
            )
        if not o.shot_cuts:  # a short video's loop seam is still no motion
            return frames, ids, item.label, loop_seams(ids), None
        frames, ids, met, cuts = limit_to_shot(
            frames,
            ids,
            lambda n: self._frame_indices(n, gen),
            lambda new: read_frames(vr, new, item.path),
            len(vr),
            video=item.path,
        )
        return frames, ids, item.label, cuts, (item.path, met) if met else None

    def __getitem__(self, work: tuple[int, int, int]) -> dict[str, Any]:
        o = self.opts
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
            if o.frame_selection:
                # Once per video, on the decoded candidates (before cropping), so the num_sample clips
                # of a video share their frames as in VideoMAE V2's repeated sampling.
                keep = select_frames(
                    frames.permute(3, 0, 1, 2),
                    o.num_frames // 2,
                    make_generator(_SELECT, self.seed, epoch, pos, attempt),
                    patch=o.patch,
                    keep_ratio=o.frame_keep_ratio,
                    cuts=cuts,
                )
                frames, ids = frames[keep], [ids[k] for k in keep.tolist()]  # (T, H, W, 3), T numbers
                cuts = cuts_between(cuts, keep)
            clips = [
                self.augment(
                    frames,
                    o.size,
                    make_generator(_SPATIAL, self.seed, epoch, pos, attempt, r),
                    flip=o.flip,
                    normalize=o.normalize,
                )
                for r in range(o.num_sample)
            ]
            video = torch.stack(clips)  # (S, 3, T, H, W) uint8, or float32 normalised
            return self._sample(
                video, label, index, ids, skipped, attempt + 1, failed=False, cuts=cuts, cut=cut
            )
        # Every attempt failed: the main process raises DataError on this flag (with the file list).
        video = torch.zeros(
            o.num_sample,
            3,
            o.num_frames,
            o.size,
            o.size,
            dtype=torch.float32 if o.normalize else torch.uint8,
        )
        return self._sample(video, -1, index, [0] * o.num_frames, skipped, MAX_ATTEMPTS, failed=True)

    def _sample(
        self, video, label, index, frame_ids, skipped, reads, failed, cuts=None, cut=None
    ) -> dict[str, Any]:
        o = self.opts
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
        if o.model_score and cuts is not None:  # for the model's embedding score, in the step
            out["cuts"] = cuts.expand(S, -1)
        if o.loader_score is not None:
            scores = loader_motion_scores(
                o.loader_score,
                _score_units(video),
                o.tubelet,
                o.patch,
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
    std = torch.tensor(IMAGENET_STD, device=video.device).view(1, 3, 1, 1, 1)  # the GPU with nvdec
    return video.float() / (std * 255.0)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate per-video samples (each S clips) into one batch of B = videos * S clips."""
    out: dict[str, Any] = {
        k: torch.cat([s[k] for s in samples]) for k in ("video", "label", "index", "frame_index")
    }
    if "scores" in samples[0]:
        out["scores"] = torch.cat([s["scores"] for s in samples])
    if any("cuts" in s for s in samples):  # (B, T-1) bool; none marked for a clip that had none
        steps = samples[0]["video"].shape[2] - 1
        out["cuts"] = torch.cat(
            [s.get("cuts", torch.zeros(s["video"].shape[0], steps, dtype=torch.bool)) for s in samples]
        )
    out["skipped"] = [e for s in samples for e in s["skipped"]]
    out["shot_cuts"] = [e for s in samples for e in s["shot_cuts"]]
    out["reads"] = sum(s["reads"] for s in samples)
    out["failed"] = sum(s["failed"] for s in samples)
    return out


__all__ = ["AUGMENTS", "MAX_ATTEMPTS", "ClipOptions", "TrainClips", "collate"]
