"""Rawframe folders (VideoMAE's rawframe datasets, e.g. SSv2 decoded to ``img_00001.jpg`` ...) read
through the same interface as a decord ``VideoReader``: ``len(reader)`` frames and
``reader.get_batch(indices).asnumpy()`` -> (K, H, W, 3) uint8, so the loader, frame selection and the
evaluation views treat a folder exactly like a video file.

Frame ``i`` (0-based) is the file ``FRAME_TEMPLATE.format(start + i)``; `start` comes from the list
(VideoMAE V2 pre-training lists) or is found on disk (``img_00000.jpg`` or ``img_00001.jpg``); the
frame count comes from the list or is the run of consecutive files from `start`.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from mats_scale.data.errors import VideoReadError
from mats_scale.data.lists import FRAME_TEMPLATE


class _Batch:
    def __init__(self, array: np.ndarray) -> None:
        self._array = array

    def asnumpy(self) -> np.ndarray:
        return self._array


class FrameFolder:
    """A directory of numbered JPEG/PNG frames with decord's reader interface (see module doc)."""

    def __init__(self, path: str, *, start: int = -1, frames: int = -1) -> None:
        self.path = path
        if start < 0:
            found = [i for i in (0, 1) if os.path.isfile(self._file_at(i))]
            if not found:
                raise VideoReadError(
                    path, f"rawframe folder without {FRAME_TEMPLATE.format(0)} or {FRAME_TEMPLATE.format(1)}"
                )
            start = found[0]
        self.start = start
        if frames < 0:
            names = set(os.listdir(path))
            frames = 0
            while FRAME_TEMPLATE.format(start + frames) in names:
                frames += 1
        self.frames = frames

    def _file_at(self, number: int) -> str:
        return os.path.join(self.path, FRAME_TEMPLATE.format(number))

    def __len__(self) -> int:
        return self.frames

    backend = "rawframes"

    def decode(self, frames: list[int]) -> np.ndarray:
        """The reader interface of ``mats_scale.data.video``: ascending frame numbers -> (U, H, W, 3) uint8."""
        return self.get_batch(frames).asnumpy()

    def get_batch(self, indices: list[int]) -> _Batch:
        from torchvision.io import ImageReadMode, decode_image, read_file

        out = []
        for i in indices:
            name = self._file_at(self.start + int(i))
            try:
                img = decode_image(read_file(name), mode=ImageReadMode.RGB)  # (3, H, W) uint8
            except (RuntimeError, OSError) as e:
                first = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
                reason = "missing" if not os.path.exists(name) else f"cannot decode ({first})"
                raise VideoReadError(self.path, f"frame {os.path.basename(name)}: {reason}") from None
            out.append(img.permute(1, 2, 0))
        if len({tuple(x.shape) for x in out}) > 1:
            raise VideoReadError(self.path, "frames of different sizes")
        return _Batch(torch.stack(out).numpy())
