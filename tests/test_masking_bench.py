"""The step benchmark script runs end to end on a toy shape and reports consistent JSON
(no timing asserted)."""

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
