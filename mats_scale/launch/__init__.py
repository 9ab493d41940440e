"""Command-line entry points (``python -m mats_scale.launch.<job>``, console scripts ``mats-<job>``).

Each works under every launcher: ``deepspeed --module mats_scale.launch.pretrain``, ``torchrun -m
mats_scale.launch.pretrain``, plain ``python -m``; ``launchers/*.py`` in a checkout are thin wrappers.
"""

from __future__ import annotations

from collections.abc import Callable

from mats_scale.cli import check_data_or_exit, load_or_exit
from mats_scale.resources import DEFAULT_CONFIG, config_path


def run_job(
    task: str,
    argv: list[str] | None = None,
    *,
    prog: str,
    description: str,
    default_config: str | None = DEFAULT_CONFIG,
) -> int:
    """Parse ``[-h] [--config FILE|NAME] [--print-config] [key=value ...]`` (the shipped
    `default_config` when no --config), check the data lists, then run `task` on the generic Trainer.
    Exit status: 0 done, 1 run error, 2 bad command line or configuration."""
    default = config_path(default_config) if default_config else None
    cfg = load_or_exit(argv, prog=prog, description=description, default_config=default)
    check_data_or_exit(cfg)  # a bad list file fails now, not after the model is built
    from mats_scale.run.preflight import preflight_or_exit

    preflight_or_exit(cfg)  # DeepSpeed config, run directory, launch layout: before the heavy imports
    from mats_scale.train.loop import run  # heavy imports only after the config is known to be valid
    from mats_scale.train.task import task_class

    factory: Callable = task_class(task)
    return run(cfg, factory)
