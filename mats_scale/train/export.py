"""Consolidated fp32 weights from a training checkpoint (ZeRO 1-3 or DCP shards, or one process's), on one
CPU process without a process group, and the readers of a run's verified checkpoint and weights; the
command is ``mats-export`` (:mod:`mats_scale.launch.export`; docs/distributed.md, "Export")."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from mats_scale.run.checkpoint import (
    CheckpointError,
    newest_verified,
    read_meta,
    step_dirs,
    verify_checkpoint,
)
from mats_scale.safe_load import UnsafeFileError, torch_load


def find_checkpoint(path: str) -> Path:
    """The verified checkpoint `path` names (a step_* directory, or a run directory's newest); raises
    :class:`CheckpointError` with one line when there is none or it is damaged."""
    p = Path(path)
    is_ckpt = (p / "manifest.json").is_file() or (p / "meta.json").is_file()
    if not is_ckpt:
        dirs = step_dirs(p / "checkpoints")
        if not dirs:
            raise CheckpointError(
                f"{path}: neither a checkpoint (step_* with manifest.json) nor a run "
                "directory with checkpoints/step_*"
            )
        p = dirs[0]
    problem = verify_checkpoint(p)
    if problem is not None:
        good, _ = newest_verified(p.parent)
        hint = f"; the newest one that verifies is {good}" if good is not None else ""
        raise CheckpointError(f"{p}: checkpoint is damaged: {problem}{hint}")
    return p


def export(path: str, out: str, layout: str = "mats") -> dict[str, torch.Tensor]:
    from mats_scale.models.spec import build_model
    from mats_scale.parallel.engine import consolidate_checkpoint
    from mats_scale.train.task import task_class

    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    sd = consolidate_checkpoint(meta["backend"], str(ckpt / "engine"))
    task = task_class(meta["task"]).for_checkpoint(meta["config"], meta)  # reads only the run directory
    model = build_model(task.model_spec(), "meta")
    model.load_state_dict(sd, strict=True, assign=True)  # names and shapes match the run's model
    if layout == "videomae":  # VideoMAE's fine-tuning key layout (models/load.py: export_videomae)
        from mats_scale.models.load import export_videomae

        torch.save(export_videomae(sd), out)
    else:
        torch.save(sd, out)
    print(
        f"exported {ckpt} (step {meta['step']}, {meta['engine']}, {len(sd)} tensors, "
        f"{sum(v.numel() for v in sd.values()) / 1e6:.2f}M fp32 values) -> {out}"
    )
    return sd


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The raw state dict of `path` (file or this project's run / checkpoint directory) and a label."""
    from mats_scale.models.load import InitError, unwrap

    if os.path.isdir(path):
        from mats_scale.parallel.engine import consolidate_checkpoint

        try:
            ckpt = find_checkpoint(path)  # verified against its manifest
        except (FileNotFoundError, CheckpointError) as e:
            raise InitError(f"finetune.init={path!r}: {e}") from None
        meta = read_meta(ckpt)
        try:
            sd = consolidate_checkpoint(meta["backend"], str(ckpt / "engine"))
        except UnsafeFileError as e:
            raise InitError(f"finetune.init={e}") from None
        return sd, f"{ckpt} ({meta['task']})"
    if not os.path.isfile(path):
        raise InitError(
            f"finetune.init={path!r}: no such file or directory (a .pt file, a run directory "
            "or a step_* checkpoint)"
        )
    try:
        obj = torch_load(path)  # never executes code from the file; official args are allow-listed
    except UnsafeFileError as e:
        raise InitError(f"finetune.init={e}") from None
    except OSError as e:
        raise InitError(f"finetune.init={path!r}: cannot read ({e.strerror or e})") from None
    return unwrap(obj, path), path


if __name__ == "__main__":
    sys.exit("the command is mats-export (python -m mats_scale.launch.export)")
