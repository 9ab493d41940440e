"""Reading videos (decord or PyAV, ``data.decoder``) and choosing which frames to read.

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

import contextlib
import logging
import os
import re
import tempfile

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
        pos = edges[:-1] + torch.rand(length, generator=generator, dtype=torch.float64).numpy() * np.diff(
            edges
        )
    return [min(int(p), num_frames - 1) for p in pos]


DECODERS = ("decord", "pyav", "nvdec")
"""``data.decoder`` choices. decord (the default) and PyAV return the same frames (same indexing, same
YUV -> RGB conversion of FFmpeg; pixel-equal on the H.264 files of the tests); nvdec decodes on the GPU
into device memory (:mod:`mats_scale.data.gpu_decode`, the same frame indices, pixels within codec
tolerance)."""

log = logging.getLogger("mats_scale.data")

# Paths whose decord read failed in this process: they go straight to PyAV afterwards (one decord
# attempt and one log line per file and process, not one per read).
_DECORD_FAILED: set[str] = set()


class DecordVideo:
    """A decord ``VideoReader`` behind the reader interface: ``len()`` and :meth:`decode`."""

    backend = "decord"

    def __init__(self, path: str, *, threads: int = 1, width: int = -1, height: int = -1) -> None:
        import decord

        # ffmpeg's own log lines would duplicate (and interleave with) our one-line warning per file.
        decord.logging.set_level(decord.logging.QUIET)
        error = None
        source = _source(path)
        with _quiet_decord_stderr() as logged:  # filled when the block ends
            try:
                # One decoding thread: parallelism comes from DataLoader workers (frame threads
                # measured no faster per core, README "Data loader at GPU rates").
                self.vr = decord.VideoReader(source, num_threads=threads, width=width, height=height)
            except Exception as e:
                error = str(e).strip()
            finally:
                if source is not path:  # decord has read the file object whole
                    source.close()
        if error is not None:
            # The exception says only "Error reading PATH..."; the cause is in the C++ log line.
            raise RuntimeError(" ".join([error, *logged]))
        self.path, self.kw = path, dict(threads=threads, width=width, height=height)  # for a PyAV retry

    def __len__(self) -> int:
        return len(self.vr)

    def decode(self, frames: list[int]) -> np.ndarray:
        """Ascending unique frame numbers -> (U, H, W, 3) uint8."""
        with _quiet_decord_stderr():
            return self.vr.get_batch(frames).asnumpy()


class PyAVVideo:
    """The same frames as decord, decoded with PyAV (FFmpeg): frame i is the i-th smallest
    presentation timestamp among the video stream's packets, as in decord's index. :meth:`decode`
    seeks to the keyframe before the first wanted frame, decodes forward in decode order, converts
    only the wanted frames to RGB and stops after the last one."""

    backend = "pyav"

    def __init__(self, path: str, *, threads: int = 1, width: int = -1, height: int = -1) -> None:
        import av
        from av.video.reformatter import VideoReformatter

        self._file = None if (source := _source(path)) is path else source
        self.container = av.open(source)
        try:
            self.stream = self.container.streams.video[0]
        except IndexError:
            self.container.close()
            raise ValueError("no video stream") from None
        self.stream.thread_type = "FRAME" if threads > 1 else "SLICE"
        self.stream.thread_count = threads
        # Demuxing (no decoding) reads the timestamps: a few ms for a 10 s clip.
        self.pts = sorted(p.pts for p in self.container.demux(self.stream) if p.pts is not None)
        self.size = {k: v for k, v in (("width", width), ("height", height)) if v > 0}
        # One reformatter per video: its cached SwsContext makes the RGB conversion ~10x cheaper than
        # ``frame.to_ndarray(format="rgb24")``'s fresh context per frame.
        self.reformatter = VideoReformatter()

    def __len__(self) -> int:
        return len(self.pts)

    def decode(self, frames: list[int]) -> np.ndarray:
        """Ascending unique frame numbers -> (U, H, W, 3) uint8."""
        want = {self.pts[f]: k for k, f in enumerate(frames)}
        out: list = [None] * len(frames)
        self._decode_into(out, want, self.pts[frames[0]])
        if any(o is None for o in out):  # a container whose seek landed after a wanted frame
            self._decode_into(out, want, None)
        missing = sum(o is None for o in out)
        if missing:
            raise ValueError(f"{missing} of {len(frames)} frames not decoded")
        return np.stack(out)

    def _decode_into(self, out: list, want: dict, seek_pts) -> None:
        """Decode from the keyframe at or before `seek_pts` (None: the start) up to the last wanted
        frame, converting the wanted ones into `out`."""
        last = max(want)
        self.container.seek(
            seek_pts if seek_pts is not None else self.pts[0],
            stream=self.stream,
            backward=True,
            any_frame=False,
        )
        for frame in self.container.decode(self.stream):
            k = want.get(frame.pts)
            if k is not None and out[k] is None:
                out[k] = self.reformatter.reformat(frame, format="rgb24", **self.size).to_ndarray()
            if frame.pts is not None and frame.pts >= last:
                break

    def close(self) -> None:
        self.container.close()
        if self._file is not None:
            self._file.close()


def _nvdec_video(path: str, **kw):
    from mats_scale.data.gpu_decode import NvdecVideo

    return NvdecVideo(path, **kw)


_READERS = {"decord": DecordVideo, "pyav": PyAVVideo, "nvdec": _nvdec_video}


def _source(path: str):
    """What a decoder opens: the name, or for a name that is not valid UTF-8 (kept with surrogate
    escapes; decord and PyAV take UTF-8 names only) a binary file object."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return open(path, "rb")  # noqa: SIM115 - closed by the reader


class CachedVideo:
    """A whole decoded video held in memory, with the readers' interface (``len()``, ``decode``)."""

    backend = "cache"

    def __init__(self, frames: np.ndarray, path: str) -> None:
        self.frames, self.path = frames, path  # (F, H, W, 3) uint8

    def __len__(self) -> int:
        return self.frames.shape[0]

    def decode(self, frames: list[int]) -> np.ndarray:
        return self.frames[frames]


class DecodedCache:
    """Whole decoded videos kept in this process up to a byte budget (``data.cache_gib``), for small
    datasets read for many epochs: a video is decoded once, every later clip of it is sliced from memory.

    Each loader process (each DataLoader worker, or the training process with ``data.num_workers=0``)
    has its own. Once the budget is used up, further videos are read from their files as without the
    cache; a video that does not decode whole (a corrupt tail) is read clip by clip as without it too,
    so the cache never changes which frames a clip gets nor which videos count as bad.
    """

    def __init__(self) -> None:
        self.videos: dict[tuple, np.ndarray] = {}
        self.bytes = 0
        self.full = False

    def get(self, key: tuple) -> np.ndarray | None:
        return self.videos.get(key)

    def load(self, key: tuple, vr, path: str, budget: int):
        """`vr` decoded whole and kept when the budget allows; returns the reader to use."""
        if self.full:
            return vr
        try:
            frames = read_frames(vr, list(range(len(vr))), path).numpy()
        except VideoReadError:
            return vr  # read clip by clip, exactly as without the cache
        if self.bytes + frames.nbytes > budget:
            self.full = True
        else:
            self.videos[key] = frames
            self.bytes += frames.nbytes
        return CachedVideo(frames, path)


_CACHE = DecodedCache()


def open_video(
    path: str,
    *,
    min_frames: int = 1,
    width: int = -1,
    height: int = -1,
    start: int = -1,
    frames: int = -1,
    decoder: str = "decord",
    threads: int = 1,
    cache_bytes: int = 0,
):
    """A reader for `path` (``len()`` frames, :func:`read_frames`), or :class:`VideoReadError`
    naming the reason.

    Checks in order: missing, not a regular file, zero length, unreadable container, too few frames.
    `width`/`height` > 0 make the decoder resize while decoding (cheaper than decoding full size).
    `decoder` is one of :data:`DECODERS`; a file decord cannot open (or, in :func:`read_frames`,
    decode: decord rejects some valid narrow videos, e.g. 16, 24 or 48 px wide) is read with PyAV.
    A directory is a rawframe folder (:class:`mats_scale.data.rawframes.FrameFolder`, same interface;
    `start`/`frames` from the list, -1 to find them on disk). A path that is not valid UTF-8 (kept
    with surrogate escapes) is opened as a file object, as the decoders only take UTF-8 names.
    `cache_bytes` > 0: keep whole decoded videos in this process up to that many bytes
    (:class:`DecodedCache`); a cached video is served from memory without touching its file.
    """
    if decoder not in _READERS:
        raise ValueError(f"decoder={decoder!r}: allowed {', '.join(DECODERS)}")
    if decoder == "nvdec":  # no GPU or no package: one line for the run, not a skipped file each
        from mats_scale.data.gpu_decode import check_gpu_decoder

        check_gpu_decoder(decoder)
    if cache_bytes > 0:
        key = (path, start, frames, width, height, decoder)
        cached = _CACHE.get(key)
        if cached is not None:
            return CachedVideo(cached, path)
        vr = open_video(
            path,
            min_frames=min_frames,
            width=width,
            height=height,
            start=start,
            frames=frames,
            decoder=decoder,
            threads=threads,
        )
        return _CACHE.load(key, vr, path, cache_bytes)
    if not os.path.exists(path):
        raise VideoReadError(path, "missing file")
    if os.path.isdir(path):
        from mats_scale.data.rawframes import FrameFolder

        vr = FrameFolder(path, start=start, frames=frames)
        if len(vr) < max(min_frames, 1):
            raise VideoReadError(path, f"too short: {len(vr)} frames, data.min_frames={min_frames}")
        return vr
    if not os.path.isfile(path):
        raise VideoReadError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(path, "empty file (0 bytes)")
    kw = dict(threads=threads, width=width, height=height)
    if decoder == "decord" and path in _DECORD_FAILED:
        decoder = "pyav"
    try:
        vr = _READERS[decoder](path, **kw)
    except Exception as e:  # decord raises DECORDError (a RuntimeError) with a long C++ trace
        reason = f"cannot open as video ({_first_line(e)})"
        if decoder != "decord":
            raise VideoReadError(path, reason) from None
        vr = _pyav_fallback(path, reason, kw)
    n = len(vr)
    if n < max(min_frames, 1):
        raise VideoReadError(path, f"too short: {n} frames, data.min_frames={min_frames}")
    return vr


def _pyav_fallback(path: str, decord_reason: str, kw: dict):
    """A PyAV reader for a file decord failed on, or VideoReadError with decord's reason."""
    _DECORD_FAILED.add(path)
    try:
        vr = PyAVVideo(path, **kw)
    except Exception:
        raise VideoReadError(path, decord_reason) from None
    log.info("decord cannot read %s (%s); reading it with PyAV", path, decord_reason)
    return vr


def read_frames(vr, indices: list[int], path: str = "") -> torch.Tensor:
    """Decode `indices` (any order, repeats allowed) -> (T, H, W, 3) uint8 tensor.

    Each frame is decoded once, in ascending order. A truncated or corrupt stream usually opens fine
    and fails here; that becomes a VideoReadError (after a PyAV retry when decord failed).
    """
    unique = sorted(set(indices))
    try:
        frames = vr.decode(unique)  # (U, H, W, 3) uint8
    except Exception as e:
        reason = f"decoding failed ({_first_line(e)})"
        if vr.backend != "decord":
            raise VideoReadError(path, reason) from None
        if "size must exactly match" in str(e):  # decord's row-padding bug: 2-72 px wide frames
            reason = "too small for decord (frames this narrow fail its row copy)"
        return read_frames(_pyav_fallback(vr.path, reason, vr.kw), indices, path)
    if frames.shape[0] != len(unique) or frames.ndim != 4:
        raise VideoReadError(path, f"decoding failed (got {frames.shape[0]} of {len(unique)} frames)")
    pos = {f: i for i, f in enumerate(unique)}
    return torch.as_tensor(frames)[[pos[i] for i in indices]]  # numpy, or a device tensor (nvdec)


@contextlib.contextmanager
def _quiet_decord_stderr():
    """Keep decord's C++ log lines (``[hh:mm:ss] /.../video_reader.cc:83: ERROR opening: PATH, CAUSE``,
    written straight to file descriptor 2 on every failed read) off stderr; yields a list that receives
    them, so the cause reaches the user once per file, as the reason of the loader's warning. Other
    output written meanwhile is passed on."""
    logged: list[str] = []
    try:
        saved = os.dup(2)
    except OSError:  # no stderr descriptor (embedded interpreters): nothing to hide
        yield logged
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield logged
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            rest = []
            for line in tmp.read().splitlines(keepends=True):
                if _DECORD_LOG.match(line):
                    logged.append(line.decode(errors="replace").strip())
                else:
                    rest.append(line)
            if rest:
                os.write(2, b"".join(rest))


_DECORD_LOG = re.compile(rb"^\[[\d:]+\] \S+\.(cc|h):\d+: ")


def _first_line(e: BaseException) -> str:
    """The cause in a decoder error, without decord's ``[hh:mm:ss] /src/file.cc:NN:`` prefix or
    ``ERROR opening: PATH,`` and PyAV's ``[Errno N]`` / ``: 'PATH'``, so both decoders give the same
    reason for the same file (e.g. "Invalid data found when processing input")."""
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    line = text[0]
    opening = re.search(r"ERROR opening: .*?, (.*)$", line)
    if opening:
        line = opening.group(1)
    line = re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", line)
    line = re.sub(r"^\[Errno -?\d+\]\s*", "", line)
    line = re.sub(r": '[^']*'$", "", line)
    return line[:160]


def multi_clip_indices(
    num_frames: int, length: int, rate: int, num_clips: int, segments: bool = False
) -> list[list[int]]:
    """Test-time temporal views: `num_clips` clips spread over the video (VideoMAE's ``test_num_segment``).

    Strided clips follow VideoMAE's test mode (``datasets/kinetics.py``, ``VideoClsDataset``): the buffer
    is every `rate`-th frame, ``0, rate, 2 rate, ...``; clip ``c`` is `length` consecutive buffer entries
    from ``int(c * step)``, ``step = max((len(buffer) - length) / (num_clips - 1), 0)``. One clip (where
    VideoMAE divides by zero) is centred in the buffer. A buffer shorter than `length` is padded by
    repeating its last frame, as VideoMAE does (every view is then the same clip; training's
    short-video fallback, a smaller stride, is not used here). With `segments` each view takes a
    different evenly spaced position inside every segment.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips={num_clips}: must be >= 1")
    if segments:
        edges = np.linspace(0, num_frames, length + 1)
        width = np.diff(edges)
        return [
            [min(int(edges[i] + width[i] * (c + 0.5) / num_clips), num_frames - 1) for i in range(length)]
            for c in range(num_clips)
        ]
    buffer = list(range(0, num_frames, rate))
    buffer += buffer[-1:] * (length - len(buffer))  # a short video: its last frame repeated
    room = len(buffer) - length
    if num_clips == 1:
        starts = [room // 2]
    else:
        step = room / (num_clips - 1)
        starts = [int(c * step) for c in range(num_clips)]
    return [buffer[s : s + length] for s in starts]


def read_eval_views(
    path: str,
    *,
    length: int,
    rate: int,
    size: int,
    num_clips: int = 1,
    num_crops: int = 1,
    segments: bool = False,
    min_frames: int = 1,
    decoder: str = "decord",
    cache_bytes: int = 0,
) -> torch.Tensor:
    """All test-time views of one video: (num_clips * num_crops, 3, T, size, size) float32,
    ImageNet-normalised (short-side resize, centre or three crops; clips outer, crops inner).
    Raises :class:`VideoReadError` for an unusable file (evaluation must not silently swap videos)."""
    from mats_scale.data.transforms import eval_views

    vr = open_video(path, min_frames=min_frames, decoder=decoder, cache_bytes=cache_bytes)
    views = [
        eval_views(read_frames(vr, ids, path), size, num_crops)
        for ids in multi_clip_indices(len(vr), length, rate, num_clips, segments)
    ]
    return torch.cat(views)
