"""One Engine protocol between the training loop and the parallel backends (STYLE.md 9).

The loop only ever calls what :class:`Engine` declares, so it is identical for

- :class:`LocalEngine` (``parallel.backend=none``): one process, plain torch;
- :class:`~mats_scale.parallel.fsdp.FSDP2Engine` (``fsdp2``): ``fully_shard`` per block, DCP checkpoints;
- :class:`~mats_scale.parallel.deepspeed_engine.DeepSpeedEngine` (``deepspeed``): ZeRO stage 0-3.

Per optimizer step the loop calls ``forward`` and ``backward`` once per micro-batch (the engine
divides by ``optim.grad_accum`` and, where the backend allows, communicates only at the last one),
then ``step(lr, skip)``, which clips, updates and clears the gradients. ``skip=True`` (a non-finite
loss on any rank) or a non-finite gradient norm drop the update: parameters and optimizer state stay
as they were and ``StepResult.applied`` is False.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import ContextManager, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from mats_scale.config import Config
from mats_scale.masking import Selection
from mats_scale.models.pretrain import PretrainOutput, PretrainVideoMAE, build_pretrain_model
from mats_scale.optim import build_adamw, total_batch
from mats_scale.parallel.checkpointing import apply_activation_checkpointing
from mats_scale.parallel.distributed import DistEnv

# Name the wrapper of torch's checkpoint_wrapper inserts into parameter names; consolidated state
# dicts are written without it, so they load into a model with or without checkpointing.
CKPT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."


class StepResult(NamedTuple):
    grad_norm: float  # total gradient norm before clipping (inf/nan when non-finite)
    applied: bool  # False when the update was skipped


@runtime_checkable
class Engine(Protocol):
    module: nn.Module
    """The model with parallel wrappers applied in place; call submodules (patch_embed) through it."""
    env: DistEnv
    name: str
    """Backend description for logs and checkpoint metadata, e.g. ``deepspeed-zero3``."""

    def autocast(self) -> ContextManager:
        """The mixed-precision context forward runs under; use it to call submodules outside forward."""

    def forward(self, video: torch.Tensor, sel: Selection) -> PretrainOutput: ...

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's loss (scaled by 1/grad_accum inside)."""

    def step(self, lr: float, skip: bool = False) -> StepResult:
        """Clip, update with learning rate `lr` unless skipped or non-finite, clear gradients."""

    def zero_grad(self) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated fp32 weights on CPU on the writer rank ({} elsewhere); collective."""

    def save(self, path: str) -> None:
        """Write model and optimizer state into directory `path` (collective; every rank writes its part)."""

    def load(self, path: str) -> None:
        """Restore what :meth:`save` wrote (collective)."""


def strip_wrapper_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(CKPT_WRAPPER_PREFIX, ""): v for k, v in sd.items()}


def apply_checkpointing(model: PretrainVideoMAE, cfg: Config) -> PretrainVideoMAE:
    return apply_activation_checkpointing(model, cfg.parallel.checkpoint_encoder_every,
                                          cfg.parallel.checkpoint_decoder_every)


def clip_and_norm(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Total gradient norm (before clipping) over `params`, clipping in place when `max_norm` is set.

    Works for plain and DTensor (FSDP2) gradients: the DTensor norm is reduced to a full tensor.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if max_norm is not None and torch.isfinite(norm):
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
    return float(norm)


class LocalEngine:
    """One process, plain torch AdamW; also the base of the FSDP2 engine (same optimizer logic)."""

    name = "none"

    def __init__(self, model: nn.Module, cfg: Config, env: DistEnv) -> None:
        self.module, self.env, self.cfg = model, env, cfg
        self.grad_accum = cfg.optim.grad_accum
        self.optimizer = build_adamw(model, cfg.optim, total_batch(cfg.data.batch_size, env.world_size,
                                                                   cfg.optim.grad_accum))
        self.params = [p for p in model.parameters() if p.requires_grad]

    @classmethod
    def build(cls, cfg: Config, env: DistEnv) -> "LocalEngine":
        model = apply_checkpointing(build_pretrain_model(cfg.model, device=env.device), cfg)
        return cls(model, cfg, env)

    def autocast(self) -> ContextManager:
        if self.env.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.env.amp_dtype)

    def forward(self, video: torch.Tensor, sel: Selection) -> PretrainOutput:
        with self.autocast():
            return self.module(video, *sel)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self, lr: float, skip: bool = False) -> StepResult:
        norm = clip_and_norm(self.params, self.cfg.optim.clip_grad)
        applied = not skip and math.isfinite(norm)
        if applied:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
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
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                   os.path.join(path, "engine.pt"))

    def load(self, path: str) -> None:
        state = torch.load(os.path.join(path, "engine.pt"), map_location=self.env.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    @staticmethod
    def consolidate(path: str) -> dict[str, torch.Tensor]:
        """Full fp32 weights from a checkpoint written by :meth:`save` (no process group needed)."""
        sd = torch.load(os.path.join(path, "engine.pt"), map_location="cpu", weights_only=True)["model"]
        return {k: v.float() for k, v in strip_wrapper_prefix(sd).items()}


def build_engine(cfg: Config, env: DistEnv, ds_config: dict | None = None) -> Engine:
    """The engine of ``cfg.parallel.backend``; the model is initialised from ``cfg.train.seed`` so
    every backend starts from the same weights as a single-process run."""
    torch.manual_seed(cfg.train.seed)
    if cfg.parallel.backend == "deepspeed":
        from mats_scale.parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, env, ds_config)
    if cfg.parallel.backend == "fsdp2":
        from mats_scale.parallel.fsdp import FSDP2Engine

        return FSDP2Engine.build(cfg, env)
    return LocalEngine.build(cfg, env)


def consolidate_checkpoint(backend: str, path: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from the engine directory of a checkpoint written by `backend`."""
    if backend == "deepspeed":
        from mats_scale.parallel.deepspeed_engine import DeepSpeedEngine as cls
    elif backend == "fsdp2":
        from mats_scale.parallel.fsdp import FSDP2Engine as cls
    else:
        cls = LocalEngine
    return cls.consolidate(path)
