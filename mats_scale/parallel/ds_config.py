"""DeepSpeed JSON: a template (shipped in ``mats_scale/ds_configs/``, or the user's) whose batch, clipping, precision and ZeRO fields are
filled from the typed config (STYLE.md 8: a batch size lives in one place).

A template marks derived fields ``"auto"`` or leaves them out. A template value that contradicts the
typed config is a :class:`ConfigError` naming both, never a silent override; ``optimizer`` and
``scheduler`` sections are refused because AdamW and the lr schedule come from ``optim.*``.
Precision: bf16 runs use DeepSpeed's ``torch_autocast`` (fp32 master parameters, bf16 compute and
bf16 parameter all-gathers), so pixel targets are computed from the fp32 clip; DeepSpeed's own
``bf16`` mode (which casts the module and its inputs) must stay disabled.
"""

from __future__ import annotations

import json
import os
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
        "train_batch_size": (total_batch(b, world_size, acc),
                             f"data.batch_size={b} x {world_size} processes x optim.grad_accum={acc}"),
        "train_micro_batch_size_per_gpu": (b, f"data.batch_size={b}"),
        "gradient_accumulation_steps": (acc, f"optim.grad_accum={acc}"),
        "gradient_clipping": (float(cfg.optim.clip_grad or 0.0), f"optim.clip_grad={cfg.optim.clip_grad}"),
        "zero_optimization.stage": (cfg.parallel.zero_stage,
                                    f"parallel.zero_stage={cfg.parallel.zero_stage}"),
        "torch_autocast.enabled": (bf16,
                                   f"train.precision={cfg.train.precision} on {'cuda' if cuda else 'cpu'}"),
        "torch_autocast.dtype": ("bfloat16", "bf16 autocast (the only reduced precision mats-scale uses)"),
        "bf16.enabled": (False,
                         "train.precision: bf16 runs through torch_autocast, not DeepSpeed's bf16 mode"),
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
    for section, source in (("optimizer", "optim.* (client AdamW from mats_scale/optim.py)"),
                            ("scheduler", "optim.* (per-step warm-up + cosine from mats_scale/optim.py)")):
        if section in ds:
            raise ConfigError(f"{path}: '{section}' must not be set; it comes from {source}")
    offload = _get(ds, "zero_optimization.offload_optimizer.device")
    if not cfg.parallel.offload_optimizer and offload not in (None, "none"):
        raise ConfigError(f"{path}: zero_optimization.offload_optimizer.device={offload!r} contradicts "
                          "the typed config (parallel.offload_optimizer=false)")
    for key, (value, source) in derived_fields(cfg, world_size, bf16=bf16, cuda=cuda).items():
        current = _get(ds, key)
        if current is not None and current != AUTO and not _same(current, value):
            raise ConfigError(f"{path}: {key}={current!r} contradicts the typed config "
                              f"({source} gives {value!r}); remove it or write \"auto\"")
        _set(ds, key, value)
    leftover = _auto_keys(ds)
    if leftover:
        raise ConfigError(f"{path}: {', '.join(leftover)}=\"auto\" is not a field mats-scale derives; "
                          "set a value")
    return ds, path


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
