"""Optimisation as the VideoMAE family does it: AdamW without decay on norms, biases, position and
mask tokens; peak lr = base_lr * total_batch / 256; per-step linear warm-up then cosine to min_lr."""

from __future__ import annotations

import math

import torch
from torch import nn

from mats_scale.config import OptimConfig


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights and biases (1-D), q/v biases, position embeddings and the mask token."""
    # Under deepspeed.zero.Init a parameter is an empty 1-D partition; its real shape is `ds_shape`.
    ndim = len(getattr(param, "ds_shape", param.shape))
    return ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "mask_token" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_id(name: str, num_layers: int) -> int:
    """VideoMAE's ``get_num_layer_for_vit`` (optim_factory.py) for `num_layers` = depth + 2: position
    table and patch embedding 0, block i -> i + 1, everything else (fc_norm, head) num_layers - 1."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers - 1


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with VideoMAE's layer-wise lr decay: parameter `name` gets
    ``lr_scale = layer_decay ** (num_layers - 1 - layer_id(name))`` (engines multiply the scheduled lr by
    it) and no weight decay as in :func:`no_weight_decay`. Names are the classifier's (``blocks.N...``).

    Not timm's ``param_groups_layer_decay``: its no-decay test reads ``param.ndim``, which under ZeRO-3's
    ``zero.Init`` is the 1-D partition (every weight would lose its decay), and its grouping puts
    ``fc_norm`` with the last block where VideoMAE gives it scale 1.
    """
    names = [n for n, _ in model.named_parameters()]
    depth = 1 + max((int(n.split(".")[1]) for n in names if n.startswith("blocks.")), default=-1)
    num_layers = depth + 2
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, no_decay = layer_id(name, num_layers), no_weight_decay(name, p)
        g = groups.setdefault(
            (lid, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers - 1 - lid),
            },
        )
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def optimizer_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """The AdamW parameter groups of `cfg`: layer-wise decay groups when ``optim.layer_decay < 1``."""
    if cfg.layer_decay < 1.0:
        return layer_decay_groups(model, cfg.weight_decay, cfg.layer_decay)
    return param_groups(model, cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr times each group's ``lr_scale`` (layer-wise decay; 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def total_batch(micro_batch: int, world_size: int, grad_accum: int) -> int:
    """Clips per optimizer step: micro-batch per process x processes x accumulated micro-batches."""
    return micro_batch * world_size * grad_accum


def peak_lr(cfg: OptimConfig, total_batch: int) -> float:
    return cfg.base_lr * total_batch / 256


def lr_at(step: int, total_steps: int, cfg: OptimConfig, total_batch: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine to min_lr."""
    peak = peak_lr(cfg, total_batch)
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_adamw(model: nn.Module, cfg: OptimConfig, total_batch: int) -> torch.optim.AdamW:
    # lr is set before every step from lr_at(); the initial value only matters for inspection.
    # fused=True: one kernel over all tensors (CPU and CUDA); on CPU torch's default per-parameter
    # loop costs ~3x as much (0.16 s vs 0.05 s per ViT-B step: benchmarks/bench_step.py with and
    # without --unfused-adamw).
    return torch.optim.AdamW(
        optimizer_groups(model, cfg), lr=peak_lr(cfg, total_batch), betas=tuple(cfg.betas), fused=cfg.fused
    )
