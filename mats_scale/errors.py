"""The configuration error type and its checks, shared by the job config and the model arguments.

Torch-free and import-free, so ``mats_scale.models.args`` can validate without importing the job
config (the model never imports ``mats_scale.config``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


class ConfigError(ValueError):
    """A bad configuration value; the message is one line: ``key=value: what is allowed``."""


def fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r}: {allowed}")


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        fail(key, value, "allowed: " + ", ".join(map(str, choices)))


def check_open_unit(key: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        fail(key, value, "must be in the open interval (0, 1)")


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        fail(key, value, "must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        fail(key, value, "must be >= 0" if allow_zero else "must be > 0")
