"""Checks that need no process group, model or data worker, run first (by the launcher, before the
trainer's heavy imports, and again by :func:`mats_scale.train.loop.prepare`): the launch layout, the
fault-injection variables, the DeepSpeed config as DeepSpeed itself reads it, and a writable run directory.
Only torch and DeepSpeed's config classes are imported, so a bad DeepSpeed template is reported in about
half the time the trainer takes to start (see the issue-17 note)."""

from __future__ import annotations

import os
import sys

from mats_scale.config import Config, ConfigError
from mats_scale.parallel.distributed import DistEnv, LaunchError, detect_env
from mats_scale.train.faults import Faults
from mats_scale.train.rundir import check_out_dir


def preflight(cfg: Config) -> tuple[DistEnv, dict[str, dict]]:
    """(this rank's DistEnv, the engine's resolved run files: DeepSpeed's JSON, checked with DeepSpeed's
    own config classes); raises ConfigError / LaunchError."""
    from mats_scale.parallel.engine import engine_run_files

    env = detect_env(cfg.train, cfg.parallel)
    Faults.from_env()  # a malformed MATS_FAULT_* variable is a config error, now
    engine_files = engine_run_files(cfg, env)
    check_out_dir(cfg.train.out_dir)  # read-only or impossible train.out_dir: one line, before any model
    return env, engine_files


def preflight_or_exit(cfg: Config) -> None:
    """:func:`preflight`, or one line (from rank 0: every rank finds the same) and exit 2 / 1."""
    try:
        preflight(cfg)
    except (ConfigError, LaunchError) as e:
        if os.environ.get("RANK", "0") == "0":
            kind = "config error" if isinstance(e, ConfigError) else "error"
            print(f"{kind}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2 if isinstance(e, ConfigError) else 1) from None
