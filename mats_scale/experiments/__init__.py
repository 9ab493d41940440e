"""Experiments over many runs: scaling ablations (``mats-ablate``) and the learning study (``mats-study``).

    grid          the grid file: base overrides x axes over config keys, run settings, profiler-only rules
    sweep         runs each point (short training runs under its launcher, ``run.repeats`` of them, or
                  the profilers only) and appends one JSON record per point to ``results.jsonl``;
                  resumable, and never mixing rows into results of another commit or config unasked
    report        Markdown tables and PNG plots from a sweep's results file alone
    study         the learning study: its file, the runs it plans, running them in dependency order
    study_report  the study's tables, verdicts and plots
    runner        one job in its own process group (the sweep's points, the study's runs), and the
                  provenance their results record

Shipped grids live in ``mats_scale/configs/ablations/`` (``--grid mask_ratio`` names one), shipped
studies in ``mats_scale/configs/studies/``.
"""
