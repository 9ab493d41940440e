"""Running the experiments' jobs, and what their results record of where they came from.

A :class:`Process` is one command (a launcher with its arguments) in its own session, so that a stop takes
every rank with it, with its output appended to a log file after a line with the command. The sweep
(:mod:`mats_scale.experiments.sweep`) runs its points one at a time under a time limit; the study
(:mod:`mats_scale.experiments.study`) runs several at once in dependency order. :func:`provenance` is
the training provenance (:mod:`mats_scale.run.provenance`) in the fields a sweep record and a study
report carry. :func:`launch_command` is the launcher command line of a sweep's training run.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from typing import Any

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILL_WAIT_S = 10  # after SIGKILL: how long to wait for the process to go


def child_env(jobs_at_once: int) -> dict[str, str]:
    """The environment of a job: this package first on PYTHONPATH, the CPU threads shared by the jobs
    that run at once, no distributed variables inherited from the caller."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs_at_once)))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch_command(run: dict[str, Any], args: list[str]) -> list[str]:
    """The launcher command line of ``python -m mats_scale.launch.pretrain ARGS`` on run.nproc processes."""
    n, py = int(run["nproc"]), sys.executable
    if run["launcher"] == "torchrun":
        return [
            py,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={n}",
            "-m",
            "mats_scale.launch.pretrain",
            *args,
        ]
    if run["launcher"] == "deepspeed":
        return [
            py,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(n),
            "--master_port",
            str(free_port()),
            "--module",
            "mats_scale.launch.pretrain",
            *args,
        ]
    return [py, "-m", "mats_scale.launch.pretrain", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_message(text: str) -> str:
    """The most telling line of a failed run's output: the last error line, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        low = ln.lower()
        if "error" in low or "out of memory" in low or "killed" in low:
            return ln[:500]
    return lines[-1][:500] if lines else "no output"


class Process:
    """`command` started in its own process group, stdout and stderr appended to `log_path`."""

    def __init__(self, command: list[str], log_path: str, env: dict[str, str]) -> None:
        self.command = command
        self.log_path = log_path
        self.wall_s = 0.0
        self._log = open(log_path, "a")  # noqa: SIM115 - closed when the job ends
        self._log.write(" ".join(command) + "\n")
        self._log.flush()
        self._t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def _ended(self) -> None:
        self.wall_s = time.perf_counter() - self._t0
        self._log.close()

    def wait(self, timeout_s: float) -> int | None:
        """Wait at most `timeout_s` seconds: the exit code, or None while the job still runs."""
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        self._ended()
        return code

    def poll(self) -> tuple[int, float] | None:
        """(exit code, CPU seconds of the job's process) once it has ended, else None; no waiting."""
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return None
        self._ended()
        return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime

    def stop(self, grace_s: float = 0.0) -> None:
        """End the job's whole process group: SIGTERM first when `grace_s` > 0 (a trainer saves after its
        step), SIGKILL at once or after `grace_s` seconds."""
        steps = [(signal.SIGTERM, grace_s)] if grace_s > 0 else []
        for sig, wait_s in [*steps, (signal.SIGKILL, KILL_WAIT_S)]:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait_s)
                break
        self._ended()

    def output(self) -> str:
        """Everything in the log file (the command line first)."""
        with open(self.log_path, errors="replace") as f:
            return f.read()


def provenance() -> dict[str, Any]:
    """Where a result comes from, read by the training provenance (:func:`mats_scale.run.provenance.collect`):
    ``git_commit`` (``+dirty`` with uncommitted changes; unknown outside git), ``versions`` (Python and the
    libraries) and ``host`` (CPU count and machine, the GPU's name and count where there is one)."""
    import torch

    from mats_scale.run.provenance import collect

    cuda = torch.cuda.is_available()
    prov = collect(torch.device("cuda" if cuda else "cpu"), 1)
    git = prov["git"]
    host: dict[str, Any] = {"cpus": os.cpu_count(), "machine": platform.machine()}
    if cuda:
        host.update(gpu=prov["device"], gpus=torch.cuda.device_count())
    return {
        "git_commit": f"{git['commit']}{'+dirty' if git['dirty'] else ''}" if git else "unknown",
        "versions": {"python": prov["python"], **prov["versions"]},
        "host": host,
    }
