"""Video MAE pre-training: the project's main job.

    deepspeed [--num_gpus N] launchers/pretrain.py [--config FILE] [key=value ...]
    torchrun --nproc_per_node N launchers/pretrain.py [--config FILE] [key=value ...]
    python launchers/pretrain.py [--config FILE] [key=value ...]          # one process
    deepspeed --hostfile HOSTFILE launchers/pretrain.py ...                # several nodes

Without --config the bundled default (configs/default.yaml) runs. The engine is chosen by
``parallel.backend`` (deepspeed with ``parallel.zero_stage``, fsdp2, or none); ``train.resume=auto``
(the default) continues from the newest checkpoint in ``train.out_dir``. Exit status: 0 done (also
after a SIGTERM/SIGINT that saved a checkpoint), 1 run error, 2 bad configuration.
"""

from __future__ import annotations

import os
import sys

from mats_scale.config import load_config_or_exit, parse_args

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.yaml")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    path, _ = parse_args(argv)
    if path is None:
        argv = ["--config", os.path.normpath(DEFAULT_CONFIG), *argv]
    cfg = load_config_or_exit(argv)

    from mats_scale.train.preflight import preflight_or_exit

    preflight_or_exit(cfg)  # DeepSpeed config, run directory, launch layout: before the heavy imports
    from mats_scale.train.loop import run  # heavy imports only after the config is known to be valid

    return run(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
