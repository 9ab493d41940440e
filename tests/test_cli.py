"""The launcher's front end: --help, --print-config, unknown options and keys (one line, exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from launch_util import PRETRAIN, ROOT

from mats_scale.config import Config
from mats_scale.config_help import config_keys, suggest, unknown_key_message


def _launch(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PRETRAIN), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_key_with_default_and_docstring(flag):
    proc = _launch(flag)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    out = proc.stdout
    assert out.startswith("usage: launchers/pretrain.py") and "--print-config" in out
    for section in ("model", "masking", "data", "optim", "train", "parallel", "logging"):
        assert f"\n{section}:\n" in out
    keys = config_keys(Config)
    assert len(keys) > 60 and all(k.doc for k in keys)  # every field has a docstring
    for k in keys:
        assert f"  {k.key} = " in out, k.key
    assert "  optim.base_lr = 0.00015\n      Learning rate per 256 clips" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--config"], "config error: --config: expects a YAML file path"),
        (["--config", "model.size=S"], "config error: --config: expects a YAML file path"),
        (["--data_path", "x"], "config error: --data_path: unknown option (a VideoMAE flag); "),
        (["--bogus"], "config error: --bogus: unknown option; usage: "),
        (["optim.baselr=1"], "config error: optim.baselr: unknown key; did you mean optim.base_lr?"),
        (["train.base_lr=1"], "config error: train.base_lr: unknown key; did you mean optim.base_lr?"),
        (["--config", "/nonexistent.yaml"], "config error: --config='/nonexistent.yaml': no such file"),
    ],
)
def test_command_line_mistakes_are_one_line_and_exit_2(args, needle):
    proc = _launch(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(needle), proc.stderr
    if args[0] == "--data_path":
        assert "data.train_list=" in lines[0]


def test_print_config_prints_the_resolved_config_and_exits(tmp_path):
    proc = _launch("--print-config", "masking.strategy=tube", "optim.base_lr=0.01")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    # The bundled default job (no --config) with the overrides on top.
    assert printed["model"]["size"] == "debug" and printed["masking"]["strategy"] == "tube"
    assert printed["optim"]["base_lr"] == 0.01 and printed["train"]["out_dir"] == "runs/default"


def test_suggestions():
    assert suggest("masking.ratioo", Config) == ["masking.ratio"]
    assert suggest("warmup_epochs", Config) == ["optim.warmup_epochs"]  # VideoMAE's flag name
    assert (
        unknown_key_message("model.colour", Config) == "model.colour: unknown key; see --help for every key"
    )


@pytest.mark.parametrize(
    "argv0, shown",
    [
        ("/venv/bin/mats-pretrain", "mats-pretrain"),  # console script (was: launchers/pretrain.py)
        ("launchers/pretrain.py", "launchers/pretrain.py"),
        ("/site/mats_scale/launch/pretrain.py", "python -m mats_scale.launch.pretrain"),  # -m, --module
        ("", "python -m mats_scale.launch.pretrain"),
    ],
)
def test_usage_names_the_command_as_it_was_started(argv0, shown):
    from mats_scale.cli import prog_name

    assert prog_name("mats_scale.launch.pretrain", argv0) == shown


def test_help_shows_no_rest_markup_and_finetune_lists_its_own_flags():
    from mats_scale.cli import plain_doc

    assert plain_doc("see :mod:`mats_scale.x` and ``key=value``") == "see mats_scale.x and key=value"
    study = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "study.py"), "--help"], capture_output=True, text=True
    )
    assert study.returncode == 0 and ":mod:" not in study.stdout and "``" not in study.stdout
    ft = subprocess.run(
        [sys.executable, str(ROOT / "launchers" / "finetune.py"), "--help"], capture_output=True, text=True
    )
    usage, options = ft.stdout.splitlines()[0], ft.stdout.split("options:")[1].split("Exit status")[0]
    assert "[--eval] [--probe]" in usage and "--eval " in options and "--probe " in options


def test_help_into_a_pipe_that_closes_early_is_quiet():
    r = subprocess.run(
        f"{sys.executable} {PRETRAIN} --help | head -1", shell=True, capture_output=True, text=True, cwd=ROOT
    )
    assert r.stdout.startswith("usage: ") and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr
