"""The training device's half of the data pipeline: uint8 clips in, model input out.

With ``data.normalize_on_device`` (the default) the workers send clips as (B, 3, T, S, S) uint8, 2.4 MB
per 16x224 clip instead of 9.6 MB of float32 (4x less through the worker queues' shared memory, the
pinned copy and the host-to-device transfer), and the conversion runs where the model does:

    video = to_model_input(batch, device)    # (B, 3, T, S, S) float32 on `device`, ImageNet-normalised

It computes ``(x - 255 mean) / (255 std)`` in float32 with the same ops as the workers' float path
(:func:`mats_scale.data.transforms.to_model_input`), so the values are bit-equal on the CPU (tested).
Nothing random happens here: crop, flip and frame choice were drawn in the worker from the sample's
seeds, so a run is as deterministic and resumable as before. Augmentation stays in the workers because
what is left there after decoding (crop, antialiased resize, flip of uint8 clips) shrinks the data or
costs a few ms per clip (README "Data loader"). A float batch (``normalize_on_device=false``) is only
moved. With ``data.decoder=nvdec`` (:mod:`mats_scale.data.gpu_decode`) the uint8 clips were decoded,
cropped and resized on the device already: the copy is a no-op and only the normalisation runs here.
"""

from __future__ import annotations

from typing import Any

import torch

from mats_scale.config import IMAGENET_MEAN, IMAGENET_STD

_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """255 x ImageNet mean and std as (1, 3, 1, 1, 1) float32 on `device` (made once per device)."""
    if device not in _STATS:
        # The same float32 products as transforms.to_model_input, so the results match bit for bit.
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1) * 255.0
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1) * 255.0
        _STATS[device] = (mean.to(device), std.to(device))
    return _STATS[device]


def normalize_video(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) uint8 -> float32 on the same device, ``(x / 255 - mean) / std``."""
    if video.dtype != torch.uint8 or video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, T, H, W) uint8 video, got {tuple(video.shape)} {video.dtype}")
    mean, std = _mean_std(video.device)
    return (video.float() - mean) / std


def to_model_input(
    batch: dict[str, Any], device: torch.device | str, *, non_blocking: bool = True
) -> torch.Tensor:
    """The model input of a loader batch on `device`: (B, 3, T, S, S) float32, ImageNet-normalised.

    The uint8 clip is copied first (4x fewer bytes; asynchronous from pinned memory) and converted on
    `device`; a float32 batch from ``data.normalize_on_device=false`` is only copied.
    """
    video = batch["video"].to(torch.device(device), non_blocking=non_blocking)
    return normalize_video(video) if video.dtype == torch.uint8 else video


def bytes_per_clip(batch: dict[str, Any]) -> int:
    """Bytes per clip of the tensors a worker sends for `batch` (what crosses the process boundary)."""
    total = sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))
    return total // batch["video"].shape[0]


__all__ = ["bytes_per_clip", "normalize_video", "to_model_input"]
