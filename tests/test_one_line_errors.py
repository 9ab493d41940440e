"""Command-line mistakes of the tools that are not launchers (benchmarks/bench_step.py, the
reconstruction picture) are one ``error:`` line naming the option and what is allowed, exit status 2."""

from __future__ import annotations

import errno
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mats_scale import cli as cli_mod
from mats_scale.launch import visualize
from mats_scale.profiling.bench import BASELINE, shape_problem

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "shape,names,line",
    [
        (("Q", 16, 224), None, "--size 'Q': allowed: debug, S, B, L, H, g"),
        (("B", 7, 224), None, "--frames 7: must be divisible by the tubelet size 2"),
        (("B", 16, 100), None, "--img 100: must be divisible by the patch size 16"),
        (
            ("B", 16, 112),
            ["tube+rc"],
            "--img 112: the running cell needs an even token grid, got 7x7 patches (with --setting tube+rc)",
        ),
    ],
)
def test_bench_step_shape_options_are_one_line(shape, names, line):
    """What benchmarks/bench_step.py prints after ``error:`` (exit 2) before it builds any model."""
    assert shape_problem(*shape, names or [BASELINE, "mats+dual"]) == line


@pytest.mark.integration
def test_bench_step_from_the_command_line_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--size", "Q"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --size 'Q': allowed: debug, S, B, L, H, g"]


def test_visualize_refuses_an_unwritable_out_before_loading(tmp_path, monkeypatch, capsys):
    # Tests run as root, where chmod does not stop writes: a read-only file system, simulated.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cli_mod, "tempfile", types.SimpleNamespace(TemporaryFile=read_only))
    monkeypatch.setattr(visualize, "load", lambda *a, **k: pytest.fail("loaded a checkpoint first"))
    png = tmp_path / "recon.png"
    assert visualize.main([str(tmp_path / "run"), "--out", str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --out {png}: {tmp_path}: cannot write there (Read-only file system)"]

    # A destination under a regular file.
    monkeypatch.undo()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert visualize.main([str(tmp_path / "run"), "--out", str(blocker / "recon.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {blocker / 'recon.png'}: needs a file name")
