"""DeepSpeed JSON: a template (shipped in ``ds_configs/``, or the user's) whose batch,
clipping, precision and ZeRO fields are filled from the typed config (STYLE.md 8: a batch size lives in one
place).

A template marks derived fields ``"auto"`` or leaves them out. A template value that contradicts the
typed config is a :class:`ConfigError` naming both, never a silent override; ``optimizer`` and
``scheduler`` sections are refused because AdamW and the lr schedule come from ``optim.*``.
Precision: bf16 runs use DeepSpeed's ``torch_autocast`` (fp32 master parameters, bf16 compute and
bf16 parameter all-gathers), so pixel targets are computed from the fp32 clip; DeepSpeed's own
``bf16`` mode (which casts the module and its inputs) must stay disabled.

The resolved JSON is then read by DeepSpeed's own ``DeepSpeedConfig`` (:func:`check_with_deepspeed`),
before any process group or model exists: an unknown key, at the top level or inside a section, is
one :class:`ConfigError` naming it and the nearest key DeepSpeed knows there.
"""

from __future__ import annotations

import collections.abc
import copy
import difflib
import json
import os
import typing
from typing import Any

from mats_scale.config import Config, ConfigError
from mats_scale.optim import total_batch
from mats_scale.resources import ds_template

AUTO = "auto"


def template_path(cfg: Config) -> str:
    if cfg.parallel.ds_config:
        return cfg.parallel.ds_config
    name = "zero3_offload.json" if cfg.parallel.offload_optimizer else f"zero{cfg.parallel.zero_stage}.json"
    return ds_template(name)


def load_template(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"parallel.ds_config={path!r}: no such file")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"parallel.ds_config={path!r}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"parallel.ds_config={path!r}: must hold a JSON object")
    return data


def derived_fields(cfg: Config, world_size: int, *, bf16: bool, cuda: bool) -> dict[str, tuple[Any, str]]:
    """Dotted DeepSpeed key -> (value, where it comes from in the typed config)."""
    b, acc = cfg.data.batch_size, cfg.optim.grad_accum
    fields: dict[str, tuple[Any, str]] = {
        "train_batch_size": (
            total_batch(b, world_size, acc),
            f"data.batch_size={b} x {world_size} processes x optim.grad_accum={acc}",
        ),
        "train_micro_batch_size_per_gpu": (b, f"data.batch_size={b}"),
        "gradient_accumulation_steps": (acc, f"optim.grad_accum={acc}"),
        "gradient_clipping": (float(cfg.optim.clip_grad or 0.0), f"optim.clip_grad={cfg.optim.clip_grad}"),
        "zero_optimization.stage": (
            cfg.parallel.zero_stage,
            f"parallel.zero_stage={cfg.parallel.zero_stage}",
        ),
        "torch_autocast.enabled": (
            bf16,
            f"train.precision={cfg.train.precision} on {'cuda' if cuda else 'cpu'}",
        ),
        "torch_autocast.dtype": ("bfloat16", "bf16 autocast (the only reduced precision mats-scale uses)"),
        "bf16.enabled": (
            False,
            "train.precision: bf16 runs through torch_autocast, not DeepSpeed's bf16 mode",
        ),
        "fp16.enabled": (False, "train.precision (fp16 is not supported)"),
    }
    if cfg.parallel.offload_optimizer:
        fields["zero_optimization.offload_optimizer.device"] = ("cpu", "parallel.offload_optimizer=true")
        fields["zero_optimization.offload_optimizer.pin_memory"] = (cuda, "pinned host memory only with CUDA")
        # DeepSpeedCPUAdam on GPUs; on a CPU-only machine the states already live in host memory and a
        # client torch AdamW avoids building the cpu_adam extension.
        fields["zero_force_ds_cpu_optimizer"] = (cuda, "DeepSpeedCPUAdam only with CUDA")
    return fields


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[leaf] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def resolve_ds_config(cfg: Config, world_size: int, *, bf16: bool, cuda: bool) -> tuple[dict, str]:
    """The template for `cfg` with every derived field filled; returns (config, template path)."""
    path = template_path(cfg)
    ds = load_template(path)
    for section, source in (
        ("optimizer", "optim.* (client AdamW from mats_scale/optim.py)"),
        ("scheduler", "optim.* (per-step warm-up + cosine from mats_scale/optim.py)"),
    ):
        if section in ds:
            raise ConfigError(f"{path}: '{section}' must not be set; it comes from {source}")
    offload = _get(ds, "zero_optimization.offload_optimizer.device")
    if not cfg.parallel.offload_optimizer and offload not in (None, "none"):
        raise ConfigError(
            f"{path}: zero_optimization.offload_optimizer.device={offload!r} contradicts "
            "the typed config (parallel.offload_optimizer=false)"
        )
    for key, (value, source) in derived_fields(cfg, world_size, bf16=bf16, cuda=cuda).items():
        current = _get(ds, key)
        if current is not None and current != AUTO and not _same(current, value):
            raise ConfigError(
                f"{path}: {key}={current!r} contradicts the typed config "
                f'({source} gives {value!r}); remove it or write "auto"'
            )
        _set(ds, key, value)
    leftover = _auto_keys(ds)
    if leftover:
        raise ConfigError(
            f'{path}: {", ".join(leftover)}="auto" is not a field mats-scale derives; set a value'
        )
    check_with_deepspeed(ds, path)
    return ds, path


class _ReadKeys(dict):
    """A dict that records which keys are looked up: the top-level keys DeepSpeedConfig knows are the
    ones it reads (it ignores the others silently)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read: set = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def keys(self):  # `KEY in d.keys()` is DeepSpeed's other way of asking
        return collections.abc.KeysView(self)


def _nearest(key: str, known) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _model_keys(model: type, loc: tuple) -> set:
    """Field names and aliases of the pydantic model reached from `model` along `loc` (section path)."""
    import pydantic

    for part in loc:
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None
        )
        if field is None:
            return set()
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, pydantic.BaseModel)), None
        )
        if model is None:
            return set()
    return {*model.model_fields, *(f.alias for f in model.model_fields.values() if f.alias)}


def _pydantic_model(name: str):
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo = [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo += cls.__subclasses__()
    return None


def _section_of(ds: dict, loc: tuple) -> str:
    """The top-level section whose dict holds the path `loc` (pydantic reports paths within a section)."""
    for key, value in ds.items():
        node = value
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and loc[-1] in node:
            return key + "."
    return ""


def check_with_deepspeed(ds: dict, path: str) -> None:
    """Let DeepSpeed's own config classes read the resolved config; unknown keys and values DeepSpeed
    refuses become one ConfigError line (the key, and the nearest valid key)."""
    import pydantic
    from deepspeed import comm as ds_comm
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeedConfig checks the batch fields against the world size it sees: 1 before the process group
    # exists (the launcher's preflight), the group's size inside a running job. Check that view (the batch
    # fields are derived from the typed config, already checked against the launch's world size).
    try:
        world = ds_comm.get_world_size()
    except (RuntimeError, AssertionError, AttributeError):
        world = 1
    probe = _ReadKeys(copy.deepcopy(ds))
    probe["train_batch_size"] = (
        ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    )
    try:
        DeepSpeedConfig(probe)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        loc = tuple(str(p) for p in err["loc"])
        where = _section_of(ds, loc) + ".".join(loc)
        if err["type"] == "extra_forbidden":
            model = _pydantic_model(e.title)
            known = _model_keys(model, loc[:-1]) if model is not None else set()
            raise ConfigError(f"{path}: {where}: not a DeepSpeed key{_nearest(loc[-1], known)}") from None
        raise ConfigError(f"{path}: {where}={err.get('input')!r}: {err['msg']}") from None
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else repr(e)
        raise ConfigError(f"{path}: DeepSpeed refuses the config: {first}") from None
    unknown = sorted(set(ds) - probe.read)
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: not a DeepSpeed key{_nearest(unknown[0], probe.read)}")


def _auto_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out += _auto_keys(v, key + ".")
        elif v == AUTO:
            out.append(key)
    return out


def write_json(ds: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(ds, f, indent=2, sort_keys=True)
        f.write("\n")
