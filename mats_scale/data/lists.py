"""Which videos a run reads: VideoMAE-style list files and folder scans.

List file format (Kinetics-400, SSv2, UCF101, HMDB51 lists of the VideoMAE family): one video per
line, ``path label`` separated by whitespace, the label an integer (ignored in pre-training). The
path may contain spaces (the label is the last field); a line with only a path gets label -1.
Blank lines and lines starting with ``#`` are skipped. A relative path is joined to the root prefix
(``data.root``). A malformed line is reported at start-up with its file and line number.

Folder scan: every video file under the root (recursively, sorted); the label is the index of the
file's top-level sub-folder among the sorted sub-folder names (ImageFolder convention), -1 for files
directly in the root.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from mats_scale.data.errors import ListFileError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv")


class VideoItem(NamedTuple):
    path: str
    label: int


def read_list_file(list_path: str, root: str = "") -> list[VideoItem]:
    """Parse a VideoMAE list file; raises :class:`ListFileError` naming the file and line number."""
    if not os.path.isfile(list_path):
        raise ListFileError(f"list file {list_path!r}: no such file")
    items = []
    with open(list_path, encoding="utf-8", errors="replace") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) == 1:
                path, label = parts[0], -1
            else:
                try:
                    path, label = parts[0], int(parts[1])
                except ValueError:
                    raise ListFileError(
                        f"{list_path}:{lineno}: {line[:120]!r}: expected 'path label' with an integer "
                        "label (or just 'path')") from None
                if label < -1:
                    raise ListFileError(f"{list_path}:{lineno}: {line[:120]!r}: label must be >= 0 (or -1)")
            items.append(VideoItem(os.path.join(root, path) if root else path, label))
    if not items:
        raise ListFileError(f"list file {list_path!r}: no videos listed")
    return items


def scan_folder(root: str) -> list[VideoItem]:
    """Every video under `root`, labelled by top-level sub-folder (see module doc)."""
    if not os.path.isdir(root):
        raise ListFileError(f"data.root={root!r}: no such directory to scan")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    index = {name: i for i, name in enumerate(classes)}
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(VIDEO_EXTENSIONS):
                path = os.path.join(dirpath, name)
                top = os.path.relpath(path, root).split(os.sep)[0]
                items.append(VideoItem(path, index.get(top, -1)))
    if not items:
        raise ListFileError(f"data.root={root!r}: no video files ({', '.join(VIDEO_EXTENSIONS)}) found")
    return items
