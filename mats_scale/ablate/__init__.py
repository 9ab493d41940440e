"""Scaling ablations in one command (``launchers/ablate.py``, ``python -m mats_scale.launch.ablate``).

    grid    the grid file: base overrides x axes over config keys, run settings, profiler-only rules
    sweep   runs each point (a short training run under its launcher, or the profilers only) and
            appends one JSON record per point to ``results.jsonl``; resumable
    report  Markdown tables and PNG plots from a results file alone

Shipped grids live in ``mats_scale/configs/ablations/`` (``--grid mask_ratio`` names one).
"""
