"""Reading videos with decord and choosing which frames to read.

Frame indices are chosen VideoMAE-style from the video's frame count ``n``:

- strided clip (Kinetics-style, :func:`clip_indices`): ``T`` frames ``rate`` apart starting at a random
  (training) or central (evaluation) offset, spanning ``(T - 1) * rate + 1`` frames;
- uniform segments (SSv2-style, :func:`segment_indices`): the video is cut into ``T`` equal segments
  and one frame is taken from each (random in training, the middle one in evaluation).

Fallback for short videos (documented behaviour, also in the README): when a strided clip does not
fit, the stride shrinks to the largest one that fits, ``(n - 1) // (T - 1)``; when even stride 1 does
not fit (``n < T``) the frames are looped, ``0, 1, .., n-1, 0, 1, ..``, which keeps motion in the clip
(padding with the last frame would end it in a still). Videos with fewer than ``data.min_frames``
frames are not looped but rejected as bad input (:class:`VideoReadError`, reason "too short").
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from mats_scale.data.errors import VideoReadError


def clip_indices(num_frames: int, length: int, rate: int, generator: torch.Generator | None) -> list[int]:
    """`length` frame indices `rate` apart inside a video of `num_frames` frames (see module doc).

    With a generator the start is random (training); without it the clip is centred (evaluation).
    """
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    if length == 1:
        rate = 1
    elif (length - 1) * rate + 1 > num_frames:
        rate = (num_frames - 1) // (length - 1)  # the largest stride that fits; 0 when n < length
    if rate == 0:
        return [i % num_frames for i in range(length)]  # loop a video shorter than the clip
    span = (length - 1) * rate + 1
    room = num_frames - span
    start = int(torch.randint(room + 1, (1,), generator=generator)) if generator is not None else room // 2
    return [start + i * rate for i in range(length)]


def segment_indices(num_frames: int, length: int, generator: torch.Generator | None) -> list[int]:
    """One frame from each of `length` equal segments (TSN / SSv2 style); random or middle frame."""
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    edges = np.linspace(0, num_frames, length + 1)
    if generator is None:
        pos = (edges[:-1] + edges[1:]) / 2
    else:
        pos = edges[:-1] + torch.rand(length, generator=generator, dtype=torch.float64).numpy() * np.diff(edges)
    return [min(int(p), num_frames - 1) for p in pos]


def open_video(path: str, *, min_frames: int = 1, width: int = -1, height: int = -1):
    """A decord ``VideoReader`` for `path`, or :class:`VideoReadError` naming the reason.

    Checks in order: missing, not a regular file, zero length, unreadable container, too few frames.
    `width`/`height` > 0 make decord resize while decoding (cheaper than decoding full size).
    """
    import decord

    # ffmpeg's own log lines would duplicate (and interleave with) our one-line warning per file.
    decord.logging.set_level(decord.logging.QUIET)
    if not os.path.exists(path):
        raise VideoReadError(path, "missing file")
    if not os.path.isfile(path):
        raise VideoReadError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(path, "empty file (0 bytes)")
    try:
        # One decoding thread: parallelism comes from DataLoader workers, not threads inside each.
        vr = decord.VideoReader(path, num_threads=1, width=width, height=height)
    except Exception as e:  # decord raises DECORDError (a RuntimeError) with a long C++ trace
        raise VideoReadError(path, f"cannot open as video ({_first_line(e)})") from None
    n = len(vr)
    if n < max(min_frames, 1):
        raise VideoReadError(path, f"too short: {n} frames, data.min_frames={min_frames}")
    return vr


def read_frames(vr, indices: list[int], path: str = "") -> torch.Tensor:
    """Decode `indices` (any order, repeats allowed) -> (T, H, W, 3) uint8 tensor.

    A truncated or corrupt stream usually opens fine and fails here; that becomes a VideoReadError.
    """
    unique = sorted(set(indices))
    try:
        frames = vr.get_batch(unique).asnumpy()  # (U, H, W, 3) uint8, decoded in ascending order
    except Exception as e:
        raise VideoReadError(path, f"decoding failed ({_first_line(e)})") from None
    if frames.shape[0] != len(unique) or frames.ndim != 4:
        raise VideoReadError(path, f"decoding failed (got {frames.shape[0]} of {len(unique)} frames)")
    pos = {f: i for i, f in enumerate(unique)}
    return torch.from_numpy(frames)[[pos[i] for i in indices]]


def _first_line(e: BaseException) -> str:
    """The first line of a decord error without its ``[hh:mm:ss] /src/file.cc:NN:`` prefix."""
    text = str(e).strip().splitlines()
    line = re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", text[0]) if text else type(e).__name__
    return line[:160]


def multi_clip_indices(num_frames: int, length: int, rate: int, num_clips: int,
                       segments: bool = False) -> list[list[int]]:
    """Test-time temporal views: `num_clips` clips spread over the video (VideoMAE's ``test_num_segment``).

    Strided clips follow VideoMAE's test mode (``datasets/kinetics.py``, ``VideoClsDataset``): the buffer
    is every `rate`-th frame, ``0, rate, 2 rate, ...``; clip ``c`` is `length` consecutive buffer entries
    from ``int(c * step)``, ``step = (len(buffer) - length) / (num_clips - 1)``. One clip (where VideoMAE
    divides by zero) is centred in the buffer. A buffer shorter than `length` keeps this module's
    short-video fallback (smaller stride, then looping; VideoMAE repeats the last frame) as one view.
    With `segments` each view takes a different evenly spaced position inside every segment.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips={num_clips}: must be >= 1")
    if segments:
        edges = np.linspace(0, num_frames, length + 1)
        width = np.diff(edges)
        return [[min(int(edges[i] + width[i] * (c + 0.5) / num_clips), num_frames - 1) for i in range(length)]
                for c in range(num_clips)]
    buffer = list(range(0, num_frames, rate))
    if len(buffer) < length:
        return [clip_indices(num_frames, length, rate, None)] * num_clips
    room = len(buffer) - length
    if num_clips == 1:
        starts = [room // 2]
    else:
        step = room / (num_clips - 1)
        starts = [int(c * step) for c in range(num_clips)]
    return [buffer[s:s + length] for s in starts]


def read_eval_views(path: str, *, length: int, rate: int, size: int, num_clips: int = 1, num_crops: int = 1,
                    segments: bool = False, min_frames: int = 1) -> torch.Tensor:
    """All test-time views of one video: (num_clips * num_crops, 3, T, size, size) float32,
    ImageNet-normalised (short-side resize, centre or three crops; clips outer, crops inner).
    Raises :class:`VideoReadError` for an unusable file (evaluation must not silently swap videos)."""
    from mats_scale.data.transforms import eval_views

    vr = open_video(path, min_frames=min_frames)
    views = [eval_views(read_frames(vr, ids, path), size, num_crops)
             for ids in multi_clip_indices(len(vr), length, rate, num_clips, segments)]
    return torch.cat(views)
