"""One process, plain torch AdamW (``parallel.backend=none``); also the base of the FSDP2 engine."""

from __future__ import annotations

import contextlib
import math
import os
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from mats_scale.config import Config, ParallelConfig
from mats_scale.models.spec import ModelSpec, build_model
from mats_scale.optim import build_adamw, set_lr, total_batch
from mats_scale.parallel.base import StepResult, clip_and_norm, strip_wrapper_prefix
from mats_scale.parallel.checkpointing import apply_checkpoint_policy
from mats_scale.parallel.compile import apply_compile
from mats_scale.parallel.distributed import DistEnv
from mats_scale.safe_load import torch_load


class LocalEngine:
    kind = "none"

    def __init__(self, model: nn.Module, cfg: Config, env: DistEnv) -> None:
        self.module, self.env, self.cfg = model, env, cfg
        self.name = self.describe(cfg)
        self.grad_accum = cfg.optim.grad_accum
        self.optimizer = build_adamw(
            model, cfg.optim, total_batch(cfg.data.batch_size, env.world_size, cfg.optim.grad_accum)
        )
        self.params = [p for p in model.parameters() if p.requires_grad]

    # ---- registry hooks (see parallel/engine.py) ------------------------------------------------
    @classmethod
    def describe(cls, cfg: Config) -> str:
        return cls.kind

    @classmethod
    def states_label(cls, parallel: ParallelConfig) -> str:
        """How the memory profiler names this engine's model-state layout (feasibility ENGINE_CHOICES):
        one process keeps every state in full, as ZeRO-0 does on each GPU."""
        return "zero0"

    @classmethod
    def run_files(cls, cfg: Config, env: DistEnv) -> dict[str, dict]:
        """Resolved backend files written into the run directory (and checked before any communication)."""
        return {}

    @classmethod
    def build(cls, cfg: Config, env: DistEnv, spec: ModelSpec) -> LocalEngine:
        model = apply_checkpoint_policy(build_model(spec, env.device), spec, cfg.parallel)
        return cls(apply_compile(model, spec, cfg.train.compile), cfg, env)

    # ---- Engine protocol ------------------------------------------------------------------------
    def autocast(self) -> AbstractContextManager:
        if self.env.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.env.amp_dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.autocast():
            return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self, lr: float, skip: bool = False) -> StepResult:
        norm = clip_and_norm(self.params, self.cfg.optim.clip_grad)
        applied = not skip and math.isfinite(norm)
        if applied:
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        self.zero_grad()
        return StepResult(norm, applied)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = strip_wrapper_prefix(self.module.state_dict())
        return {k: v.detach().float().cpu().clone() for k, v in sd.items()}

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        torch.save(
            {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
            os.path.join(path, "engine.pt"),
        )

    def load(self, path: str) -> None:
        state = torch_load(os.path.join(path, "engine.pt"), map_location=self.env.device)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    @staticmethod
    def consolidate(path: str) -> dict[str, torch.Tensor]:
        """Full fp32 weights from a checkpoint written by :meth:`save` (no process group needed)."""
        sd = torch_load(os.path.join(path, "engine.pt"))["model"]
        return {k: v.float() for k, v in strip_wrapper_prefix(sd).items()}
