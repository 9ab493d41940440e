"""Export a consolidated fp32 weights file from a training checkpoint (ZeRO 1-3 shards, DCP shards,
or a single-process checkpoint), on one CPU process without a process group.

    python -m mats_scale.train.export RUN_DIR_OR_CHECKPOINT OUT.pt [--layout videomae]

RUN_DIR_OR_CHECKPOINT is a ``step_*`` checkpoint directory or a run directory (its newest
checkpoint). The checkpoint is verified against its manifest first; a damaged one is refused in one
line (exit 1), naming the newest one that verifies. DeepSpeed shards go through DeepSpeed's own
``zero_to_fp32``; FSDP2 shards through DCP's ``dcp_to_torch_save`` (the engine registry picks the
reader from the checkpoint's metadata). OUT.pt holds a plain state dict, checked to load (strict) into
the model the run's task builds from the run's config: ``model.load_state_dict(torch.load("OUT.pt"))``.
``--layout videomae`` writes the encoder in VideoMAE's fine-tuning key layout instead
(``{"module": {"patch_embed...", "blocks.N..."}}``), which VideoMAE's / VideoMAE V2's
``run_class_finetuning.py --finetune OUT.pt`` loads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from mats_scale.config import load_config_text
from mats_scale.safe_load import UnsafeFileError, torch_load
from mats_scale.train.checkpoint import (
    CheckpointError,
    newest_verified,
    read_meta,
    step_dirs,
    verify_checkpoint,
)


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
    task = task_class(meta["task"])(load_config_text(meta["config"]))
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="step_* checkpoint directory or run directory")
    parser.add_argument("out", help="output .pt file (a plain fp32 state dict)")
    parser.add_argument(
        "--layout",
        choices=["mats", "videomae"],
        default="mats",
        help="mats: this project's state dict; videomae: the encoder (and a classifier's "
        "fc_norm/head) under 'module' with VideoMAE's fine-tuning key names",
    )
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.out, args.layout)
    except (OSError, KeyError, RuntimeError, ValueError) as e:  # CheckpointError is a RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
