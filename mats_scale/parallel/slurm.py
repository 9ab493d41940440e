"""Slurm without a torch launcher: ``srun python launchers/pretrain.py`` starts one task per GPU; each
reads its place from Slurm's variables when the torch / DeepSpeed ones are absent:

    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID,
    MASTER_ADDR = the first host of SLURM_JOB_NODELIST (``node[01-04]`` -> node01),
    MASTER_PORT = 15000 + SLURM_JOB_ID % 20000 (unless set), so the tasks of a job agree on it.

A launcher that exported RANK / WORLD_SIZE (deepspeed, torchrun, also inside an allocation) wins.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import MutableMapping

_GROUP = re.compile(r"\[([^\]]*)\]")


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: 'a[1-2,4],b' -> ['a[1-2,4]', 'b']."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in [*parts, cur] if p]


def _expand_range(spec: str) -> list[str]:
    out = []
    for item in spec.split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo)  # zero padding as written: 01-04 -> 01, 02, 03, 04
            out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(item)
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list -> host names, in order (as ``scontrol show hostnames``):
    'node[01-03,07],gpu-a[1-2]' -> node01, node02, node03, node07, gpu-a1, gpu-a2."""
    hosts = []
    for part in _split_top(nodelist.strip()):
        pieces = _GROUP.split(part)  # literal, range, literal, range, ...
        choices = [[p] if i % 2 == 0 else _expand_range(p) for i, p in enumerate(pieces)]
        hosts += ["".join(c) for c in itertools.product(*choices)]
    return hosts


def apply_slurm_env(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from Slurm's variables when a
    task was started by srun and no launcher set them; returns whether it did."""
    if "RANK" in environ or "WORLD_SIZE" in environ or "SLURM_PROCID" not in environ:
        return False
    ntasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
    if not ntasks:
        return False
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = ntasks
    environ["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or ""
    if "MASTER_ADDR" not in environ and nodes:
        environ["MASTER_ADDR"] = expand_nodelist(nodes)[0]
    if "MASTER_PORT" not in environ and environ.get("SLURM_JOB_ID", "").isdigit():
        environ["MASTER_PORT"] = str(15000 + int(environ["SLURM_JOB_ID"]) % 20000)
    return True
