"""One job per run directory: rank 0 holds an exclusive ``flock`` on ``<out_dir>/.lock`` for the whole
run; a second job into the same ``train.out_dir`` stops with one line naming the owner."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from typing import IO

import torch

from mats_scale.parallel.distributed import DistEnv, LaunchError, all_reduce

log = logging.getLogger("mats_scale.train")
LOCK_NAME = ".lock"
_held: dict[str, IO[str]] = {}  # realpath -> open lock file of this process


class RunDirInUse(LaunchError):
    """Another job holds the run directory."""


def _try_lock(out_dir: str) -> str | None:
    """Lock `out_dir` for this process; returns None, or the owner's description when it is taken."""
    path = os.path.join(out_dir, LOCK_NAME)
    key = os.path.realpath(path)
    old = _held.pop(key, None)
    if old is not None:  # an earlier run in this process (tests, notebooks) is over
        old.close()
    f = open(path, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held by another process
        f.seek(0)
        owner = f.read().strip() or "unknown"
        f.close()
        return owner
    except OSError as e:  # a file system without locks (ENOLCK): run unguarded rather than not at all
        f.close()
        log.warning("cannot lock %s (%s): a second job could write this run directory too", path, e.strerror)
        return None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} host {socket.gethostname()}\n")
    f.flush()
    _held[key] = f
    return None


def acquire(out_dir: str, env: DistEnv) -> None:
    """Rank 0 locks `out_dir`; every rank raises :class:`RunDirInUse` when it could not."""
    owner = _try_lock(out_dir) if env.is_writer else None
    taken = torch.tensor([float(owner is not None)], device=env.device)
    all_reduce(taken, op="max")
    if taken.item():
        where = os.path.join(out_dir, LOCK_NAME)
        raise RunDirInUse(
            f"train.out_dir={out_dir!r} is in use by another job ({owner or 'see rank 0'}; "
            f"lock {where}); wait for it to end or choose another train.out_dir"
        )


def release(out_dir: str) -> None:
    f = _held.pop(os.path.realpath(os.path.join(out_dir, LOCK_NAME)), None)
    if f is not None:
        f.close()
