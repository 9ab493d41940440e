"""Fine-tuning (and evaluation) of a video classifier with MATS token selection.

    deepspeed [--num_gpus N] launchers/finetune.py [--config FILE|NAME] [--eval|--probe] [key=value ...]
    torchrun --nproc_per_node N launchers/finetune.py [--config FILE|NAME] [--eval|--probe] [key=value ...]
    python launchers/finetune.py [--config FILE|NAME] [--eval|--probe] [key=value ...]     # one process

Installed: ``mats-finetune ...``, ``deepspeed --module mats_scale.launch.finetune ...``. Without --config
the shipped ``finetune_default`` job runs (the bundled dataset, from scratch unless ``finetune.init``
names a pre-training run, e.g. ``finetune.init=runs/default``). Training runs on the generic Trainer
(every engine, exact resume, TensorBoard) and ends with the multi-view evaluation of the val split.
``--eval`` (= ``finetune.eval_only=true``) only evaluates ``finetune.init``: a fine-tuned run directory,
step_* checkpoint, exported .pt or official fine-tuned checkpoint. ``--probe`` (=
``finetune.linear_probe=true``) fits a linear probe on the frozen encoder of ``finetune.init`` (any
pre-trained or fine-tuned weights; none: a random-encoder baseline). Exit status: 0 done, 1 run error,
2 bad configuration (also a checkpoint that does not fit the model).
"""

from __future__ import annotations

import sys

FINETUNE_DEFAULT = "finetune_default"
OPTIONS = (
    ("--eval", "only evaluate finetune.init (= finetune.eval_only=true)"),
    ("--probe", "fit a linear probe on the frozen encoder of finetune.init (= finetune.linear_probe=true)"),
    ("", "  with either, the results go next to finetune.init (a run: RUN/eval; NAME.pt: NAME/eval)"),
    ("", "  unless train.out_dir=DIR is given on the command line"),
)


def main(argv: list[str] | None = None) -> int:
    from mats_scale.cli import load_or_exit, prog_name
    from mats_scale.config import ConfigError
    from mats_scale.launch import run_job
    from mats_scale.resources import config_path

    argv = list(sys.argv[1:] if argv is None else argv)
    for flag, key in (("--eval", "finetune.eval_only"), ("--probe", "finetune.linear_probe")):
        if flag in argv:
            argv = [a for a in argv if a != flag] + [f"{key}=true"]
    prog = prog_name("mats_scale.launch.finetune")
    cfg = load_or_exit(
        argv, prog=prog, description=__doc__, default_config=config_path(FINETUNE_DEFAULT), options=OPTIONS
    )
    if not (cfg.finetune.eval_only or cfg.finetune.linear_probe):
        return run_job("finetune", argv, prog=prog, description=__doc__, default_config=FINETUNE_DEFAULT)

    from mats_scale.data.errors import DataError
    from mats_scale.parallel.distributed import LaunchError, shutdown
    from mats_scale.train.finetune import evaluate_only

    explicit_out = any(a.startswith("train.out_dir=") for a in argv)
    try:
        evaluate_only(cfg, cfg.train.out_dir if explicit_out else None)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    except (LaunchError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
