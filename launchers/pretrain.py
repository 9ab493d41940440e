"""Video MAE pre-training: the project's main job.

    deepspeed [--num_gpus N] launchers/pretrain.py [--config FILE] [key=value ...]
    torchrun --nproc_per_node N launchers/pretrain.py [--config FILE] [key=value ...]
    python launchers/pretrain.py [--config FILE] [key=value ...]          # one process
    srun python launchers/pretrain.py ...                                  # Slurm (scripts/*.sbatch)
    python launchers/pretrain.py --print-config [--config FILE] [key=value ...]

Without --config the bundled default (configs/default.yaml) runs. The engine is chosen by
``parallel.backend`` (deepspeed with ``parallel.zero_stage``, fsdp2, or none); ``train.resume=auto``
(the default) continues from the newest checkpoint in ``train.out_dir``. Exit status: 0 done (also
after a SIGTERM/SIGINT that saved a checkpoint), 1 run error, 2 bad configuration.
"""

from __future__ import annotations

import os

from mats_scale.cli import check_data_or_exit, load_or_exit

DEFAULT_CONFIG = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.yaml"))


def main(argv=None) -> int:
    cfg = load_or_exit(argv, prog="launchers/pretrain.py", description=__doc__, default_config=DEFAULT_CONFIG)
    check_data_or_exit(cfg)  # a bad list file fails now, not after the model is built

    from mats_scale.train.loop import run  # heavy imports only after the config is known to be valid

    return run(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
