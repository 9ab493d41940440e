"""The launchers' command line: ``[-h] [--config FILE] [--print-config] [key=value ...]``.

``--help`` lists every config key with its default and docstring, grouped by section (generated from
:mod:`mats_scale.config`); ``--print-config`` prints the resolved config (defaults <- FILE <-
overrides) as YAML and exits. Every mistake (an unknown option, ``--config`` without a value, an
unknown key, a bad value) is one ``config error:`` line on stderr and exit status 2, with the nearest
keys when a name is close to one; no traceback. DeepSpeed's ``--local_rank=N`` is accepted and
ignored. Torch-free: nothing heavy is imported before the config is known to be valid.

The other commands (the profilers, the experiments, the tools) share the rest: :func:`out_dir_problem`,
argparse types with one-line messages (:func:`choices_list`, :func:`ratio_list`, :func:`policy_list`,
:func:`bounded`, :func:`positive`, :func:`dtype_arg`), the profilers' sweep options
(:func:`add_sweep_args`) and :func:`run`, which turns a :class:`UsageError` or :class:`ConfigError` into
one ``error:`` line and exit status 2 (any other exception is a bug and keeps its traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import NamedTuple

from mats_scale.config import Config, ConfigError, load_config
from mats_scale.config_help import VIDEOMAE_FLAGS, keys_help, suggest

USAGE = "[-h] [--config FILE] [--print-config] [key=value ...]"


class Args(NamedTuple):
    config: str | None
    overrides: list[str]
    help: bool
    print_config: bool


def parse(argv: Sequence[str]) -> Args:
    """Split the command line; raises :class:`ConfigError` (one line) on anything else."""
    path, overrides, want_help, want_print = None, [], False, False
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            want_help = True
        elif arg == "--print-config":
            want_print = True
        elif arg == "--config":
            if i + 1 >= len(args) or args[i + 1].startswith("-") or "=" in args[i + 1]:
                raise ConfigError(
                    "--config: expects a YAML file path or a shipped config name, "
                    "e.g. --config my.yaml or --config default"
                )
            path = args[i + 1]
            i += 1
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
            if not path:
                raise ConfigError(
                    "--config: expects a YAML file path or a shipped config name, "
                    "e.g. --config my.yaml or --config default"
                )
        elif arg.startswith(("--local_rank", "--local-rank")):
            if "=" not in arg:
                i += 1  # the value follows as its own argument
        elif arg.startswith("-"):
            raise ConfigError(_unknown_option(arg))
        else:
            overrides.append(arg)
        i += 1
    return Args(path, overrides, want_help, want_print)


def _unknown_option(arg: str) -> str:
    name = arg.split("=", 1)[0]
    near = suggest(name.lstrip("-"), Config)
    hint = (
        f"; settings are key=value overrides: did you mean {near[0]}=...?"
        if near
        else "; settings are key=value overrides (see --help for every key)"
    )
    what = " (a VideoMAE flag)" if name.lstrip("-").replace("-", "_") in VIDEOMAE_FLAGS else ""
    return f"{name}: unknown option{what}; usage: {USAGE}{hint}"


def prog_name(module: str, argv0: str | None = None) -> str:
    """How this command was started, for its usage line: the console script (``mats-pretrain``), the
    checkout's script as typed (``launchers/pretrain.py``), or ``python -m mats_scale.launch.pretrain``.
    `module` is the command's module (``mats_scale.launch.pretrain``)."""
    argv0 = (sys.argv[0] if sys.argv else "") if argv0 is None else argv0
    if not argv0 or argv0 in ("-c", "-m"):
        return f"python -m {module}"
    if argv0.replace(os.sep, "/").endswith(module.replace(".", "/") + ".py"):
        return f"python -m {module}"  # python -m / deepspeed --module / torchrun -m
    if argv0.endswith(".py"):  # launchers/pretrain.py, relative to the working directory when under it
        rel = os.path.relpath(argv0) if os.path.isabs(argv0) else argv0
        return argv0 if rel.startswith(os.pardir) else rel
    return os.path.basename(argv0)  # a console script: mats-pretrain


def plain_doc(text: str) -> str:
    """A docstring as a terminal shows it: reST roles and inline-literal backticks removed
    (``:mod:`mats_scale.x``` -> ``mats_scale.x``)."""
    return re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text).replace("``", "")


def usage_with(options: Sequence[tuple[str, str]]) -> str:
    """:data:`USAGE` with a command's own flags before the overrides."""
    flags = " ".join(f"[{flag}]" for flag, _ in options if flag)
    return USAGE.replace(" [key=value", f" {flags} [key=value") if flags else USAGE


def print_to_stdout(text: str, end: str = "\n") -> None:
    """Print for a reader that may stop early (``--help | head``): a closed pipe ends the output
    quietly instead of a BrokenPipeError traceback."""
    try:
        print(text, end=end, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


def help_text(
    prog: str, description: str, default_config: str | None, options: Sequence[tuple[str, str]] = ()
) -> str:
    """The job commands' help; `options` are (flag, what it does) rows besides the common ones."""
    first = plain_doc(description).strip().split("\n\n")
    shown = default_config and os.path.relpath(default_config)
    if shown and shown.startswith(".."):
        shown = default_config
    default = f" (default: {shown})" if shown else ""
    return "\n".join(
        [
            f"usage: {prog} {usage_with(options)}",
            "",
            "\n\n".join(first[:2]),
            "",
            "options:",
            "  -h, --help        show this help (every config key) and exit",
            f"  --config FILE     YAML file merged over the defaults below{default}",
            "  --print-config    print the resolved config (defaults <- FILE <- key=value) as YAML and exit",
            *(f"  {flag:<16}  {what}" for flag, what in options),
            "  key=value         override one key, e.g. optim.base_lr=1e-4 masking.strategy=tube",
            "",
            "Exit status: 0 done, 1 run error, 2 bad command line or config.",
            "",
            "config keys, with the defaults of mats_scale/config.py (the --config file, or the default one,",
            "replaces some of them: --print-config shows what a run would use):",
            "",
            keys_help(Config),
            "",
        ]
    )


def load_or_exit(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "mats-pretrain",
    description: str = "",
    default_config: str | None = None,
    options: Sequence[tuple[str, str]] = (),
) -> Config:
    """The validated Config of a command line; prints help / the config and exits 0, or prints one
    ``config error:`` line and exits 2. `options`: the command's own flags for the help."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv)
        if args.help:
            print_to_stdout(help_text(prog, description, default_config, options))
            raise SystemExit(0)
        cfg = load_config(args.config or default_config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print_to_stdout(cfg.to_yaml(), end="")
        raise SystemExit(0)
    return cfg


def out_dir_problem(path: str) -> str | None:
    """Make the folder `path` (when missing) and check that a file can be written into it (a temporary
    file, gone at once): the problem as a phrase for an ``error:`` line, or None. For the results
    folder of a long job, checked before the work."""
    target = os.path.abspath(path)
    probe = target
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        if probe == target:
            return "exists and is not a folder"
        return f"{probe} is not a folder, so no folder can be made under it"
    try:
        os.makedirs(target, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as e:
        return f"cannot write there ({e.strerror or e})"
    return None


def check_data_or_exit(cfg: Config) -> None:
    """Read the list file (or scan the folder) of ``data.dataset=list|folder`` now, before the heavy
    imports and the process group, so a bad list stops the run within a second: one ``error:`` line
    naming the file and line, exit status 1 (as the run's other data errors)."""
    from mats_scale.data.errors import DataError
    from mats_scale.data.lists import read_list_file, scan_folder

    d = cfg.data
    try:
        if d.dataset == "list":
            read_list_file(d.train_list, d.root)
        elif d.dataset == "folder":
            scan_folder(d.root)
    except DataError as e:
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
        prefix = f"[rank {os.environ.get('RANK', '0')}] " if several else ""
        print(f"{prefix}error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


# ---- argparse helpers of the other commands -------------------------------------------------------

DEFAULT_SIZES = "S,B,L,H,g"
DEFAULT_RATIOS = "0.75,0.8,0.85,0.9,0.95"
DEFAULT_STRATEGIES = "tube+rc,mats,mats+dual"


class UsageError(ValueError):
    """A bad command-line argument (one line naming the option and what is allowed)."""


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
    """Activation-checkpointing policies: ``none,half,full`` or ``E,D`` pairs separated by ``;``."""
    from mats_scale.profiling.workload import CHECKPOINT_POLICIES, parse_policy

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


def dtype_arg(text: str):
    """``fp32`` / ``bf16`` / ``fp16`` -> the torch dtype (torch is imported only when parsing)."""
    from mats_scale.profiling.workload import DTYPES

    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype {text!r}: allowed: {', '.join(DTYPES)}")
    return DTYPES[text]


def check_out_dir(path: str, option: str = "--out") -> None:
    """UsageError unless files can be written into the folder `path` (made when missing): before the
    work, not after it."""
    if problem := out_dir_problem(path):
        raise UsageError(f"{option}={path!r}: {problem}; {option} is the folder the results are written into")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one ``error:`` line (a UsageError for :func:`run`), not the usage block."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def command_parser(
    module: str, doc: str, *, suffix: str = "", summary: bool = False, **kwargs
) -> ArgumentParser:
    """Every command's parser: usage named as the command was started (:func:`prog_name`, plus `suffix`
    for a sub-command such as `` report``), the docstring as a terminal shows it (its first paragraph,
    re-wrapped, with `summary`), and a bad argument as one ``error:`` line for :func:`run`."""
    text = plain_doc(doc).strip()
    if summary:
        kwargs["description"] = " ".join(text.split("\n\n")[0].split())
    else:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs["description"] = text
    return ArgumentParser(prog=prog_name(module) + suffix, **kwargs)


def add_sweep_args(parser: argparse.ArgumentParser, *, sizes: bool = True) -> None:
    """The profilers' sweep options: sizes, ratios, strategies, shapes, --out, --no-progress."""
    from mats_scale.models.sizes import SIZES
    from mats_scale.tokens import PRESETS

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
        type=choices_list(list(PRESETS), "strategies"),
        default=_items(DEFAULT_STRATEGIES),
        help=f"presets: {', '.join(PRESETS)} (default {DEFAULT_STRATEGIES})",
    )
    parser.add_argument(
        "--decoder-ratio", type=float, default=0.5, help="running-cell ratio rho_d (default 0.5)"
    )
    parser.add_argument("--keep-ratio", type=float, default=0.3, help="MATS rho_pre (default 0.3)")
    parser.add_argument("--num-frames", type=positive(int), default=16, help="frames per clip (default 16)")
    parser.add_argument("--img-size", type=positive(int), default=224, help="input resolution (default 224)")
    parser.add_argument("--out", default="profiling/out", help="output folder (default profiling/out)")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (none is drawn when stderr is not a terminal)",
    )


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a command's main; a bad argument or config value becomes one ``error:`` line and exit status
    2 (other exceptions propagate with their traceback)."""
    try:
        return main(argv)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
