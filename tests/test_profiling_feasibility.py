import csv
import math

import pytest
import torch

from mats_scale.cli import run
from mats_scale.config import ModelConfig
from mats_scale.launch.plan import main as plan_main
from mats_scale.profiling.feasibility import (
    NODES,
    Node,
    data_verdict,
    gpu_clips_per_s,
    max_micro_batch,
    plan,
    training_days,
)
from mats_scale.profiling.memory import GIB, ActivationModel, Allowance, peak_allocated
from mats_scale.profiling.states import ModelStates
from mats_scale.profiling.workload import CHECKPOINT_POLICIES, Workload, masking_config


def _states(resident_gib: float, gathered_gib: float = 0.0, step_gib: float = 0.0) -> ModelStates:
    return ModelStates(
        params=int(resident_gib * GIB),
        grads=0,
        master=0,
        optimizer=0,
        comm_buffers=0,
        gathered=int(gathered_gib * GIB),
        step_temp=int(step_gib * GIB),
    )


def test_max_micro_batch_is_the_boundary():
    node = Node(gpus=8, mem_gib=40.0, peak_tflops=312.0)
    allowance = Allowance(cuda_context_gib=1.0, fragmentation=0.1)
    act = ActivationModel(
        saved_per_clip=0,
        saved_const=0,
        peak_per_clip=int(0.3 * GIB),
        peak_const=12345,
        input_per_clip=5 * 2**20,
    )
    states = _states(6.0, gathered_gib=0.5, step_gib=2.0)
    b = max_micro_batch(states, act, node, allowance)

    def total(n):
        allocated = peak_allocated(states, act, n)
        return allocated + allowance.total(allocated)

    assert b > 0
    assert total(b) <= node.mem_gib * GIB < total(b + 1)
    # Nothing fits when the optimizer step alone overflows.
    assert max_micro_batch(_states(1.0, step_gib=40.0), act, node, allowance) == 0


def test_training_days_arithmetic():
    node = Node(gpus=8, mem_gib=80, peak_tflops=100.0)
    # 1 TFLOP per clip at 50% of 100 TFLOPS: 0.02 s per clip per GPU; 1000 clips / (10 x 8) -> 13 steps
    # of 10 clips: 13 x 0.2 s = 2.6 s per epoch.
    days = training_days(10**12, 10, node, 0.5, epochs=86400 / 2.6, train_clips=1000)
    assert days == pytest.approx(1.0)


@pytest.mark.integration
def test_plan_orders_strategies_engines_and_checkpointing():
    model = ModelConfig(size="S")
    wls = {
        st: Workload(model, masking_config(st, 0.9), dtype=torch.bfloat16) for st in ("tube+rc", "mats+dual")
    }
    policies = {k: CHECKPOINT_POLICIES[k] for k in ("none", "full")}
    plans = plan(wls, ["zero0", "zero3"], policies, NODES["a100-40"])
    best = {(p.strategy, p.engine, p.checkpoint): p for p in plans}
    assert len(best) == 8
    for engine in ("zero0", "zero3"):
        for pol in policies:
            assert best["mats+dual", engine, pol].max_batch > best["tube+rc", engine, pol].max_batch
        assert best["mats+dual", engine, "full"].max_batch > best["mats+dual", engine, "none"].max_batch
    # With the shipped templates (5e7-element buckets) ZeRO-3 shards more than its buckets cost...
    assert best["mats+dual", "zero3", "none"].max_batch > best["mats+dual", "zero0", "none"].max_batch
    # ...while DeepSpeed's own default 5e8-element reduce bucket (an empty ds_config) outweighs what
    # it shards of a model as small as ViT-S.
    defaults = {
        (p.strategy, p.engine, p.checkpoint): p
        for p in plan(wls, ["zero0", "zero3"], policies, NODES["a100-40"], ds_config={})
    }
    assert defaults["mats+dual", "zero3", "none"].max_batch < defaults["mats+dual", "zero0", "none"].max_batch
    # Recomputation costs time: a larger step per clip with full checkpointing.
    p0, p1 = best["mats+dual", "zero3", "none"], best["mats+dual", "zero3", "full"]
    assert p1.train_flops_per_clip > p0.train_flops_per_clip
    assert math.isclose(p0.step_s, p0.train_flops_per_clip * p0.max_batch / (312e12 * 0.35))


@pytest.mark.integration
def test_cli_sweep_and_config_check(tmp_path, capsys):
    rate = tmp_path / "rate.json"
    rate.write_text('{"clips_per_s_per_core": 12.5}')  # what benchmarks/bench_data.py --list writes
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "model:\n  size: S\n  num_frames: 8\n  img_size: 128\nmasking:\n  strategy: mats\n"
        "  decoder: running_cell\n  decoder_mode: lean\ndata:\n  batch_size: 64\n"
        "parallel:\n  backend: deepspeed\n  zero_stage: 3\n"
    )
    argv = [
        "--config",
        str(cfg),
        "--engines",
        "zero2,zero3",
        "--checkpoint",
        "none,full",
        "--strategies",
        "tube+rc,mats+dual",
        "--node",
        "a100-40",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--data-rate",
        str(rate),
        "--host-cores",
        "32",
    ]
    assert plan_main(argv) == 0
    out = capsys.readouterr().out
    assert "Headline: ViT-S on 8 x 40 GiB, ZeRO-3" in out and "Your config" in out and "FITS" in out
    assert "## Data side: 8 GPUs at MFU 0.35, 32-core host" in out
    assert out.count("-bound: ") == 2 * 2 + 1  # 2 strategies x 2 policies, and the configured job
    assert "- data: decode-bound: needs" in out  # ViT-S at 8x128 consumes thousands of clips/s per GPU
    with open(tmp_path / "feasibility.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2
    assert all(float(r["total_gib"]) <= 40.0 for r in rows)
    assert (tmp_path / "feasibility.png").stat().st_size > 0


def test_cli_bad_input(tmp_path, capsys):
    assert plan_main(["--node", "custom", "--out", str(tmp_path)]) == 2
    assert "--node custom needs --gpu-mem-gib and --peak-tflops" in capsys.readouterr().err
    assert plan_main(["masking.ratio=2", "--out", str(tmp_path)]) == 2
    assert "masking.ratio=2" in capsys.readouterr().err
    assert plan_main(["--ds-config", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert plan_main(["--data-rate", "fast", "--out", str(tmp_path)]) == 2
    assert "--data-rate='fast': neither a number nor a file" in capsys.readouterr().err
    assert plan_main(["--data-rate", "0", "--out", str(tmp_path)]) == 2
    assert "must be a finite number > 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option,value,rule",
    [
        ("--gpu-mem-gib", "inf", "a number in (0, 1e+06)"),
        ("--gpu-mem-gib", "1e300", "a number in (0, 1e+06)"),
        ("--peak-tflops", "nan", "a finite number > 0"),
        ("--mfu", "inf", "a finite number > 0"),
        ("--epochs", "-1", "a finite number > 0"),
        ("--context-gib", "inf", "a finite number >= 0"),
        ("--fragmentation", "nan", "a number in [0, 1)"),
        ("--fragmentation", "1", "a number in [0, 1)"),
        ("--gpus", "0", "a whole number > 0"),
    ],
)
def test_cli_non_finite_numbers_are_one_line(tmp_path, capsys, option, value, rule):
    out = tmp_path / "out"
    assert plan_main([option, value, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: argument {option}: {value!r}: must be {rule} (see --help)"]
    assert not out.exists()  # refused while parsing, before any planning


def test_cli_infinite_rate_and_unwritable_out(tmp_path, capsys):
    assert plan_main(["--data-rate", "inf", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --data-rate='inf': must be a finite number > 0 clips/s"
    ]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert plan_main(["--out", str(blocker / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: --out={str(blocker / 'out')!r}: {blocker} is not a folder"
    )


def test_cli_inf_from_the_command_line_has_no_traceback(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "profiling" / "feasibility.py"), "--gpu-mem-gib", "inf"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: argument --gpu-mem-gib: 'inf': must be a number in (0, 1e+06) (see --help)"
    ]


def test_data_verdict_arithmetic_by_hand():
    """0.3 TFLOP per training clip on 8 GPUs of 300 TFLOPS at MFU 0.4: 300e12 x 0.4 / 3e11 = 400 clips/s
    per GPU, 3200 for the node. At 25 clips/s per core: ceil(3200 / 25) = 128 cores (16 per GPU); a
    64-core host keeps 8 for the training processes, 56 for workers < 128: decode-bound, the GPUs at
    most 56 x 25 / 3200 = 43.75 % busy. At 100 clips/s per core: 32 cores (4 per GPU) <= 56: compute-bound."""
    node = Node(gpus=8, mem_gib=80.0, peak_tflops=300.0)
    assert gpu_clips_per_s(3e11, node, 0.4) == pytest.approx(400.0)
    v = data_verdict(3e11, node, 0.4, core_clips_per_s=25.0, host_cores=64)
    assert v.node_clips_per_s == pytest.approx(3200.0)
    assert (v.cores_needed, v.cores_for_workers, v.workers_per_gpu, v.decode_bound) == (128, 56, 16, True)
    assert v.gpu_busy_fraction == pytest.approx(0.4375)
    assert v.text().startswith("decode-bound: needs 128 cores / workers (16 per GPU)")
    assert "at most 44% busy" in v.text()
    v = data_verdict(3e11, node, 0.4, core_clips_per_s=100.0, host_cores=64)
    assert (v.cores_needed, v.workers_per_gpu, v.decode_bound, v.gpu_busy_fraction) == (32, 4, False, 1.0)
    assert v.text().startswith("compute-bound: 32 of 56 free cores (4 workers per GPU)")
    # Exactly enough cores (72 - 8 = 64 free, 3200 / 50 = 64 needed) is compute-bound; a bit slower is not.
    assert not data_verdict(3e11, node, 0.4, 50.0, 72).decode_bound
    assert data_verdict(3e11, node, 0.4, 49.9, 72).decode_bound


def test_cli_only_argument_errors_become_exit_2():
    from mats_scale.cli import UsageError

    def bad_argument(argv):
        raise UsageError("--x=1: must be 2")

    def bug(argv):
        raise ValueError("a programming error deep inside")

    assert run(bad_argument, []) == 2
    with pytest.raises(ValueError, match="a programming error"):  # keeps its traceback
        run(bug, [])


@pytest.mark.parametrize("command", ["plan", "flops", "memory"])
def test_every_profiler_option_has_help_text(command, monkeypatch):
    import argparse
    import importlib

    module = importlib.import_module(f"mats_scale.launch.{command}")
    seen = {}

    def capture(self, argv=None, namespace=None):
        seen["parser"] = self
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        module.main([])
    missing = [a.option_strings or a.dest for a in seen["parser"]._actions if not a.help]
    assert not missing, missing
