"""Which videos a run reads: VideoMAE / VideoMAE V2 list files and folder scans.

List files, one video per line, fields separated by whitespace (a path may contain spaces: the
numbers are the last fields). A whole file is read in one of these formats, decided from all its
lines and reported (:attr:`VideoList.source_format`):

- ``path label`` (VideoMAE and VideoMAE V2 video lists, Kinetics, UCF101, HMDB51); a line with only
  a path gets label -1;
- ``path start_index total_frames`` (VideoMAE V2 pre-training lists): ``video.mp4 0 -1`` is a video
  file (total -1: decode it), ``frames/123 1 47`` a rawframe folder whose first frame is
  ``img_00001.jpg`` and which has 47 frames; chosen when every line ends in two integers and every
  second field is 0 or 1;
- ``folder total_frames label`` (VideoMAE / VideoMAE V2 rawframe lists, SSv2): chosen when every
  line ends in two integers and some second field is neither 0 nor 1 (a count, not a start index).

A line that fits none of these, or fits another format than the rest of the file, is an error naming
the file, the line number and the line. Blank lines and lines starting with ``#`` are skipped.
Paths are read as bytes and decoded with ``surrogateescape``, so a file name that is not UTF-8 still
names the file on disk. A relative path is joined to the root prefix (``data.root``).

A path that is a directory is a rawframe folder (:mod:`mats_scale.data.rawframes`) whatever the
format; without a frame count or start index in the list they are found on disk.

Folder scan: every video file and every rawframe folder (a directory holding ``img_00000.jpg`` or
``img_00001.jpg``) under the root (recursively, sorted); the label is the index of the item's
top-level sub-folder among the sorted sub-folder names (ImageFolder convention), -1 for items
directly in the root.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from mats_scale.data.errors import ListFileError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv")
FRAME_TEMPLATE = "img_{:05d}.jpg"
"""File names of a rawframe folder (VideoMAE's ``--fname_tmpl``), numbered from 0 or 1."""

FORMATS = {
    "path_label": "VideoMAE 'path label'",
    "path_start_total": "VideoMAE V2 pre-training 'path start_index total_frames'",
    "folder_total_label": "rawframe 'folder total_frames label'",
}
_INT = re.compile(r"^-?\d+$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class VideoItem(NamedTuple):
    path: str
    label: int
    start: int = -1
    """Rawframes: number of the first frame file (-1: find img_00000.jpg or img_00001.jpg)."""
    frames: int = -1
    """Rawframes: frame count (-1: count the files; a video file is always decoded)."""


class VideoList(list):
    """A list of :class:`VideoItem` that remembers where it came from and in which format."""

    def __init__(self, items=(), source_format: str = "") -> None:
        super().__init__(items)
        self.source_format = source_format


def _fail(list_path: str, lineno: int, line: str, why: str) -> None:
    raise ListFileError(f"{list_path}:{lineno}: {line[:120]!r}: {why}")


def _kind(tokens: list[str]) -> int:
    """Fields a line can be read as: 3 (two trailing integers), 2 (one), 1 (a bare path), 0 (none)."""
    if len(tokens) >= 3 and _INT.match(tokens[-1]) and _INT.match(tokens[-2]):
        return 3
    if len(tokens) >= 2 and _INT.match(tokens[-1]):
        return 2
    return 1 if len(tokens) == 1 else 0


def read_list_file(list_path: str, root: str = "") -> VideoList:
    """Parse a list file (see module doc); raises :class:`ListFileError` naming the file and line."""
    if not os.path.isfile(list_path):
        raise ListFileError(f"list file {list_path!r}: no such file")
    with open(list_path, "rb") as f:
        data = f.read()
    if b"\x00" in data:
        raise ListFileError(
            f"list file {list_path!r}: no valid line: it is a binary file (NUL bytes), not a "
            "text list of videos ('path label' or 'path start_index total_frames' per line)"
        )
    lines = []
    for lineno, raw in enumerate(data.splitlines(), 1):
        line = raw.decode("utf-8", "surrogateescape").strip()
        if not line or line.startswith("#"):
            continue
        if _CONTROL.search(line):
            _fail(list_path, lineno, line, "control characters: not a line of a text list of videos")
        lines.append((lineno, line, line.split()))
    if not lines:
        raise ListFileError(f"list file {list_path!r}: no videos listed (no valid line)")

    kinds = [_kind(tokens) for _, _, tokens in lines]
    if all(k == 3 for k in kinds):
        fmt = (
            "path_start_total"
            if all(tokens[-2] in ("0", "1") for _, _, tokens in lines)
            else "folder_total_label"
        )
    else:
        fmt = "path_label"
    # The first line of each kind, to name it when a line does not fit the file's format.
    first = {k: n for (n, _, _), k in reversed(list(zip(lines, kinds, strict=True)))}
    items = VideoList(source_format=FORMATS[fmt])
    for (lineno, line, tokens), kind in zip(lines, kinds, strict=True):
        if fmt == "path_label":
            if kind == 0:
                _fail(
                    list_path,
                    lineno,
                    line,
                    "expected 'path label' with an integer label (or just 'path'), "
                    "or 'path start_index total_frames' (VideoMAE V2)",
                )
            if kind == 3 and 2 in first:  # e.g. 'a.mp4 0 -1' among 'b.mp4 3' lines
                _fail(
                    list_path,
                    lineno,
                    line,
                    f"three fields, but line {first[2]} has two: the file is read as "
                    f"{FORMATS[fmt]}; use one format per file",
                )
            if kind == 1:
                path, label = line, -1
            else:
                path, label = line.rsplit(maxsplit=1)[0], int(tokens[-1])
            start, frames = -1, -1
        else:
            path = line.rsplit(maxsplit=2)[0]
            a, b = int(tokens[-2]), int(tokens[-1])
            if fmt == "path_start_total":
                label, start, frames = -1, a, b
                if frames == 0 or frames < -1:
                    _fail(
                        list_path,
                        lineno,
                        line,
                        "total_frames must be > 0 (a rawframe folder) or -1 (a video)",
                    )
            else:
                label, start, frames = b, -1, a
                if frames <= 0:
                    _fail(list_path, lineno, line, "total_frames must be > 0")
        if label < -1:
            _fail(list_path, lineno, line, "label must be >= 0 (or -1)")
        items.append(VideoItem(os.path.join(root, path) if root else path, label, start, frames))
    return items


def is_frame_folder(path: str) -> bool:
    """A directory holding the first frame of a rawframe clip (img_00000.jpg or img_00001.jpg)."""
    return any(os.path.isfile(os.path.join(path, FRAME_TEMPLATE.format(i))) for i in (0, 1))


def scan_folder(root: str) -> VideoList:
    """Every video and rawframe folder under `root`, labelled by top-level sub-folder (see module doc)."""
    if not os.path.isdir(root):
        raise ListFileError(f"data.root={root!r}: no such directory to scan")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    index = {name: i for i, name in enumerate(classes)}
    items = VideoList()
    folders = 0

    def label_of(path: str) -> int:
        top = os.path.relpath(path, root).split(os.sep)[0]
        return index.get(top, -1)

    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if dirpath != root and is_frame_folder(dirpath):
            items.append(VideoItem(dirpath, label_of(dirpath)))
            folders += 1
            dirnames.clear()  # a clip's frames, not more clips
            continue
        for name in sorted(filenames):
            if name.lower().endswith(VIDEO_EXTENSIONS):
                path = os.path.join(dirpath, name)
                items.append(VideoItem(path, label_of(path)))
    if not items:
        raise ListFileError(
            f"data.root={root!r}: no video files ({', '.join(VIDEO_EXTENSIONS)}) or rawframe "
            f"folders ({FRAME_TEMPLATE.format(1)}, ...) found"
        )
    items.source_format = f"folder scan ({len(items) - folders} video files, {folders} rawframe folders)"
    return items
