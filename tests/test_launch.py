"""The project's main job, end to end: `deepspeed launchers/pretrain.py` with no config (short)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import statistics
import subprocess
import sys

import pytest
from launch_util import BIN, PRETRAIN, ROOT, TINY, env, free_port, metric_runs, tail

from mats_scale.config import load_config


@pytest.mark.dist
def test_default_main_job_under_the_deepspeed_launcher(tmp_path):
    run = tmp_path / "run"
    port = free_port()
    # cwd=tmp_path: the bundled dataset is generated on first use into ./data/bundled.
    proc = subprocess.run(
        [
            str(BIN / "deepspeed"),
            "--master_port",
            str(port),
            str(PRETRAIN),
            "train.steps=60",
            f"train.out_dir={run}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env(),
    )
    assert proc.returncode == 0, tail(proc)
    assert (tmp_path / "data" / "bundled" / "meta.json").is_file()

    (only,) = metric_runs(run)
    assert only["start"]["engine"] == "deepspeed-zero2" and sorted(only["steps"]) == list(range(1, 61))
    losses = [only["steps"][s]["loss"] for s in range(1, 61)]
    assert statistics.mean(losses[-10:]) < 0.85 * statistics.mean(losses[:5]), losses  # it learns

    cfg = load_config(str(run / "config.yaml"))  # the resolved config round-trips
    assert (cfg.masking.strategy, cfg.masking.decoder, cfg.data.dataset, cfg.train.steps) == (
        "mats",
        "running_cell",
        "bundled",
        60,
    )
    ds = json.loads((run / "ds_config.json").read_text())
    world = only["start"]["world_size"]
    assert ds["train_batch_size"] == 4 * world and ds["zero_optimization"]["stage"] == 2
    assert "step     60/60" in (run / "train.log").read_text()
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    assert (run / "checkpoints" / "latest").read_text() == "step_00000060"
    assert "\r" not in proc.stderr and "step/s" not in proc.stderr  # piped: no progress-bar redraws
    assert "epoch" in (run / "train.log").read_text()
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["argv"][0] == str(PRETRAIN) and prov["versions"]["deepspeed"] and prov["device"]
    # DeepSpeed's CPU all-reduce segment (66 MB of /dev/shm per rank, never unlinked by DeepSpeed) is gone
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone, as it should be
        os.killpg(pgid, signal.SIGKILL)


@pytest.mark.dist
@pytest.mark.slow  # DeepSpeed's runner + a rank: 20-70 s on the shared 2-core machine
def test_sigterm_to_the_deepspeed_runner_itself_saves_and_stops(tmp_path):
    """`timeout`/`kill PID` signal only DeepSpeed's runner, which forwards nothing on one node: the ranks
    notice that it is gone, save a checkpoint and exit 0 (one rank, FSDP2, to keep it short)."""
    run = tmp_path / "run"
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "1",
        "--master_port",
        str(free_port()),
        str(PRETRAIN),
        *TINY,
        "parallel.backend=fsdp2",
        "train.steps=500",
        "logging.log_every=1",
        f"train.out_dir={run}",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env(MATS_FAULT_SLEEP_IN_STEP="0.2"),
        start_new_session=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("step      2/"):
                break
        proc.send_signal(signal.SIGTERM)  # the runner only, not its process group
        out, err = proc.communicate(timeout=120)  # until the ranks, which share the pipes, are gone
    finally:
        _kill_group(proc.pid)
    assert proc.returncode == -signal.SIGTERM
    (only,) = metric_runs(run)
    last = max(only["steps"])
    assert last < 500 and f"stopping after step {last} on signal" in out
    assert (run / "checkpoints" / "latest").read_text() == f"step_{last:08d}"
    assert "exits successfully" in out + err  # launch.py saw the rank exit 0


@pytest.mark.dist
@pytest.mark.slow  # DeepSpeed's runner + a rank: 20-70 s on the shared 2-core machine
def test_ctrl_c_under_mats_scale_launch_saves_exits_0_without_a_traceback(tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group; `python -m mats_scale.launch.runner`
    (DeepSpeed's runner in its own session) turns it into a clean stop of the ranks."""
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "mats_scale.launch.runner",
        "--num_gpus",
        "1",
        "--master_port",
        str(free_port()),
        str(PRETRAIN),
        *TINY,
        "parallel.backend=fsdp2",
        "train.steps=500",
        "logging.log_every=1",
        f"train.out_dir={run}",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env(MATS_FAULT_SLEEP_IN_STEP="0.2"),
        start_new_session=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("step      2/"):
                break
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    (only,) = metric_runs(run)
    last = max(only["steps"])
    assert f"stopping after step {last} on signal" in out
    assert (run / "checkpoints" / "latest").read_text() == f"step_{last:08d}"
