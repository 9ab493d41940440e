"""The one training loop of every task and engine (it only calls the Task and Engine protocols): per
step, ``optim.grad_accum`` micro-batches through ``task.step``, one all-reduce of the step's scalars so
every rank takes the same skip / stop decision, then ``engine.step`` (docs/design.md, docs/distributed.md)."""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mats_scale.config import Config, ConfigError
from mats_scale.data.errors import DataError
from mats_scale.data.loader import explain_worker_failure
from mats_scale.optim import lr_at, total_batch
from mats_scale.parallel.distributed import (
    DistEnv,
    LaunchError,
    all_gather_object,
    all_reduce,
    barrier,
    detect_env,
    explain_collective_failure,
    init_distributed,
    shutdown,
)
from mats_scale.parallel.engine import build_engine
from mats_scale.run import lock, provenance
from mats_scale.run.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng,
    restore_rng,
    step_dirs,
)
from mats_scale.run.faults import Faults
from mats_scale.run.files import check_resume, lr_change_note, write_run_record
from mats_scale.run.log import RunLogger, peak_memory_gib
from mats_scale.run.preflight import preflight
from mats_scale.train.compile import RecompileWatch, compiled_frames
from mats_scale.train.mfu import MfuMeter
from mats_scale.train.schedule import resolve_schedule
from mats_scale.train.sources import BatchStream
from mats_scale.train.stall import StallMeter
from mats_scale.train.task import Task


class TrainingError(RuntimeError):
    """The run can not go on (non-finite losses beyond the policy); the message says why."""


class DataStop(DataError):
    """Too many bad videos on some rank; every rank raises it after the shared checkpoint and rank 0's
    report (already printed: the launcher must not see a rank exit before rank 0 has said why)."""


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
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def seed_rank_streams(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """After the (rank-independent) model init: per-rank streams for drop path, python, numpy and
    the mask generator (on the training device, returned)."""
    torch.manual_seed(seed + 7919 * (rank + 1))
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank)


def prepare(cfg: Config) -> tuple[DistEnv, dict[str, dict]]:
    """Everything that can fail on a bad config or launch, before any communication or model building:
    the process layout, the engine's resolved files (DeepSpeed's JSON, checked by DeepSpeed's own
    classes) and a writable run directory."""
    return preflight(cfg)  # also run by the launcher before the heavy imports


class Trainer:
    """Set-up, the step loop and checkpointing of one run of `task`; :func:`train` drives it."""

    def __init__(self, cfg: Config, task: Task) -> None:
        # train.epochs / optim.warmup_epochs -> steps, from the dataset size (before anything is built).
        cfg, schedule_note, schedule_warnings = resolve_schedule(
            cfg, detect_env(cfg.train, cfg.parallel).world_size
        )
        env0, engine_files = prepare(cfg)
        batch_total = total_batch(cfg.data.batch_size, env0.world_size, cfg.optim.grad_accum)
        early = CheckpointManager(cfg.train.out_dir, cfg.train.keep_last, env0).resolve(cfg.train.resume)
        if early is not None:  # a changed config is refused before any process group, op build or model
            check_resume(cfg, early, batch_total, task.name)
        self.cfg, self.task = cfg, task
        self.env = env = init_distributed(cfg.train, cfg.parallel)
        self.faults = Faults.from_env()
        if env.is_writer:
            os.makedirs(cfg.train.out_dir, exist_ok=True)
        barrier()
        lock.acquire(cfg.train.out_dir, env)  # one job per run directory
        self.ckpt = CheckpointManager(
            cfg.train.out_dir, cfg.train.keep_last, env, on_save=self.faults.in_save
        )
        self.resume_path = self.ckpt.resolve(cfg.train.resume)  # refuses a fresh start over old checkpoints
        # The whole config must match the checkpoint's, but for train.allow_changes (nothing written yet).
        self.changes = check_resume(cfg, self.resume_path, batch_total, task.name) if self.resume_path else {}
        self.log = RunLogger(cfg.train.out_dir, env, cfg.logging, cfg.train.steps, task)
        if schedule_note:
            self.log.info(schedule_note)
        for warning in schedule_warnings:
            self.log.warning(warning)
        for note in self.ckpt.notes:  # damaged checkpoints skipped, a missing pointer, a restart
            self.log.warning(note)

        self.engine = build_engine(cfg, env, task.model_spec())
        # Rank 0 logs MFU: FLOPs per clip counted on meta, the device peak (table, GEMM sample or config).
        self.mfu = (
            MfuMeter.for_run(cfg, task, env.device, env.precision, env.world_size) if env.is_writer else None
        )
        self.mask_gen = seed_rank_streams(cfg.train.seed, env.rank, env.device)
        self.stream = BatchStream(task.build_loader(env.rank, env.world_size))
        self.stream.loader.defer_stop = (
            True  # bad-data stops are agreed across ranks (in the step's all-reduce)
        )
        self.data_stopped = False
        self.stall, self.recompiles = StallMeter(env.rank, env.world_size), RecompileWatch()
        self.counters = Counters()
        # What a checkpoint must agree on to be resumed by this run.
        self.expect = {
            "world_size": env.world_size,
            "engine": self.engine.name,
            "task": task.name,
            **task.checkpoint_key(),
        }
        if self.resume_path is not None:
            _, state = self.ckpt.load(self.resume_path, self.engine, self.expect)
            self.counters = Counters(**state["counters"])
            self.stream.load_state_dict(state["data"])
            restore_rng(state["rng"], self.mask_gen)
        self.batch_total = batch_total
        if env.is_writer:  # only now that the checkpoint was accepted: config.yaml or a resume record
            write_run_record(
                cfg,
                engine_files,
                self.resume_path,
                self.counters.step,
                self.changes,
                provenance.collect(env.device, env.world_size),
            )
        note = lr_change_note(cfg, self.changes, self.counters.step, batch_total)
        if note:
            self.log.warning(note)

    def save(self) -> None:
        state = {
            "counters": asdict(self.counters),
            "data": self.stream.state_dict(),
            "rng": capture_rng(self.mask_gen),
        }
        meta = {**self.expect, "backend": self.engine.kind, "config": self.cfg.to_yaml()}
        path = self.ckpt.save(self.counters.step, self.engine, state, meta)
        self.log.info(f"saved {path}")

    def stop_on_bad_data(self, step: int) -> None:
        """All ranks agreed (in the step's all-reduce) that a rank hit the bad-file limit: save a checkpoint,
        gather every rank's report to rank 0 and raise :class:`DataStop` on all ranks."""
        self.save()
        mine = self.stream.stop_error
        reports = all_gather_object(str(mine) if mine is not None else None)
        listed = "\n".join(
            f"[rank {r}] {text}" if len(reports) > 1 else text for r, text in enumerate(reports) if text
        )
        message = (
            f"step {step}: stopping on bad training data (update of this step skipped); saved "
            f"{self.ckpt.latest()}; fix or remove the files, or raise data.max_bad_fraction, then "
            f"resume with train.resume=auto\n{listed}"
        )
        if self.env.is_writer:
            print(f"error: {message}", file=sys.stderr, flush=True)
        barrier()  # no rank exits (and makes the launcher kill the others) before the report is out
        raise DataStop(message)

    def step(self, step: int, stop: StopRequest) -> tuple[dict[str, Any], int, bool]:
        """One optimizer step: returns (metrics, non-finite micro-batches, stop requested on any rank)."""
        cfg, env, engine = self.cfg, self.env, self.engine
        t0 = time.perf_counter()
        data_time = 0.0
        lr = lr_at(step - 1, cfg.train.steps, cfg.optim, self.batch_total)
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        nonfinite = torch.zeros((), dtype=torch.float64, device=env.device)
        skipped = 0
        totals: dict[str, Any] = {}
        self.faults.during_step(step, env.rank)
        for _ in range(cfg.optim.grad_accum):
            t_data = time.perf_counter()
            batch = self.stream.next()
            data_time += time.perf_counter() - t_data
            skipped += len(batch.get("skipped", ()))  # the loader warns once per bad file
            out = self.task.step(engine, batch, self.mask_gen)
            loss = self.faults.loss(out.loss, step, env.rank)
            if self.stream.stop_error is not None:
                # A bad-data stop drops this step's update on every engine through the one skip they all
                # honour: non-finite gradients (ZeRO 1-3 skip an update only then, not on request).
                loss = loss * float("nan")
            finite = torch.isfinite(loss.detach())
            loss_sum += torch.where(finite, loss.detach().double(), 0.0)
            nonfinite += (~finite).double()
            engine.backward(loss)
            for key, value in out.metrics.items():
                totals[key] = totals.get(key, 0.0) + value
        # One collective: [loss sum, non-finite micro-batches, stop requests, skipped files, bad-data stops,
        # peak memory (summed over ranks: the process tree's peak RSS on CPU), task metrics..., compiled
        # frames, each rank's data wait in its own slot]
        names = sorted(totals)
        peak_mem = peak_memory_gib(env.device)
        scalars = torch.tensor(
            [float(stop.signum is not None), skipped, float(self.stream.stop_error is not None), peak_mem],
            dtype=torch.float64,
            device=env.device,
        )
        stats = torch.cat(
            [
                loss_sum.view(1),
                nonfinite.view(1),
                scalars,
                *(torch.as_tensor(totals[k], dtype=torch.float64, device=env.device).view(1) for k in names),
                torch.tensor(
                    [compiled_frames(), *self.stall.slots(data_time)], dtype=torch.float64, device=env.device
                ),
            ]
        )
        all_reduce(stats)  # every rank takes the same skip / stop decision
        values = stats.tolist()
        loss_total, n_nonfinite, stop_votes, new_skipped, data_stops, peak_mem_sum = values[:6]
        self.data_stopped = data_stops > 0
        result = engine.step(lr, skip=n_nonfinite > 0 or self.data_stopped)
        c = self.counters
        c.step = step
        c.skipped_files += int(new_skipped)
        if result.applied:
            c.nan_streak = 0
        else:
            c.skipped_steps += 1
            c.nan_streak += 1
        micro_total = cfg.optim.grad_accum * env.world_size
        dt = time.perf_counter() - t0
        metrics = {
            "loss": loss_total / micro_total if not n_nonfinite else float("nan"),  # skipped: NaN
            "lr": lr,
            "grad_norm": result.grad_norm,
            "applied": result.applied,
            "clips_per_s": self.batch_total / dt,
            "step_time_s": dt,
            "data_time_s": data_time,
            **self.stall.step(values[7 + len(names) :], dt, self.batch_total),
            **self.task.summarize(dict(zip(names, values[6 : 6 + len(names)], strict=True)), micro_total),
            "peak_mem_gib": peak_mem,
            "peak_mem_sum_gib": peak_mem_sum,
            "skipped_files": c.skipped_files,
            "skipped_steps": c.skipped_steps,
        }
        if self.mfu is not None:
            metrics["mfu"] = self.mfu(metrics["clips_per_s"])
        if cfg.train.compile:  # summed over ranks; constant after warm-up unless something recompiled
            metrics["compiled_frames"] = int(values[6 + len(names)])
            note = self.recompiles.check(step, metrics["compiled_frames"])
            if note:
                self.log.warning(note)
        return metrics, int(n_nonfinite), stop_votes > 0

    def run(self) -> TrainResult:
        cfg, c, log = self.cfg, self.counters, self.log
        log.start(
            c.step,
            str(self.resume_path) if self.resume_path else None,
            {
                "engine": self.engine.name,
                "world_size": self.env.world_size,
                "device": str(self.env.device),
                "precision": self.env.precision,
                "total_batch": self.batch_total,
                "steps_per_epoch": len(self.stream.loader) / cfg.optim.grad_accum,
                **(
                    {
                        "mfu_flops_per_clip": self.mfu.flops_per_clip,
                        "mfu_peak_tflops": self.mfu.peak_flops / 1e12,
                        "mfu_peak_source": self.mfu.peak_source,
                    }
                    if self.mfu is not None
                    else {}
                ),
            },
        )
        log.info(
            f"engine {self.engine.name} on {self.env.world_size} x {self.env.device} "
            f"({self.env.precision}), total batch {self.batch_total} = {cfg.data.batch_size} x "
            f"{self.env.world_size} x {cfg.optim.grad_accum}, "
            f"{len(self.stream.loader)} batches per epoch per rank, run dir {cfg.train.out_dir}"
        )
        if self.resume_path is not None:
            log.info(f"resumed from {self.resume_path} at step {c.step}")
        if c.step >= cfg.train.steps:
            log.info(f"nothing to do: step {c.step} >= train.steps={cfg.train.steps}")
        metrics, stopped = {"loss": float("nan")}, False
        self.engine.zero_grad()
        with StopRequest() as stop:
            while c.step < cfg.train.steps:
                step = c.step + 1
                metrics, nonfinite, stopped = self.step(step, stop)
                if self.data_stopped:  # too many bad files on some rank: all save, then stop
                    log.step(step, metrics)
                    self.stop_on_bad_data(step)
                why = None
                if not metrics["applied"]:
                    micro = cfg.optim.grad_accum * self.env.world_size
                    why = (
                        f"non-finite loss in {nonfinite} of {micro} micro-batches"
                        if nonfinite
                        else f"non-finite gradient norm {metrics['grad_norm']}"
                    )
                    log.warning(
                        f"step {step}: {why}; update skipped ({c.nan_streak} in a row, "
                        f"{c.skipped_steps} in total)"
                    )
                log.step(step, metrics)
                if why and (cfg.train.nan_policy == "stop" or c.nan_streak >= cfg.train.max_nan_steps):
                    raise TrainingError(
                        f"step {step}: {why}; stopping after {c.nan_streak} skipped step(s) in a row "
                        f"(train.nan_policy={cfg.train.nan_policy}, "
                        f"train.max_nan_steps={cfg.train.max_nan_steps}); "
                        f"last checkpoint: {self.ckpt.latest() or 'none yet'}"
                    )
                every = cfg.train.save_every
                if stopped or step == cfg.train.steps or (every and step % every == 0):
                    self.save()
                self.faults.after_step(step)
                if stopped:
                    log.info(f"stopping after step {step} on signal; resume with train.resume=auto")
                    break
        # The step records' peak is read before each optimizer step (it rides on the step's one
        # all-reduce); the last step's optimizer update (the first allocates AdamW's states) is in this one.
        peak = peak_memory_gib(self.env.device)
        peak_sum = all_reduce(torch.tensor([peak], dtype=torch.float64, device=self.env.device)).item()
        log.end(c.step, {"peak_mem_gib": peak, "peak_mem_sum_gib": peak_sum, **self.stall.summary()})
        log.summary()
        barrier()
        return TrainResult(c.step, c.skipped_steps, metrics["loss"], stopped, cfg.train.out_dir)


def train(cfg: Config, task: Task | None = None) -> TrainResult:
    """Run `task` (default: pre-training) to ``train.steps``."""
    if task is None:
        from mats_scale.train.pretrain import PretrainTask

        task = PretrainTask(cfg)
    trainer = Trainer(cfg, task)
    try:
        result = trainer.run()
        if not result.stopped_by_signal:
            task.finish(trainer)  # e.g. fine-tuning's evaluation after training
        return result
    except BaseException:
        trainer.stream.close()  # whatever the error: the data workers go now, or the exit waits for them
        raise
    finally:
        trainer.log.close()
        lock.release(trainer.cfg.train.out_dir)


def run(cfg: Config, task_factory: Callable[[Config], Task] | None = None) -> int:
    """train() with errors turned into one message and an exit status (2: config, 1: other)."""
    rank = os.environ.get("RANK", "0")
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        train(cfg, task_factory(cfg) if task_factory is not None else None)
    except ConfigError as e:
        if rank == "0":  # the same on every rank: said once
            print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    except DataStop:  # rank 0 has printed every rank's list, once
        return 1
    except (LaunchError, CheckpointError, TrainingError, DataError) as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once (workers are already shut down)
        newest = step_dirs(Path(cfg.train.out_dir) / "checkpoints")  # no digests: this stops at once
        last = newest[0] if newest else None
        kept = (
            f"the last checkpoint, {last.name}, is kept; resume with train.resume=auto"
            if last is not None
            else "no checkpoint was saved yet, so a rerun starts from step 0"
        )
        print(f"{prefix}interrupted: stopped at once without saving ({kept})", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        why = explain_worker_failure(e, int(rank)) or explain_collective_failure(e)
        if why is None:
            raise  # a bug: keep the traceback
        print(f"{prefix}error: {why}", file=sys.stderr, flush=True)
        return 1
    shutdown()
    return 0
