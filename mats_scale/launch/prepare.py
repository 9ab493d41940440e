"""mats-prepare: re-encode a video dataset for fast training reads (what VideoMAE users do by hand
before Kinetics).

    mats-prepare SRC DST [--list train.txt --list val.txt] [--short-side 256]
        [--fps 0] [--gop 16] [--crf 23] [--preset veryfast] [--tune fastdecode] [--workers N]

Also ``python -m mats_scale.launch.prepare``. Every video (SRC scanned recursively, labelled by top-level
sub-folder; or the videos of each ``--list`` file) becomes ``DST/<same relative path>.mp4`` with a
keyframe every ``--gop`` frames, plus the list files to train on; :mod:`mats_scale.data.prepare`
describes the encoding, the resume and the failure report. Exit status: 0 done (unreadable sources are
listed, not fatal), 2 bad arguments or a DST that cannot be written, 130 interrupted (the same command
resumes).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from mats_scale.cli import command_parser, run
from mats_scale.data.errors import ListFileError
from mats_scale.data.prepare import REPORT, DestinationError, PrepareOptions, prepare


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    d = PrepareOptions()
    ap = command_parser("mats_scale.launch.prepare", __doc__, summary=True)
    ap.add_argument("src", help="source directory (scanned, or the root of the --list paths)")
    ap.add_argument("dst", help="output directory (created; rerun to resume)")
    ap.add_argument(
        "--list",
        action="append",
        default=[],
        dest="lists",
        help="VideoMAE list file of videos under SRC (repeatable); default: scan SRC",
    )
    ap.add_argument(
        "--short-side",
        type=int,
        default=d.short_side,
        help="scale the short side down to this (default %(default)s)",
    )
    ap.add_argument(
        "--fps",
        type=float,
        default=d.fps,
        help="output frame rate; 0 keeps the source's (default %(default)s)",
    )
    ap.add_argument(
        "--gop", type=int, default=d.gop, help="keyframe at least every N frames (default %(default)s)"
    )
    ap.add_argument(
        "--crf",
        type=int,
        default=d.crf,
        help="libx264 constant rate factor, lower is better (default %(default)s)",
    )
    ap.add_argument("--preset", default=d.preset, help="libx264 preset (default %(default)s)")
    ap.add_argument("--tune", default=d.tune, help="libx264 tune, '' for none (default %(default)s)")
    ap.add_argument("--workers", type=int, default=0, help="encoding processes (default: all cores)")
    ap.add_argument(
        "--no-progress", action="store_true", help="no progress bar (also when output is not a terminal)"
    )
    a = ap.parse_args(argv)
    if a.workers < 0:
        ap.error(f"--workers={a.workers}: must be >= 0 (0: all cores)")
    opts = PrepareOptions(a.short_side, a.fps, a.gop, a.crf, a.preset, a.tune)
    try:
        r = prepare(a.src, a.dst, opts, list_files=a.lists, workers=a.workers, progress=not a.no_progress)
    except (ValueError, ListFileError, DestinationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {str(e) or 'rerun the same command to resume'}", file=sys.stderr)
        return 130
    print(
        f"{r['videos']} videos: {r['encoded']} encoded, {r['already_done']} already done, "
        f"{len(r['failed'])} failed, in {r['seconds']} s -> {a.dst} ({', '.join(r['lists'])})"
    )
    for src, reason in sorted(r["failed"].items())[:10]:  # a name that is not UTF-8 shown with \x..
        print(
            f"  failed: {src}: {reason}".encode("utf-8", "surrogateescape").decode(
                "utf-8", "backslashreplace"
            )
        )
    if r["failed"]:
        print(f"  all failures: {os.path.join(a.dst, REPORT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
