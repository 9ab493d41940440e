"""Re-encode a video dataset for fast training reads (what VideoMAE users do by hand before Kinetics).

The command is ``mats-prepare SRC DST [--list FILE ...] [options]`` (:mod:`mats_scale.launch.prepare`).

Every video (SRC scanned recursively, labelled by top-level sub-folder; or the videos of each
``--list`` file, ``path label`` lines with paths relative to SRC) becomes ``DST/<same relative
path>.mp4``: H.264 (libx264, yuv420p, no audio), the short side scaled down to ``--short-side``
(never up; even sides), the frame rate kept (or resampled to ``--fps``), a keyframe at least every
``--gop`` frames. Why: a strided clip (16 frames at rate 4 spans 61) is decoded from the keyframe
before its first frame; with x264's default interval of 250 frames that is ~180 frames decoded per
clip on a 300-frame video, with ``--gop 16`` ~70 (benchmarks/README.md, "Data loader at GPU rates",
has the measured speed-up).

Robust and resumable: each output is written to ``NAME.part`` and renamed when complete, so an
interrupted run leaves no half file; a rerun skips finished outputs. A source that cannot be read is
listed in ``DST/prepare_failed.txt`` (``path<TAB>reason``) and left out of the list files, never
fatal. ``DST/prepare.json`` records the options; a rerun with other options is refused. The list
files are written last: ``DST/list.txt`` (+ ``classes.txt``) for a scanned SRC, or one file per
``--list`` with the same name, paths relative to DST, each output once, in the source list's format
(a VideoMAE V2 ``path 0 -1`` list stays one; rawframe lists become ``path label``), plus
``classes.txt`` when each label's videos sit in one folder named after the class: train with
``data.dataset=list data.root=DST data.train_list=DST/train.txt``.

DST and SRC must not overlap; a DST that cannot be written stops the run with one error line (exit
2); Ctrl-C stops it with one line (exit 130), and the same command resumes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from multiprocessing import get_context

from mats_scale.data.lists import FORMATS, VideoItem, VideoList, read_list_file, scan_folder


@dataclass(frozen=True)
class PrepareOptions:
    """The encoding of every output (saved in DST/prepare.json)."""

    short_side: int = 256
    fps: float = 0.0  # 0: keep the source's frame rate
    gop: int = 16
    crf: int = 23
    preset: str = "veryfast"
    tune: str = "fastdecode"  # "" for none

    def check(self) -> None:
        """Raise ValueError naming the CLI option and what is allowed."""
        if self.short_side < 16 or self.short_side % 2:
            raise ValueError(f"--short-side={self.short_side}: must be an even number >= 16")
        if self.fps < 0:
            raise ValueError(f"--fps={self.fps}: must be > 0, or 0 to keep the source's rate")
        if self.gop < 1:
            raise ValueError(f"--gop={self.gop}: must be >= 1")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"--crf={self.crf}: must be in [0, 51]")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset={self.preset!r}: allowed {', '.join(PRESETS)}")
        if self.tune not in TUNES:
            raise ValueError(f"--tune={self.tune!r}: allowed {', '.join(t or repr(t) for t in TUNES)}")


PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
TUNES = ("", "fastdecode", "film", "animation", "grain", "stillimage", "zerolatency")
REPORT = "prepare_failed.txt"
META = "prepare.json"
_WRITE_ERRNOS = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # only writing DST raises these


class DestinationError(OSError):
    """DST (or a file in it) cannot be written; the message names DST, the file and the reason."""


class PrepareInterrupted(KeyboardInterrupt):
    """Ctrl-C during the encoding; the message says how far it got and how to resume."""


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side scaled down to `short_side` (never up), both even."""
    short = min(width, height)
    scale = min(1.0, short_side / short)
    w, h = max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)
    return w, h


def encode_one(src: str, dst: str, opts: PrepareOptions) -> int:
    """Re-encode `src` into `dst` (atomically, via ``dst.part``); returns the frames written.
    Raises on any read or write failure (the caller reports it)."""
    import av
    from av.video.reformatter import Interpolation, VideoReformatter

    tmp = dst + ".part"
    with av.open(src) as inp:
        if not inp.streams.video:
            raise ValueError("no video stream")
        ins = inp.streams.video[0]
        ins.thread_type, ins.thread_count = "SLICE", 1  # parallelism comes from the worker processes
        src_rate = ins.average_rate or ins.guessed_rate
        rate = Fraction(opts.fps).limit_denominator(1001) if opts.fps else src_rate
        if not rate or rate <= 0 or (opts.fps and not src_rate):
            raise ValueError("unknown frame rate" + ("" if opts.fps else " (pass --fps)"))
        reformatter = VideoReformatter()
        with av.open(tmp, mode="w", format="mp4") as out:
            enc = _Encoder(out, rate, opts, reformatter, Interpolation.BICUBIC)
            held, held_time = None, 0.0  # with --fps: the last frame, shown until the next one's time
            for frame in inp.decode(ins):
                if not opts.fps:
                    enc.write(frame, 1)
                    continue
                # Resample like ffmpeg's fps filter: output slot k (time k / fps) shows the last
                # source frame at or before that time, so frames are dropped or repeated.
                t = float(frame.time) if frame.time is not None else held_time + 1 / float(src_rate)
                if held is not None:
                    enc.write(held, _slots_before(t, rate) - enc.written)
                held, held_time = frame, t
            if held is not None:  # the last frame lasts one source frame; a video keeps >= 1 frame
                end = _slots_before(held_time + 1 / float(src_rate), rate)
                enc.write(held, max(end - enc.written, 0 if enc.written else 1))
            enc.close()
    os.replace(tmp, dst)
    return enc.written


def _slots_before(t: float, rate: Fraction) -> int:
    """Output slots k with k / rate < t (a tiny tolerance for float timestamps)."""
    return max(0, math.ceil(t * float(rate) - 1e-6))


class _Encoder:
    """libx264 output stream of one file, created on the first frame (its size is known then)."""

    def __init__(self, out, rate: Fraction, opts: PrepareOptions, reformatter, interpolation) -> None:
        self.out, self.rate, self.opts = out, rate, opts
        self.reformatter, self.interpolation = reformatter, interpolation
        self.stream = None
        self.written = 0

    def write(self, frame, count: int) -> None:
        if count <= 0:
            return
        if self.stream is None:
            self.size = output_size(frame.width, frame.height, self.opts.short_side)
            s = self.out.add_stream("libx264", rate=self.rate)
            s.width, s.height = self.size
            s.pix_fmt, s.thread_count = "yuv420p", 1
            options = {
                "crf": str(self.opts.crf),
                "preset": self.opts.preset,
                "g": str(self.opts.gop),
                "threads": "1",
            }
            if self.opts.tune:
                options["tune"] = self.opts.tune
            s.options = options
            self.stream = s
        img = self.reformatter.reformat(
            frame, width=self.size[0], height=self.size[1], format="yuv420p", interpolation=self.interpolation
        )
        for _ in range(count):
            img.pts, img.time_base = self.written, 1 / self.rate  # frame numbers on the output grid
            for packet in self.stream.encode(img):
                self.out.mux(packet)
            self.written += 1

    def close(self) -> None:
        if self.stream is None:
            raise ValueError("no decodable frames")
        for packet in self.stream.encode():
            self.out.mux(packet)


def _cannot_write(e: OSError, path: str) -> str:
    return f"cannot write {e.filename or path}: {e.strerror or e}"


def _job(job: tuple[str, str, PrepareOptions]) -> tuple[str, str | None, str | None]:
    """Worker: (src, reason, write_error): reason when the source could not be re-encoded, never
    fatal; write_error when the output could not be written (DST's fault: the run stops)."""
    src, dst, opts = job
    tmp = dst + ".part"
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(tmp, "wb").close()  # DST is writable here, so a failure below is the source's
    except OSError as e:
        return src, None, _cannot_write(e, tmp)
    try:
        encode_one(src, dst, opts)
        return src, None, None
    except Exception as e:  # any unreadable source is reported, never fatal
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return src, None, _cannot_write(e, tmp)
        text = str(e).strip().splitlines()
        return src, f"{type(e).__name__}: {text[0][:200] if text else ''}", None
    except BaseException:  # Ctrl-C: no half file
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C reaches the whole process group; the parent alone handles it. SIGTERM
    (Pool.terminate) must end a worker even when the parent had a handler of its own (forked along)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def output_path(src: str, src_root: str, dst_root: str) -> str:
    """DST/<path of src relative to SRC, extension .mp4>; ValueError for a path outside SRC."""
    rel = os.path.relpath(os.path.abspath(src), os.path.abspath(src_root))
    if rel.startswith(os.pardir + os.sep) or rel == os.pardir:
        raise ValueError(f"{src!r} is not under SRC={src_root!r}")
    return os.path.join(dst_root, os.path.splitext(rel)[0] + ".mp4")


def _lists(src_root: str, list_files: Sequence[str]) -> dict[str, list[VideoItem]]:
    """{output list name: items (paths resolved under SRC)}."""
    if not list_files:
        return {"list.txt": scan_folder(src_root)}
    out = {}
    for lf in list_files:
        name = os.path.basename(lf)
        if name in out or name in (REPORT, META):
            raise ValueError(f"--list {lf!r}: two list files named {name!r} (or a reserved name)")
        listed = read_list_file(lf)
        out[name] = VideoList(
            (
                VideoItem(it.path if os.path.isabs(it.path) else os.path.join(src_root, it.path), it.label)
                for it in listed
            ),
            source_format=listed.source_format,
        )
    return out


def list_line(rel: str, label: int, source_format: str) -> str:
    """One line of an output list, in its source list's format: a VideoMAE V2 pre-training list stays
    ``path 0 -1`` (a video file), every other list becomes ``path label`` (rawframe folders are videos
    now, so their frame counts no longer apply)."""
    if source_format == FORMATS["path_start_total"]:
        return f"{rel} 0 -1\n"
    return f"{rel} {label}\n"


def class_names_of(lists: dict[str, list[VideoItem]]) -> list[str] | None:
    """Class names for ``classes.txt`` from labelled lists: the name of the folder holding the videos of
    each label (the Kinetics / UCF101 layout ``class_name/video.mp4``), when every label has exactly one
    such folder name and no two labels share one, and the labels are 0..N-1; else None."""
    names: dict[int, set[str]] = {}
    for items in lists.values():
        for it in items:
            if it.label >= 0:
                names.setdefault(it.label, set()).add(os.path.basename(os.path.dirname(it.path)))
    if not names or sorted(names) != list(range(len(names))) or any(len(v) != 1 for v in names.values()):
        return None
    flat = [next(iter(names[i])) for i in range(len(names))]
    return flat if len(set(flat)) == len(flat) else None


def _check_apart(src_root: str, dst_root: str) -> None:
    """ValueError when DST is SRC, inside it, or holds it (symbolic links resolved)."""
    s, d = os.path.realpath(src_root), os.path.realpath(dst_root)

    def inside(a: str, b: str) -> bool:
        return a == b or a.startswith(b.rstrip(os.sep) + os.sep)

    if inside(d, s) or inside(s, d):
        how = "the same directory" if s == d else "DST is inside SRC" if inside(d, s) else "SRC is inside DST"
        real = f" (resolved: {s!r}, {d!r})" if (s, d) != (src_root, dst_root) else ""
        raise ValueError(
            f"SRC={src_root!r} and DST={dst_root!r} overlap: {how}{real}; "
            "DST must be a directory outside SRC (and not a parent of it)"
        )


def _check_meta(dst_root: str, opts: PrepareOptions) -> None:
    path = os.path.join(dst_root, META)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f).get("options")
        if saved != asdict(opts):
            diff = ", ".join(
                f"--{k.replace('_', '-')} {saved.get(k)!r} (now {v!r})"
                for k, v in asdict(opts).items()
                if saved and saved.get(k) != v
            )
            raise ValueError(
                f"{dst_root} was prepared with other options: {diff or saved}; "
                "rerun with the same options to resume, or use a new DST"
            )
    with open(path + ".part", "w") as f:
        json.dump({"options": asdict(opts)}, f, indent=1)
    os.replace(path + ".part", path)


def _write_atomic(path: str, lines: list[str]) -> None:
    # surrogateescape: a file name that is not UTF-8 is written as its bytes (what the readers expect)
    with open(path + ".part", "w", encoding="utf-8", errors="surrogateescape") as f:
        f.writelines(lines)
    os.replace(path + ".part", path)


def prepare(
    src_root: str,
    dst_root: str,
    opts: PrepareOptions = PrepareOptions(),
    *,
    list_files: Sequence[str] = (),
    workers: int = 0,
    progress: bool = True,
) -> dict:
    """Re-encode SRC into DST (see the module doc); returns counts and the failures. Raises
    ValueError for bad arguments, DestinationError when DST cannot be written and
    PrepareInterrupted (a KeyboardInterrupt) on Ctrl-C."""
    opts.check()
    if not os.path.isdir(src_root):
        raise ValueError(f"SRC={src_root!r}: no such directory")
    _check_apart(src_root, dst_root)
    lists = _lists(src_root, list_files)
    classes = sorted(d for d in os.listdir(src_root) if os.path.isdir(os.path.join(src_root, d)))
    jobs: dict[str, str] = {}  # src as listed -> dst; each source once even when several lists name it
    owner: dict[str, tuple[str, str]] = {}  # dst -> (its source as first listed, normalised)
    failed: dict[str, str] = {}
    for items in lists.values():
        for item in items:
            if item.path in jobs or item.path in failed:
                continue
            dst = output_path(item.path, src_root, dst_root)
            key = os.path.normpath(os.path.abspath(item.path))
            first, first_key = owner.setdefault(dst, (item.path, key))
            if first_key == key:
                jobs[item.path] = dst
            else:  # e.g. a.avi and a.mp4 side by side
                failed[item.path] = f"same output {dst} as {first}: rename one of them"
    todo = [(src, dst, opts) for dst, (src, _) in owner.items() if not os.path.isfile(dst)]
    done = len(owner) - len(todo)
    done_before, clashes = done, len(failed)
    try:
        os.makedirs(dst_root, exist_ok=True)
        _check_meta(dst_root, opts)
    except OSError as e:
        raise _dst_error(dst_root, e, os.path.join(dst_root, META)) from None
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    from tqdm import tqdm

    with tqdm(
        total=len(owner),
        initial=done_before,
        desc="prepare",
        unit="video",
        disable=None if progress else True,  # None: drawn only on a terminal, never \r into a pipe
        file=sys.stderr,
    ) as bar:
        pool = None
        try:
            if workers > 1 and len(todo) > 1:
                # Workers are forked with Ctrl-C blocked (and then ignore it): only this process stops.
                mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    pool = get_context("fork").Pool(min(workers, len(todo)), initializer=_ignore_sigint)
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                results = pool.imap_unordered(_job, todo)
            else:
                results = map(_job, todo)
            for src, reason, write_error in results:
                if write_error:
                    raise _dst_error(dst_root, None, write_error)
                if reason:
                    failed[src] = reason
                else:
                    done += 1
                bar.update(1)
        except KeyboardInterrupt:
            raise PrepareInterrupted(
                f"{done} of {len(owner)} videos done; rerun the same command to resume"
            ) from None
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    # The report lists this run's failures (a rerun retries them); the lists name what exists.
    try:
        _write_atomic(os.path.join(dst_root, REPORT), [f"{s}\t{r}\n" for s, r in sorted(failed.items())])
        for name, items in lists.items():
            listed: dict[str, int] = {}  # each output once, with its first label
            for it in items:
                if it.path in jobs:
                    listed.setdefault(jobs[it.path], it.label)
            fmt = getattr(items, "source_format", "")
            lines = [
                list_line(os.path.relpath(d, dst_root), label, fmt)
                for d, label in listed.items()
                if os.path.isfile(d)
            ]
            _write_atomic(os.path.join(dst_root, name), lines)
        names = class_names_of(lists) if list_files else classes
        if names:
            _write_atomic(os.path.join(dst_root, "classes.txt"), [f"{i} {c}\n" for i, c in enumerate(names)])
    except OSError as e:
        raise _dst_error(dst_root, e, dst_root) from None
    return {
        "videos": len(jobs) + clashes,
        "encoded": done - done_before,
        "already_done": done_before,
        "failed": failed,
        "seconds": round(time.perf_counter() - t0, 2),
        "lists": sorted(lists),
    }


def _dst_error(dst_root: str, e: OSError | None, what: str) -> DestinationError:
    """DST <dst>: cannot write <file>: <reason>; what is allowed."""
    why = _cannot_write(e, what) if e is not None else what
    return DestinationError(f"DST {dst_root}: {why}; DST must be a writable directory")


if __name__ == "__main__":
    sys.exit("the command is mats-prepare (python -m mats_scale.launch.prepare)")
