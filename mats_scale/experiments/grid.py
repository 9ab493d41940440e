"""An ablation grid (OmegaConf YAML): base overrides x the cartesian product of axes over config keys.

    name: mask_ratio                 # the sweep's name (results file name)
    config: default                  # base --config (a file or a shipped config name; default: default)
    base:                            # key=value overrides every point gets (dotted keys or nested)
      model.size: S
    axes:                            # every combination of these values is one point
      masking.preset: [tube+rc, mats+dual]
      masking.ratio: [0.75, 0.9]
      run.nproc: [1, 2]              # run.* keys are run settings, not config keys (below)
    run:                             # how a real point runs (defaults shown)
      launcher: torchrun             # torchrun, deepspeed or python (one process, no launcher)
      nproc: 1
      warmup_steps: 2                # steps left out of the medians
      loss_window: 3                 # final loss = mean of the last N steps
      time_limit_s: 600              # per run
      repeats: 3                     # runs per real point: clips/s is their median, with min-max
    measure: [train, flops, memory]  # train = a real run; flops, memory, feasibility = profilers only
    points:                          # extra points after the product (e.g. an engine with no stage)
      - {parallel.backend: fsdp2}
    rules:                           # per-point changes, first match wins
      - when: {model.size: [H, g]}
        measure: [flops, memory, feasibility]
    feasibility: {node: a100-80, engine: zero3}  # the planner's node (and engine; default: the point's)

A point's overrides are the base, then its axis values; ``run.*`` values and ``measure`` may come from
an axis or a rule. A ``masking.preset`` value also sets the preset's strategy / decoder / decoder_mode
(unless the grid sets them), so presets can be swept over a base config that names a strategy.
:func:`expand` builds the points; the sweep validates each point's config (a bad one becomes a
failed point, the sweep goes on).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from mats_scale.errors import ConfigError
from mats_scale.resources import DEFAULT_CONFIG
from mats_scale.tokens import PRESETS

MEASURES = ("train", "flops", "memory", "feasibility")
LAUNCHERS = ("torchrun", "deepspeed", "python")
RUN_DEFAULTS: dict[str, Any] = {
    "launcher": "torchrun",
    "nproc": 1,
    "warmup_steps": 2,
    "loss_window": 3,
    "time_limit_s": 600,
    "repeats": 3,  # runs per real point (median and min-max of throughput); profiler-only points run none
}
GRID_KEYS = ("name", "config", "base", "axes", "points", "run", "measure", "rules", "feasibility")


@dataclass
class Point:
    """One point of a grid: what varies (axes), the full override list, run settings and measures."""

    axes: dict[str, Any]
    overrides: list[str]
    run: dict[str, Any]
    measure: list[str]
    config: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.axes.items()) or "base"


@dataclass
class Grid:
    name: str
    points: list[Point]
    feasibility: dict[str, Any]


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested or dotted mapping -> {dotted key: plain value}."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        full = f"{prefix}{key}"
        if isinstance(value, (dict, DictConfig)):
            out.update(_flat(value, full + "."))
        else:
            out[full] = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    return out


def _value(v: Any) -> str:
    """A value as the dotlist parser reads it back (None -> null, bools lower case)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _measures(value: Any, where: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    bad = [m for m in items if m not in MEASURES]
    if bad or not items:
        raise ConfigError(f"{where}: {items}: allowed: {', '.join(MEASURES)}")
    return items


def _check_run(run: dict[str, Any], where: str) -> None:
    unknown = sorted(set(run) - set(RUN_DEFAULTS))
    if unknown:
        raise ConfigError(f"{where}: unknown run key(s) {unknown}: allowed: {', '.join(RUN_DEFAULTS)}")
    if run["launcher"] not in LAUNCHERS:
        raise ConfigError(f"{where}.launcher={run['launcher']!r}: allowed: {', '.join(LAUNCHERS)}")
    for key in ("nproc", "loss_window", "time_limit_s"):
        if not isinstance(run[key], (int, float)) or run[key] < 1:
            raise ConfigError(f"{where}.{key}={run[key]!r}: must be a number >= 1")
    repeats = run["repeats"]
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"{where}.repeats={repeats!r}: must be a whole number >= 1 (runs per point)")
    if run["launcher"] == "python" and run["nproc"] != 1:
        raise ConfigError(f"{where}: launcher=python runs one process, got nproc={run['nproc']}")


def _matches(when: dict[str, Any], values: dict[str, Any]) -> bool:
    for key, allowed in when.items():
        allowed = allowed if isinstance(allowed, list) else [allowed]
        if values.get(key) not in allowed:
            return False
    return True


def load_mapping(path: str, option: str, keys: tuple[str, ...]) -> DictConfig:
    """A YAML file that must hold a mapping (a grid, a study); ConfigError naming `option` otherwise."""
    try:
        raw = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"{option}={path!r}: no such file") from None
    except Exception as e:  # noqa: BLE001 - YAML errors of any kind become one line
        raise ConfigError(f"{option}={path!r}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{option}={path!r}: expected a mapping with keys {', '.join(keys)}")
    return raw


def load_grid(path: str) -> Grid:
    """Read and expand a grid file; raises ConfigError naming the key on bad input."""
    raw = load_mapping(path, "--grid", GRID_KEYS)
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}: allowed: {', '.join(GRID_KEYS)}")
    spec = OmegaConf.to_container(raw)
    return expand(spec, default_name=path.rsplit("/", 1)[-1].removesuffix(".yaml"))


def expand(spec: dict[str, Any], default_name: str = "grid") -> Grid:
    """The cartesian product of ``spec['axes']`` over ``spec['base']``, with run settings and rules."""
    base = _flat(spec.get("base") or {})
    axes = _flat(spec.get("axes") or {})
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"axes.{key}: expected a non-empty list of values, got {values!r}")
    run_base = {**RUN_DEFAULTS, **(spec.get("run") or {})}
    measure_base = _measures(spec.get("measure", ["train", "flops", "memory"]), "measure")
    rules = spec.get("rules") or []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or not isinstance(rule.get("when"), dict):
            raise ConfigError(
                f"rules[{i}]: expected {{when: {{key: [values]}}, measure: [...], run: {{...}}}}"
            )
    keys = list(axes)
    combos = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(axes[k] for k in keys))]
    extra = spec.get("points") or []
    if not isinstance(extra, list) or not all(isinstance(p, dict) for p in extra):
        raise ConfigError("points: expected a list of mappings {key: value}")
    combos += [_flat(p) for p in extra]
    points = []
    for values in combos:
        run = dict(run_base)
        measure = list(measure_base)
        rule = next((r for r in rules if _matches(_flat(r["when"]), {**base, **values})), None)
        if rule is not None:
            measure = _measures(rule.get("measure", measure), "rules.measure")
            run.update(rule.get("run") or {})
        conf = {k: v for k, v in {**base, **values}.items() if not k.startswith("run.")}
        # A preset on a grid axis replaces the base config's masking fields (strategy, decoder, mode),
        # unless the grid sets them itself: a sweep over presets over a config that names a strategy.
        preset = conf.get("masking.preset")
        if preset in PRESETS:
            conf.update({f"masking.{k}": v for k, v in PRESETS[preset].items() if f"masking.{k}" not in conf})
        run.update({k[4:]: v for k, v in {**base, **values}.items() if k.startswith("run.")})
        _check_run(run, "run")
        points.append(
            Point(
                values,
                [f"{k}={_value(v)}" for k, v in conf.items()],
                run,
                measure,
                spec.get("config") or DEFAULT_CONFIG,
            )
        )
    return Grid(spec.get("name") or default_name, points, spec.get("feasibility") or {"node": "a100-80"})
