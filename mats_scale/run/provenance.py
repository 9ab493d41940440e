"""Where a run came from: code version, command, libraries, machine (``provenance.json`` in the run
directory, and in every resume record; fields in docs/distributed.md, "The run directory")."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("mats_scale", "torch", "deepspeed", "timm", "decord", "torchvision", "numpy", "omegaconf", "av")


def git_state(path: Path) -> dict[str, Any] | None:
    """Commit and dirty flag of the git checkout holding `path`; None outside git (or without git)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()

    try:
        root = git("rev-parse", "--show-toplevel")
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty, "root": root}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect(device: torch.device, world_size: int) -> dict[str, Any]:
    versions = {name: _version(name) for name in PACKAGES}
    versions["cuda"] = torch.version.cuda
    versions["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    nccl = None
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        try:
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - a torch build without NCCL
            nccl = None
    versions["nccl"] = nccl
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "git": git_state(Path(__file__).resolve().parent),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "python": platform.python_version(),
        "versions": versions,
        "host": socket.gethostname(),
        "device": name,
        "device_type": device.type,
        "world_size": world_size,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
