"""GPU video decoding (``data.decoder=nvdec``): NVDEC through PyNvVideoCodec, frames decoded straight into
the training GPU's memory as (U, H, W, 3) uint8 tensors, crop and resize run there too.

The reader has the CPU readers' interface (``len()``, ``decode(frames)``, ``backend``) and is picked by
``data.decoder`` like them (:data:`mats_scale.data.video.DECODERS`), so the loader's own index functions
choose the frames; crop, resize and flip are the workers' functions (:mod:`mats_scale.data.transforms`),
which are device-agnostic torch ops, applied to the device tensor. docs/gpu.md says why PyNvVideoCodec.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from mats_scale.data.errors import DataError

GPU_DECODERS = {"nvdec": "PyNvVideoCodec"}
"""GPU ``data.decoder`` choices -> the package that provides them (an optional dependency)."""


class GpuDecodeUnavailable(DataError):
    """A GPU decoder asked for where it cannot run (no CUDA device, or its package missing)."""


def gpu_decode_problem(decoder: str, *, cuda: bool, installed: bool) -> str | None:
    """One line on why `decoder` cannot run here, or None when it can (cuda: a CUDA device is visible
    to torch; installed: the decoder's package can be imported). The config refuses data.num_workers
    > 0 with it: decoding happens in the training process, on its GPU."""
    if decoder not in GPU_DECODERS:
        return f"data.decoder={decoder}: not a GPU decoder (GPU decoders: {', '.join(GPU_DECODERS)})"
    package = GPU_DECODERS[decoder]
    if not cuda:
        return (
            f"data.decoder={decoder} decodes on an NVIDIA GPU (NVDEC) and this machine has no CUDA device: "
            "use data.decoder=decord or pyav"
        )
    if not installed:
        return (
            f"data.decoder={decoder} needs the {package} package (pip install {package}; no system FFmpeg "
            "needed): it is not installed"
        )
    return None


def check_gpu_decoder(decoder: str) -> None:
    """Raise :class:`GpuDecodeUnavailable` (one line) unless `decoder` can run on this machine."""
    import torch

    problem = gpu_decode_problem(
        decoder,
        cuda=torch.cuda.is_available(),
        installed=importlib.util.find_spec(GPU_DECODERS.get(decoder, decoder)) is not None,
    )
    if problem is not None:
        raise GpuDecodeUnavailable(problem)


def open_nvdec(path: str, device_index: int) -> Any:
    """PyNvVideoCodec's SimpleDecoder: RGB (HWC) frames in device memory of GPU `device_index`."""
    import PyNvVideoCodec as nvc

    return nvc.SimpleDecoder(
        path,
        gpu_id=device_index,
        use_device_memory=True,
        output_color_type=nvc.OutputColorType.RGB,
    )


class NvdecVideo:
    """One video decoded by NVDEC: ``len()`` frames and :meth:`decode` -> (U, H, W, 3) uint8 on the GPU.

    `open_decoder(path, device_index)` returns an object with ``len()`` and
    ``get_batch_frames_by_index(indices)`` whose frames support DLPack (PyNvVideoCodec's SimpleDecoder;
    tests pass a CPU stand-in). `width`/`height` > 0 resize on the device after decoding (the CPU
    readers resize while decoding; the same bilinear size either way).
    """

    backend = "nvdec"

    def __init__(
        self,
        path: str,
        *,
        threads: int = 1,
        width: int = -1,
        height: int = -1,
        device: Any = None,
        open_decoder: Callable[[str, int], Any] = open_nvdec,
    ) -> None:
        import torch

        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        )
        self.path, self.kw = path, dict(threads=threads, width=width, height=height)
        self.size = (height, width) if width > 0 and height > 0 else None
        self.decoder = open_decoder(path, self.device.index or 0)
        self.num_frames = len(self.decoder)

    def __len__(self) -> int:
        return self.num_frames

    def decode(self, frames: list[int]):
        """Ascending unique frame numbers -> (U, H, W, 3) uint8 tensor on the device (zero-copy DLPack
        views of the decoder's buffers, stacked into one tensor the caller owns)."""
        import torch

        if sorted(set(frames)) != list(frames):
            raise ValueError(f"frames must be ascending and unique, got {frames}")
        if frames and not 0 <= frames[0] <= frames[-1] < self.num_frames:
            raise ValueError(f"frames {frames[0]}..{frames[-1]} outside 0..{self.num_frames - 1}")
        decoded = self.decoder.get_batch_frames_by_index(list(frames))
        if len(decoded) != len(frames):
            raise ValueError(f"{len(frames) - len(decoded)} of {len(frames)} frames not decoded")
        out = torch.stack([torch.from_dlpack(f) for f in decoded]).to(self.device)  # (U, H, W, 3)
        if self.size is not None:
            from mats_scale.data.transforms import resize_clip

            out = resize_clip(out.permute(0, 3, 1, 2), self.size).permute(0, 2, 3, 1).contiguous()
        return out


def device_clip(frames, size: int, generator, *, flip: bool = True):
    """The pre-training view of decoded device frames: (T, H, W, 3) uint8 on the GPU -> (3, T, S, S)
    uint8 there, by the workers' own :func:`~mats_scale.data.transforms.pretrain_augment` (the same crop
    box and flip drawn from the same generator; torch's resize kernel of the device), ready for
    :func:`mats_scale.data.device.normalize_video`."""
    from mats_scale.data.transforms import pretrain_augment

    return pretrain_augment(frames, size, generator, flip=flip, normalize=False)


__all__ = [
    "GPU_DECODERS",
    "GpuDecodeUnavailable",
    "NvdecVideo",
    "check_gpu_decoder",
    "device_clip",
    "gpu_decode_problem",
    "open_nvdec",
]
