"""Data-stall accounting: the per-rank fraction of step time spent waiting for batches, its log line,
and the end record's delivered vs consumed clip rates (one process, an artificially slow loader)."""

from __future__ import annotations

import re
import time

import pytest
from launch_util import TINY, metric_runs

from mats_scale.config import load_config
from mats_scale.train.loop import train
from mats_scale.train.sources import BatchStream
from mats_scale.train.stall import StallMeter

SLOW_S = 0.25  # added to every batch the loop asks for


def _run(tmp_path, monkeypatch, slow: bool):
    if slow:
        plain = BatchStream.next

        def slow_next(self):
            time.sleep(SLOW_S)
            return plain(self)

        monkeypatch.setattr(BatchStream, "next", slow_next)
    overrides = ["parallel.backend=none", "data.batch_size=2", "train.steps=3", "logging.log_every=1"]
    train(load_config(None, TINY + overrides + ["optim.grad_accum=2", f"train.out_dir={tmp_path}"]))
    (run,) = metric_runs(tmp_path)
    return run


def test_slow_loader_shows_in_the_data_wait_fraction_log_line_and_end_record(tmp_path, monkeypatch):
    run = _run(tmp_path, monkeypatch, slow=True)
    for step, rec in run["steps"].items():
        assert rec["data_time_s"] >= 2 * SLOW_S  # two micro-batches per step, each slowed
        assert rec["data_wait"] == pytest.approx(rec["data_time_s"] / rec["step_time_s"])
        assert rec["data_wait_ranks"] == [round(rec["data_wait"], 4)]
        assert rec["data_wait_mean"] == rec["data_wait"]
        assert 0.5 < rec["data_wait"] <= 1.0, step  # 0.5 s of sleep against a tiny model's compute
    shown = [int(x) for x in re.findall(r"clips/s  data wait (\d+)%", (tmp_path / "train.log").read_text())]
    assert shown == [round(100 * r["data_wait"]) for r in run["steps"].values()]
    end = run["end"]
    wall = sum(r["step_time_s"] for r in run["steps"].values())
    wait = sum(r["data_time_s"] for r in run["steps"].values())
    assert end["clips_per_s_delivered"] == pytest.approx(3 * 4 / wall)  # 3 steps of 2 x 2 clips
    assert end["clips_per_s_consumed"] == pytest.approx(3 * 4 / (wall - wait))
    assert end["data_wait"] == pytest.approx(wait / wall)
    assert end["clips_per_s_delivered"] < 0.5 * end["clips_per_s_consumed"]  # data-bound
    assert (
        f"data: {end['clips_per_s_delivered']:.2f} clips/s delivered, {end['clips_per_s_consumed']:.2f} "
        f"clips/s consumed (data wait {end['data_wait']:.0%}" in (tmp_path / "train.log").read_text()
    )


def test_a_fast_loader_waits_less_than_the_slowed_one(tmp_path, monkeypatch):
    fast = _run(tmp_path / "fast", monkeypatch, slow=False)
    slow = _run(tmp_path / "slow", monkeypatch, slow=True)
    assert fast["end"]["data_wait"] < slow["end"]["data_wait"]
    for rec in fast["steps"].values():
        assert rec["data_time_s"] < 2 * SLOW_S


def test_every_ranks_wait_reaches_rank_0_and_the_slowest_rank_decides():
    ranks = [StallMeter(r, 3) for r in range(3)]
    waits = [0.1, 0.6, 0.0]
    reduced = [sum(col) for col in zip(*(m.slots(w) for m, w in zip(ranks, waits, strict=True)), strict=True)]
    assert reduced == waits  # each rank's slot carries its own wait through the sum all-reduce
    meter = ranks[0]
    m = meter.step(reduced, step_s=1.0, clips=12)
    assert m["data_wait"] == 0.6 and m["data_wait_ranks"] == [0.1, 0.6, 0.0]
    assert m["data_wait_mean"] == pytest.approx(0.7 / 3)
    meter.step([0.0, 0.0, 0.0], step_s=1.0, clips=12)
    # 24 clips in 2 s of wall time, of which 0.6 s waiting for the slowest rank's data
    assert meter.summary() == pytest.approx(
        {"clips_per_s_delivered": 12.0, "clips_per_s_consumed": 24 / 1.4, "data_wait": 0.3}
    )
