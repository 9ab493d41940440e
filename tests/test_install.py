"""A non-editable install runs the default job from outside the checkout: the wheel carries the shipped
configs and DeepSpeed templates (the checkout's top-level ds_configs/, installed as mats_scale/ds_configs),
read through importlib.resources, and every console script answers --help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import tomllib
from launch_util import ROOT, env, tail

pytestmark = pytest.mark.dist  # spawns processes


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("mats_scale-*.whl")
    site = tmp / "site"
    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert inst.returncode == 0, inst.stderr[-3000:]
    return wheel, site, tmp


def _env(site) -> dict[str, str]:
    out = env()
    out["PYTHONPATH"] = str(site)  # the installed copy, not the checkout
    return out


def test_wheel_ships_configs_and_deepspeed_templates(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "mats_scale/configs/default.yaml" in names
    assert {f"mats_scale/ds_configs/zero{s}.json" for s in range(4)} <= names


def test_every_console_script_answers_help_outside_the_checkout(installed):
    wheel, site, tmp = installed
    with zipfile.ZipFile(wheel) as z:
        (entry_points,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        shipped = {
            line.split("=")[0].strip()
            for line in z.read(entry_points).decode().splitlines()
            if "=" in line and line.startswith("mats-")
        }
    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = set(tomllib.load(f)["project"]["scripts"])
    commands = {p.stem for p in (ROOT / "mats_scale" / "launch").glob("*.py")} - {"__init__", "runner"}
    assert shipped == declared == {f"mats-{c.replace('_', '-')}" for c in commands}, (shipped, declared)
    workdir = tmp / "help"
    workdir.mkdir()
    for name in sorted(declared):
        proc = subprocess.run(
            [str(site / "bin" / name), "--help"],
            capture_output=True,
            text=True,
            cwd=workdir,
            env=_env(site),
            timeout=300,
        )
        assert proc.returncode == 0 and "usage:" in proc.stdout, (name, tail(proc))
    assert not any(workdir.iterdir())  # --help writes nothing


def test_installed_package_finds_its_deepspeed_templates(installed):
    _, site, tmp = installed
    code = (
        "from importlib.resources import files; from mats_scale.resources import ds_template; "
        "folder = files('mats_scale.ds_configs'); "
        "print(sorted(p.name for p in folder.iterdir() if p.name.endswith('.json'))); "
        "print(ds_template('zero2.json'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp, env=_env(site), timeout=120
    )
    assert proc.returncode == 0, tail(proc)
    names, path = proc.stdout.strip().splitlines()
    assert names == str([f"zero{s}.json" for s in range(4)] + ["zero3_offload.json"])
    assert path.startswith(str(site)) and os.path.isfile(path)


def test_installed_package_runs_the_default_job_outside_the_checkout(installed):
    _, site, tmp = installed
    workdir = tmp / "elsewhere"
    workdir.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import mats_scale; print(mats_scale.__file__)"],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=_env(site),
    )
    assert where.stdout.strip().startswith(str(site))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mats_scale.launch.pretrain",
            "train.steps=2",
            "data.num_workers=0",
            "logging.progress_bar=false",
        ],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=_env(site),
        timeout=600,
    )
    assert proc.returncode == 0, tail(proc)
    run_dir = workdir / "runs" / "default"
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert os.path.isdir(workdir / "data" / "bundled")  # the bundled data is made where the user runs
