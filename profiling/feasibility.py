"""``mats-plan`` from a checkout: ``python profiling/feasibility.py [options]`` (``--help`` lists them).

A thin wrapper of :mod:`mats_scale.launch.plan`, which describes the command.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mats_scale.launch.plan import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
