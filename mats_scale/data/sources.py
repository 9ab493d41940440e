"""Which videos a split holds: data.dataset = bundled (generated on first use), list, folder, or
synthetic (in-memory clips, no files). Start-up problems raise :class:`DataError` before any worker starts.
"""

from __future__ import annotations

import fcntl
import logging
import os

from mats_scale.config import Config
from mats_scale.data import appearance, synth
from mats_scale.data.errors import DataError
from mats_scale.data.lists import VideoItem, VideoList, read_list_file, scan_folder

log = logging.getLogger("mats_scale.data")

SYNTHETIC_CLIPS = 1024
"""Clips per epoch of data.dataset=synthetic."""
DEFAULT_BUNDLED_ROOT = os.path.join("data", "bundled")
BUNDLED_PARAMS = synth.SynthParams()
"""What the loader generates when the bundled dataset is missing (the generator CLI's defaults)."""
APPEARANCE_PARAMS = appearance.DEFAULTS
"""What the loader generates for data.bundled=objects / scenes (the study's calibrated difficulty)."""

# What a (possibly interrupted) generation leaves in its directory; anything else means foreign data.
_GENERATED_NAMES = {
    ".lock",
    "train",
    "val",
    "train.txt",
    "val.txt",
    "classes.txt",
    "meta.json",
    "meta.json.part",
}


def bundled_root(cfg: Config) -> str:
    """data.root, else data/bundled (data.bundled=motion) or data/bundled-<task> in the working directory."""
    task = cfg.data.bundled
    return cfg.data.root or os.path.join(
        os.getcwd(), DEFAULT_BUNDLED_ROOT + ("" if task == "motion" else f"-{task}")
    )


def ensure_bundled(
    root: str,
    params: synth.SynthParams | appearance.AppearanceParams | None = None,
    workers: int = 0,
    task: str = "motion",
) -> str:
    """Generate the bundled dataset `task` (data.bundled: motion, objects, scenes) into `root` unless it is
    complete; safe to call from every rank.

    An exclusive ``flock`` on ``root/.lock`` serialises the callers (no torch.distributed needed):
    the first one generates, the others wait on the lock and then find ``meta.json`` (the done-marker,
    written last). A run that died mid-generation leaves no marker, so the next caller regenerates.
    A non-empty `root` with other files than a generation writes is refused (DataError), and so is a
    complete one of another task.
    """
    if synth.is_complete(root):
        held = appearance.meta_task(root)
        if held not in (task, None):
            raise DataError(
                f"data.root={root!r} holds the bundled {held!r} task, not data.bundled={task!r}: "
                "point data.root at another (empty or new) directory, or leave it empty"
            )
        return root
    foreign = sorted(set(os.listdir(root)) - _GENERATED_NAMES) if os.path.isdir(root) else []
    if foreign:  # never write sample videos into somebody's data directory
        raise DataError(
            f"data.root={root!r} is not a bundled dataset (no meta.json, and it holds "
            f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): point data.root "
            "at an empty or new directory, or use data.dataset=list / folder for your videos"
        )
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not synth.is_complete(root):
                log.warning("bundled dataset (%s) missing in %s: generating it (first use)", task, root)
                workers = workers or min(4, os.cpu_count() or 1)
                if task == "motion":
                    synth.generate(root, params or BUNDLED_PARAMS, workers=workers)
                else:
                    params = params or APPEARANCE_PARAMS[task]
                    appearance.generate(root, params, workers=workers)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


_LISTS: dict[tuple, VideoList] = {}
"""List files read in this process, by (path, root, mtime, size): the schedule, the task and the loaders
ask for the same list at start-up, and a Kinetics list has ~240k lines."""
_FOLDERS_LOGGED: set[tuple] = set()


def _read_list_once(path: str, root: str) -> VideoList:
    try:
        st = os.stat(path)
    except OSError:
        return read_list_file(path, root)  # raises the list error that names the file
    key = (os.path.abspath(path), root, st.st_mtime_ns, st.st_size)
    if key not in _LISTS:
        _LISTS[key] = items = read_list_file(path, root)
        log.info("data: %d videos from %s, read as %s", len(items), path, items.source_format)
    cached = _LISTS[key]
    return VideoList(cached, cached.source_format)


def resolve_items(cfg: Config, split: str = "train") -> list[VideoItem]:
    """The videos of `split` for data.dataset = bundled, list or folder (start-up errors raise). A list
    file is read (and logged) once per process while it is unchanged; a folder is scanned every time."""
    d = cfg.data
    if d.dataset == "bundled":
        root = ensure_bundled(bundled_root(cfg), task=d.bundled)
        return read_list_file(os.path.join(root, f"{split}.txt"), root)
    if d.dataset == "list":
        path = d.train_list if split == "train" else d.val_list
        if not path:
            raise DataError(f"data.{split}_list is empty: data.dataset=list needs a list file")
        return _read_list_once(path, d.root)
    if d.dataset == "folder":
        items = scan_folder(d.root)
        seen = (os.path.abspath(d.root), len(items), items.source_format)
        if seen not in _FOLDERS_LOGGED:
            _FOLDERS_LOGGED.add(seen)
            log.info("data: %d videos from %s, %s", len(items), d.root, items.source_format)
        return items
    raise DataError(f"data.dataset={d.dataset!r} has no file list")


def class_names(cfg: Config) -> dict[int, str]:
    """Label -> class name where the data says it: the bundled set's classes, a folder scan's
    sub-folders, or a ``classes.txt`` (``label name`` lines, as ``mats-prepare`` and ``mats-synth`` write
    it) beside the val list or in data.root; empty when none is found or it cannot be read."""
    d = cfg.data
    if d.dataset == "bundled":
        return dict(enumerate(synth.CLASSES if d.bundled == "motion" else appearance.CLASSES[d.bundled]))
    if d.dataset == "folder" and os.path.isdir(d.root):
        return dict(
            enumerate(sorted(e for e in os.listdir(d.root) if os.path.isdir(os.path.join(d.root, e))))
        )
    if d.dataset != "list":
        return {}
    for folder in dict.fromkeys([os.path.dirname(d.val_list or d.train_list), d.root]):
        path = os.path.join(folder, "classes.txt")
        try:
            with open(path, encoding="utf-8") as f:
                pairs = [line.split(maxsplit=1) for line in f if line.strip()]
            return {int(p[0]): p[1].strip() for p in pairs if len(p) == 2}
        except (OSError, ValueError, UnicodeDecodeError):
            continue
    return {}


def train_items(cfg: Config) -> list[VideoItem] | None:
    """The training videos, or None for data.dataset=synthetic (in-memory clips)."""
    return None if cfg.data.dataset == "synthetic" else resolve_items(cfg, "train")


__all__ = [
    "APPEARANCE_PARAMS",
    "BUNDLED_PARAMS",
    "class_names",
    "SYNTHETIC_CLIPS",
    "bundled_root",
    "ensure_bundled",
    "resolve_items",
    "train_items",
]
