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


def resolve_schedule(cfg: Config, world_size: int) -> tuple[Config, str | None, list[str]]:
    """:func:`resolve_epochs` (counting the videos once) and :func:`schedule_warnings`."""
    videos = num_videos(cfg)
    cfg, note = resolve_epochs(cfg, world_size, videos)
    return cfg, note, schedule_warnings(cfg, world_size, videos)


def schedule_warnings(cfg: Config, world_size: int, videos: int) -> list[str]:
    """What a run would do that its author probably did not mean: a warm-up as long as the run, and
    videos that no batch of an epoch holds (whole batches only, as VideoMAE's ``drop_last``)."""
    out = []
    steps, warmup = cfg.train.steps, cfg.optim.warmup_steps
    if warmup >= steps:
        out.append(
            f"optim.warmup_steps={warmup} >= train.steps={steps}: the learning rate only ramps up and "
            f"never reaches its peak ({cfg.optim.base_lr:g} x batch / 256) or decays; shorten the warm-up"
        )
    per_batch = max(1, cfg.data.batch_size // cfg.data.num_sample)  # videos per micro-batch
    used = math.ceil(videos / world_size) // per_batch * per_batch * world_size
    if 0 < used < videos:
        out.append(
            f"data: {videos} videos on {world_size} process(es) at {per_batch} videos per batch: "
            f"{videos - used} of them are left out of every epoch (whole batches only, a different "
            f"{videos - used} each epoch); a batch size that divides the videos per process uses them all"
        )
    return out


def resolve_epochs(cfg: Config, world_size: int, videos: int | None = None) -> tuple[Config, str | None]:
    """`cfg` with train.steps / optim.warmup_steps derived from epochs (when set), and a log line.
    `videos`: the training set's size when already counted."""
    t, o = cfg.train, cfg.optim
    if t.epochs is None and o.warmup_epochs is None:
        return cfg, None
    videos = num_videos(cfg) if videos is None else videos
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
