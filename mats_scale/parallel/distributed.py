"""Process-group set-up shared by every engine: one place decides device, backend, rank and precision.

Launchers (``deepspeed``, ``torchrun``, or plain ``python`` for one process) export RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; under ``srun`` without them they come from Slurm's variables
(:mod:`mats_scale.parallel.slurm`); a plain ``python`` run gets a one-process group on a free
local port. CUDA runs use NCCL, CPU runs gloo.

Faults: the collective timeout is ``parallel.timeout_s`` (default 300 s on gloo, 1800 s on
NCCL), so a rank that dies or hangs is noticed by the others within it; each rank records every rank's
pid and host at start-up, so a survivor can say which rank died and how (:func:`explain_collective_failure`);
a busy ``MASTER_PORT`` is one line naming the port; under DeepSpeed's single-node runner the ranks watch
their launcher (:func:`watch_launcher`) and stop as on SIGTERM when it is gone. DeepSpeed's CPU all-reduce
segments in /dev/shm are unlinked by their rank at exit and on SIGTERM/SIGINT, and those of ended runs
(a SIGKILLed rank) are swept at the next start (:func:`sweep_stale_shm`).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from mats_scale.config import ParallelConfig, TrainConfig
from mats_scale.parallel.shm import register_shm_cleanup, report_swept, shm_buffer_path, sweep_stale_shm


class LaunchError(RuntimeError):
    """The process layout does not fit the configuration (one line, names both)."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype | None
    """bfloat16 when forward runs under autocast (CUDA by default), None for fp32."""

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes logs, the resolved config and the checkpoint pointer."""
        return self.rank == 0

    @property
    def precision(self) -> str:
        return "bf16" if self.amp_dtype is not None else "fp32"


def resolve_device(train: TrainConfig, local_rank: int) -> torch.device:
    if train.device == "cuda" and not torch.cuda.is_available():
        raise LaunchError("train.device='cuda': no CUDA device is visible; use train.device=cpu or auto")
    if train.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_env(train: TrainConfig, parallel: ParallelConfig) -> DistEnv:
    """Rank, world size, device and precision from the launcher's environment (no communication)."""
    from mats_scale.parallel.slurm import apply_slurm_env

    apply_slurm_env()  # srun without a torch launcher: Slurm's variables give rank and world
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if parallel.backend == "none" and world > 1:
        raise LaunchError(
            f"parallel.backend=none runs one process, but the launcher started "
            f"WORLD_SIZE={world}; use parallel.backend=deepspeed or fsdp2"
        )
    device = resolve_device(train, local_rank)
    bf16 = train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda")
    amp = torch.bfloat16 if bf16 else None
    return DistEnv(rank, world, local_rank, device, amp)


DEFAULT_TIMEOUT_S = {"cpu": 300, "cuda": 1800}
"""parallel.timeout_s=0: gloo (CPU) answers in well under a second, NCCL's first collectives can wait
for slow kernels to compile."""


def collective_timeout(parallel: ParallelConfig, device: torch.device) -> timedelta:
    seconds = parallel.timeout_s or DEFAULT_TIMEOUT_S["cuda" if device.type == "cuda" else "cpu"]
    return timedelta(seconds=seconds)


def port_in_use_message(port: str, addr: str) -> str:
    return (
        f"MASTER_PORT={port} on {addr} is already in use (another job on this node?): "
        f"choose a free port, e.g. deepspeed --master_port {int(port) + 1} ... or "
        f"torchrun --master_port {int(port) + 1} ..."
    )


def master_port_problem() -> str | None:
    """On global rank 0 of a multi-process launch whose MASTER_PORT someone on this machine already
    listens on: the message, before minutes of DeepSpeed op builds (rank 0 binds the port only when it
    joins the group). None otherwise, also under torchrun, whose agent holds the port itself, and when
    MASTER_ADDR is not an address of this machine."""
    env = os.environ
    port, addr = env.get("MASTER_PORT", ""), env.get("MASTER_ADDR", "127.0.0.1")
    if env.get("RANK", "0") != "0" or int(env.get("WORLD_SIZE", "1") or 1) <= 1 or not port.isdigit():
        return None
    if env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store does: TIME_WAIT is fine
        try:
            s.bind((addr, int(port)))
        except OSError as e:
            return port_in_use_message(port, addr) if e.errno == errno.EADDRINUSE else None
    return None


def _port_in_use(e: BaseException) -> bool:
    text = str(e)
    return "EADDRINUSE" in text or "address already in use" in text.lower()


def init_distributed(train: TrainConfig, parallel: ParallelConfig) -> DistEnv:
    """:func:`detect_env`, then join the process group.

    ``parallel.backend=none`` runs one process without a group; deepspeed joins through
    ``deepspeed.init_distributed`` (which also sets up its comm layer), fsdp2 through torch.
    """
    env = detect_env(train, parallel)
    launched = "WORLD_SIZE" in os.environ  # set by a launcher (before the defaults below fill it in)
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if parallel.backend == "none" or dist.is_initialized():
        return env
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1:
            raise LaunchError(
                f"WORLD_SIZE={env.world_size} but MASTER_PORT is not set; start with deepspeed or torchrun"
            )
        os.environ["MASTER_PORT"] = str(_free_port())
    for key, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank)):
        os.environ.setdefault(key, str(value))
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    timeout = collective_timeout(parallel, env.device)
    try:
        if parallel.backend == "deepspeed":
            import deepspeed

            from mats_scale.parallel.ds_ops import first_build_notice, ops_to_build

            notice = (
                first_build_notice(ops_to_build(parallel.offload_optimizer)) if env.local_rank == 0 else None
            )
            if notice:
                print(notice, file=sys.stderr, flush=True)
            if env.device.type == "cpu":
                # Before the rendezvous: no rank of this job creates its segment until every rank has
                # joined, so the sweep can not meet a segment of this job.
                if env.local_rank == 0:
                    report_swept(sweep_stale_shm())
                register_shm_cleanup(shm_buffer_path(env.rank))
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend,
                rank=env.rank,
                world_size=env.world_size,
                timeout=timeout,
                device_id=env.device if env.device.type == "cuda" else None,
            )
    except (dist.DistError, RuntimeError, OSError) as e:
        if not _port_in_use(e):
            raise
        raise LaunchError(port_in_use_message(os.environ["MASTER_PORT"], os.environ["MASTER_ADDR"])) from None
    _record_peers(env)
    if launched:
        watch_launcher()
    return env


# ---- who is who: a survivor names the rank that died ------------------------------------------------
_PEERS: list[dict[str, Any]] = []


def _record_peers(env: DistEnv) -> None:
    """Every rank's pid and host, gathered once at start-up (one small collective)."""
    me = {"rank": env.rank, "pid": os.getpid(), "host": socket.gethostname()}
    _PEERS[:] = all_gather_object(me)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on, or None when the process does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _process_end(pid: int) -> str | None:
    """None while `pid` runs; else how it ended ("was killed by SIGKILL", "exited with code 1", "is gone")."""
    fields = _proc_stat(pid)
    if fields is None:
        return "is gone"
    if fields[0] not in ("Z", "X"):  # not a zombie: still running
        return None
    if len(fields) > 49:  # field 52, exit_code, in waitpid(2) form (Linux >= 3.5)
        status = int(fields[49])
        if os.WIFSIGNALED(status):
            return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exited with code {os.WEXITSTATUS(status)}"
    return "has exited"


def dead_ranks() -> list[str]:
    """'rank N (pid P) was killed by SIGKILL' for every other rank on this host that is no longer running."""
    host, me = socket.gethostname(), os.getpid()
    out = []
    for peer in _PEERS:
        if peer["pid"] == me or peer["host"] != host:
            continue
        end = _process_end(peer["pid"])
        if end is not None:
            out.append(f"rank {peer['rank']} (pid {peer['pid']}) {end}")
    return out


_COLLECTIVE_HINTS = (
    "gloo",
    "nccl",
    "connection closed by peer",
    "connection reset by peer",
    "timed out",
    "broken pipe",
    "socket",
)


def explain_collective_failure(e: BaseException) -> str | None:
    """One line for a collective that failed because another rank died or stopped answering; None when
    `e` is not a communication error (it is then a bug or another error with its own message)."""
    text = str(e)
    if not (
        isinstance(e, dist.DistError)
        or (isinstance(e, RuntimeError) and any(h in text.lower() for h in _COLLECTIVE_HINTS))
    ):
        return None
    if len(_PEERS) < 2:
        return None
    time.sleep(0.5)  # the launcher reaps a dead rank at once; give /proc a moment to show it
    dead = dead_ranks()
    # "[.../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:25803: Connection reset by peer. This is
    # typically ..." -> "Read error [127.0.0.1]:25803: Connection reset by peer"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", first).split(". This is typically")[0]
    if dead:
        return f"{'; '.join(dead)}; stopping this rank too (communication failed: {first[:120]})"
    return (
        f"another rank stopped answering (no rank on this host has exited; a rank on another node, "
        f"or parallel.timeout_s passed): {first[:200]}"
    )


# ---- the launcher is gone: stop as on SIGTERM ----------------------------------------------------------
def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[1]) if fields is not None else None


def watch_launcher(interval_s: float = 1.0) -> threading.Thread | None:
    """Send SIGTERM to this rank (a checkpoint is saved, the run stops) when its launcher goes away.

    DeepSpeed's single-node ``deepspeed`` runner starts ``deepspeed.launcher.launch``, which starts the
    ranks; SIGTERM to the runner (``timeout``, ``kill PID``) kills only the runner and forwards nothing
    (DeepSpeed 0.19 runner.py installs its handler for multi-node pdsh only), so the ranks would train on
    unwatched. PR_SET_PDEATHSIG can not help (the ranks' parent, launch.py, lives on), hence a daemon thread
    that polls the chain rank -> parent -> runner once a second. Started for launched ranks only.
    """
    if not os.path.isdir("/proc"):
        return None
    parent = os.getppid()
    grand = _ppid(parent)
    watch_grand = "deepspeed.launcher.launch" in _cmdline(parent) and grand is not None and grand > 1

    def gone() -> bool:
        return os.getppid() != parent or (watch_grand and _ppid(parent) != grand)

    def poll() -> None:
        while not gone():
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=poll, name="mats-launcher-watch", daemon=True)
    thread.start()
    return thread


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of a tensor on this rank's device; a no-op without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order ([obj] without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any (one all-reduce; a barrier that carries a vote)."""
    t = torch.tensor([float(flag)], device=device)
    all_reduce(t, op="max")
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
