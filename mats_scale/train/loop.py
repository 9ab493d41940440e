"""The pre-training loop: identical for every engine (it only calls the Engine protocol).

One optimizer step = ``optim.grad_accum`` micro-batches per process, each: next batch -> token
selection with this rank's mask generator -> forward -> backward; then one all-reduce of the step's
scalars (loss, non-finite count, stop request, skipped files, tokens) so that every rank takes the
same decision, then ``engine.step``. A non-finite loss on any rank (or a non-finite gradient norm)
drops that update everywhere (``train.nan_policy``); a SIGTERM/SIGINT on any rank makes all ranks
save a checkpoint after the current step and exit 0. Steps are numbered from 1; step s uses the
learning rate ``lr_at(s - 1)``.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from mats_scale.config import Config, ConfigError
from mats_scale.masking import Selection, TokenGrid, tube_masking
from mats_scale.optim import lr_at, total_batch
from mats_scale.parallel.distributed import DistEnv, LaunchError, all_reduce, barrier, detect_env, \
    init_distributed, shutdown
from mats_scale.parallel.engine import Engine, build_engine
from mats_scale.train.checkpoint import CheckpointError, CheckpointManager, capture_rng, restore_rng
from mats_scale.train.faults import Faults
from mats_scale.train.runlog import RunLogger, peak_memory_gib
from mats_scale.train.sources import BatchStream, build_loader


class TrainingError(RuntimeError):
    """The run can not go on (non-finite losses beyond the policy); the message says why."""


@dataclass
class Counters:
    """Per-rank trainer state saved with every checkpoint (besides data position and RNG)."""

    step: int = 0
    skipped_steps: int = 0
    nan_streak: int = 0
    skipped_files: int = 0


@dataclass
class TrainResult:
    step: int
    skipped_steps: int
    last_loss: float
    stopped_by_signal: bool
    out_dir: str


class StopRequest:
    """SIGTERM/SIGINT set a flag the loop reads once per step; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_selector(cfg: Config) -> Callable[[Engine, torch.Tensor, dict, torch.Generator], Selection]:
    """Token selection of ``cfg.masking`` for one micro-batch."""
    grid = TokenGrid.from_model(cfg.model)
    m = cfg.masking
    if m.strategy != "tube" or m.decoder != "none":
        raise ConfigError(f"masking.strategy={m.strategy}, masking.decoder={m.decoder}: this build has "
                          "tube masking with decoder none only")

    def select(engine: Engine, video: torch.Tensor, batch: dict, gen: torch.Generator) -> Selection:
        return tube_masking(grid, m.ratio, video.shape[0], gen)

    return select


def seed_rank_streams(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """After the (rank-independent) model init: per-rank streams for drop path, python, numpy and
    the mask generator (on the training device, returned)."""
    torch.manual_seed(seed + 7919 * (rank + 1))
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2 ** 32)
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank)


def _write_run_files(cfg: Config, env: DistEnv, ds_config: Optional[dict]) -> None:
    if not env.is_writer:
        return
    from mats_scale.parallel.ds_config import write_json

    with open(os.path.join(cfg.train.out_dir, "config.yaml"), "w") as f:
        f.write(cfg.to_yaml())
    if ds_config is not None:
        write_json(ds_config, os.path.join(cfg.train.out_dir, "ds_config.json"))


def prepare(cfg: Config) -> tuple[DistEnv, Optional[dict]]:
    """Everything that can fail on a bad config or launch, before any heavy import or communication."""
    env = detect_env(cfg.train, cfg.parallel)
    ds_config = None
    if cfg.parallel.backend == "deepspeed":
        from mats_scale.parallel.ds_config import resolve_ds_config

        ds_config, _ = resolve_ds_config(cfg, env.world_size, bf16=env.amp_dtype is not None,
                                         cuda=env.device.type == "cuda")
    make_selector(cfg)
    return env, ds_config


def train(cfg: Config) -> TrainResult:
    _, ds_config = prepare(cfg)
    env = init_distributed(cfg.train, cfg.parallel)
    faults = Faults.from_env()
    out_dir = cfg.train.out_dir
    if env.is_writer:
        os.makedirs(out_dir, exist_ok=True)
    barrier()
    ckpt = CheckpointManager(out_dir, cfg.train.keep_last, env, on_save=faults.in_save)
    resume_path = ckpt.resolve(cfg.train.resume)  # refuses a fresh start over old checkpoints first
    _write_run_files(cfg, env, ds_config)
    log = RunLogger(out_dir, env, cfg.logging, cfg.train.steps)

    engine = build_engine(cfg, env, ds_config)
    mask_gen = seed_rank_streams(cfg.train.seed, env.rank, env.device)
    stream = BatchStream(build_loader(cfg, env.rank, env.world_size))
    select = make_selector(cfg)
    counters = Counters()
    expect = {"world_size": env.world_size, "engine": engine.name, "model": asdict(cfg.model)}
    if resume_path is not None:
        _, state = ckpt.load(resume_path, engine, expect)
        counters = Counters(**state["counters"])
        stream.load_state_dict(state["data"])
        restore_rng(state["rng"], mask_gen)

    batch_total = total_batch(cfg.data.batch_size, env.world_size, cfg.optim.grad_accum)
    log.start(counters.step, str(resume_path) if resume_path else None,
              {"engine": engine.name, "world_size": env.world_size, "device": str(env.device),
               "precision": env.precision, "total_batch": batch_total})
    log.info(f"engine {engine.name} on {env.world_size} x {env.device} ({env.precision}), total batch "
             f"{batch_total} = {cfg.data.batch_size} x {env.world_size} x {cfg.optim.grad_accum}, "
             f"{len(stream.loader)} batches per epoch per rank, run dir {out_dir}")
    if resume_path is not None:
        log.info(f"resumed from {resume_path} at step {counters.step}")
    if counters.step >= cfg.train.steps:
        log.info(f"nothing to do: step {counters.step} >= train.steps={cfg.train.steps}")

    def save() -> None:
        state = {"counters": asdict(counters), "data": stream.state_dict(), "rng": capture_rng(mask_gen)}
        path = ckpt.save(counters.step, engine, state, {**expect, "config": cfg.to_yaml()})
        log.info(f"saved {path}")

    last_loss, stopped = float("nan"), False
    engine.zero_grad()
    with StopRequest() as stop:
        while counters.step < cfg.train.steps:
            step = counters.step + 1
            t0 = time.perf_counter()
            data_time = 0.0
            lr = lr_at(step - 1, cfg.train.steps, cfg.optim, batch_total)
            # [finite loss sum, non-finite micro-batches, stop requests, skipped files, enc tokens, dec tokens]
            stats = torch.zeros(6, dtype=torch.float64, device=env.device)
            for _ in range(cfg.optim.grad_accum):
                t_data = time.perf_counter()
                batch = stream.next()
                data_time += time.perf_counter() - t_data
                for path, reason in batch.get("skipped", ()):
                    log.warning(f"skipped unreadable file {path}: {reason}")
                    stats[3] += 1
                video = batch["video"].to(env.device, non_blocking=True)
                sel = select(engine, video, batch, mask_gen)
                out = engine.forward(video, sel)
                loss = faults.loss(out.loss, step, env.rank)
                finite = torch.isfinite(loss.detach())
                stats[0] += torch.where(finite, loss.detach().double(), 0.0)
                stats[1] += (~finite).double()
                engine.backward(loss)
                stats[4] += sel.visible_ids.numel()
                stats[5] += sel.visible_ids.numel() + sel.target_ids.numel()
            faults.during_step(step, env.rank)
            stats[2] = float(stop.signum is not None)
            all_reduce(stats)
            loss_sum, nonfinite, stop_votes, new_skipped, enc_tokens, dec_tokens = stats.tolist()
            result = engine.step(lr, skip=nonfinite > 0)
            counters.step = step
            counters.skipped_files += int(new_skipped)
            micro_total = cfg.optim.grad_accum * env.world_size
            last_loss = loss_sum / (micro_total - nonfinite) if nonfinite < micro_total else float("nan")
            if result.applied:
                counters.nan_streak = 0
            else:
                counters.skipped_steps += 1
                counters.nan_streak += 1
                why = (f"non-finite loss in {int(nonfinite)} of {micro_total} micro-batches" if nonfinite
                       else f"non-finite gradient norm {result.grad_norm}")
                log.warning(f"step {step}: {why}; update skipped ({counters.nan_streak} in a row, "
                            f"{counters.skipped_steps} in total)")
                if cfg.train.nan_policy == "stop" or counters.nan_streak >= cfg.train.max_nan_steps:
                    raise TrainingError(
                        f"step {step}: {why}; stopping after {counters.nan_streak} skipped step(s) in a row "
                        f"(train.nan_policy={cfg.train.nan_policy}, train.max_nan_steps={cfg.train.max_nan_steps}); "
                        f"the last checkpoint is {ckpt.latest()}")
            dt = time.perf_counter() - t0
            log.step(step, {"loss": last_loss, "lr": lr, "grad_norm": result.grad_norm, "applied": result.applied,
                            "clips_per_s": batch_total / dt, "step_time_s": dt, "data_time_s": data_time,
                            "tokens_encoder": int(enc_tokens), "tokens_decoder": int(dec_tokens),
                            "peak_mem_gib": peak_memory_gib(env.device), "skipped_files": counters.skipped_files,
                            "skipped_steps": counters.skipped_steps})
            stopped = stop_votes > 0
            every = cfg.train.save_every
            if stopped or step == cfg.train.steps or (every and step % every == 0):
                save()
            faults.after_step(step)
            if stopped:
                log.info(f"stopping after step {step} on signal; resume with train.resume=auto")
                break
    log.close()
    barrier()
    return TrainResult(counters.step, counters.skipped_steps, last_loss, stopped, out_dir)


def run(cfg: Config) -> int:
    """train() with errors turned into one message and an exit status (2: config, 1: other)."""
    rank = os.environ.get("RANK", "0")
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        train(cfg)
    except ConfigError as e:
        print(f"{prefix}config error: {e}", file=sys.stderr, flush=True)
        return 2
    except (LaunchError, CheckpointError, TrainingError) as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return 1
    shutdown()
    return 0
