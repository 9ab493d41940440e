"""Schedules written in epochs, as VideoMAE configs are (``--epochs 800 --warmup_epochs 40``).

One epoch visits every video once: ``ceil(videos / world size) // (data.batch_size / data.num_sample)``
micro-batches per rank (the loader's batches per epoch), so
``steps per epoch = that // optim.grad_accum``. With ``train.epochs`` set, ``train.steps`` becomes
``round(epochs x steps per epoch)``; with ``optim.warmup_epochs``, ``optim.warmup_steps`` likewise. The
derived values are what the run records (config.yaml, checkpoints), so a resume compares them too.
"""

from __future__ import annotations

import dataclasses
import math

from mats_scale.config import Config, ConfigError


def steps_per_epoch(
    num_videos: int, world_size: int, batch_size: int, num_sample: int, grad_accum: int
) -> int:
    batches = math.ceil(num_videos / world_size) // (batch_size // num_sample)
    return batches // grad_accum


def num_videos(cfg: Config) -> int:
    from mats_scale.data.loader import SYNTHETIC_CLIPS, resolve_items

    return SYNTHETIC_CLIPS if cfg.data.dataset == "synthetic" else len(resolve_items(cfg, "train"))


def resolve_epochs(cfg: Config, world_size: int) -> tuple[Config, str | None]:
    """`cfg` with train.steps / optim.warmup_steps derived from epochs (when set), and a log line."""
    t, o = cfg.train, cfg.optim
    if t.epochs is None and o.warmup_epochs is None:
        return cfg, None
    videos = num_videos(cfg)
    per_epoch = steps_per_epoch(videos, world_size, cfg.data.batch_size, cfg.data.num_sample, o.grad_accum)
    if per_epoch < 1:
        raise ConfigError(
            f"train.epochs: {videos} videos over {world_size} processes give no full optimizer "
            f"step per epoch (data.batch_size={cfg.data.batch_size}, "
            f"optim.grad_accum={o.grad_accum})"
        )
    steps = max(1, round(t.epochs * per_epoch)) if t.epochs is not None else t.steps
    warmup = round(o.warmup_epochs * per_epoch) if o.warmup_epochs is not None else o.warmup_steps
    parts = [f"{per_epoch} optimizer steps per epoch ({videos} videos, {world_size} processes)"]
    if t.epochs is not None:
        parts.append(f"train.epochs={t.epochs:g} -> train.steps={steps}")
    if o.warmup_epochs is not None:
        parts.append(f"optim.warmup_epochs={o.warmup_epochs:g} -> optim.warmup_steps={warmup}")
    out = dataclasses.replace(
        cfg, train=dataclasses.replace(t, steps=steps), optim=dataclasses.replace(o, warmup_steps=warmup)
    )
    return out, "schedule: " + "; ".join(parts)
