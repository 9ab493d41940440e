"""Scaling ablations in one command: run a grid of short training runs and profiler-only points.

    python launchers/ablate.py --grid FILE|NAME [--out DIR] [--repeats N] [--retry-failed] [--append]
                               [--dry-run]
    python launchers/ablate.py report RESULTS.jsonl [--out DIR]

``--grid mask_ratio`` names a shipped grid (``mats_scale/configs/ablations/``); see
:mod:`mats_scale.experiments.grid` for the file format. Results go to ``DIR/results.jsonl`` (default
``runs/ablate/<grid name>``), one JSON record per point; re-running the same grid at the same commit
skips finished points. A DIR whose results were made at another commit or with another configuration
of the points is refused before anything runs (choose a new --out, or --append to add labelled rows).
``report`` writes ``<name>_report.md`` and PNG plots next to the results. Installed: ``mats-ablate``.
Exit status: 0 done (failed points are recorded, not fatal), 2 bad grid or arguments, or results
that a sweep would mix with.
"""

from __future__ import annotations

import os
import signal
import sys

from mats_scale.cli import command_parser, out_dir_problem, run
from mats_scale.errors import ConfigError
from mats_scale.resources import GRID_DIR, require_config


def grid_path(value: str) -> str:
    """A grid file as given, else a shipped grid of that name (ConfigError listing them otherwise)."""
    return require_config(value, GRID_DIR, "--grid")


def _report(argv: list[str]) -> int:
    p = command_parser(
        "mats_scale.launch.ablate", "Markdown tables and PNG plots of a sweep.", suffix=" report"
    )
    p.add_argument("results", help="a sweep's results.jsonl")
    p.add_argument("--out", default=None, help="output folder (default: next to the results)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.results):
        print(f"error: {args.results}: no such results file", file=sys.stderr)
        return 2
    out = args.out or os.path.dirname(os.path.abspath(args.results))
    if problem := out_dir_problem(out):
        where = f"--out {out}" if args.out else f"{out} (the results' folder; pass --out DIR)"
        print(f"error: {where}: {problem}; the report is written into a folder", file=sys.stderr)
        return 2
    from mats_scale.experiments.report import render

    try:
        for path in render(args.results, args.out):
            print(path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        return _report(argv[1:])
    p = command_parser(
        "mats_scale.launch.ablate",
        __doc__,
        summary=True,
        epilog="'ablate.py report RESULTS.jsonl' renders a finished sweep.",
    )
    p.add_argument("--grid", required=True, help="grid YAML file or a shipped grid name")
    p.add_argument("--out", default=None, help="results folder (default runs/ablate/<grid name>)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs per real point (default: the grid's run.repeats, else 3): clips/s median and min-max",
    )
    p.add_argument("--retry-failed", action="store_true", help="re-run points recorded as failed")
    p.add_argument(
        "--append",
        action="store_true",
        help="add rows to results made at another commit or config (labelled; report: newest per point)",
    )
    p.add_argument("--dry-run", action="store_true", help="list the points and exit")
    args = p.parse_args(argv)
    from mats_scale.experiments.grid import load_grid

    if args.repeats is not None and args.repeats < 1:
        print(
            f"error: --repeats {args.repeats}: must be a whole number >= 1 (runs per point)", file=sys.stderr
        )
        return 2
    try:
        grid = load_grid(grid_path(args.grid))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for pt in grid.points if args.repeats is not None else ():
        pt.run["repeats"] = args.repeats
    out = args.out or os.path.join("runs", "ablate", grid.name)
    if args.dry_run:
        for i, pt in enumerate(grid.points, 1):
            print(
                f"[{i}/{len(grid.points)}] {pt.label}: measure {','.join(pt.measure)}; "
                f"{pt.run['launcher']} x {pt.run['nproc']}"
                + (f", {pt.run['repeats']} runs" if "train" in pt.measure else "")
                + f"; {' '.join(pt.overrides)}"
            )
        return 0
    if problem := out_dir_problem(out):
        print(
            f"error: --out {out}: {problem}; it is the folder the results are written into", file=sys.stderr
        )
        return 2
    from mats_scale.experiments.sweep import SweepConflict, sweep

    def interrupted(signum, frame):
        raise KeyboardInterrupt  # unwinds through the running point, which kills its process group

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        results = sweep(
            grid, out, retry_failed=args.retry_failed, append=args.append, echo=lambda s: print(s, flush=True)
        )
    except SweepConflict as e:  # results made at another commit / with another config: nothing ran
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; finished points are in {out}/results.jsonl (re-run to go on)", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() may run inside a caller's process
    print(f"results: {results}\nreport:  python launchers/ablate.py report {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
