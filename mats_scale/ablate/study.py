"""The learning study: pre-train with each masking preset, fine-tune and linear-probe every encoder, next to
from-scratch fine-tuning, over several seeds; accuracy against measured pre-training compute.

A study file (OmegaConf YAML, shipped ones in ``mats_scale/configs/studies/``)::

    name: presets
    presets: [tube, tube+rc, mats, mats+dual]   # masking presets (mats_scale.tokens.PRESETS)
    seeds: [0, 1, 2]
    scratch: true       # fine-tune from scratch and probe a random encoder, once per seed
    probe: true         # linear probe of every pre-trained encoder
    jobs: 2             # runs at once, each with cpu_count // jobs threads
    common: {...}       # config overrides every run gets (nested or dotted keys)
    pretrain: {config: default, train: {steps: 1000}, ...}           # its base config + overrides
    finetune: {config: finetune_default, train: {steps: 3000}, ...}

Every run is the project's own launcher (``python -m mats_scale.launch.pretrain`` / ``.finetune``, the
one Trainer, ``--probe`` for the probe) in a subprocess with its own run directory
``OUT/runs/<kind>-<preset>-s<seed>-<hash>``; the hash covers the run's configuration and that of the
runs it starts from, so a changed study never resumes a run of another configuration. A run counts as
done when its result is on disk (the last step's checkpoint, ``eval/results.json``,
``probe/results.json``) and ``study.json`` records its wall and CPU time: re-running the command skips
done runs and resumes a half-finished one from its newest checkpoint (``train.resume=auto``).

Pre-training compute comes from the profilers (:func:`mats_scale.ablate.sweep.profile_flops`: fvcore
forward MACs per clip, the MATS score's MACs, FlopCounterMode training-step FLOPs per clip) times the
clips the run saw. :func:`write_report` writes ``runs.csv`` (one row per seed), ``summary.csv``,
``study.md`` (table and the verdicts, computed, not written by hand), ``study.png`` and
``reconstruction.png`` (:mod:`mats_scale.tools.visualize` on the first seed's run of every preset).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from mats_scale.ablate.grid import _flat, _value, load_mapping
from mats_scale.ablate.sweep import child_env, git_commit, host, summarize_metrics, versions
from mats_scale.config import Config
from mats_scale.errors import ConfigError
from mats_scale.tokens import PRESETS

STUDY_KEYS = ("name", "presets", "seeds", "scratch", "probe", "jobs", "common", "pretrain", "finetune")
KINDS = ("pretrain", "finetune", "probe")
SCRATCH = "scratch"  # the preset label of the from-scratch baseline (a random encoder in the probe)
MODULES = {"pretrain": "mats_scale.launch.pretrain", "finetune": "mats_scale.launch.finetune"}
LOSS_WINDOW = 10  # the pre-training loss reported: mean of the last steps
TARGET_COMPUTE = 0.6  # the claim: mats+dual reaches the tube presets' accuracy at <= 0.6x their compute


@dataclass
class Stage:
    """A base config and its overrides (dotted key -> value)."""

    config: str
    overrides: dict[str, Any]


@dataclass
class Study:
    name: str
    presets: list[str]
    seeds: list[int]
    scratch: bool
    probe: bool
    jobs: int
    common: dict[str, Any]
    pretrain: Stage
    finetune: Stage


@dataclass
class Job:
    """One run of the study: a launcher module with its arguments, after the jobs in `deps`."""

    name: str
    kind: str
    preset: str
    seed: int
    config: str
    overrides: list[str]
    deps: list[str] = field(default_factory=list)
    run_dir: str = ""
    cfg: Config | None = None  # the resolved config of the run (set by plan)

    @property
    def steps(self) -> int:
        return self.cfg.train.steps

    def command(self) -> list[str]:
        module = MODULES["finetune" if self.kind == "probe" else self.kind]
        return [sys.executable, "-m", module, f"--config={self.config}", *self.overrides]


# ---- the study file -----------------------------------------------------------------------------


def load_study(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Read a study file and apply ``key=value`` overrides (e.g. ``seeds=[0] pretrain.train.steps=5``);
    raises ConfigError naming the key."""
    raw = load_mapping(path, "--study", STUDY_KEYS)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key=value, e.g. seeds=[0,1,2]")
    try:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"overrides {' '.join(overrides)}: {str(e).splitlines()[0]}") from None
    spec = OmegaConf.to_container(raw)
    unknown = sorted(set(spec) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}: allowed: {', '.join(STUDY_KEYS)}")
    presets = spec.get("presets") or []
    if not isinstance(presets, list) or not presets:
        raise ConfigError(f"presets={presets!r}: expected a non-empty list of: {', '.join(PRESETS)}")
    for p in presets:
        if p not in PRESETS:
            raise ConfigError(f"presets: {p!r} is not a masking preset; allowed: {', '.join(PRESETS)}")
    if len(set(presets)) != len(presets):
        raise ConfigError(f"presets={presets}: a preset is listed twice")
    seeds = spec.get("seeds")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ConfigError(f"seeds={seeds!r}: expected a list of distinct integers >= 0, e.g. [0, 1, 2]")
    jobs = spec.get("jobs", 1)
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"jobs={jobs!r}: expected an integer >= 1 (runs at once)")
    for key in ("scratch", "probe"):
        if not isinstance(spec.get(key, True), bool):
            raise ConfigError(f"{key}={spec[key]!r}: expected true or false")
    stages = {}
    for key in ("pretrain", "finetune"):
        stage = spec.get(key)
        if not isinstance(stage, dict) or not isinstance(stage.get("config"), str):
            raise ConfigError(f"{key}: expected a mapping with a base 'config' (a file or shipped name)")
        stages[key] = Stage(stage["config"], _flat({k: v for k, v in stage.items() if k != "config"}))
    common = spec.get("common") or {}
    if not isinstance(common, dict):
        raise ConfigError(f"common={common!r}: expected a mapping of config overrides")
    return Study(
        name=str(spec.get("name") or os.path.basename(path).removesuffix(".yaml")),
        presets=presets,
        seeds=seeds,
        scratch=spec.get("scratch", True),
        probe=spec.get("probe", True),
        jobs=jobs,
        common=_flat(common),
        pretrain=stages["pretrain"],
        finetune=stages["finetune"],
    )


# ---- the plan -----------------------------------------------------------------------------------


def _dotlist(values: dict[str, Any]) -> list[str]:
    return [f"{k}={_value(v)}" for k, v in values.items()]


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:8]


def plan(study: Study, out_dir: str) -> list[Job]:
    """Every run of the study, pre-training first (the others start from it)."""
    from mats_scale.config import load_config
    from mats_scale.resources import config_path

    runs = os.path.join(out_dir, "runs")
    jobs: list[Job] = []
    digests: dict[str, str] = {}

    def add(kind: str, preset: str, seed: int, config: str, values: dict[str, Any], dep: Job | None) -> Job:
        ident = _digest(kind, config, values, digests[dep.name] if dep else None)
        job = Job(f"{kind}-{preset}-s{seed}", kind, preset, seed, config, [])
        job.run_dir = os.path.join(runs, f"{job.name}-{ident}")
        values = dict(values)
        if kind != "pretrain":  # fine-tuning and the probe start from the pre-training run (or nothing)
            values["finetune.init"] = dep.run_dir if dep else "''"
            job.deps = [dep.name] if dep else []
        if kind == "probe":
            values["finetune.linear_probe"] = True
        values["train.out_dir"] = job.run_dir
        job.overrides = _dotlist(values)
        try:
            cfg = load_config(config_path(config), job.overrides)
        except ConfigError as e:
            raise ConfigError(f"{kind} run of preset {preset}, seed {seed}: {e}") from None
        job.cfg = cfg
        digests[job.name] = ident
        jobs.append(job)
        return job

    ft, pre = study.finetune, study.pretrain
    pretrained = {}
    for preset in study.presets:
        masking = {f"masking.{k}": v for k, v in PRESETS[preset].items()}
        for seed in study.seeds:
            values = {**study.common, **pre.overrides, **masking, "train.seed": seed}
            pretrained[preset, seed] = add("pretrain", preset, seed, pre.config, values, None)
    tail = [(p, s, pretrained[p, s]) for p in study.presets for s in study.seeds]
    if study.scratch:
        tail += [(SCRATCH, s, None) for s in study.seeds]
    for preset, seed, dep in tail:
        values = {**study.common, **ft.overrides, "train.seed": seed}
        add("finetune", preset, seed, ft.config, values, dep)
        if study.probe:
            add("probe", preset, seed, ft.config, values, dep)
    return jobs


def result_path(job: Job) -> str:
    """The file whose presence says the run finished (not merely stopped after a signal)."""
    if job.kind == "pretrain":
        return os.path.join(job.run_dir, "checkpoints", f"step_{job.steps:08d}")
    return os.path.join(job.run_dir, "eval" if job.kind == "finetune" else "probe", "results.json")


def job_record(job: Job) -> dict[str, Any] | None:
    """The run's ``study.json`` when the run is done, else None."""
    path = os.path.join(job.run_dir, "study.json")
    if not (os.path.exists(path) and os.path.exists(result_path(job))):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


# ---- running ------------------------------------------------------------------------------------


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    log: Any
    t0: float


def _kill(run: _Running) -> None:
    """SIGKILL the run's process group: an interrupted study must not let a run save and look done."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.proc.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(run.proc.pid, 0)
    run.log.close()


def run_jobs(jobs: list[Job], at_once: int, echo: Callable[[str], None] = print) -> dict[str, str]:
    """Run the jobs not yet done, `at_once` at a time in dependency order; returns name -> status
    (done, ok, failed: ..., skipped: ...). A failed run is recorded and its dependants skipped."""
    status: dict[str, str] = {}
    pending = []
    for job in jobs:
        if job_record(job) is not None:
            status[job.name] = "done"
        else:
            pending.append(job)
    todo = len(pending)
    if status:
        echo(f"{len(status)} of {len(jobs)} runs done before; {todo} to run")
    running: list[_Running] = []
    started = 0
    try:
        while pending or running:
            for job in list(pending):
                bad = [d for d in job.deps if status.get(d, "").startswith(("failed", "skipped"))]
                if bad:
                    pending.remove(job)
                    status[job.name] = f"skipped: {bad[0]} did not finish"
                    echo(f"{job.name}: skipped ({bad[0]} did not finish)")
                elif len(running) < at_once and all(status.get(d) in ("done", "ok") for d in job.deps):
                    pending.remove(job)
                    os.makedirs(job.run_dir, exist_ok=True)
                    log = open(os.path.join(job.run_dir, "study.log"), "a")  # noqa: SIM115 - closed on exit
                    log.write(" ".join(job.command()) + "\n")
                    log.flush()
                    proc = subprocess.Popen(
                        job.command(),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=child_env(at_once),
                        start_new_session=True,  # own process group: an interrupt kills the whole run
                    )
                    started += 1
                    echo(f"[{started}/{todo}] {job.name}: started")
                    running.append(_Running(job, proc, log, time.perf_counter()))
            for run in list(running):
                pid, wait_status, usage = os.wait4(run.proc.pid, os.WNOHANG)
                if pid == 0:
                    continue
                running.remove(run)
                run.log.close()
                wall = time.perf_counter() - run.t0
                rc = os.waitstatus_to_exitcode(wait_status)
                job = run.job
                if rc == 0 and os.path.exists(result_path(job)):
                    record = {
                        "status": "ok",
                        "wall_s": wall,
                        "cpu_s": usage.ru_utime + usage.ru_stime,
                        "command": job.command(),
                        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                    with open(os.path.join(job.run_dir, "study.json"), "w") as f:
                        json.dump(record, f, indent=1)
                    status[job.name] = "ok"
                    echo(f"{job.name}: ok in {wall:.0f} s")
                else:
                    why = f"exit {rc}" if rc else "exited without its result (stopped by a signal?)"
                    status[job.name] = f"failed: {why}"
                    echo(f"{job.name}: FAILED ({why}); see {os.path.join(job.run_dir, 'study.log')}")
            time.sleep(0.2)
    except BaseException:
        for run in running:
            _kill(run)
        raise
    return status


# ---- results ------------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def pretrain_compute(jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """Per preset: the profilers' FLOPs per clip of its pre-training config and the clips one run sees."""
    from mats_scale.ablate.sweep import profile_flops
    from mats_scale.optim import total_batch

    out = {}
    for job in jobs:
        if job.kind != "pretrain" or job.preset in out:
            continue
        cfg = job.cfg
        flops = profile_flops(cfg)
        clips = job.steps * total_batch(cfg.data.batch_size, 1, cfg.optim.grad_accum)
        out[job.preset] = {
            "fwd_gmacs_per_clip": flops["fwd_gmacs"] + flops["score_gmacs"],
            "score_gmacs_per_clip": flops["score_gmacs"],
            "train_gflops_per_clip": flops["train_gflops"],
            "tokens_encoder": flops["tokens_encoder"],
            "tokens_decoder": flops["tokens_decoder"],
            "pretrain_clips": clips,
            "pretrain_gmacs": (flops["fwd_gmacs"] + flops["score_gmacs"]) * clips,
            "pretrain_tflops": flops["train_gflops"] * clips / 1e3,
        }
    return out


def collect(study: Study, jobs: list[Job]) -> list[dict[str, Any]]:
    """One row per (preset, seed): pre-training loss and compute, fine-tuning and probe accuracy, times."""
    compute = pretrain_compute(jobs)
    by_key = {(j.kind, j.preset, j.seed): j for j in jobs}
    rows = []
    labels = list(study.presets) + ([SCRATCH] if study.scratch else [])
    for preset in labels:
        for seed in study.seeds:
            row: dict[str, Any] = {"preset": preset, "seed": seed}
            row.update(
                compute.get(preset, {"pretrain_clips": 0, "pretrain_gmacs": 0.0, "pretrain_tflops": 0.0})
            )
            pre = by_key.get(("pretrain", preset, seed))
            rec = job_record(pre) if pre is not None else None
            if rec is not None:
                summary = summarize_metrics(os.path.join(pre.run_dir, "metrics.jsonl"), 0, LOSS_WINDOW)
                row.update(
                    pretrain_loss=summary.get("final_loss"),
                    pretrain_wall_s=rec["wall_s"],
                    pretrain_cpu_s=rec["cpu_s"],
                )
            for kind, extra in (("finetune", ("top5", "wall_s", "cpu_s")), ("probe", ("train_top1",))):
                job = by_key.get((kind, preset, seed))
                rec = job_record(job) if job is not None else None
                if rec is not None:
                    res = {**rec, **(_read_json(result_path(job)) or {})}
                    row.update({f"{kind}_{k}": res.get(k) for k in ("top1", *extra)})
            rows.append(row)
    return rows


def _stats(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per preset: means and spreads over the seeds, and compute relative to the first tube preset."""
    out = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == preset]
        s: dict[str, Any] = {"preset": preset, "seeds": len(mine)}
        for key in ("fwd_gmacs_per_clip", "train_gflops_per_clip", "pretrain_clips", "pretrain_tflops"):
            s[key] = mine[0].get(key)
        for key in ("finetune_top1", "probe_top1", "pretrain_loss", "pretrain_cpu_s", "finetune_cpu_s"):
            s[key] = _stats([r.get(key) for r in mine])
        out.append(s)
    reference = next((s for s in out if s["preset"].startswith("tube")), None)
    for s in out:
        ref = reference["pretrain_tflops"] if reference else None
        s["compute_vs_reference"] = s["pretrain_tflops"] / ref if ref and s["preset"] != SCRATCH else None
    return out


def verdicts(summary: list[dict[str, Any]]) -> list[str]:
    """The study's questions answered from the numbers (one sentence each)."""

    def top1(s):
        return s["finetune_top1"]

    lines = []
    scratch = next((s for s in summary if s["preset"] == SCRATCH), None)
    trained = [s for s in summary if s["preset"] != SCRATCH and top1(s)]
    if scratch and top1(scratch):
        for s in trained:
            margin = top1(s)["mean"] - top1(scratch)["mean"]
            every = top1(s)["min"] > top1(scratch)["max"]
            lines.append(
                f"{s['preset']} vs from scratch: fine-tuned top-1 {top1(s)['mean']:.3f} vs "
                f"{top1(scratch)['mean']:.3f} ({margin:+.3f}); every seed above the best scratch seed: "
                f"{'yes' if every else 'no'}"
            )
    ours = next((s for s in trained if s["preset"] == "mats+dual"), None)
    if ours:
        for s in trained:
            if not s["preset"].startswith("tube"):
                continue
            diff = top1(ours)["mean"] - top1(s)["mean"]
            spread = max(top1(ours)["std"], top1(s)["std"])
            ratio = ours["pretrain_tflops"] / s["pretrain_tflops"]
            accuracy = "yes" if diff >= 0 else ("within one seed std" if -diff <= spread else "no")
            met = diff >= 0 and ratio <= TARGET_COMPUTE
            lines.append(
                f"mats+dual vs {s['preset']}: top-1 {top1(ours)['mean']:.3f} vs {top1(s)['mean']:.3f} "
                f"({diff:+.3f}; seed std {top1(ours)['std']:.3f} / {top1(s)['std']:.3f}) at "
                f"{ratio:.2f}x its pre-training compute; at least its accuracy: {accuracy}; compute <= "
                f"{TARGET_COMPUTE}x: {'yes' if ratio <= TARGET_COMPUTE else 'no'}; target met: "
                f"{'yes' if met else 'no'}"
            )
    return lines


# ---- report -------------------------------------------------------------------------------------

RUN_COLUMNS = (
    "preset",
    "seed",
    "pretrain_loss",
    "finetune_top1",
    "finetune_top5",
    "probe_top1",
    "probe_train_top1",
    "fwd_gmacs_per_clip",
    "score_gmacs_per_clip",
    "train_gflops_per_clip",
    "pretrain_clips",
    "pretrain_gmacs",
    "pretrain_tflops",
    "pretrain_wall_s",
    "pretrain_cpu_s",
    "finetune_wall_s",
    "finetune_cpu_s",
)


def _fmt(st: dict[str, float] | None, digits: int = 3) -> str:
    if not st:
        return "-"
    if st["n"] == 1:
        return f"{st['mean']:.{digits}f} (1 seed)"
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f} ({st['min']:.{digits}f}-{st['max']:.{digits}f})"


def _plot(summary: list[dict[str, Any]], rows: list[dict[str, Any]], path: str, chance: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in (
        (axes[0], "finetune_top1", "fine-tuned top-1 (val)"),
        (axes[1], "probe_top1", "linear probe top-1 (val)"),
    ):
        for i, s in enumerate(summary):
            x = s["pretrain_tflops"] or 0.0
            ys = [r[key] for r in rows if r["preset"] == s["preset"] and r.get(key) is not None]
            if not ys:
                continue
            color = "grey" if s["preset"] == SCRATCH else f"C{i}"
            ax.scatter([x] * len(ys), ys, color=color, alpha=0.35, s=18)
            st = s[key]
            ax.errorbar(x, st["mean"], yerr=st["std"], fmt="o", color=color, capsize=4, label=s["preset"])
        if chance:
            ax.axhline(chance, color="black", lw=0.8, ls="--", label="chance")
        ax.set_xlabel("pre-training compute per run (training TFLOPs, profiler)")
        ax.set_ylabel(title)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # nothing finished: no legend (and no warning)
        axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("accuracy vs pre-training compute (dots: seeds; bars: mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reconstruction_picture(study: Study, jobs: list[Job], path: str) -> bool:
    """:mod:`mats_scale.tools.visualize` on the first seed's pre-training run of every preset (one clip,
    one mask seed): input, visible tokens, targets and reconstruction per preset. False if none is done."""
    from mats_scale.tools import visualize

    runs = [
        j.run_dir
        for j in jobs
        if j.kind == "pretrain" and j.seed == study.seeds[0] and job_record(j) is not None
    ]
    return bool(runs) and visualize.main([*runs, "--out", path, "--seed", "0"]) == 0


def write_report(study: Study, jobs: list[Job], out_dir: str, command: str = "") -> list[str]:
    """runs.csv, summary.csv, study.md, study.png and reconstruction.png in `out_dir`; returns their
    paths."""
    rows = collect(study, jobs)
    summary = summarize(rows)
    paths = [os.path.join(out_dir, n) for n in ("runs.csv", "summary.csv", "study.md", "study.png")]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUN_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    stat_keys = ("finetune_top1", "probe_top1", "pretrain_loss", "pretrain_cpu_s", "finetune_cpu_s")
    with open(paths[1], "w", newline="") as f:
        fields = ["preset", "seeds", "fwd_gmacs_per_clip", "train_gflops_per_clip", "pretrain_clips"]
        fields += ["pretrain_tflops", "compute_vs_reference"]
        fields += [f"{k}_{a}" for k in stat_keys for a in ("mean", "std", "min", "max")]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for s in summary:
            flat = {k: s[k] for k in fields if k in s}
            for k in stat_keys:
                for a in ("mean", "std", "min", "max"):
                    flat[f"{k}_{a}"] = s[k][a] if s[k] else None
            w.writerow(flat)
    ref = next((s["preset"] for s in summary if s["preset"].startswith("tube")), None)
    lines = [
        f"# Study `{study.name}`: accuracy against pre-training compute",
        "",
        f"Seeds {study.seeds}; mean ± sample std (min-max) over the seeds. Pre-training: "
        f"`{study.pretrain.config}` + {_dotlist(study.pretrain.overrides)}; fine-tuning: "
        f"`{study.finetune.config}` + {_dotlist(study.finetune.overrides)}; every run: "
        f"{_dotlist(study.common)}.",
        "Compute from the profilers: forward GMACs per clip (fvcore, with the MATS score), training-step "
        "GFLOPs per clip (FlopCounterMode, forward + backward + score), times the clips a run sees. "
        "CPU s: user + system time of the run's process (comparable across runs with the same "
        "threads per run on a machine with no other load).",
        "",
        f"| preset | fwd GMACs/clip | train GFLOPs/clip | pre-train TFLOPs | x {ref or '-'} | "
        "pre-train loss | fine-tuned top-1 | probe top-1 | CPU s pre-train | CPU s fine-tune |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        scratch = s["preset"] == SCRATCH
        lines.append(
            "| "
            + " | ".join(
                [
                    s["preset"] + (" (random encoder in the probe)" if scratch else ""),
                    "-" if scratch else f"{s['fwd_gmacs_per_clip']:.4f}",
                    "-" if scratch else f"{s['train_gflops_per_clip']:.4f}",
                    "0" if scratch else f"{s['pretrain_tflops']:.3g}",
                    f"{s['compute_vs_reference']:.2f}" if s["compute_vs_reference"] else "-",
                    _fmt(s["pretrain_loss"], 4),
                    _fmt(s["finetune_top1"]),
                    _fmt(s["probe_top1"]),
                    _fmt(s["pretrain_cpu_s"], 0),
                    _fmt(s["finetune_cpu_s"], 0),
                ]
            )
            + " |"
        )
    lines += ["", "## Verdicts (computed from the table)", ""]
    lines += [f"- {v}" for v in verdicts(summary)] or ["- (not enough finished runs)"]
    lines += [
        "",
        f"Command: `{command or 'python launchers/study.py'}`; report written at commit {git_commit()}; "
        f"{json.dumps(host())}; {json.dumps(versions())}.",
        "",
    ]
    with open(paths[2], "w") as f:
        f.write("\n".join(lines))
    results = [_read_json(result_path(j)) for j in jobs if j.kind == "finetune" and job_record(j)]
    classes = next((len(r["per_class_acc"]) for r in results if r and r.get("per_class_acc")), 0)
    _plot(summary, rows, paths[3], 1 / classes if classes else None)
    picture = os.path.join(out_dir, "reconstruction.png")
    if reconstruction_picture(study, jobs, picture):
        paths.append(picture)
    return paths


def prepare_data(jobs: list[Job]) -> None:
    """Generate the bundled dataset (if a run uses it) once, before runs start side by side."""
    from mats_scale.data.loader import resolve_items

    seen = set()
    for job in jobs:
        d = job.cfg.data
        key = (d.dataset, d.root, d.train_list, d.val_list)
        if key not in seen and d.dataset != "synthetic":
            seen.add(key)
            resolve_items(job.cfg, "train")
