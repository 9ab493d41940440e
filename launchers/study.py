"""The learning study from a checkout: ``python launchers/study.py [--study FILE|NAME] [--out DIR]``.

A thin wrapper of :mod:`mats_scale.launch.study` (its docstring describes the command). The study
starts every run itself, so run this with plain ``python``, not under a launcher.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mats_scale.launch.study import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
