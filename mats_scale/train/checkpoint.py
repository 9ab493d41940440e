"""Atomic, resumable checkpoints of a training run.

Layout under ``<out_dir>/checkpoints``::

    step_00000040/            one complete checkpoint (40 optimizer steps done)
        engine/               the engine's own files (DeepSpeed, DCP or torch.save)
        rank_00000.pt ...     per-rank trainer state: counters, data position, RNG states
        meta.json             written last: step, world size, engine, model config
    latest                    the name of the newest complete checkpoint (replaced atomically)

A save writes everything into ``.tmp-step_N``, fsyncs it, renames it to ``step_N`` and only then
points ``latest`` at it with ``os.replace``; a crash at any moment leaves the previous checkpoint
and pointer intact (the stale temp directory is removed by the next save). All ranks must see the
same ``out_dir`` (a shared file system on several nodes). The last ``keep_last`` checkpoints are
kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from mats_scale.parallel.distributed import DistEnv, barrier

POINTER = "latest"
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that can not be used (missing, incomplete, or from another configuration)."""


def capture_rng(mask_generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "mask": mask_generator.get_state(),
             "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any], mask_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    mask_generator.set_state(state["mask"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


class CheckpointManager:
    def __init__(self, out_dir: str, keep_last: int, env: DistEnv,
                 on_save: Callable[[int], None] = lambda step: None) -> None:
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last, self.env = keep_last, env
        self.on_save = on_save  # fault-injection hook, called mid-save

    # ---- finding -------------------------------------------------------------------------
    def latest(self) -> Optional[Path]:
        """The checkpoint the pointer names, or None when there is no pointer."""
        pointer = self.root / POINTER
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "meta.json").is_file():
            raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete; "
                                  f"point it at an existing step_* directory or remove it")
        return path

    def resolve(self, resume: str) -> Optional[Path]:
        """train.resume -> the checkpoint to load, or None to start fresh."""
        if resume == "none":
            if (self.root / POINTER).is_file():
                raise CheckpointError(f"train.out_dir={str(self.root.parent)!r} already holds checkpoints "
                                      f"(latest: {(self.root / POINTER).read_text().strip()}); continue with "
                                      "train.resume=auto or choose another train.out_dir")
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / "meta.json").is_file():
            raise CheckpointError(f"train.resume={resume!r}: not a complete mats-scale checkpoint "
                                  "(expected a step_* directory with meta.json)")
        return path

    # ---- saving --------------------------------------------------------------------------
    def save(self, step: int, engine, rank_state: dict[str, Any], meta: dict[str, Any]) -> Path:
        name = f"step_{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.env.is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        engine.save(str(tmp / "engine"))
        torch.save(rank_state, tmp / f"rank_{self.env.rank:05d}.pt")
        self.on_save(step)
        barrier()
        if self.env.is_writer:
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
            _fsync_tree(tmp)
            if final.exists():  # left by a crash between rename and pointer update: never pointed at
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            staged = self.root / f".{POINTER}.tmp"
            with open(staged, "w") as f:
                f.write(name)
                f.flush()
                os.fsync(f.fileno())
            os.replace(staged, self.root / POINTER)
            _fsync_dir(self.root)
            self._prune(keep=name)
        barrier()
        return final

    def _prune(self, keep: str) -> None:
        done = sorted(p.name for p in self.root.iterdir() if _NAME.match(p.name))
        for old in done[:-self.keep_last]:
            if old != keep:
                shutil.rmtree(self.root / old)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale)

    # ---- loading -------------------------------------------------------------------------
    def load(self, path: Path, engine, expect: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Check `expect` against the checkpoint's meta.json, restore the engine, and return
        (meta, this rank's trainer state)."""
        meta = json.loads((path / "meta.json").read_text())
        for key, value in expect.items():
            if meta.get(key) != value:
                raise CheckpointError(f"{path}: written with {key}={meta.get(key)!r}, this run has "
                                      f"{key}={value!r}; resume with the same setting or another "
                                      "train.out_dir")
        engine.load(str(path / "engine"))
        # Our own file: numpy and python RNG states need the full unpickler.
        state = torch.load(path / f"rank_{self.env.rank:05d}.pt", map_location="cpu", weights_only=False)
        return meta, state
