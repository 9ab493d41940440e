"""Scaling ablations from a checkout: ``python launchers/ablate.py --grid FILE|NAME`` and
``python launchers/ablate.py report RESULTS.jsonl``.

A thin wrapper of :mod:`mats_scale.launch.ablate` (its docstring describes both commands). The sweep
launches each real point itself (torchrun / deepspeed / python per the grid), so run this with plain
``python``, not under a launcher.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mats_scale.launch.ablate import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
