"""What a run reports: ``train.log``, ``metrics.jsonl``, TensorBoard scalars and a progress bar on a
terminal, written by rank 0; a resume drops what the interrupted session logged past its checkpoint."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from typing import Any

import torch

from mats_scale.config import LoggingConfig
from mats_scale.parallel.distributed import DistEnv

# TensorBoard tag of each per-step metric of the Trainer (metrics.jsonl uses the keys); a task's own
# metrics get the task's tags (``Task.tb_tags``), else ``task/<key>``.
TB_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "clips_per_s": "perf/clips_per_s",
    "step_time_s": "perf/step_time_s",
    "data_time_s": "perf/data_time_s",
    "data_wait": "perf/data_wait",  # max over ranks
    "data_wait_mean": "perf/data_wait_mean_over_ranks",
    "data_wait_ranks": "perf/data_wait_rank",  # one scalar per rank: perf/data_wait_rank/<rank>
    "compiled_frames": "perf/compiled_frames",
    "peak_mem_gib": "memory/peak_gib",
    "skipped_files": "data/skipped_files",
    "skipped_steps": "train/skipped_steps",
    "mfu": "perf/mfu",
    "peak_mem_sum_gib": "memory/peak_sum_over_ranks_gib",
}


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated CUDA memory of this process, or its peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


class _TqdmHandler(logging.StreamHandler):
    """Prints through tqdm.write so log lines do not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never kill training
            self.handleError(record)


class RunLogger:
    def __init__(self, out_dir: str, env: DistEnv, cfg: LoggingConfig, total_steps: int, task=None) -> None:
        self.env, self.cfg, self.total = env, cfg, total_steps
        self.task_format = getattr(task, "log_format", "")
        self.tags = {**dict(getattr(task, "tb_tags", {})), **TB_TAGS}
        # Handlers sit on the package logger, so the data loader's warnings ("mats_scale.data") land
        # in the console and train.log too.
        self.log = logging.getLogger("mats_scale")
        self.log.handlers.clear()
        self.log.propagate = False
        self.tb = self.bar = self.jsonl = None
        if env.is_writer:
            self.log.setLevel(logging.INFO)
            console = _TqdmHandler(sys.stdout)
            console.setFormatter(logging.Formatter("%(message)s"))
            file = logging.FileHandler(os.path.join(out_dir, "train.log"))
            file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.log.addHandler(console)
            self.log.addHandler(file)
            self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a")  # noqa: SIM115 - closed in close()
        else:
            self.log.setLevel(logging.WARNING)
            err = logging.StreamHandler(sys.stderr)
            err.setFormatter(logging.Formatter(f"[rank {env.rank}] %(levelname)s %(message)s"))
            self.log.addHandler(err)
        self._out_dir = out_dir
        self._losses: list[float] = []  # this session's step losses, for the closing summary
        self._window: list[dict[str, Any]] = []  # the steps since the last log line
        self._steps_per_epoch: float | None = None
        self._t_start, self._step_start = time.perf_counter(), 0

    def start(self, start_step: int, resumed_from: str | None, info: dict[str, Any]) -> None:
        if not self.env.is_writer:
            return
        dropped = self._drop_steps_after(start_step) if resumed_from else 0
        self._steps_per_epoch = info.get("steps_per_epoch")
        self._t_start, self._step_start = time.perf_counter(), start_step
        self._event(
            {
                "event": "start",
                "step": start_step,
                "resumed_from": resumed_from,
                "dropped_steps": dropped,
                **info,
            }
        )
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self._out_dir, "tb"), purge_step=start_step + 1)
        if self.cfg.progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                smoothing=0.1,
            )

    def _drop_steps_after(self, step: int) -> int:
        """Rewrite metrics.jsonl without the step records past `step` (atomically); returns how many."""
        path = os.path.join(self._out_dir, "metrics.jsonl")
        self.jsonl.flush()
        with open(path) as f:
            lines = f.readlines()

        def kept(line: str) -> bool:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short when the interrupted session died
                return False
            return "event" in rec or rec.get("step", 0) <= step

        keep = [ln for ln in lines if ln.strip() and kept(ln)]
        if len(keep) == len(lines):
            return 0
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        self.jsonl.close()
        os.replace(tmp, path)
        self.jsonl = open(path, "a")  # noqa: SIM115 - stays open for the run, as in __init__
        return len(lines) - len(keep)

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def warning(self, msg: str) -> None:
        self.log.warning(msg)

    def _event(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def step(self, step: int, m: dict[str, Any]) -> None:
        if not self.env.is_writer:
            return
        self._event({"step": step, **m})
        self._losses.append(m["loss"])
        self._window.append(m)
        if self.tb is not None:
            for key, value in m.items():
                tag = self.tags.get(key, f"task/{key}")
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(tag, value, step)
                elif isinstance(value, list):  # per-rank values
                    for i, v in enumerate(value):
                        self.tb.add_scalar(f"{tag}/{i}", v, step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", refresh=False)
            self.bar.update(1)
        if step % self.cfg.log_every == 0 or step == 1 or step == self.total:
            self.info(self.line(step, m))
            self._window = []

    def line(self, step: int, m: dict[str, Any]) -> str:
        """The log line: loss averaged over the steps since the last line (finite ones), their
        throughput, the epoch and the ETA of the rest at this session's pace."""
        w = self._window or [m]
        finite = [x["loss"] for x in w if math.isfinite(x["loss"])]
        loss = f"{sum(finite) / len(finite):.4f}" if finite else "nan"
        step_time = sum(x["step_time_s"] for x in w) / len(w)
        busy = sum(x["step_time_s"] for x in w)
        clips = sum(x["clips_per_s"] * x["step_time_s"] for x in w) / max(busy, 1e-12)  # clips / seconds
        wait = sum(x.get("data_wait", 0.0) * x["step_time_s"] for x in w) / max(busy, 1e-12)  # slowest rank
        grad = "nan" if not math.isfinite(m["grad_norm"]) else f"{m['grad_norm']:.3f}"
        epoch = f"  epoch {step / self._steps_per_epoch:.2f}" if self._steps_per_epoch else ""
        done = step - self._step_start
        eta = (time.perf_counter() - self._t_start) / done * (self.total - step) if done else 0.0
        return (
            f"step {step:6d}/{self.total}{epoch}  loss {loss} (mean of {len(w)})  lr {m['lr']:.3e}  "
            f"grad_norm {grad}  {clips:.2f} clips/s  data wait {wait:.0%}  {step_time:.3f} s/step  "
            f"ETA {_duration(eta)}  "
            + (f"mfu {m['mfu']:.1%}  " if "mfu" in m else "")
            + (self.task_format.format(**m) + "  " if self.task_format else "")
            + f"peak {m['peak_mem_gib']:.2f} GiB  "
            f"skipped files {m['skipped_files']} steps {m['skipped_steps']}"
        )

    def end(self, step: int, info: dict[str, Any]) -> None:
        """The closing record of a session in metrics.jsonl (event "end": the run's peak memory after the
        last optimizer step, which the step records cannot include; the session's clip rates and data
        wait, also logged as one line)."""
        if self.env.is_writer:
            self._event({"event": "end", "at_step": step, **info})
            if info.get("clips_per_s_delivered"):
                self.info(
                    f"data: {info['clips_per_s_delivered']:.2f} clips/s delivered, "
                    f"{info['clips_per_s_consumed']:.2f} clips/s consumed "
                    f"(data wait {info['data_wait']:.0%} of the steps' time, slowest rank)"
                )

    def summary(self) -> None:
        """One line that shows whether the loss fell: mean of the session's first vs last steps."""
        finite = [x for x in self._losses if math.isfinite(x)]
        if len(finite) < 2:
            return
        k = max(1, min(10, len(finite) // 3))
        first, last = sum(finite[:k]) / k, sum(finite[-k:]) / k
        self.info(
            f"loss: mean of the first {k} steps {first:.4f} -> mean of the last {k} steps {last:.4f} "
            f"({last / first:.2f}x)"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        for h in list(self.log.handlers):
            h.close()
            self.log.removeHandler(h)
