"""Fault injection for the tests of resume, atomic saves, signals and the non-finite policy.

Read once from environment variables (never from the config, so a YAML can not switch them on);
step numbers are 1-based optimizer steps as logged:

    MATS_FAULT_NAN_STEPS=3,4        rank 0 multiplies its loss by NaN in these steps
    MATS_FAULT_KILL_AFTER_STEP=5    every rank SIGKILLs itself after step 5 (after a save due then)
    MATS_FAULT_CRASH_IN_SAVE=6      every rank SIGKILLs itself in the middle of saving step 6
    MATS_FAULT_SIGTERM_AT_STEP=3    at the start of step 3, rank 0 sends SIGTERM to its child processes
                                    (data workers), then to itself, as DeepSpeed's launcher does
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from dataclasses import dataclass
from typing import Optional

import torch


def _step(name: str) -> Optional[int]:
    value = os.environ.get(name, "")
    return int(value) if value else None


@dataclass(frozen=True)
class Faults:
    nan_steps: frozenset[int] = frozenset()
    kill_after_step: Optional[int] = None
    crash_in_save: Optional[int] = None
    sigterm_at_step: Optional[int] = None

    @classmethod
    def from_env(cls) -> "Faults":
        nan = os.environ.get("MATS_FAULT_NAN_STEPS", "")
        return cls(frozenset(int(s) for s in nan.split(",") if s.strip()),
                   _step("MATS_FAULT_KILL_AFTER_STEP"), _step("MATS_FAULT_CRASH_IN_SAVE"),
                   _step("MATS_FAULT_SIGTERM_AT_STEP"))

    def loss(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        # Multiplied (not added) so the gradients are non-finite too, as with a real overflow.
        return loss * float("nan") if step in self.nan_steps and rank == 0 else loss

    def during_step(self, step: int, rank: int) -> None:
        if step == self.sigterm_at_step and rank == 0:
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    def after_step(self, step: int) -> None:
        if step == self.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def in_save(self, step: int) -> None:
        if step == self.crash_in_save:
            os.kill(os.getpid(), signal.SIGKILL)
