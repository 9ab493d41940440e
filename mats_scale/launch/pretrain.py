"""Video MAE pre-training: the project's main job.

    deepspeed [--num_gpus N] launchers/pretrain.py [--config FILE|NAME] [key=value ...]
    torchrun --nproc_per_node N launchers/pretrain.py [--config FILE|NAME] [key=value ...]
    python launchers/pretrain.py [--config FILE|NAME] [key=value ...]          # one process
    deepspeed --hostfile HOSTFILE launchers/pretrain.py ...                     # several nodes
    srun python launchers/pretrain.py ...                                       # Slurm (scripts/*.sbatch)
    python launchers/pretrain.py --print-config [--config FILE] [key=value ...]  # resolved config

Installed (no checkout): ``mats-pretrain ...``, ``deepspeed --module mats_scale.launch.pretrain ...``,
``torchrun -m mats_scale.launch.pretrain ...``. Without --config the shipped default job
(``mats_scale/configs/default.yaml``) runs; ``--config k400_vit_b_mats_dual`` names another shipped
config. The engine is chosen by ``parallel.backend`` (deepspeed with ``parallel.zero_stage``, fsdp2, or
none); ``train.resume=auto`` (the default) continues from the newest checkpoint in ``train.out_dir``.
Exit status: 0 done (also after a SIGTERM/SIGINT that saved a checkpoint), 1 run error, 2 bad
configuration.
"""

from __future__ import annotations

from mats_scale.cli import prog_name
from mats_scale.launch import run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("pretrain", argv, prog=prog_name("mats_scale.launch.pretrain"), description=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
