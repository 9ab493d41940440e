"""Process-group set-up shared by every engine: one place decides device, backend, rank and precision.

Launchers (``deepspeed``, ``torchrun``, or plain ``python`` for one process) export RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; under ``srun`` without them they come from Slurm's variables
(:mod:`mats_scale.parallel.slurm`); a plain ``python`` run gets a one-process group on a free
local port. CUDA runs use NCCL, CPU runs gloo.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from mats_scale.config import ParallelConfig, TrainConfig


class LaunchError(RuntimeError):
    """The process layout does not fit the configuration (one line, names both)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    """bfloat16 when forward runs under autocast (CUDA by default), None for fp32."""

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes logs, the resolved config and the checkpoint pointer."""
        return self.rank == 0

    @property
    def precision(self) -> str:
        return "bf16" if self.amp_dtype is not None else "fp32"


def resolve_device(train: TrainConfig, local_rank: int) -> torch.device:
    if train.device == "cuda" and not torch.cuda.is_available():
        raise LaunchError("train.device='cuda': no CUDA device is visible; use train.device=cpu or auto")
    if train.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_env(train: TrainConfig, parallel: ParallelConfig) -> DistEnv:
    """Rank, world size, device and precision from the launcher's environment (no communication)."""
    from mats_scale.parallel.slurm import apply_slurm_env

    apply_slurm_env()  # srun without a torch launcher: Slurm's variables give rank and world
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if parallel.backend == "none" and world > 1:
        raise LaunchError(f"parallel.backend=none runs one process, but the launcher started "
                          f"WORLD_SIZE={world}; use parallel.backend=deepspeed or fsdp2")
    device = resolve_device(train, local_rank)
    bf16 = train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda")
    amp = torch.bfloat16 if bf16 else None
    return DistEnv(rank, world, local_rank, device, amp)


def init_distributed(train: TrainConfig, parallel: ParallelConfig) -> DistEnv:
    """:func:`detect_env`, then join the process group.

    ``parallel.backend=none`` runs one process without a group; deepspeed joins through
    ``deepspeed.init_distributed`` (which also sets up its comm layer), fsdp2 through torch.
    """
    env = detect_env(train, parallel)
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if parallel.backend == "none" or dist.is_initialized():
        return env
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1:
            raise LaunchError(f"WORLD_SIZE={env.world_size} but MASTER_PORT is not set; "
                              "start with deepspeed or torchrun")
        os.environ["MASTER_PORT"] = str(_free_port())
    for key, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank)):
        os.environ.setdefault(key, str(value))
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    if parallel.backend == "deepspeed":
        import deepspeed

        from mats_scale.parallel.ds_ops import first_build_notice, ops_to_build

        notice = first_build_notice(ops_to_build(parallel.offload_optimizer)) if env.local_rank == 0 else None
        if notice:
            print(notice, file=sys.stderr, flush=True)
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=30))
    else:
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(minutes=30),
                                device_id=env.device if env.device.type == "cuda" else None)
    return env


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of a tensor on this rank's device; a no-op without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
