"""What the parallel engines need to know about a model, besides calling it (torchtitan ``TrainSpec``).

An engine wraps any ``nn.Module`` described by a :class:`ModelSpec`: it builds the structure where it
wants it (``meta`` for FSDP2, under ``deepspeed.zero.Init`` for ZeRO-3, the device otherwise), fills
it with the module's own ``reset_buffers`` / ``init_module``, and applies activation checkpointing,
sharding units and ZeRO-3 leaf modules from the block types and groups named here. Nothing in this
file imports a distributed library: the model stays free of parallelism (STYLE.md 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


class InitMixin:
    """Build/initialise split (STYLE.md 3) that every engine relies on.

    ``reset_buffers()`` recomputes non-persistent buffers (after ``to_empty`` or ``zero.Init``);
    ``init_module(m)`` fills module `m`'s own parameters (children excluded), so a sharded build can
    gather and initialise one module at a time and draw the same numbers as ``init_weights()``.
    """

    def reset_buffers(self) -> None:  # pragma: no cover - overridden
        pass

    def init_module(self, m: nn.Module) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @torch.no_grad()
    def init_weights(self) -> None:
        self.reset_buffers()
        for m in self.modules():
            self.init_module(m)


@dataclass(frozen=True)
class ModelSpec:
    """A model as the engines see it."""

    name: str
    """Short name for logs and checkpoint metadata (e.g. ``pretrain-B``)."""
    build: Callable[[], nn.Module]
    """Builds the structure only: no initialisation and no random numbers of its own (engines call it on
    ``meta``, under ``zero.Init`` or on the device); the module implements :class:`InitMixin`."""
    block_types: tuple[type[nn.Module], ...]
    """Transformer block classes: ZeRO-3 leaf modules (each fetched whole)."""
    block_groups: Callable[[nn.Module], dict[str, nn.ModuleList]]
    """Named lists holding every transformer block: FSDP2 units, and what activation-checkpointing
    policies address (``{"encoder": ..., "decoder": ...}``)."""
    extra_units: Callable[[nn.Module], list[nn.Module]] = field(default=lambda model: [])
    """FSDP2 units besides the blocks (e.g. the patch embedding, called alone for motion scores)."""
    forward_methods: tuple[str, ...] = ()
    """Root methods other than ``forward`` that run submodules (e.g. ``motion_scores``): FSDP2 registers
    them so they unshard parameters like ``forward`` does."""

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """FSDP2 units: the extra units, then every entry of every block group (a checkpoint-wrapped
        block is sharded with its wrapper)."""
        return [*self.extra_units(model), *(b for group in self.block_groups(model).values() for b in group)]


def build_model(spec: ModelSpec, device: torch.device | str | None = None, *, init: bool = True) -> nn.Module:
    """Build on ``meta``, then (unless `device` is meta) materialise on `device` and initialise.

    Structure never allocates or draws random numbers, so a model built here and one built on meta,
    moved with ``to_empty`` and initialised with ``init_weights`` are identical for the same seed.
    """
    with torch.device("meta"):
        model = spec.build()
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type != "meta":
        model.to_empty(device=device)
        if init:
            model.init_weights()
    return model
