"""DeepSpeed's CPU all-reduce segments in /dev/shm: each rank unlinks its own when it stops, and those
of ended runs (a SIGKILLed rank) are swept when the next run starts."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from typing import Any

# DeepSpeed's CPU accelerator (ops/csrc/cpu/comm/shm.cpp, when every rank is on this node) creates one
# 66 MB segment per rank, ``deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_{MASTER_PORT}_{rank}``, every
# rank maps all of them at start-up, and nothing ever unlinks them: a run that ends leaves them in
# /dev/shm (RAM). Each rank unlinks its own at exit and on SIGTERM/SIGINT (harmless for the peers: an
# unlinked segment stays valid for processes that still have it mapped); what a SIGKILLed rank leaves
# behind is swept when the next run starts.
SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer_"
_OWN_SHM: list[str] = []  # segments this process unlinks when it stops
_SHM_PID: list[int] = []  # the process that registered them (a forked child inherits the list)


def shm_buffer_path(rank: int, shm_dir: str = SHM_DIR) -> str:
    """DeepSpeed's CPU all-reduce segment of `rank` in this job (named by uid, MASTER_ADDR, MASTER_PORT)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(shm_dir, f"{SHM_PREFIX}{os.getuid()}_{addr}_{port}_{rank}")


def remove_own_shm() -> None:
    """Unlink the segments this process registered; a no-op in a forked child (a data worker)."""
    if os.getpid() not in _SHM_PID:
        return
    for path in _OWN_SHM:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _chain_signal(sig: signal.Signals) -> None:
    """On `sig`, unlink this process's segments, then do what the previous handler did."""
    previous = signal.getsignal(sig)
    if previous in (signal.SIG_IGN, None):  # ignored, or a handler installed outside Python: left alone
        return

    def handler(signum: int, frame: Any) -> Any:
        remove_own_shm()
        if callable(previous):
            return previous(signum, frame)
        signal.signal(signum, signal.SIG_DFL)  # SIG_DFL: die of the signal, as without this handler
        signal.raise_signal(signum)
        return None

    signal.signal(sig, handler)


def register_shm_cleanup(path: str) -> None:
    """Unlink `path` when this process exits (atexit) or gets SIGTERM/SIGINT (the signal then goes on)."""
    if path not in _OWN_SHM:
        _OWN_SHM.append(path)
    if os.getpid() in _SHM_PID:
        return  # hooks already installed by this process
    _SHM_PID[:] = [os.getpid()]
    atexit.register(remove_own_shm)
    if threading.current_thread() is threading.main_thread():  # signal handlers: main thread only
        for sig in (signal.SIGTERM, signal.SIGINT):
            _chain_signal(sig)


def shm_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """This user's DeepSpeed all-reduce segments in `shm_dir` (paths, sorted)."""
    prefix = f"{SHM_PREFIX}{os.getuid()}_"
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return []
    return sorted(os.path.join(shm_dir, n) for n in names if n.startswith(prefix))


def _held_by(pid_dir: str) -> set[str]:
    """Paths one process has open (fd/) or mapped (maps); raises OSError when they can not be read."""
    held = set()
    fd_dir = os.path.join(pid_dir, "fd")
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            held.add(os.readlink(os.path.join(fd_dir, fd)))
    with open(os.path.join(pid_dir, "maps")) as f:
        for line in f:
            fields = line.rstrip("\n").split(maxsplit=5)  # address perms offset dev inode [path]
            if len(fields) == 6:
                held.add(fields[5])
    return held


def held_shm_paths(proc: str = "/proc") -> set[str]:
    """Every path a process of this user has open or mapped (processes that can not be read skipped)."""
    uid, held = os.getuid(), set()
    for pid in os.listdir(proc):
        pid_dir = os.path.join(proc, pid)
        try:
            if pid.isdigit() and os.stat(pid_dir).st_uid == uid:
                held |= _held_by(pid_dir)
        except OSError:  # ended meanwhile, or not readable (non-dumpable, another user namespace)
            continue
    return held


def listening_ports(proc: str = "/proc") -> set[int] | None:
    """TCP ports a socket on this host listens on (net/tcp and net/tcp6); None when net/tcp is unreadable."""
    ports: set[int] = set()
    for name, required in (("tcp", True), ("tcp6", False)):
        try:
            with open(os.path.join(proc, "net", name)) as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            if required:
                return None
            continue
        ports |= {int(r[1].rsplit(":", 1)[1], 16) for r in rows if len(r) > 3 and r[3] == "0A"}  # 0A: LISTEN
    return ports


def _segment_port(path: str) -> int | None:
    """MASTER_PORT in a segment's name (``..._{addr}_{port}_{rank}``), None when it is not a number."""
    port = os.path.basename(path).rsplit("_", 2)[-2]
    return int(port) if port.isdigit() else None


def sweep_stale_shm(shm_dir: str = SHM_DIR, proc: str = "/proc") -> list[str]:
    """Unlink this user's DeepSpeed all-reduce segments that belong to no live job; returns them.

    The name carries no pid (uid, MASTER_ADDR, MASTER_PORT and rank only), so a segment counts as its
    owner's only while it provably can not be in use:
    - no process of this user (the uid in the name) has it open or mapped: DeepSpeed's ranks keep every
      segment of their job open and mapped from its creation to their end;
    - nothing on this host listens on the port in its name: a live job's rendezvous store (rank 0's
      TCPStore, or torchrun's agent) listens there for the whole run. This also covers ranks whose /proc
      entries this process can not read (skipped above), and a port that is reused keeps the segment.
    Nothing is removed when /proc/net/tcp can not be read. Limit: ranks in another PID and network
    namespace that share this /dev/shm are invisible to both rules.
    """
    segments = shm_segments(shm_dir)
    if not segments:
        return []
    ports = listening_ports(proc)
    if ports is None:
        return []
    held = held_shm_paths(proc)
    removed = []
    for path in segments:
        port = _segment_port(path)
        if port is None or port in ports or path in held or os.path.realpath(path) in held:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


def report_swept(removed: list[str]) -> None:
    """One line on stderr naming the stale segments that were removed (none: nothing)."""
    if removed:
        names = ", ".join(os.path.basename(p) for p in removed)
        print(
            f"[mats] removed {len(removed)} stale DeepSpeed shm segment(s) of ended runs: {names}",
            file=sys.stderr,
        )
