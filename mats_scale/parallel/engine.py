"""The registry of engine kinds: the one place that maps ``parallel.backend`` to an engine.

==========  =====================================================  =========================
kind        engine                                                 checkpoint layout
==========  =====================================================  =========================
none        :class:`~mats_scale.parallel.local.LocalEngine`         ``engine.pt`` (torch.save)
deepspeed   :class:`~mats_scale.parallel.deepspeed_engine.DeepSpeedEngine` (ZeRO 0-3)  DeepSpeed shards
fsdp2       :class:`~mats_scale.parallel.fsdp.FSDP2Engine`          DCP shards
==========  =====================================================  =========================

Training, checkpoints, export and the profilers go through these functions; no code outside
``mats_scale/parallel`` asks which backend it has. Engine modules are imported on first use (DeepSpeed
is slow to import) and never import this module back.
"""

from __future__ import annotations

import importlib

import torch

from mats_scale.config import Config, ParallelConfig
from mats_scale.models.spec import ModelSpec
from mats_scale.parallel.base import Engine, StepResult
from mats_scale.parallel.distributed import DistEnv

ENGINE_KINDS: dict[str, str] = {
    "none": "mats_scale.parallel.local:LocalEngine",
    "deepspeed": "mats_scale.parallel.deepspeed_engine:DeepSpeedEngine",
    "fsdp2": "mats_scale.parallel.fsdp:FSDP2Engine",
}
SHARDED_KINDS = ("deepspeed", "fsdp2")
"""Kinds that shard model states over ranks (the memory profiler models these)."""

__all__ = [
    "ENGINE_KINDS",
    "SHARDED_KINDS",
    "Engine",
    "StepResult",
    "build_engine",
    "consolidate_checkpoint",
    "engine_class",
    "engine_name",
    "engine_run_files",
    "states_label",
]


def engine_class(kind: str) -> type:
    if kind not in ENGINE_KINDS:
        raise ValueError(f"engine kind {kind!r}: allowed: {', '.join(ENGINE_KINDS)}")
    module, name = ENGINE_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def engine_name(cfg: Config) -> str:
    """What checkpoints and logs call the engine of `cfg` (e.g. ``deepspeed-zero3-offload``)."""
    return engine_class(cfg.parallel.backend).describe(cfg)


def states_label(parallel: ParallelConfig) -> str:
    """The memory profiler's name for the model-state layout of a ``parallel`` section (``zero3``,
    ``zero3-offload``, ``fsdp2``; one process counts as ``zero0``)."""
    return engine_class(parallel.backend).states_label(parallel)


def engine_run_files(cfg: Config, env: DistEnv) -> dict[str, dict]:
    """Resolved backend files for the run directory (DeepSpeed: ``ds_config.json``); raises
    ConfigError on a bad template before any communication or model building."""
    return engine_class(cfg.parallel.backend).run_files(cfg, env)


def build_engine(cfg: Config, env: DistEnv, spec: ModelSpec) -> Engine:
    """The engine of ``cfg.parallel.backend`` around the model of `spec`. The model is initialised
    from ``cfg.train.seed``, so every backend starts from the same weights as a single-process run."""
    torch.manual_seed(cfg.train.seed)
    return engine_class(cfg.parallel.backend).build(cfg, env, spec)


def consolidate_checkpoint(kind: str, path: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from the engine directory of a checkpoint written by an engine of `kind`."""
    return engine_class(kind).consolidate(path)
