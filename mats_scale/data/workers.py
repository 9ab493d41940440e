"""DataLoader worker processes: their set-up, and the one shutdown path of every loader.

Workers ignore SIGTERM and SIGINT (the main process handles stop signals and ends them), so whoever
iterates a loader with workers registers its iterator with :func:`track`; :func:`close_workers` and
:func:`kill_workers` end them, and an exit hook kills what is left, so no exit waits for a worker.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import random
import signal
import weakref
from typing import Any

import numpy as np
import torch


def init_worker(worker_id: int) -> None:
    """Set up a DataLoader worker process.

    DeepSpeed's launcher sends SIGTERM to a rank's whole process tree, workers first; a worker killed
    by it would make the trainer fail before it saves its checkpoint, so workers ignore it and die with
    their parent (PR_SET_PDEATHSIG). Global RNGs get the worker's own stream (from the DataLoader's
    per-worker torch seed, itself from (seed, rank)).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    s = torch.initial_seed() % (1 << 32)
    random.seed(s)
    np.random.seed(s)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Not Linux (no prctl): torch's watchdog still ends an orphaned worker within seconds.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def explain_worker_failure(e: BaseException, rank: int = 0) -> str | None:
    """One line for torch's "DataLoader worker (pid N) is killed by signal ..." errors (raised by its SIGCHLD
    handler anywhere in the main process), else None."""
    text = str(e).strip()
    if not (isinstance(e, RuntimeError) and text.startswith("DataLoader worker")):
        return None
    return f"a data loader worker of rank {rank} died: {text.splitlines()[0].rstrip('. ')}; stopping"


_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()  # DataLoader iterators that may own worker processes


def track(iterator: Any) -> Any:
    """Register a DataLoader iterator for the exit hook; returns it."""
    if getattr(iterator, "_workers", None) is not None:
        _LIVE.add(iterator)
    return iterator


def close_workers(iterator: Any) -> None:
    """End `iterator`'s workers now: torch's clean shutdown, then SIGKILL for any still running (they
    ignore the SIGTERM torch sends after its grace period)."""
    workers = list(getattr(iterator, "_workers", None) or [])
    if hasattr(iterator, "_shutdown_workers"):
        with contextlib.suppress(Exception):  # one may already be dead: killed below
            iterator._shutdown_workers()
    _kill(workers)
    _LIVE.discard(iterator)


def kill_workers(iterator: Any) -> None:
    """SIGKILL every worker of `iterator` at once (exit paths: no grace period, nothing left to read)."""
    if getattr(iterator, "_worker_pids_set", False):
        # torch's SIGCHLD handler would report the killed workers as an error
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    _kill(list(getattr(iterator, "_workers", None) or []))


def _kill(workers: list) -> None:
    for w in workers:
        if w.is_alive():
            w.kill()
    for w in workers:
        w.join(timeout=5)


@atexit.register
def _kill_workers_at_exit() -> None:
    # Runs before multiprocessing's own exit hook (registered earlier, so called later), which would
    # SIGTERM the daemonic workers (ignored, see init_worker) and then join them forever.
    for iterator in list(_LIVE):
        kill_workers(iterator)


__all__ = ["close_workers", "explain_worker_failure", "init_worker", "kill_workers", "track"]
