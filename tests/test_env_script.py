"""scripts/env.sh: which checkout the environment runs, and the caller's working directory.

A throw-away environment (venv without pip) stands in for the real one; its `pip` is a stub that
records the call and re-points the environment's `mats_scale` (a .pth file, as an editable install
does), so nothing is downloaded and the shared environment is never touched."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from launch_util import ROOT

FAKE_PIP = """import pathlib, sys
log = pathlib.Path(sys.prefix) / "pip-calls.txt"
with open(log, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
target = sys.argv[-1].split("[")[0]  # the path after -e
(pathlib.Path(__file__).parents[1] / "mats_scale_checkout.pth").write_text(target + "\\n")
"""


def _fake_env(tmp_path: Path, installed: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    rel = Path(sysconfig.get_path("purelib", vars={"base": ""}).lstrip("/"))
    site = venv / rel
    site.mkdir(parents=True, exist_ok=True)
    (site / "pip").mkdir()
    (site / "pip" / "__init__.py").write_text("")
    (site / "pip" / "__main__.py").write_text(FAKE_PIP)
    (site / "mats_scale_checkout.pth").write_text(f"{installed}\n")  # "installed" from another clone
    (venv / ".complete").touch()
    return venv


def _env_sh(tmp_path: Path, venv: Path, *cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "MATS_CACHE": str(tmp_path / "cache"),
        "MATS_VENV": str(venv),
        "PYTHON": sys.executable,
    }
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "env.sh"), *cmd],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )


def test_env_sh_repoints_an_environment_installed_from_another_clone(tmp_path):
    other = tmp_path / "other-clone"
    (other / "mats_scale").mkdir(parents=True)
    (other / "mats_scale" / "__init__.py").write_text("")
    venv = _fake_env(tmp_path, other)
    # Run from the checkout root, where `import mats_scale` would find the local copy.
    proc = _env_sh(
        tmp_path, venv, "python", "-I", "-c", "import mats_scale; print(mats_scale.__file__)", cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    calls = (venv / "pip-calls.txt").read_text().splitlines()
    assert len(calls) == 1 and calls[0].endswith(f"--no-deps -e {ROOT}"), calls
    assert proc.stdout.strip() == str(ROOT / "mats_scale" / "__init__.py")
    # Pointing here already: no second install.
    assert _env_sh(tmp_path, venv, "true", cwd=ROOT).returncode == 0
    assert len((venv / "pip-calls.txt").read_text().splitlines()) == 1


def test_env_sh_keeps_the_callers_directory_and_never_deletes_a_foreign_environment(tmp_path):
    venv = _fake_env(tmp_path, ROOT)
    work = tmp_path / "work"
    work.mkdir()
    proc = _env_sh(tmp_path, venv, "pwd", cwd=work)
    assert proc.returncode == 0 and proc.stdout.strip() == str(work), proc.stderr
    # An environment env.sh did not create (no .complete, no marker): installed into, not recreated.
    (venv / ".complete").unlink()
    (venv / "keep-me").write_text("user data")
    proc = _env_sh(tmp_path, venv, "pwd", cwd=work)
    assert proc.returncode == 0 and (venv / "keep-me").exists(), proc.stderr
