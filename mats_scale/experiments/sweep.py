"""Run a grid point by point, append one JSON record per point to the sweep's results file.

A real point ("train" in its measures) is a short pre-training run in a subprocess under its launcher
(torchrun / deepspeed / python, ``run.nproc`` processes, killed as a process group after
``run.time_limit_s``); its ``metrics.jsonl`` gives

* clips/s, step time and MFU: medians over the steps after ``run.warmup_steps``;
* peak memory: on CPU the process tree's peak RSS (the Trainer's ``peak_mem_sum_gib``: ru_maxrss
  summed over the ranks), on CUDA rank 0's ``torch.cuda.max_memory_allocated`` (``peak_mem_gib``);
* final loss: mean of the last ``run.loss_window`` finite step losses; tokens per clip.

Every point (real or profiler-only) also gets the profilers' numbers for the same configuration: FLOPs
per clip (fvcore forward MACs, FlopCounterMode training FLOPs), the memory profiler's prediction
(per rank, on the device the run uses) and, for profiler-only points, the feasibility planner's row for
a GPU node. A failure (config error, non-zero exit, timeout, OOM) is recorded with its message and
the sweep goes on. Records are keyed by a hash of the resolved config, run settings and measures: a
key already in the results file is skipped (``retry_failed`` re-runs the failed ones).

A real point runs ``run.repeats`` times, one after the other, each in a fresh run directory: its
clips/s, step time, MFU and loss are the medians over the runs, with the runs' clips/s and their min
and max (the spread the report shows), its peak memory the highest. A sweep never mixes its rows into
results made at another commit or with another configuration of the same points without being told:
it stops before running anything (:class:`SweepConflict`) unless ``append`` is set, and then labels
the rows it adds (``appended``; every record carries its ``git_commit`` and the sweep's ``session``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from omegaconf import OmegaConf

from mats_scale.config import Config, ConfigError, load_config
from mats_scale.experiments.grid import Grid, Point
from mats_scale.experiments.runner import Process, child_env, error_message, launch_command, provenance

# Settings every real point gets: its own run directory, a fresh start, no bar, no TensorBoard.
FORCED = ["logging.progress_bar=false", "logging.tensorboard=false", "train.save_every=0"]
OK_STATUS = ("ok", "profiled")
STOP_GRACE_S = 20  # a point past its time limit: SIGTERM (the trainer stops after its step), then SIGKILL
GIB = 1024**3
MEDIANS = ("clips_per_s", "step_time_s", "mfu", "mfu_peak_tflops", "final_loss")  # over a point's runs


class SweepConflict(ConfigError):
    """The results folder holds rows made at another commit or with another configuration of the
    points, which the sweep would append to; one line saying what and how to go on."""


# ---- configuration --------------------------------------------------------------------------------


def resolve(point: Point) -> Config:
    """The point's validated Config (raises ConfigError)."""
    return load_config(point.config, point.overrides)


def config_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def point_key(cfg_dict: dict[str, Any], point: Point, feasibility: dict[str, Any] | None = None) -> str:
    """Identity of a point: resolved config (without its run directory), run settings, measures (and
    the planner's node when it is planned)."""
    conf = json.loads(json.dumps(cfg_dict))
    conf["train"].pop("out_dir", None)
    ident = {"config": conf, "run": point.run, "measure": sorted(point.measure)}
    if "feasibility" in point.measure:
        ident["feasibility"] = feasibility or {}
    blob = json.dumps(ident, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted key: value} (lists as tuples)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if not isinstance(v, list) else tuple(v)
    return out


def point_id(record: dict[str, Any]) -> str:
    """Which grid point a record is, whatever its configuration: the grid's name and the axes' values."""
    return json.dumps([record.get("grid"), record.get("point") or {}], sort_keys=True)


def short_commit(commit: Any) -> str:
    """A record's git_commit as shown: 12 hex digits, ``+dirty`` kept (uncommitted changes)."""
    commit = str(commit or "unknown")
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")


def load_results(path: str) -> list[dict[str, Any]]:
    """Records of a results file (a torn last line from a killed sweep is ignored)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


# ---- profilers ------------------------------------------------------------------------------------


def _workload(cfg: Config, dtype_name: str):
    from mats_scale.profiling.workload import DTYPES, Workload

    ckpt = (cfg.parallel.checkpoint_encoder_every, cfg.parallel.checkpoint_decoder_every)
    return Workload(cfg.model, cfg.masking, cfg.data.batch_size, DTYPES[dtype_name], ckpt)


def profile_flops(cfg: Config) -> dict[str, Any]:
    """FLOPs per clip: fvcore forward MACs (+ the papers' convention), FlopCounterMode step FLOPs."""
    from mats_scale.profiling.flops import count_flops, model_flops

    rep = count_flops(_workload(cfg, "fp32"), with_elementwise=False)
    return {
        "fwd_gmacs": rep.fwd_macs / 1e9,
        "ref_gmacs": rep.ref_macs / 1e9,
        "score_gmacs": rep.score_macs / 1e9,
        "train_gflops": rep.train_flops / 1e9,
        "model_gflops": model_flops(_workload(cfg, "fp32")) / 1e9,
        "tokens_encoder": rep.n_visible,
        "tokens_decoder": rep.decoder_tokens,
    }


def _engine_label(cfg: Config) -> str:
    from mats_scale.parallel.engine import states_label

    return states_label(cfg.parallel)  # one process (backend none) counts as zero0


def profile_memory(cfg: Config, nproc: int, target: str) -> dict[str, Any]:
    """The memory profiler's peak per rank for the run's micro-batch on `target` (cpu: fp32 unless
    train.precision=bf16; cuda: bf16 unless fp32), and that times the processes."""
    from mats_scale.profiling.feasibility import Node, engine_states
    from mats_scale.profiling.memory import activation_model, peak_allocated
    from mats_scale.profiling.states import param_stats
    from mats_scale.profiling.workload import build_model

    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and target == "cuda")
    wl = _workload(cfg, "bf16" if bf16 else "fp32")
    label = _engine_label(cfg)
    states = engine_states(param_stats(build_model(wl, "meta")), label, Node(nproc, 1e9, 1.0), wl.dtype)
    act = activation_model(wl, target=target)
    per_rank = peak_allocated(states, act, wl.batch)
    return {
        "target": target,
        "engine": label,
        "dtype": "bf16" if bf16 else "fp32",
        "states_gib": states.total / GIB,
        "activations_gib": act.peak(wl.batch) / GIB,
        "per_rank_gib": per_rank / GIB,
        "host_offload_gib": states.cpu_bytes / GIB,
        "total_gib": nproc * (per_rank + states.cpu_bytes) / GIB,
    }


def profile_feasibility(cfg: Config, node_name: str, engine: str | None = None) -> dict[str, Any]:
    """The planner's row (feasibility.check_config) for the point's configuration on a GPU node, with
    the point's engine or `engine` (a feasibility ENGINE_CHOICES label such as zero3)."""
    from mats_scale.profiling.feasibility import NODES, check_config

    if node_name not in NODES:
        raise ConfigError(f"feasibility.node={node_name!r}: allowed: {', '.join(NODES)}")
    node = NODES[node_name]
    bf16 = cfg.train.precision != "fp32"
    wl = _workload(cfg, "bf16" if bf16 else "fp32")
    row = check_config(wl, engine or _engine_label(cfg), node)
    return {"node": node.name, **row, "fits": bool(row["fits"])}


# ---- real runs ------------------------------------------------------------------------------------


def summarize_metrics(path: str, warmup: int, window: int) -> dict[str, Any]:
    """Medians after warm-up, peak memory and the final loss from a run's metrics.jsonl."""
    import math

    start, steps, end = {}, [], {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("event") == "start":
                    start, steps, end = rec, [], {}
                elif rec.get("event") == "end":  # peak after the last optimizer step
                    end = rec
                elif "step" in rec:
                    steps.append(rec)
    if not steps:
        return {"steps": 0}
    timed = steps[warmup:] or steps  # too few steps: no warm-up left out (flagged by "timed_steps")
    cuda = str(start.get("device", "cpu")).startswith("cuda")
    batch = start.get("total_batch") or 1
    losses = [s["loss"] for s in steps if math.isfinite(s["loss"])]
    out = {
        "steps": len(steps),
        "timed_steps": len(timed) if len(timed) < len(steps) else 0,
        "total_batch": batch,
        "world_size": start.get("world_size"),
        "device": start.get("device"),
        "engine": start.get("engine"),
        "precision": start.get("precision"),
        "clips_per_s": statistics.median(s["clips_per_s"] for s in timed),
        "step_time_s": statistics.median(s["step_time_s"] for s in timed),
        # peak_mem_sum_gib: older logs (before the Trainer summed over ranks) only have rank 0's
        "peak_mem_gib": max(
            s.get("peak_mem_gib" if cuda else "peak_mem_sum_gib", s["peak_mem_gib"])
            for s in [*steps, end]
            if s
        ),
        "peak_mem_kind": "cuda max_memory_allocated, rank 0" if cuda else "peak RSS summed over ranks",
        "final_loss": sum(losses[-window:]) / len(losses[-window:]) if losses else float("nan"),
        "tokens_encoder_per_clip": statistics.median(s["tokens_encoder"] for s in timed) / batch,
        "tokens_decoder_per_clip": statistics.median(s["tokens_decoder"] for s in timed) / batch,
    }
    if all("mfu" in s for s in timed):
        out["mfu"] = statistics.median(s["mfu"] for s in timed)
        out["mfu_peak_tflops"] = start.get("mfu_peak_tflops")
        out["mfu_peak_source"] = start.get("mfu_peak_source")
    return out


def run_once(point: Point, run_dir: str) -> tuple[str, str | None, dict[str, Any], float]:
    """One real run: (status, error message, measured metrics, wall seconds)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh start: never resume a half-run point
    os.makedirs(run_dir)
    args = [f"--config={point.config}"] + point.overrides + FORCED + [f"train.out_dir={run_dir}"]
    cmd = launch_command(point.run, args)
    job = Process(cmd, os.path.join(run_dir, "launcher.log"), child_env(int(point.run["nproc"])))
    try:
        rc = job.wait(point.run["time_limit_s"])
        if rc is None:  # past its time limit: stop every rank
            job.stop(STOP_GRACE_S)
    except BaseException:  # the sweep itself is interrupted: take the run's processes with it
        job.stop(STOP_GRACE_S)
        raise
    timed_out, wall, output = rc is None, job.wall_s, job.output()
    measured = summarize_metrics(
        os.path.join(run_dir, "metrics.jsonl"), int(point.run["warmup_steps"]), int(point.run["loss_window"])
    )
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)  # weights are not results
    if timed_out:
        return "timeout", f"killed after run.time_limit_s={point.run['time_limit_s']} s", measured, wall
    if rc == 0:
        return "ok", None, measured, wall
    low = output.lower()
    oom = rc in (-9, 137) or "out of memory" in low or "outofmemoryerror" in low
    return ("oom" if oom else "error"), f"exit {rc}: {error_message(output)}", measured, wall


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A point's measured numbers over its runs (each a :func:`summarize_metrics`): the MEDIANS over the
    runs that finished a step, the runs' clips/s with their min and max, the highest peak memory."""
    done = [m for m in runs if m.get("steps")]
    if not done:
        return runs[-1] if runs else {"steps": 0}
    out = dict(done[0])
    for key in MEDIANS:
        values = [m[key] for m in done if m.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    out["peak_mem_gib"] = max(m["peak_mem_gib"] for m in done)
    out["repeats"] = len(done)
    out["clips_per_s_runs"] = [m["clips_per_s"] for m in done]
    out["clips_per_s_min"] = min(out["clips_per_s_runs"])
    out["clips_per_s_max"] = max(out["clips_per_s_runs"])
    return out


def run_point(point: Point, run_dir: str) -> tuple[str, str | None, dict[str, Any], float]:
    """``run.repeats`` real runs of the point (``run_dir/run<i>``), one after the other, stopping at the
    first failure: (status, error message, :func:`combine_runs` of the runs, wall seconds in all)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    repeats, runs, wall = int(point.run.get("repeats", 1)), [], 0.0
    status, error = "ok", None
    for i in range(1, repeats + 1):
        status, error, measured, seconds = run_once(point, os.path.join(run_dir, f"run{i}"))
        runs.append(measured)
        wall += seconds
        if status != "ok":
            error = f"run {i} of {repeats}: {error}" if repeats > 1 else error
            break
    return status, error, combine_runs(runs), wall


# ---- the sweep ------------------------------------------------------------------------------------


@dataclass
class Planned:
    """A grid point before it runs: its record so far, its config (None after a config error), its key."""

    point: Point
    record: dict[str, Any]
    key: str
    cfg: Config | None = None
    error: str | None = None


def plan(grid: Grid) -> list[Planned]:
    """Every point's resolved config and key (a config error is keyed by the point's record)."""
    out = []
    for point in grid.points:
        record: dict[str, Any] = {
            "grid": grid.name,
            "point": point.axes,
            "overrides": point.overrides,
            "run": point.run,
            "measure": point.measure,
            "base_config": point.config,
        }
        try:
            cfg = resolve(point)
        except ConfigError as e:
            key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
            out.append(Planned(point, record, key, error=str(e)))
            continue
        cdict = config_dict(cfg)
        record["config"] = cdict
        out.append(Planned(point, record, point_key(cdict, point, grid.feasibility), cfg))
    return out


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The config keys, run settings and measures in which two records of the same point differ."""

    def ident(rec):
        return {
            **flatten(rec.get("config") or {}),
            **{f"run.{k}": v for k, v in (rec.get("run") or {}).items()},
            "measure": tuple(rec.get("measure") or ()),
        }

    a, b = ident(old), ident(new)
    return sorted(k for k in a.keys() | b.keys() if k != "train.out_dir" and a.get(k) != b.get(k))


def mixing_problem(
    existing: list[dict[str, Any]], planned: list[Planned], todo: int, commit: str
) -> str | None:
    """Why appending `todo` new rows to the `existing` records would mix results, or None: rows of these
    points with another configuration, rows of other points (another grid), rows from another commit."""
    if not existing or not todo:
        return None
    now = {point_id(p.record): p for p in planned}
    keys = {p.key for p in planned}
    changed = [r for r in existing if point_id(r) in now and r.get("key") not in keys]
    other = [r for r in existing if point_id(r) not in now]
    commits = sorted({short_commit(r.get("git_commit")) for r in existing} - {short_commit(commit)})
    made = f"made at commit {', '.join(commits)}" if commits else "made at this commit"
    if changed:
        diff = _differences(changed[-1], now[point_id(changed[-1])].record)
        shown = ", ".join(diff[:4]) + (f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")
        what = f"{len(changed)} rows of these points {made} with another configuration (differs in {shown})"
    elif other:
        what = f"{len(other)} rows of points that are not in grid {planned[0].record['grid']!r}, {made}"
    elif commits:
        what = f"{len(existing)} rows {made} (this is {short_commit(commit)})"
    else:
        return None
    return f"holds {what}; the {todo} points to run would be appended to them"


def sweep(
    grid: Grid,
    out_dir: str,
    *,
    retry_failed: bool = False,
    append: bool = False,
    echo: Callable[[str], None] = print,
) -> str:
    """Run every point of `grid` not yet in ``out_dir/results.jsonl``; returns that path. Raises
    SweepConflict, before running anything, when that file holds rows made at another commit or with
    another configuration of the points and `append` is not set."""
    os.makedirs(out_dir, exist_ok=True)
    results = os.path.join(out_dir, "results.jsonl")
    existing = load_results(results)
    done = {r["key"]: r["status"] for r in existing}
    planned = plan(grid)
    todo = [p for p in planned if p.key not in done or (retry_failed and done[p.key] not in OK_STATUS)]
    origin = provenance()
    problem = mixing_problem(existing, planned, len(todo), origin["git_commit"])
    if problem and not append:
        raise SweepConflict(
            f"{results}: {problem}: choose a new --out folder, or pass --append to add them (labelled "
            "by commit; the report shows the newest row of each point)"
        )
    origin.update(session=_session(), **({"appended": True} if problem else {}))
    flops_cache: dict[str, dict[str, Any]] = {}
    import torch

    cuda = torch.cuda.is_available()
    for i, item in enumerate(planned, 1):
        point, record, key, cfg = item.point, dict(item.record), item.key, item.cfg
        head = f"[{i}/{len(planned)}] {point.label}"
        if key in done and not (retry_failed and done[key] not in OK_STATUS):
            echo(f"{head}: done before ({done[key]}), skipped")
            continue
        record["key"] = key
        if cfg is None:
            record.update(status="config", error=item.error)
            _append(results, {**record, **origin, "finished_at": _now()})
            echo(f"{head}: config error: {item.error}")
            continue
        cdict = record["config"]
        real = "train" in point.measure
        # Real runs are predicted for the device they run on; profiler-only points for a GPU.
        target = "cuda" if not real or (cuda and cfg.train.device != "cpu") else "cpu"
        try:
            if "flops" in point.measure:
                ckpt = [cfg.parallel.checkpoint_encoder_every, cfg.parallel.checkpoint_decoder_every]
                fkey = json.dumps([cdict["model"], cdict["masking"], ckpt], sort_keys=True)  # recompute
                flops_cache.setdefault(fkey, profile_flops(cfg))
                record["flops"] = flops_cache[fkey]
            if "memory" in point.measure:
                record["predicted"] = profile_memory(cfg, int(point.run["nproc"]), target)
            if "feasibility" in point.measure:
                feas = grid.feasibility
                record["feasibility"] = profile_feasibility(
                    cfg, str(feas.get("node", "a100-80")), feas.get("engine")
                )
        except (ConfigError, ValueError, RuntimeError) as e:
            record.update(status="error", error=f"profiler: {e}")
            _append(results, {**record, **origin, "finished_at": _now()})
            echo(f"{head}: profiler error: {e}")
            continue
        if real:
            n = int(point.run.get("repeats", 1))
            echo(f"{head}: running {point.run['launcher']} x {point.run['nproc']}, {n} run(s) ...")
            status, error, measured, wall = run_point(point, os.path.join(out_dir, "runs", key))
            record.update(status=status, error=error, measured=measured, wall_s=wall)
            summary = "no step finished"
            if measured.get("steps"):
                spread = f" ({measured['clips_per_s_min']:.2f}-{measured['clips_per_s_max']:.2f})"
                summary = (
                    f"{measured['clips_per_s']:.2f}{spread if measured['repeats'] > 1 else ''} clips/s, "
                    f"peak {measured['peak_mem_gib']:.2f} GiB"
                )
            echo(f"{head}: {status} in {wall:.0f} s ({summary})" + (f": {error}" if error else ""))
        else:
            record.update(status="profiled", error=None)
            echo(f"{head}: profiled")
        _append(results, {**record, **origin, "finished_at": _now()})
    return results


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _session() -> str:
    """The sweep's start time to the microsecond: two sweeps in one second are two sessions."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _append(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
