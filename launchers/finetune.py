"""Fine-tuning from a checkout: ``deepspeed launchers/finetune.py [--config FILE] [--eval] [key=value ...]``.

A thin wrapper of :mod:`mats_scale.launch.finetune` (its docstring lists every way to launch).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mats_scale.launch.finetune import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
