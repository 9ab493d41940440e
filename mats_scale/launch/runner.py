"""DeepSpeed's launcher with clean stops: Ctrl-C or SIGTERM saves a checkpoint, exits 0, prints no traceback.

    python -m mats_scale.launch.runner [deepspeed options] launchers/pretrain.py [--config FILE] [key=value ...]

takes exactly the arguments of ``deepspeed`` and runs DeepSpeed's runner in its own session, so a Ctrl-C in
the terminal reaches only this process. On one node the runner would die of it with a ``KeyboardInterrupt``
traceback (it installs no handler for local runs) and ``deepspeed.launcher.launch`` would exit 1 after
terminating the ranks. Instead, the first Ctrl-C/SIGTERM is passed as SIGTERM to the ranks themselves
(the processes ``deepspeed.launcher.launch`` started): they save after the current step and exit 0, so the
launcher and the runner exit 0 too. A second Ctrl-C stops the ranks at once (SIGINT: no save, status 130);
a third kills everything. Multi-node runs (the runner's pdsh mode handles signals itself) get the signal
forwarded to the runner. Exit status: the runner's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids of every process (from /proc)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat")
            if stat:
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                tree.setdefault(ppid, []).append(int(entry))
    return tree


def local_ranks(runner_pid: int) -> list[int]:
    """Pids of the ranks below `runner_pid`: children of a ``deepspeed.launcher.launch`` descendant."""
    tree, ranks, todo = _children(), [], [runner_pid]
    while todo:
        pid = todo.pop()
        kids = tree.get(pid, [])
        if "deepspeed.launcher.launch" in _read(f"/proc/{pid}/cmdline"):
            ranks += kids
        else:
            todo += kids
    return ranks


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    runner = subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", *argv], start_new_session=True
    )
    stops = 0

    def on_signal(signum, frame) -> None:
        nonlocal stops
        stops += 1
        ranks = local_ranks(runner.pid)
        if stops >= 3:
            os.killpg(runner.pid, signal.SIGKILL)
            return
        if not ranks:  # not started yet, or on other nodes: the runner (and its launcher) decide
            os.kill(runner.pid, signum)
            return
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if stops == 1 else signal.SIGINT)
        print(
            "stopping: the ranks save a checkpoint after the current step (Ctrl-C again: stop at once, "
            "no save)"
            if stops == 1
            else "stopping at once (no save)",
            file=sys.stderr,
            flush=True,
        )

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = runner.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    raise SystemExit(main())
