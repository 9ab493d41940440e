"""The files of a generated dataset (the bundled motion set, data/synth.py, and the appearance tasks,
data/appearance.py): clips under ``train/`` and ``val/``, VideoMAE list files, ``classes.txt`` and
``meta.json`` written last as the done-marker the loader checks."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any


@dataclass(frozen=True)
class FileParams:
    """The parameters every generated dataset has: clip counts, seed, clip size and encoding (each
    generator's params add its own after these; all are stored in meta.json)."""

    num_train: int = 400
    num_val: int = 80
    seed: int = 0
    frames: int = 32
    height: int = 128
    width: int = 176
    fps: int = 16
    codec: str = "libx264"
    crf: int = 18


def relpath(split: str, index: int) -> str:
    """Where clip `index` of `split` lives, relative to the dataset root."""
    return f"{split}/{index:06d}.mp4"


def write_dataset(
    out_dir: str,
    params: Any,
    write_one: Callable[[tuple], None],
    label_of: Callable[[Any, str, int], int],
    classes: Sequence[str],
    meta: dict,
    workers: int,
) -> dict:
    """The generated-dataset layout (this set and data/appearance.py's tasks): every clip through
    `write_one((params, split, index, path))` (in `workers` forked processes), ``train.txt`` /
    ``val.txt`` (VideoMAE ``path label``), ``classes.txt`` and last, atomically, ``meta.json`` (`meta`
    plus the seconds taken), the done-marker the loader checks. Returns the meta dict."""
    t0 = time.perf_counter()
    jobs = []
    for split, count in (("train", params.num_train), ("val", params.num_val)):
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        jobs += [(params, split, i, os.path.join(out_dir, relpath(split, i))) for i in range(count)]
    if workers > 1 and len(jobs) > 1:
        with get_context("fork").Pool(workers) as pool:
            pool.map(write_one, jobs, chunksize=max(1, len(jobs) // (8 * workers)))
    else:
        for job in jobs:
            write_one(job)
    for split, count in (("train", params.num_train), ("val", params.num_val)):
        lines = [f"{relpath(split, i)} {label_of(params, split, i)}\n" for i in range(count)]
        with open(os.path.join(out_dir, f"{split}.txt"), "w") as f:
            f.writelines(lines)
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.writelines(f"{i} {name}\n" for i, name in enumerate(classes))
    meta = {**meta, "seconds": round(time.perf_counter() - t0, 2)}
    tmp = os.path.join(out_dir, "meta.json.part")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "meta.json"))
    return meta
