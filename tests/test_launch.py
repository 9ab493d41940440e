"""The project's main job, end to end: `deepspeed launchers/pretrain.py` with no config (short)."""

from __future__ import annotations

import json
import statistics
import subprocess

import pytest
from launch_util import BIN, PRETRAIN, env, free_port, metric_runs, tail

from mats_scale.config import load_config


@pytest.mark.dist
def test_default_main_job_under_the_deepspeed_launcher(tmp_path):
    run = tmp_path / "run"
    # cwd=tmp_path: the bundled dataset is generated on first use into ./data/bundled.
    proc = subprocess.run([str(BIN / "deepspeed"), "--master_port", str(free_port()), str(PRETRAIN),
                           "train.steps=60", f"train.out_dir={run}"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env())
    assert proc.returncode == 0, tail(proc)
    assert (tmp_path / "data" / "bundled" / "meta.json").is_file()

    (only,) = metric_runs(run)
    assert only["start"]["engine"] == "deepspeed-zero2" and sorted(only["steps"]) == list(range(1, 61))
    losses = [only["steps"][s]["loss"] for s in range(1, 61)]
    assert statistics.mean(losses[-10:]) < 0.85 * statistics.mean(losses[:5]), losses  # it learns

    cfg = load_config(str(run / "config.yaml"))  # the resolved config round-trips
    assert (cfg.masking.strategy, cfg.masking.decoder, cfg.data.dataset, cfg.train.steps) == \
        ("mats", "running_cell", "bundled", 60)
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
