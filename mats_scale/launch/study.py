"""The learning study in one command: pre-train with each masking preset, fine-tune and probe each encoder
next to from-scratch fine-tuning, over several seeds; tables and a plot of accuracy against compute.

    python launchers/study.py [--study FILE|NAME] [--out DIR] [--jobs N] [--dry-run] [key=value ...]
    python launchers/study.py report [--study FILE|NAME] [--out DIR] [key=value ...]

``--study presets`` (the default) names a shipped study (``mats_scale/configs/studies/``); see
:mod:`mats_scale.experiments.study` for the file format. ``key=value`` overrides the study file, e.g.
``seeds=[0] presets=[tube,mats+dual] pretrain.train.steps=200``. Runs go to ``DIR/runs`` (default
``runs/study/<name>``); re-running the command skips finished runs and resumes an interrupted one.
At the end (and with ``report``, from whatever has finished) it writes runs.csv, summary.csv, study.md,
study.png and reconstruction.png (one clip through every preset's first-seed run) into DIR.
Installed: ``mats-study ...``. Run it with plain ``python``: it starts every run itself.
Exit status: 0 every run finished, 1 a run failed (the others went on; with ``report``: nothing has
finished yet), 2 bad study file or arguments, 130 interrupted (finished runs are kept; re-run to go on).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys

from mats_scale.cli import command_parser, run
from mats_scale.errors import ConfigError
from mats_scale.resources import STUDY_DIR, require_config


def study_path(value: str) -> str:
    """A study file as given, else a shipped study of that name (ConfigError listing them otherwise)."""
    return require_config(value, STUDY_DIR, "--study")


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    report_only = bool(argv) and argv[0] == "report"
    p = command_parser("mats_scale.launch.study", __doc__, suffix=" report" if report_only else "")
    p.add_argument(
        "--study", default="presets", help="study YAML file or a shipped study name (default presets)"
    )
    p.add_argument("--out", default=None, help="study folder (default runs/study/<name>)")
    # report takes the study's --jobs too (ignored), so a study's command line renders as it is
    p.add_argument("--jobs", type=int, default=None, help="runs at once (default: the study's 'jobs')")
    if not report_only:
        p.add_argument("--dry-run", action="store_true", help="list the runs and their commands, then exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="changes to the study file")
    args = p.parse_args(argv[1:] if report_only else argv)
    from mats_scale.experiments import study as st
    from mats_scale.experiments.study_report import write_report

    try:
        study = st.load_study(study_path(args.study), args.overrides)
        if getattr(args, "jobs", None) is not None:
            if args.jobs < 1:
                raise ConfigError(f"--jobs={args.jobs}: expected an integer >= 1")
            study.jobs = args.jobs
        out = args.out or os.path.join("runs", "study", study.name)
        jobs = st.plan(study, out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The study command the tables come from (``report`` renders the same study).
    command = shlex.join(["python", "launchers/study.py", *(argv[1:] if report_only else argv)])
    if report_only:
        if not any(st.job_record(job) for job in jobs):
            print(
                f"error: {out}: no finished run of this study yet (run it without 'report' first)",
                file=sys.stderr,
            )
            return 1
        for path in write_report(study, jobs, out, command):
            print(path)
        return 0
    if args.dry_run:
        for i, job in enumerate(jobs, 1):
            done = " (done)" if st.job_record(job) else ""
            after = f" after {', '.join(job.deps)}" if job.deps else ""
            print(f"[{i}/{len(jobs)}] {job.name}{done}{after}: {shlex.join(job.command()[1:])}")
        return 0
    os.makedirs(out, exist_ok=True)
    try:
        st.prepare_data(jobs)
    except Exception as e:  # noqa: BLE001 - a data problem is one line, before any run starts
        print(f"error: {e}", file=sys.stderr)
        return 1

    def interrupted(signum, frame):
        raise KeyboardInterrupt  # unwinds through the running runs, which are killed

    previous = signal.signal(signal.SIGTERM, interrupted)
    print(f"study {study.name}: {len(jobs)} runs, {study.jobs} at a time, into {out}", flush=True)
    try:
        status = st.run_jobs(jobs, study.jobs, echo=lambda s: print(s, flush=True))
    except KeyboardInterrupt:
        print(
            f"interrupted; finished runs are kept in {out}/runs (re-run the command to go on)",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() may run inside a caller's process
    for path in write_report(study, jobs, out, command):
        print(path)
    failed = [name for name, s in status.items() if s not in ("ok", "done")]
    if failed:
        print(f"{len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
