"""Command-line entry points (``python -m mats_scale.launch.<job>``, console scripts ``mats-<job>``).

Each works under every launcher: ``deepspeed --module mats_scale.launch.pretrain``, ``torchrun -m
mats_scale.launch.pretrain``, plain ``python -m``; ``launchers/*.py`` in a checkout are thin wrappers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Optional

from mats_scale.config import load_config_or_exit, parse_args
from mats_scale.resources import DEFAULT_CONFIG


def run_job(task: str, argv: Optional[list[str]] = None, default_config: Optional[str] = DEFAULT_CONFIG) -> int:
    """Parse ``[--config FILE|NAME] [key=value ...]`` (the shipped `default_config` when no --config),
    then run `task` on the generic Trainer. Exit status: 0 done, 1 run error, 2 bad configuration."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path, _ = parse_args(argv)
    if path is None and default_config is not None:
        argv = ["--config", default_config, *argv]
    cfg = load_config_or_exit(argv)

    # Heavy imports only after the config is known to be valid.
    from mats_scale.train.loop import run
    from mats_scale.train.task import task_class

    factory: Callable = task_class(task)
    return run(cfg, factory)
