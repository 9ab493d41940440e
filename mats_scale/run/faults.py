"""Fault injection for the tests of resume, atomic saves, signals and the non-finite policy, read once
from ``MATS_FAULT_*`` environment variables, never from the config (docs/distributed.md, "Fault
injection")."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass

import torch

from mats_scale.config import ConfigError


def _int(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(
            f"{name}={value!r}: expected a whole number (a test-only fault-injection "
            "variable; unset it for a normal run)"
        ) from None
    if n < 0:
        raise ConfigError(f"{name}={value!r}: must be >= 0")
    return n


def _step(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return _int(name, value) if value else None


def _seconds(name: str) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return 0.0
    try:
        s = float(value)
    except ValueError:
        s = float("nan")
    if not 0.0 <= s < float("inf"):
        raise ConfigError(
            f"{name}={value!r}: expected a number of seconds >= 0 (a test-only fault-injection variable)"
        )
    return s


@dataclass(frozen=True)
class Faults:
    nan_steps: frozenset[int] = frozenset()
    kill_after_step: int | None = None
    crash_in_save: int | None = None
    sigterm_at_step: int | None = None
    disk_full_in_save: int | None = None
    kill_rank: int | None = None
    sleep_in_step: float = 0.0
    rank: int = 0

    @classmethod
    def from_env(cls) -> Faults:
        name = "MATS_FAULT_NAN_STEPS"
        nan = os.environ.get(name, "")
        return cls(
            frozenset(_int(name, s.strip()) for s in nan.split(",") if s.strip()),
            _step("MATS_FAULT_KILL_AFTER_STEP"),
            _step("MATS_FAULT_CRASH_IN_SAVE"),
            _step("MATS_FAULT_SIGTERM_AT_STEP"),
            _step("MATS_FAULT_DISK_FULL_IN_SAVE"),
            _step("MATS_FAULT_KILL_RANK"),
            _seconds("MATS_FAULT_SLEEP_IN_STEP"),
            int(os.environ.get("RANK", "0") or 0),
        )

    def loss(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        # Multiplied (not added) so the gradients are non-finite too, as with a real overflow.
        return loss * float("nan") if step in self.nan_steps and rank == 0 else loss

    def during_step(self, step: int, rank: int) -> None:
        if self.sleep_in_step:
            time.sleep(self.sleep_in_step)
        if step == self.sigterm_at_step and rank == 0:
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    def after_step(self, step: int) -> None:
        if step == self.kill_after_step and self.kill_rank in (None, self.rank):
            os.kill(os.getpid(), signal.SIGKILL)

    def in_save(self, step: int) -> None:
        if step == self.crash_in_save:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.disk_full_in_save and self.rank == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
