"""The learning study: pre-train with each masking preset, fine-tune and linear-probe every encoder, next to
from-scratch fine-tuning, over several seeds; accuracy against measured pre-training compute.

A study file (OmegaConf YAML, shipped ones in ``mats_scale/configs/studies/``)::

    name: presets
    presets: [tube, tube+rc, mats, mats+dual]   # masking presets (mats_scale.tokens.PRESETS)
    variants:           # optional: a preset plus pre-training overrides, under a label of its own
      mats+dual+ctx: {preset: mats+dual, masking: {context_ratio: 0.25}}
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

Runs are started by :mod:`mats_scale.experiments.runner`, side by side in dependency order; the tables,
plots and verdicts are :mod:`mats_scale.experiments.study_report`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from mats_scale.config import Config
from mats_scale.errors import ConfigError
from mats_scale.experiments.grid import _flat, _value, load_mapping
from mats_scale.experiments.runner import Process, child_env
from mats_scale.tokens import PRESETS

STUDY_KEYS = (
    "name",
    "presets",
    "variants",
    "seeds",
    "scratch",
    "probe",
    "jobs",
    "common",
    "pretrain",
    "finetune",
)
KINDS = ("pretrain", "finetune", "probe")
SCRATCH = "scratch"  # the preset label of the from-scratch baseline (a random encoder in the probe)
MODULES = {"pretrain": "mats_scale.launch.pretrain", "finetune": "mats_scale.launch.finetune"}


@dataclass
class Stage:
    """A base config and its overrides (dotted key -> value)."""

    config: str
    overrides: dict[str, Any]


@dataclass
class Variant:
    """A masking preset plus config overrides of its pre-training runs (dotted key -> value)."""

    preset: str
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
    variants: dict[str, Variant] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """The pre-trained methods in table order: the presets, then the variants."""
        return [*self.presets, *self.variants]


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
    variants = _variants(spec.get("variants") or {}, presets)
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
        variants=variants,
    )


def _variants(raw: Any, presets: list[str]) -> dict[str, Variant]:
    """``variants: {label: {preset: P, <config overrides>}}`` checked; raises ConfigError naming it."""
    if not isinstance(raw, dict):
        raise ConfigError(f"variants={raw!r}: expected a mapping label -> {{preset: P, <overrides>}}")
    out = {}
    for label, body in raw.items():
        if not isinstance(body, dict) or body.get("preset") not in PRESETS:
            raise ConfigError(
                f"variants.{label}: expected a mapping with a 'preset' (one of {', '.join(PRESETS)}) and "
                "config overrides of its pre-training runs"
            )
        if label in PRESETS or label in presets or label == SCRATCH:
            raise ConfigError(
                f"variants.{label}: the label is a preset's (or {SCRATCH}); give it another name"
            )
        out[str(label)] = Variant(body["preset"], _flat({k: v for k, v in body.items() if k != "preset"}))
    return out


# ---- the plan -----------------------------------------------------------------------------------


def dotlist(values: dict[str, Any]) -> list[str]:
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
        job.overrides = dotlist(values)
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
    for label in study.labels:
        variant = study.variants.get(label, Variant(label, {}))
        masking = {f"masking.{k}": v for k, v in PRESETS[variant.preset].items()}
        for seed in study.seeds:
            values = {**study.common, **pre.overrides, **masking, **variant.overrides, "train.seed": seed}
            pretrained[label, seed] = add("pretrain", label, seed, pre.config, values, None)
    tail = [(p, s, pretrained[p, s]) for p in study.labels for s in study.seeds]
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
    running: list[tuple[Job, Process]] = []
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
                    log = os.path.join(job.run_dir, "study.log")
                    started += 1
                    running.append((job, Process(job.command(), log, child_env(at_once))))
                    echo(f"[{started}/{todo}] {job.name}: started")
            for job, process in list(running):
                ended = process.poll()
                if ended is None:
                    continue
                running.remove((job, process))
                (rc, cpu_s), wall = ended, process.wall_s
                if rc == 0 and os.path.exists(result_path(job)):
                    record = {
                        "status": "ok",
                        "wall_s": wall,
                        "cpu_s": cpu_s,
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
    except BaseException:  # interrupted: kill the runs at once, so that none saves and looks done
        for _, process in running:
            process.stop()
        raise
    return status


def prepare_data(jobs: list[Job]) -> None:
    """Generate the bundled dataset (if a run uses it) once, before runs start side by side."""
    from mats_scale.data.sources import resolve_items

    seen = set()
    for job in jobs:
        d = job.cfg.data
        key = (d.dataset, d.bundled, d.root, d.train_list, d.val_list)
        if key not in seen and d.dataset != "synthetic":
            seen.add(key)
            resolve_items(job.cfg, "train")
