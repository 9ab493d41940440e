"""The Engine protocol between the Trainer and the parallel backends (STYLE.md 9), and what the
engines share.

An engine wraps any ``nn.Module`` described by a :class:`~mats_scale.models.spec.ModelSpec`; the
Trainer and the tasks only ever call what :class:`Engine` declares. Per optimizer step a task calls
``forward`` (arguments pass through to the model) and the Trainer ``backward`` once per micro-batch
(the engine divides by ``optim.grad_accum`` and, where the backend allows, communicates only at the
last one), then ``step(lr, skip)``, which clips, updates and clears the gradients. ``skip=True`` (a
non-finite loss on any rank) or a non-finite gradient norm drop the update: parameters and optimizer
state stay as they were and ``StepResult.applied`` is False.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

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
    """The model with parallel wrappers applied in place; call its root methods (``motion_scores``)
    under :meth:`autocast`, never its submodules."""
    env: DistEnv
    kind: str
    """Registry key of the backend: ``none``, ``deepspeed`` or ``fsdp2`` (checkpoints, export)."""
    name: str
    """Backend description for logs and checkpoint metadata, e.g. ``deepspeed-zero3``."""

    def autocast(self) -> AbstractContextManager:
        """The mixed-precision context forward runs under; use it to call root methods outside forward."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward, under the engine's precision and sharding."""

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
