"""Clip augmentation on uint8 tensors with torch ops (no PIL, no per-frame Python loop).

Decoded clips arrive as (T, H, W, 3) uint8; every function here crops/resizes/flips the whole clip at
once and returns (3, T, S, S) float32 ImageNet-normalised pixels (``normalize`` semantics of
:mod:`mats_scale.data.inmemory`), or with ``normalize=False`` the same clip as (3, T, S, S) uint8,
which :func:`mats_scale.data.device.to_model_input` normalises on the training device (same values).

Pre-training (VideoMAE ``GroupMultiScaleCrop``): crop sides from min(H, W) times one of the scales
(1, .875, .75, .66), a side within 3 px of the output size snapped to it, height and width scale
indices at most one apart; the crop sits at one of 13 fixed offsets (corners, centre, edge midpoints
and quarter points); then resize to S x S and an optional horizontal flip.
Evaluation / fine-tuning: short-side resize to S, then a centre crop or three crops along the long
side (VideoMAE's test-time ``spatial_crop``), combined with several temporal clips.
Fine-tuning's optional RandAugment (:class:`ClipRandAugment`) is timm's, drawn once per clip.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from mats_scale.config import IMAGENET_MEAN, IMAGENET_STD

SCALES = (1.0, 0.875, 0.75, 0.66)


def multiscale_crop_box(
    height: int, width: int, size: int, generator: torch.Generator, scales=SCALES, max_distort: int = 1
) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of a VideoMAE multi-scale crop in an H x W frame."""
    base = min(height, width)
    sides = [int(base * s) for s in scales]
    crop_h = [size if abs(s - size) < 3 else s for s in sides]
    crop_w = [size if abs(s - size) < 3 else s for s in sides]
    pairs = [(h, w) for i, h in enumerate(crop_h) for j, w in enumerate(crop_w) if abs(i - j) <= max_distort]
    ch, cw = pairs[int(torch.randint(len(pairs), (1,), generator=generator))]
    ch, cw = min(ch, height), min(cw, width)
    hs, ws = (height - ch) // 4, (width - cw) // 4
    # 13 fixed offsets in quarter steps (y, x): corners, centre, edge midpoints, quarter points.
    grid = [
        (0, 0),
        (0, 4),
        (4, 0),
        (4, 4),
        (2, 2),
        (2, 0),
        (2, 4),
        (4, 2),
        (0, 2),
        (1, 1),
        (1, 3),
        (3, 1),
        (3, 3),
    ]
    oy, ox = grid[int(torch.randint(len(grid), (1,), generator=generator))]
    return oy * hs, ox * ws, ch, cw


def to_model_input(clip: torch.Tensor) -> torch.Tensor:
    """(T, 3, S, S) uint8 -> (3, T, S, S) float32, ImageNet-normalised (x / 255 - mean) / std."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1) * 255.0
    return (clip.permute(1, 0, 2, 3).float() - mean) / std


def resize_clip(clip: torch.Tensor, size: tuple[int, int], *, antialias: bool = True) -> torch.Tensor:
    """(T, 3, h, w) uint8 -> (T, 3, *size) uint8, bilinear (torchvision's uint8 kernel), antialiased
    unless `antialias` is off (cv2.resize's INTER_LINEAR, VideoMAE's test transform, has none)."""
    if tuple(clip.shape[-2:]) == tuple(size):
        return clip
    return TF.resize(clip, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=antialias)


def pretrain_augment(
    frames: torch.Tensor, size: int, generator: torch.Generator, *, flip: bool = True, normalize: bool = True
) -> torch.Tensor:
    """Multi-scale crop + resize + random horizontal flip (if `flip`) + normalisation (if `normalize`).

    frames: (T, H, W, 3) uint8 -> (3, T, size, size) float32, or uint8 without `normalize`. All
    frames get the same crop and flip.
    """
    T, H, W, _ = frames.shape
    top, left, ch, cw = multiscale_crop_box(H, W, size, generator)
    clip = frames[:, top : top + ch, left : left + cw].permute(0, 3, 1, 2)  # (T, 3, ch, cw) uint8 view
    # Channels-last (the decoder's HWC layout): the crop copy keeps pixel order and torch's uint8
    # antialiased kernel runs on it directly; same pixels, ~25 % less CPU than a channels-first copy.
    clip = resize_clip(clip.contiguous(memory_format=torch.channels_last), (size, size))
    if flip and bool(torch.rand(1, generator=generator) < 0.5):
        clip = clip.flip(-1)
    return to_model_input(clip) if normalize else clip.permute(1, 0, 2, 3)


def short_side_resize(frames: torch.Tensor, size: int, *, test_mode: bool = False) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, h, w) uint8 with min(h, w) = size, aspect ratio kept. With `test_mode`
    as VideoMAE's test transform (``video_transforms.Resize``, cv2): the long side truncated to
    ``int(size * long / short)`` (it decides the last pixel of the third crop) and no antialiasing;
    otherwise the long side is rounded and the kernel antialiased (training views)."""
    T, H, W, _ = frames.shape
    long_side = int if test_mode else round
    h, w = (
        (size, max(size, long_side(size * W / H))) if H <= W else (max(size, long_side(size * H / W)), size)
    )
    return resize_clip(frames.permute(0, 3, 1, 2).contiguous(), (h, w), antialias=not test_mode)


def spatial_crops(clip: torch.Tensor, size: int, num_crops: int) -> list[torch.Tensor]:
    """Centre crop (num_crops=1) or three crops along the long side (start, centre, end), each
    (T, 3, size, size), of a short-side-resized clip (T, 3, h, w)."""
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops={num_crops}: allowed 1 or 3")
    h, w = clip.shape[-2:]
    if min(h, w) < size:
        raise ValueError(f"clip {h}x{w} is smaller than the crop {size}")
    cy, cx = (h - size) // 2, (w - size) // 2
    if num_crops == 1:
        offsets = [(cy, cx)]
    elif w >= h:
        offsets = [(cy, 0), (cy, cx), (cy, w - size)]
    else:
        offsets = [(0, cx), (cy, cx), (h - size, cx)]
    return [clip[..., y : y + size, x : x + size] for y, x in offsets]


def eval_views(frames: torch.Tensor, size: int, num_crops: int = 1) -> torch.Tensor:
    """VideoMAE's test views: short-side resize (its test transform) + centre/three crops +
    normalisation: (T, H, W, 3) uint8 -> (num_crops, 3, T, size, size) float32."""
    clip = short_side_resize(frames, size, test_mode=True)
    return torch.stack([to_model_input(c) for c in spatial_crops(clip, size, num_crops)])


class ClipRandAugment:
    """timm RandAugment applied identically to every frame of a clip (VideoMAE fine-tuning's ``--aa``).

    timm draws the ops and magnitudes from Python's ``random`` and numpy's global generator; each frame
    is transformed after re-seeding both with one seed drawn from the clip's torch generator, so every
    frame gets the same ops with the same magnitudes (the draws do not depend on pixel values), and
    the clip is a pure function of that generator (resumable). The global states are restored after.
    hparams as VideoMAE's ``create_random_augment``: translate by up to 0.45 x the crop size, bicubic.
    """

    def __init__(self, config_str: str, crop_size: int) -> None:
        from PIL import Image
        from timm.data.auto_augment import rand_augment_transform

        hparams = {"translate_const": int(crop_size * 0.45), "interpolation": Image.BICUBIC}
        self.transform = rand_augment_transform(config_str, hparams)

    def __call__(self, clip: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(T, 3, h, w) uint8 -> (T, 3, h, w) uint8."""
        from PIL import Image

        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        saved = random.getstate(), np.random.get_state()
        out = []
        try:
            for frame in clip.permute(0, 2, 3, 1).numpy():
                random.seed(seed)
                np.random.seed(seed)
                out.append(np.asarray(self.transform(Image.fromarray(frame))))
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def finetune_augment(
    frames: torch.Tensor,
    size: int,
    generator: torch.Generator,
    *,
    flip: bool = True,
    normalize: bool = True,
    rand_aug: ClipRandAugment | None = None,
) -> torch.Tensor:
    """Fine-tuning training view: short-side resize to size * 256/224 (VideoMAE), optional RandAugment
    of the whole resized clip (one draw for all frames), a random size x size crop, optional flip,
    normalisation -> (3, T, size, size) float32 (uint8 without `normalize`)."""
    clip = short_side_resize(frames, round(size * 256 / 224))
    if rand_aug is not None:
        clip = rand_aug(clip, generator)
    h, w = clip.shape[-2:]
    y = int(torch.randint(h - size + 1, (1,), generator=generator))
    x = int(torch.randint(w - size + 1, (1,), generator=generator))
    clip = clip[..., y : y + size, x : x + size]
    if flip and bool(torch.rand(1, generator=generator) < 0.5):
        clip = clip.flip(-1)
    return to_model_input(clip) if normalize else clip.permute(1, 0, 2, 3)
