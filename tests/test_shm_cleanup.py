"""DeepSpeed's CPU all-reduce segments: a rank unlinks its own when it stops, a new run sweeps those of
ended runs and never one a live process holds. Fake segments in a temporary directory stand in for
/dev/shm."""

from __future__ import annotations

import mmap
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from mats_scale.parallel.shm import (
    held_shm_paths,
    listening_ports,
    shm_buffer_path,
    shm_segments,
    sweep_stale_shm,
)

UID = os.getuid()


def free_port():
    """A port nothing listens on (right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def segment(shm_dir, port=None, rank=1, uid=UID):
    """A fake all-reduce segment named as DeepSpeed names it (on a free port unless given)."""
    port = free_port() if port is None else port
    path = shm_dir / f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_{port}_{rank}"
    path.write_bytes(b"\0" * 4096)
    return path


HOLDER = textwrap.dedent(
    """
    import mmap, sys, time
    f = open(sys.argv[1], "r+b")
    m = mmap.mmap(f.fileno(), 0)  # as a DeepSpeed rank: open and mapped
    print("holding", flush=True)
    time.sleep(600)
    """
)


def test_sweep_removes_a_segment_once_its_holder_is_gone(tmp_path):
    seg = segment(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(seg)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        assert sweep_stale_shm(str(tmp_path)) == [] and seg.exists()  # a live job's segment
    finally:
        holder.kill()  # SIGKILL: nothing of the holder's own runs
        holder.wait()
        holder.stdout.close()
    assert sweep_stale_shm(str(tmp_path)) == [str(seg)] and not seg.exists()


def test_sweep_keeps_what_this_process_holds_and_unrelated_files(tmp_path):
    port = free_port()
    opened, mapped, stale = (segment(tmp_path, port=port, rank=r) for r in range(3))
    other_user = segment(tmp_path, uid=UID + 1)
    unrelated = tmp_path / "deepspeed_other_buffer"
    unrelated.write_bytes(b"x")
    (tmp_path / "torch_1234").write_bytes(b"x")
    assert shm_segments(str(tmp_path)) == sorted(str(p) for p in (opened, mapped, stale))
    held = open(opened, "rb")  # noqa: SIM115 - open across the sweep, as a rank holds its segment
    with open(mapped, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)  # `mapped` stays mapped after its file is closed
    try:
        assert sweep_stale_shm(str(tmp_path)) == [str(stale)]
        assert opened.exists() and mapped.exists()
    finally:
        held.close()
        m.close()
    assert sweep_stale_shm(str(tmp_path)) == [str(opened), str(mapped)]  # kept only while held
    assert sorted(os.listdir(tmp_path)) == sorted([other_user.name, unrelated.name, "torch_1234"])


def fake_proc(root, processes, listening=()):
    """A /proc of `processes` ({pid: (fd targets, mapped paths)}, owned by this user) and of TCP sockets
    listening on the ports `listening` (the first in net/tcp, the others in net/tcp6)."""
    for pid, (fds, maps) in processes.items():
        (root / str(pid) / "fd").mkdir(parents=True)
        for n, target in enumerate(fds):
            os.symlink(target, root / str(pid) / "fd" / str(n))
        lines = [f"7f00-7f10 rw-s 00000000 00:1a {100 + i} {p}\n" for i, p in enumerate(maps)]
        (root / str(pid) / "maps").write_text("7f00-7f10 r--p 00000000 00:00 0\n" + "".join(lines))
    (root / "self").mkdir()
    (root / "net").mkdir()
    head = "  sl  local_address rem_address   st tx_queue rx_queue\n"
    v4 = [f"   0: 0100007F:{p:04X} 00000000:0000 0A 00000000:00000000\n" for p in listening[:1]]
    v4.append("   1: 0100007F:7531 0100007F:A001 01 00000000:00000000\n")  # an established connection
    v6 = [f"   0: {'0' * 32}:{p:04X} {'0' * 32}:0000 0A 00000000:00000000\n" for p in listening[1:]]
    (root / "net" / "tcp").write_text(head + "".join(v4))
    (root / "net" / "tcp6").write_text(head + "".join(v6))
    return root


def test_sweep_rules_on_a_fake_proc(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    a, b, c = (segment(shm, port=29500, rank=r) for r in range(3))
    live4, live6, connected = segment(shm, port=29600), segment(shm, port=29700), segment(shm, port=30001)
    no_port = shm / f"deepspeed_allreduce_buffer_{UID}_127.0.0.1__0"  # MASTER_PORT was empty
    no_port.write_bytes(b"x")
    processes = {101: ([str(a), "socket:[42]"], []), 102: ([], [str(b)])}
    proc = fake_proc(tmp_path / "proc", processes, listening=(29600, 29700))
    (proc / "103" / "fd").mkdir(parents=True)
    (proc / "103" / "maps").mkdir()  # a process that can not be read is skipped, not fatal
    assert held_shm_paths(str(proc)) >= {str(a), str(b)}
    assert listening_ports(str(proc)) == {29600, 29700}  # 30001 (0x7531) is only connected, not listening
    # a is open, b mapped, live4/live6 have a live rendezvous on their port, no_port has no port to check
    assert sweep_stale_shm(str(shm), str(proc)) == sorted([str(c), str(connected)])
    assert sorted(os.listdir(shm)) == sorted(p.name for p in (a, b, live4, live6, no_port))
    os.unlink(proc / "net" / "tcp")  # can not tell which ports are in use: nothing is removed
    c = segment(shm, port=29500, rank=2)
    assert listening_ports(str(proc)) is None and sweep_stale_shm(str(shm), str(proc)) == [] and c.exists()


def test_sweep_keeps_a_segment_whose_port_has_a_listener(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        seg = segment(tmp_path, port=server.getsockname()[1])
        assert sweep_stale_shm(str(tmp_path)) == [] and seg.exists()  # a job's rendezvous store
    assert sweep_stale_shm(str(tmp_path)) == [str(seg)]


def test_shm_buffer_path_names_the_segment_as_deepspeed_does(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert shm_buffer_path(1, str(tmp_path)) == str(
        tmp_path / f"deepspeed_allreduce_buffer_{UID}_127.0.0.1_29500_1"
    )


RANK = textwrap.dedent(
    """
    import os, signal, sys, time
    from mats_scale.parallel.shm import register_shm_cleanup
    seg, how = sys.argv[1], sys.argv[2]
    # A rank starts from its launcher with default dispositions; not whatever the test process has
    # ignored or blocked (inherited across exec).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    if how == "handler":  # a handler installed before: it still runs, after the unlink
        def previous(signum, frame):
            print("previous handler sees", os.path.exists(seg), flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, previous)
    open(seg, "wb").close()
    register_shm_cleanup(seg)
    register_shm_cleanup(seg)  # twice: one set of hooks
    pid = os.fork()
    if pid == 0:  # a forked child (a data worker) exits normally: it must leave the rank's segment
        sys.exit(0)
    os.waitpid(pid, 0)
    print("ready", os.path.exists(seg), flush=True)
    if how == "exit":
        sys.exit(0)
    time.sleep(600)
    """
)


@pytest.mark.parametrize(
    "how, sig, code",
    [
        ("default", signal.SIGTERM, -signal.SIGTERM),  # still dies of SIGTERM
        ("default", signal.SIGINT, -signal.SIGINT),  # KeyboardInterrupt, as without the handler
        ("handler", signal.SIGTERM, 3),
        ("exit", None, 0),  # atexit
    ],
)
def test_a_rank_unlinks_its_own_segment_when_it_stops(tmp_path, how, sig, code):
    seg = tmp_path / f"deepspeed_allreduce_buffer_{UID}_127.0.0.1_29500_1"
    proc = subprocess.Popen(
        [sys.executable, "-c", RANK, str(seg), how], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "ready True\n", proc.stderr.read() if proc.poll() is not None else ""
        if sig is not None:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert not seg.exists()
    if how == "handler":
        assert out == "previous handler sees False\n"
