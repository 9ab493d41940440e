"""The step and motion-score benchmark scripts run end to end on small settings and report
consistent output (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_bench_step_runs_and_reports_counts_and_flops():
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_step.py"),
        "--size",
        "debug",
        "--frames",
        "4",
        "--img",
        "64",
        "--runs",
        "1",
        "--warmup",
        "0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd="/")  # no PYTHONPATH needed
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    ref, mats = out["settings"]["tube+rc"], out["settings"]["mats+dual"]
    # 2 x 4 x 4 grid: tube 0.9 leaves 2 of 16 per slice visible, the cell keeps 16 of 32; MATS keeps
    # int(0.3 * 32) = 9, int(0.1 * 32) = 3 visible, 6 targets thinned to 6 - 6 * 2 // 4 = 3.
    assert (ref["visible"], ref["targets"]) == (4, 16) and (mats["visible"], mats["targets"]) == (3, 3)
    assert mats["selection_gflop"] > 0 == ref["selection_gflop"]  # only MATS embeds for its scores
    assert mats["step_gflop"] < ref["step_gflop"] and out["gemm_peak_gflops"] > 0
    assert set(out["step_ratio_vs_tube+rc"]) == {"tube+rc", "mats+dual"}


@pytest.mark.integration
def test_bench_scores_reports_every_score_and_the_planner_rates():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_scores.py"), "--quick", "--no-loader"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd="/")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    scores, rates = out["score_functions"], out["loader_clips_per_s_per_core_with_score"]
    assert scores["pixel"]["vs_pixel"] == 1.0
    assert all(v["ms_per_clip"] > 0 and v["cpu_ms_per_clip"] > 0 for v in scores.values())
    assert {"compensated, panning camera", "embed (ViT-B patch embedding, float input)"} <= set(scores)
    # A loader score can only lower the loader's rate (38.1 clips/s per core without one).
    assert set(rates) == {k for k in scores if k.startswith(("pixel", "compensated"))}
    assert all(0 < r < 38.1 for r in rates.values())
    bad = subprocess.run([*cmd, "--base-rate", "0"], capture_output=True, text=True, timeout=120, cwd="/")
    assert bad.returncode != 0 and "--base-rate=0.0: must be > 0" in bad.stderr


@pytest.mark.integration
def test_study_scores_keeps_the_same_tokens_on_a_still_camera():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "study_scores.py"), "--clips", "1", "--cameras", "still"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd="/")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()[2:]]
    assert len(rows) == 3
    for row in rows:
        pixel, _, comp, zoom = (float(x) for x in row[3].split("/"))
        assert pixel == comp == zoom and row[5].strip() == "1.00"
    bad = subprocess.run([*cmd[:-1], "tilt"], capture_output=True, text=True, timeout=120, cwd="/")
    assert bad.returncode != 0 and "--cameras=tilt" in bad.stderr
