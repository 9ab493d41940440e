"""Checks that need no process group, model or data worker (launch layout, fault variables, the DeepSpeed
config as DeepSpeed reads it, a writable run directory), run by the launcher before the heavy imports."""

from __future__ import annotations

import os
import sys
import tempfile

from mats_scale.config import Config, ConfigError
from mats_scale.parallel.distributed import DistEnv, LaunchError, detect_env, master_port_problem
from mats_scale.run.faults import Faults


def check_out_dir(path: str) -> None:
    """Create `path` (and its parents) and write a probe file in it; one :class:`ConfigError` line when
    that is impossible (read-only file system, a parent that is a file, no permission), so the run
    stops before any process group, model or data worker exists."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        other = e.filename and os.path.abspath(e.filename) != os.path.abspath(path)
        where = f" ({e.filename})" if other else ""
        raise ConfigError(
            f"train.out_dir={path!r}: cannot create or write it: {e.strerror}{where}; "
            "choose a writable directory"
        ) from None


def preflight(cfg: Config) -> tuple[DistEnv, dict[str, dict]]:
    """(this rank's DistEnv, the engine's resolved run files: DeepSpeed's JSON, checked with DeepSpeed's
    own config classes); raises ConfigError / LaunchError."""
    from mats_scale.parallel.engine import engine_run_files

    env = detect_env(cfg.train, cfg.parallel)
    if problem := master_port_problem():
        raise LaunchError(problem)
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
