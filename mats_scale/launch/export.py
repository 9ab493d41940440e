"""mats-export: a consolidated fp32 weights file from a training checkpoint (ZeRO 1-3 shards, DCP shards,
or a single-process checkpoint), on one CPU process without a process group.

    mats-export RUN_DIR_OR_CHECKPOINT OUT.pt [--layout videomae]

Also ``python -m mats_scale.launch.export``. RUN_DIR_OR_CHECKPOINT is a ``step_*`` checkpoint directory
or a run directory (its newest checkpoint). The checkpoint is verified against its manifest first; a
damaged one is refused in one line (exit 1), naming the newest one that verifies. DeepSpeed shards go
through DeepSpeed's own ``zero_to_fp32``; FSDP2 shards through DCP's ``dcp_to_torch_save`` (the engine
registry picks the reader from the checkpoint's metadata). OUT.pt holds a plain state dict, checked to
load (strict) into the model the run's task builds from the run's config:
``model.load_state_dict(torch.load("OUT.pt"))``. ``--layout videomae`` writes the encoder in VideoMAE's
fine-tuning key layout instead (``{"module": {"patch_embed...", "blocks.N..."}}``), which VideoMAE's /
VideoMAE V2's ``run_class_finetuning.py --finetune OUT.pt`` loads. The export itself is
:func:`mats_scale.train.export.export`.
"""

from __future__ import annotations

import sys

from mats_scale.cli import command_parser, run


def main(argv=None) -> int:
    return run(_main, argv)


def _main(argv) -> int:
    parser = command_parser("mats_scale.launch.export", __doc__, summary=True)
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
    from mats_scale.train.export import export  # torch: after the command line is known to be valid

    try:
        export(args.checkpoint, args.out, args.layout)
    except (OSError, KeyError, RuntimeError, ValueError) as e:  # CheckpointError is a RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
