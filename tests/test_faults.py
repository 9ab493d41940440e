"""Faults a long run meets (issues 17 and 18), in one process: damaged checkpoints and the fallback of
train.resume=auto, a missing `latest` pointer, never overwriting or pruning another run's checkpoints,
export of a damaged checkpoint, config errors as one line, a busy port, an unwritable run directory, and
errors while data workers run (disk full during a save, a killed worker, Ctrl-C twice), each under a time
limit so that a regression fails instead of hanging. The multi-process cases are in test_dist.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_util import PRETRAIN, ROOT, TINY, env, metric_runs

from mats_scale.config import ConfigError, load_config
from mats_scale.launch.export import main as export_main
from mats_scale.parallel.distributed import DistEnv
from mats_scale.parallel.ds_config import resolve_ds_config
from mats_scale.resources import ds_template
from mats_scale.run.checkpoint import CheckpointError, CheckpointManager, verify_checkpoint
from mats_scale.run.faults import Faults
from mats_scale.train.loop import train

LOCAL = TINY + ["parallel.backend=none", "data.batch_size=2", "logging.log_every=1"]
ONE = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), amp_dtype=None)


class _FileEngine:
    name = "fake"

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def save(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "w.pt").write_bytes(str(self.value).encode() * 1000)

    def load(self, path: str) -> None:
        self.value = int((Path(path) / "w.pt").read_bytes()[:1])


def _manager(root: Path, **kw) -> CheckpointManager:
    mgr = CheckpointManager(str(root), keep_last=kw.pop("keep_last", 3), env=ONE, **kw)
    mgr.resolve("auto")  # a run id, as the trainer does
    return mgr


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


# ---- damaged checkpoints -------------------------------------------------------------------------
DAMAGE = {
    "truncated engine file": lambda c: (c / "engine" / "w.pt").write_bytes(b"7" * 10),
    "garbage meta.json": lambda c: (c / "meta.json").write_text("{not json"),
    "same-size change in the rank state": lambda c: (c / "rank_00000.pt").write_bytes(
        bytes(b ^ 0xFF for b in (c / "rank_00000.pt").read_bytes())
    ),
    "missing file": lambda c: (c / "engine" / "w.pt").unlink(),
}
PROBLEM = {
    "truncated engine file": "engine/w.pt has 10 bytes, 1000 were written",
    "garbage meta.json": "meta.json has 9 bytes",
    "same-size change in the rank state": "rank_00000.pt does not match its checksum",
    "missing file": "engine/w.pt is missing",
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_resume_auto_skips_a_damaged_newest_checkpoint_and_never_deletes_it(tmp_path, kind):
    mgr = _manager(tmp_path)
    for step in (2, 4):
        mgr.save(step, _FileEngine(step), {"n": step}, {"world_size": 1})
    newest = tmp_path / "checkpoints" / "step_00000004"
    assert verify_checkpoint(newest) is None
    DAMAGE[kind](newest)
    assert PROBLEM[kind] in verify_checkpoint(newest)

    again = CheckpointManager(str(tmp_path), keep_last=3, env=ONE)
    assert again.resolve("auto") == tmp_path / "checkpoints" / "step_00000002"
    assert any(f"step_00000004 is damaged: {PROBLEM[kind]}" in n and "kept on disk" in n for n in again.notes)
    assert any("resuming from step_00000002, the newest checkpoint that verifies" in n for n in again.notes)
    engine = _FileEngine()
    _, state = again.load(again.resolve("auto"), engine, {"world_size": 1})
    assert (engine.value, state) == (2, {"n": 2})
    # An explicit path is refused with the problem; nothing is deleted.
    with pytest.raises(
        CheckpointError,
        match=f"train.resume='{newest}': cannot resume from it: .*{PROBLEM[kind].split(' ')[0]}",
    ):
        CheckpointManager(str(tmp_path), keep_last=3, env=ONE).resolve(str(newest))
    assert newest.is_dir()
    # The resumed run saves step 4 again: the damaged one is kept under another name, not overwritten.
    again.save(4, _FileEngine(4), {"n": 4}, {"world_size": 1})
    assert (tmp_path / "checkpoints" / "step_00000004.damaged-1").is_dir()
    assert verify_checkpoint(tmp_path / "checkpoints" / "step_00000004") is None


def test_no_checkpoint_verifies_is_one_error_and_keeps_them(tmp_path):
    mgr = _manager(tmp_path)
    mgr.save(2, _FileEngine(2), {}, {})
    DAMAGE["truncated engine file"](tmp_path / "checkpoints" / "step_00000002")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies \(1 damaged.*resume=restart"):
        CheckpointManager(str(tmp_path), keep_last=3, env=ONE).resolve("auto")
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()


def test_export_of_a_damaged_checkpoint_is_one_line_and_exit_1(tmp_path, capsys):
    mgr = _manager(tmp_path)
    for step in (2, 4):
        mgr.save(step, _FileEngine(step), {}, {"world_size": 1})
    DAMAGE["garbage meta.json"](tmp_path / "checkpoints" / "step_00000004")
    for target in (tmp_path, tmp_path / "checkpoints" / "step_00000004"):
        assert export_main([str(target), str(tmp_path / "out.pt")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "step_00000004: checkpoint is damaged: meta.json has 9 bytes" in err[0]
        assert "the newest one that verifies is" in err[0] and err[0].endswith("step_00000002")
    assert not (tmp_path / "out.pt").exists()


# ---- a missing pointer, a fresh start, and other runs' checkpoints -------------------------------
def test_missing_pointer_resumes_from_the_newest_checkpoint_and_changes_nothing(tmp_path):
    cfg = lambda *o: load_config(None, LOCAL + [f"train.out_dir={tmp_path}", "train.save_every=2", *o])  # noqa: E731
    train(cfg("train.steps=4"))
    ckpts = tmp_path / "checkpoints"
    before = {p.name: _digest(p) for p in ckpts.glob("step_*")}
    assert sorted(before) == ["step_00000002", "step_00000004"]
    (ckpts / "latest").unlink()
    # A fresh start over them is refused, also without the pointer ...
    with pytest.raises(
        CheckpointError,
        match=r"already holds checkpoints \(step_00000004, step_00000002\).*"
        "train.resume=restart",
    ):
        train(cfg("train.steps=6", "train.resume=none", "train.allow_changes=[train.steps]"))
    # ... and resume=auto finds the newest one, says so, and continues.
    result = train(cfg("train.steps=6", "train.keep_last=3", "train.allow_changes=[train.steps]"))
    assert result.step == 6
    assert metric_runs(tmp_path)[-1]["start"]["resumed_from"].endswith("step_00000004")
    assert (
        "checkpoints/latest is missing: looking for the newest checkpoint that verifies"
        in (tmp_path / "train.log").read_text()
    )
    assert {p.name: _digest(p) for p in ckpts.glob("step_0000000[24]")} == before  # untouched
    # train.resume=restart starts over and moves the old checkpoints aside (never deletes them).
    result = train(cfg("train.steps=2", "train.resume=restart"))
    assert result.step == 2 and metric_runs(tmp_path)[-1]["start"]["resumed_from"] is None
    (aside,) = tmp_path.glob("checkpoints.before-restart-*")
    assert sorted(p.name for p in aside.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000006"]
    assert {p.name: _digest(p) for p in aside.glob("step_0000000[24]")} == before


def test_pruning_and_saving_never_touch_another_runs_checkpoints(tmp_path):
    other = _manager(tmp_path)
    for step in (2, 4, 6):
        other.save(step, _FileEngine(step), {}, {})
    foreign = {p.name: _digest(p) for p in (tmp_path / "checkpoints").glob("step_*")}
    # A run resumed from an older checkpoint (an explicit path) writes a new line of checkpoints.
    mine = CheckpointManager(str(tmp_path), keep_last=1, env=ONE)
    mine.resolve(str(tmp_path / "checkpoints" / "step_00000002"))
    mine.run_id = "another-run"
    for step in (4, 8, 10):
        mine.save(step, _FileEngine(step), {}, {})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # keep_last=1 pruned this run's own 4 and 8; the other run's 2, 4 (renamed) and 6 stay as they were.
    assert names == [
        "latest",
        "step_00000002",
        "step_00000004.superseded-1",
        "step_00000006",
        "step_00000010",
    ]
    assert _digest(tmp_path / "checkpoints" / "step_00000004.superseded-1") == foreign["step_00000004"]
    for name in ("step_00000002", "step_00000006"):
        assert _digest(tmp_path / "checkpoints" / name) == foreign[name]


# ---- config errors: one line ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "override",
    [
        "optim.base_lr=nan",
        "optim.base_lr=inf",
        "optim.min_lr=nan",
        "optim.weight_decay=nan",
        "optim.clip_grad=nan",
        "optim.betas=[0.9,nan]",
        "model.drop_path=nan",
        "masking.frame_alpha=inf",
    ],
)
def test_non_finite_numbers_are_refused_for_every_float_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}=.*(finite|must be)"):
        load_config(None, [override])


def test_yaml_syntax_errors_name_file_line_and_column(tmp_path):
    tab = tmp_path / "tab.yaml"
    tab.write_text("model:\n  size: debug\n\tnum_frames: 4\n")
    with pytest.raises(
        ConfigError,
        match=rf"^--config='{tab}': YAML syntax error at line 3, column 1: "
        ".*a tab",
    ):
        load_config(str(tab))
    unclosed = tmp_path / "unclosed.yaml"
    unclosed.write_text("optim:\n  betas: [0.9, 0.95\ntrain:\n  steps: 3\n")
    proc = subprocess.run(
        [sys.executable, str(PRETRAIN), "--config", str(unclosed)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env(),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"config error: --config='{unclosed}': YAML syntax error at line 3, column 6: did not find expected "
        "',' or ']'"
    ]


@pytest.mark.parametrize("value", ["abc", "3.5", "-1"])
def test_malformed_fault_variables_are_config_errors(monkeypatch, value):
    monkeypatch.setenv("MATS_FAULT_KILL_AFTER_STEP", value)
    with pytest.raises(ConfigError, match=rf"^MATS_FAULT_KILL_AFTER_STEP='{value}': "):
        Faults.from_env()


def _template(tmp_path: Path, edit) -> str:
    ds = json.loads(Path(ds_template("zero3.json")).read_text())
    edit(ds)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda d: d.update(zero_optimizaton={"stage": 3}),
            "zero_optimizaton: not a DeepSpeed key; did you mean 'zero_optimization'?",
        ),
        (
            lambda d: d["zero_optimization"].update(overlap_com=True),
            "zero_optimization.overlap_com: not a DeepSpeed key; did you mean 'overlap_comm'?",
        ),
        (
            lambda d: d["zero_optimization"].update(offload_param={"device": "cpu", "pin_memroy": True}),
            "zero_optimization.offload_param.pin_memroy: not a DeepSpeed key; did you mean 'pin_memory'?",
        ),
        (
            lambda d: d["zero_optimization"].update(reduce_bucket_size="big"),
            "zero_optimization.reduce_bucket_size='big': Input should be a valid integer",
        ),
    ],
)
def test_ds_config_template_keys_are_checked_by_deepspeed_before_anything_is_built(tmp_path, edit, message):
    from mats_scale.train.loop import prepare

    cfg = load_config(
        None,
        [
            "parallel.zero_stage=3",
            f"parallel.ds_config={_template(tmp_path, edit)}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.device=cpu",
        ],
    )
    with pytest.raises(ConfigError, match="^" + __import__("re").escape(f"{tmp_path / 't.json'}: {message}")):
        prepare(cfg)  # what the trainer runs before any process group, model or worker
    assert not (tmp_path / "run").exists()
    # Valid sections DeepSpeed reads through other classes are accepted.
    ok = load_config(
        None,
        [
            "parallel.zero_stage=3",
            "parallel.ds_config="
            + _template(
                tmp_path,
                lambda d: d.update(
                    activation_checkpointing={"partition_activations": False},
                    flops_profiler={"enabled": False},
                    tensorboard={"enabled": False},
                ),
            ),
        ],
    )
    resolve_ds_config(ok, world_size=2, bf16=False, cuda=False)


# ---- launch problems: one line before anything is built -----------------------------------------
def _run(args: list[str], timeout: int, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PRETRAIN), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env(**extra),
    )


def _lines(text: str) -> list[str]:
    # DeepSpeed and torch print their own start-up warnings; ours are the rest.
    return [ln for ln in text.strip().splitlines() if "[WARNING]" not in ln and "cpp_extension.py" not in ln]


def _read_only_dir(tmp_path: Path):
    """A read-only tmpfs when this machine lets us mount one (root in CI containers often can), else None."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    ok = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        == 0
        if os.geteuid() == 0
        else False
    )
    return mnt if ok else None


def test_unwritable_out_dir_is_one_line_before_any_model(tmp_path):
    from mats_scale.train.loop import prepare

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    ro = _read_only_dir(tmp_path)
    cases = [(blocker / "run", "Not a directory")] + ([(ro / "run", "Read-only file system")] if ro else [])
    try:
        for target, why in cases:
            with pytest.raises(
                ConfigError,
                match=rf"^train.out_dir='{target}': cannot create or write it: "
                rf"{why}",
            ):
                prepare(load_config(None, LOCAL + [f"train.out_dir={target}"]))  # runs before any model
    finally:
        if ro is not None:
            subprocess.run(["umount", str(ro)])


def test_busy_rendezvous_port_is_one_line_naming_it(tmp_path, monkeypatch):
    from mats_scale.parallel.distributed import LaunchError, init_distributed

    # Another job's rendezvous store on the port (what a second job with the same MASTER_PORT meets).
    other_job = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(other_job.port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(None, LOCAL + ["parallel.backend=fsdp2"])
    with pytest.raises(
        LaunchError,
        match=rf"^MASTER_PORT={other_job.port} on 127.0.0.1 is already in use .*"
        "--master_port",
    ):
        init_distributed(cfg.train, cfg.parallel)
    assert not torch.distributed.is_initialized()


def test_a_busy_port_is_found_before_any_op_build_or_model(tmp_path, monkeypatch):
    """The launcher's preflight (no process group, no DeepSpeed import) names it on rank 0 of a
    2-process launch (was: only when rank 0 joined the group, after the op builds)."""
    from mats_scale.parallel.distributed import LaunchError
    from mats_scale.run.preflight import preflight

    other_job = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(other_job.port), "RANK": "0", "WORLD_SIZE": "2"}
    for key, value in {**env, "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(None, LOCAL + ["parallel.backend=deepspeed", f"train.out_dir={tmp_path}"])
    with pytest.raises(LaunchError, match=rf"^MASTER_PORT={other_job.port} on 127.0.0.1 is already in use"):
        preflight(cfg)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # torchrun: its agent holds the port
    preflight(cfg)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    monkeypatch.setenv("RANK", "1")  # only rank 0 binds it
    preflight(cfg)


# ---- errors while data workers run: never hang ---------------------------------------------------
WORKERS = LOCAL[:]
WORKERS[WORKERS.index("data.num_workers=0")] = "data.num_workers=2"


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        out += [int(c) for c in children]
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _small_tmpfs(tmp_path: Path, size: str):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        != 0
    ):
        return None
    return mnt


@pytest.mark.integration
def test_disk_full_during_a_save_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    # A 6 MiB tmpfs holds one checkpoint of the tiny model (about 3.5 MiB) but not two; without the
    # privilege to mount, the same failure is injected (ENOSPC raised in the middle of the save).
    mnt = _small_tmpfs(tmp_path, "6m")
    run = (mnt or tmp_path) / "run"
    fault = {} if mnt is not None else {"MATS_FAULT_DISK_FULL_IN_SAVE": "4"}
    try:
        start = time.monotonic()
        proc = _run(
            WORKERS + ["train.steps=6", "train.save_every=2", f"train.out_dir={run}"], timeout=120, **fault
        )
        took = time.monotonic() - start
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        pointer = (run / "checkpoints" / "latest").read_text()
        verified = verify_checkpoint(run / "checkpoints" / pointer)
    finally:
        if mnt is not None:
            subprocess.run(["umount", str(mnt)])
    assert proc.returncode == 1, (took, proc.stderr[-2000:])
    (line,) = [ln for ln in _lines(proc.stderr)]
    failed = "step_00000004" if mnt is None else "step_0000000"
    assert line.startswith(f"error: saving checkpoint {failed}") and "no space left on the device" in line
    assert f"last good checkpoint: {run / 'checkpoints' / pointer}" in line
    assert not [n for n in names if n.startswith(".tmp-")] and pointer in names and verified is None


@pytest.mark.integration
def test_a_killed_data_worker_is_an_error_naming_it_not_a_hang(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(PRETRAIN), *WORKERS, "train.steps=50", f"train.out_dir={tmp_path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env(MATS_FAULT_SLEEP_IN_STEP="0.2"),
    )
    try:
        for line in proc.stdout:
            if line.startswith("step      1/"):
                break
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
        os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1, err[-2000:]
    (line,) = _lines(err)
    assert line == (
        f"error: a data loader worker of rank 0 died: DataLoader worker (pid {workers[0]}) is "
        "killed by signal: Killed; stopping"
    )
    assert not any(_alive(w) for w in workers)


@pytest.mark.integration
def test_ctrl_c_twice_stops_at_once_with_one_line(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(PRETRAIN), *WORKERS, "train.steps=50", f"train.out_dir={tmp_path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env(MATS_FAULT_SLEEP_IN_STEP="1"),
    )
    try:
        for line in proc.stdout:
            if line.startswith("step      1/"):
                break
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert _lines(err) == [  # stopped in step 1: there is no checkpoint to speak of
        "interrupted: stopped at once without saving (no checkpoint was saved yet, so a rerun starts "
        "from step 0)"
    ]
    assert not any(_alive(w) for w in workers)
