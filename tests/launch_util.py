"""Launching the trainer (or a worker script) in fresh processes for the distributed tests."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "launchers" / "pretrain.py"
BIN = Path(sys.executable).parent

# Small and quick: debug model, 4 frames of 64x64 (2x4x4 tokens), in-memory clips, no workers.
TINY = [
    "model.size=debug",
    "model.num_frames=4",
    "model.img_size=64",
    "data.dataset=synthetic",
    "data.num_workers=0",
    "train.device=cpu",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    return out


def torchrun(nproc: int, args: list, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env(**extra_env)
    )


def pretrain(
    nproc: int, overrides: list[str], timeout: int = 300, **extra_env: str
) -> subprocess.CompletedProcess:
    return torchrun(nproc, [PRETRAIN, *overrides], timeout=timeout, **extra_env)


def tail(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-n:]}\nstderr:\n{proc.stderr[-n:]}"


def metric_runs(run_dir: Path) -> list[dict]:
    """metrics.jsonl split into runs: [{"start": start event, "steps": {step: record}, "end": end event
    or None}, ...]."""
    runs: list[dict] = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "start":
            runs.append({"start": rec, "steps": {}, "end": None})
        elif rec.get("event") == "end":
            runs[-1]["end"] = rec
        else:
            runs[-1]["steps"][rec["step"]] = rec
    return runs


def same_float(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))
