"""The run directory's record of what ran (``config.yaml``, ``ds_config.json``, ``provenance.json``,
``resumes.jsonl``) and the check that a resume runs the same config (docs/distributed.md, "A changed
config on resume")."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mats_scale.config import Config, ConfigError
from mats_scale.optim import lr_at

FREE_KEYS = (
    "train.resume",
    "train.out_dir",
    "train.allow_changes",
    "train.save_every",
    "train.keep_last",
    "logging",
    "data.num_workers",
    "data.prefetch_factor",
)
"""Keys (or sections) a resume may always change: they do not change the numbers a run computes."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_dict(cfg: Config) -> dict[str, Any]:
    return flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))


def stored_config(yaml_text: str) -> dict[str, Any]:
    """The checkpoint's config, with defaults filled in for keys it predates (not re-validated)."""
    stored = OmegaConf.create(yaml_text)
    with contextlib.suppress(Exception):  # a key this version does not know: compare what is there
        stored = OmegaConf.merge(OmegaConf.structured(Config), stored)
    return flatten(OmegaConf.to_container(stored))


def _covered(key: str, names) -> bool:
    return any(key == n or key.startswith(n.rstrip("*").rstrip(".") + ".") for n in names)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (checkpoint value, this run's value)} of every key that differs, free keys left out."""
    keys = sorted(set(old) | set(new))
    return {
        k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k) and not _covered(k, FREE_KEYS)
    }


def check_resume(
    cfg: Config, checkpoint: Path, total_batch: int, task: str | None = None
) -> dict[str, tuple[Any, Any]]:
    """Refuse (:class:`ConfigError`) a resume of another task's run, or whose config differs from the
    checkpoint's in a key not allowed by ``train.allow_changes``; return the allowed changes. No file
    is written."""
    from mats_scale.config_help import config_keys, unknown_key_message

    known = {k.key for k in config_keys(Config)} | {k.section for k in config_keys(Config)}
    for name in cfg.train.allow_changes:
        if name.rstrip("*").rstrip(".") not in known:
            raise ConfigError(f"train.allow_changes: {unknown_key_message(name, Config)}")
    meta_path = checkpoint / "meta.json"
    meta = json.loads(meta_path.read_text())
    if task is not None and meta.get("task", task) != task:
        raise ConfigError(
            f"train.out_dir={cfg.train.out_dir!r} holds a {meta['task']} run ({checkpoint.name}); "
            f"a {task} run needs a train.out_dir of its own"
        )
    if "config" not in meta:
        return {}  # written before checkpoints carried their config: nothing to compare with
    changes = config_changes(stored_config(meta["config"]), config_dict(cfg))
    refused = {k: v for k, v in changes.items() if not _covered(k, cfg.train.allow_changes)}
    if refused:
        listed = ", ".join(f"{k}={new!r} (the run has {old!r})" for k, (old, new) in refused.items())
        why = ""
        if "train.steps" in refused:
            old, new = refused["train.steps"]
            step, a, b = first_lr_difference(cfg, int(old), int(new), meta["step"], total_batch)
            why = (
                f"; train.steps sets the cosine lr schedule, so the lr of step {step + 1} would go from "
                f"{a:.3e} to {b:.3e}"
            )
        raise ConfigError(
            f"cannot resume {checkpoint}: this run's config differs from the checkpoint's in {listed}{why}. "
            f"Resume with the run's settings, list the keys that may change in "
            f"train.allow_changes=[{','.join(refused)}], or choose another train.out_dir"
        )
    return changes


def first_lr_difference(
    cfg: Config, old: int, new: int, step: int, total_batch: int
) -> tuple[int, float, float]:
    """(s, lr under `old` total steps, lr under `new`) at the first step s >= `step` where they differ
    (the warm-up is the same under both), or at `step` when none does."""
    for s in range(step, min(old, new)):
        a, b = lr_at(s, old, cfg.optim, total_batch), lr_at(s, new, cfg.optim, total_batch)
        if not math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0):
            return s, a, b
    return step, lr_at(step, old, cfg.optim, total_batch), lr_at(step, new, cfg.optim, total_batch)


def lr_change_note(
    cfg: Config, changes: dict[str, tuple[Any, Any]], step: int, total_batch: int
) -> str | None:
    """The warning for an allowed train.steps change: the schedule is recomputed for the new total."""
    if "train.steps" not in changes:
        return None
    old, new = changes["train.steps"]
    s, a, b = first_lr_difference(cfg, int(old), int(new), step, total_batch)
    return (
        f"train.steps {old} -> {new} (allowed by train.allow_changes): the cosine lr schedule is "
        f"recomputed for the new total, so the lr of step {s + 1} is {b:.3e} instead of {a:.3e}"
    )


def write_run_record(
    cfg: Config,
    engine_files: dict[str, dict],
    resumed_from: Path | None,
    step: int,
    changes: dict[str, tuple[Any, Any]],
    provenance: dict[str, Any],
) -> None:
    """Fresh run: config.yaml, the engine's resolved files (ds_config.json), provenance.json.
    Resume: one line in resumes.jsonl."""
    out = Path(cfg.train.out_dir)
    if resumed_from is None:
        from mats_scale.parallel.ds_config import write_json

        (out / "config.yaml").write_text(cfg.to_yaml())
        for name, content in engine_files.items():
            write_json(content, str(out / name))
        (out / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        return
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "step": step,
        "checkpoint": str(resumed_from),
        "changes": {k: {"checkpoint": old, "now": new} for k, (old, new) in changes.items()},
        "provenance": provenance,
    }
    with open(out / "resumes.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
