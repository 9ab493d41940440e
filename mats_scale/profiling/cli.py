"""Shared argument parsing of the profiling CLIs (profiling/*.py): lists, validation, one-line errors.

Only user errors become one ``error:`` line and exit status 2: argparse's own (exit 2 with usage; one
line with :class:`ArgumentParser`), a :class:`UsageError` raised by a CLI's checks of its arguments (an
``--out`` folder that cannot be written is one, checked before the work), and a :class:`ConfigError` of
the project config. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence

from mats_scale.cli import out_dir_problem
from mats_scale.config import ConfigError
from mats_scale.models.sizes import SIZES
from mats_scale.profiling.workload import CHECKPOINT_POLICIES, DTYPES, STRATEGIES, parse_policy

DEFAULT_SIZES = "S,B,L,H,g"
DEFAULT_RATIOS = "0.75,0.8,0.85,0.9,0.95"
DEFAULT_STRATEGIES = "tube+rc,mats,mats+dual"


class UsageError(ValueError):
    """A bad command-line argument of a profiling CLI (one line naming the option and what is allowed)."""


def _items(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def choices_list(allowed: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = _items(text)
        bad = [s for s in items if s not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{what} {text!r}: allowed: {', '.join(allowed)} (comma-separated)"
            )
        return items

    return parse


def ratio_list(text: str) -> list[float]:
    try:
        values = [float(s) for s in _items(text)]
    except ValueError:
        values = []
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(
            f"ratios {text!r}: comma-separated numbers in the open interval (0, 1)"
        )
    return values


def policy_list(text: str) -> dict[str, tuple[int, int]]:
    out = {}
    for item in text.split(";") if ";" in text else _items(text):
        try:
            out[item] = parse_policy(item)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    if not out:
        raise argparse.ArgumentTypeError(f"checkpointing {text!r}: allowed: {', '.join(CHECKPOINT_POLICIES)}")
    return out


def bounded(
    kind: Callable[[str], float], low: float, *, low_ok: bool = False, high: float | None = None
) -> Callable[[str], float]:
    """An argparse type: a finite number of `kind` above `low` (or equal with low_ok), below `high`."""
    rule = f"{'>=' if low_ok else '>'} {low:g}"
    if high is not None:
        rule = f"in {'[' if low_ok else '('}{low:g}, {high:g})"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        finite = value is not None and not (isinstance(value, float) and not math.isfinite(value))
        ok = finite and (value >= low if low_ok else value > low)
        if not ok or (high is not None and value >= high):
            noun = "a whole number" if kind is int else "a number" if high is not None else "a finite number"
            raise argparse.ArgumentTypeError(f"{text!r}: must be {noun} {rule}")
        return value

    return parse


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    return bounded(kind, 0)


def check_out_dir(path: str, option: str = "--out") -> None:
    """UsageError unless files can be written into the folder `path` (made when missing): before the
    work, not after it."""
    if problem := out_dir_problem(path):
        raise UsageError(f"{option}={path!r}: {problem}; {option} is the folder the results are written into")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one ``error:`` line (a UsageError for :func:`run`), not the usage block."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def add_sweep_args(parser: argparse.ArgumentParser, *, sizes: bool = True) -> None:
    if sizes:
        parser.add_argument(
            "--sizes",
            type=choices_list(list(SIZES), "sizes"),
            default=_items(DEFAULT_SIZES),
            help=f"model sizes (default {DEFAULT_SIZES})",
        )
    parser.add_argument(
        "--ratios",
        type=ratio_list,
        default=ratio_list(DEFAULT_RATIOS),
        help=f"encoder mask ratios rho (default {DEFAULT_RATIOS})",
    )
    parser.add_argument(
        "--strategies",
        type=choices_list(list(STRATEGIES), "strategies"),
        default=_items(DEFAULT_STRATEGIES),
        help=f"presets: {', '.join(STRATEGIES)} (default {DEFAULT_STRATEGIES})",
    )
    parser.add_argument(
        "--decoder-ratio", type=float, default=0.5, help="running-cell ratio rho_d (default 0.5)"
    )
    parser.add_argument("--keep-ratio", type=float, default=0.3, help="MATS rho_pre (default 0.3)")
    parser.add_argument("--num-frames", type=positive(int), default=16, help="frames per clip (default 16)")
    parser.add_argument("--img-size", type=positive(int), default=224, help="input resolution (default 224)")
    parser.add_argument("--out", default="profiling/out", help="output folder (default profiling/out)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def dtype_arg(text: str):
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype {text!r}: allowed: {', '.join(DTYPES)}")
    return DTYPES[text]


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI main; a bad argument or config value becomes one ``error:`` line and exit status 2
    (other exceptions propagate with their traceback)."""
    try:
        return main(argv)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
