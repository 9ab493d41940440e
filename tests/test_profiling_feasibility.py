import csv
import json
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
    run_steps,
    training_days,
)
from mats_scale.profiling.measured import measured_mfu
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
    # 1 TFLOP per clip at 50% of 100 TFLOPS: 0.02 s per clip per GPU; 10 clips per micro-batch, 3
    # micro-batches per optimizer step: 0.6 s per step; 144000 steps = 1 day.
    assert training_days(10**12, 10, node, 0.5, steps=144_000, grad_accum=3) == pytest.approx(1.0)
    # 1000 videos, 2 clips each, on 8 GPUs at micro-batch 10: ceil(1000 / 8) // 5 = 25 steps per epoch.
    assert run_steps(4, 1000, 8, 10, num_sample=2) == 100


def test_h200_and_b200_nodes_and_every_node_in_the_help(capsys):
    assert NODES["h200-141"] == Node(8, 141.0, 989.0, "8x H200-SXM-141GB")
    assert NODES["b200-192"] == Node(8, 192.0, 2250.0, "8x B200-192GB")
    with pytest.raises(SystemExit) as e:
        plan_main(["--help"])
    assert e.value.code == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in NODES), [n for n in NODES if n not in usage]


def _metrics(path, sessions):
    """A metrics.jsonl as the Trainer writes it: per session a start event, then step records."""
    lines = []
    for world, mfus in sessions:
        lines.append({"event": "start", "step": 0, "world_size": world, "mfu_peak_source": "NVIDIA H100"})
        lines += [{"step": i + 1, "loss": 1.0, "mfu": m} for i, m in enumerate(mfus)]
    path.write_text("\n".join(json.dumps(rec) for rec in lines) + '\n{"step": 9, "mf')  # cut short


def test_measured_mfu_of_a_run_is_the_median_of_its_last_session(tmp_path):
    _metrics(tmp_path / "metrics.jsonl", [(4, [0.9, 0.9, 0.9]), (8, [0.05, 0.9, 0.40, 0.44, 0.42])])
    for where in (tmp_path, tmp_path / "metrics.jsonl"):
        got = measured_mfu(str(where), "g")
        assert got.mfu == pytest.approx(0.42)  # the first 2 steps (warm-up) left out
        assert "median of 3 steps" in got.source and "8 x NVIDIA H100" in got.source
    _metrics(tmp_path / "metrics.jsonl", [(1, [])])
    with pytest.raises(ValueError, match="no step record with an mfu"):
        measured_mfu(str(tmp_path), "g")


def test_a_runs_data_wait_reaches_the_plans_data_side(tmp_path, capsys):
    """--mfu-from RUN: the data side names the run's measured stall next to the predicted rates."""
    run = tmp_path / "run"
    run.mkdir()
    steps = [
        {"step": i + 1, "loss": 1.0, "mfu": 0.3, "data_wait": w}
        for i, w in enumerate([0.9, 0.5, 0.1, 0.2, 0.3])
    ]
    start = {"event": "start", "step": 0, "world_size": 8, "mfu_peak_source": "NVIDIA H100"}
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [start, *steps]) + "\n")
    assert measured_mfu(str(run), "g").data.endswith("data wait 20% of the step time (median over steps)")
    end = {
        "event": "end",
        "at_step": 5,
        "clips_per_s_delivered": 80.0,
        "clips_per_s_consumed": 100.0,
        "data_wait": 0.2,
    }
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(end) + "\n")
    argv = ["--engines", "zero3", "--strategies", "mats+dual", "--checkpoint", "none", "--no-progress"]
    assert plan_main([*argv, "--mfu-from", str(run), "--out", str(tmp_path / "o")]) == 0
    data = capsys.readouterr().out.split("## Data side")[1]
    assert (
        f"- measured in {run / 'metrics.jsonl'}: data wait 20% of the steps' time, "
        "80.0 clips/s delivered vs 100.0 consumed" in data
    )


def test_measured_mfu_of_gpucheck_takes_the_planned_model_and_preset(tmp_path):
    path = tmp_path / "results.json"
    results = [("ViT-B mats+dual", 0.50), ("ViT-g mats+dual", 0.47), ("vit_g tube+rc", 0.39), ("ViT-g", 0.45)]
    doc = {
        "device": "NVIDIA H200",
        "results": [{"name": n, "mfu": m, "clips_per_s": 1.0} for n, m in results],
    }
    doc["results"].append({"name": "ViT-g mats+dual no mfu", "mfu": None})  # a run that gave none
    path.write_text(json.dumps(doc))
    got = measured_mfu(str(path), "g", "mats+dual")
    assert got.mfu == 0.47 and "entry 'ViT-g mats+dual'" in got.source and "NVIDIA H200" in got.source
    assert measured_mfu(str(path), "g", "mats").mfu == 0.45  # no entry names mats alone: all ViT-g ones
    assert measured_mfu(str(path), "g").mfu == 0.45
    other = measured_mfu(str(path), "L", "mats+dual")  # no ViT-L entry: the median of all
    assert other.mfu == pytest.approx(0.46) and "no entry is ViT-L" in other.source
    # mats-gpucheck's own rows name the model and preset in fields (a depth-reduced ViT-g is "g-8blk").
    rows = [
        {"name": "B mats+dual", "model": "B", "preset": "mats+dual", "mfu": 0.5},
        {"name": "g-8blk tube+rc", "model": "g-8blk", "preset": "tube+rc", "mfu": 0.3},
        {"name": "g-8blk mats+dual", "model": "g-8blk", "preset": "mats+dual", "mfu": 0.36},
        {"name": "g-8blk mats+dual compile", "model": "g-8blk", "preset": "mats+dual", "mfu": 0.4},
        {"name": "mem zero3 b32", "model": "B", "preset": "tube+rc", "mfu": float("nan")},
    ]
    path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "results": rows}))
    assert measured_mfu(str(path), "g", "mats+dual").mfu == pytest.approx(0.38)
    assert measured_mfu(str(path), "B", "tube+rc").mfu == 0.5  # the NaN row does not count
    for text, message in (
        ("[1, 2]", "expected a JSON object"),
        ('{"results": [{"mfu": 0.3}]}', 'expected "results"'),
        ('{"results": []}', "finite"),
        ('{"results": [{"name": "ViT-g", "mfu": 35}]}', "must be in \\(0, 1\\]"),
        ("{nope", "not valid JSON"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            measured_mfu(str(path), "g")
    with pytest.raises(ValueError, match="no such file"):
        measured_mfu(str(tmp_path / "missing.json"), "g")


def test_cli_configured_batch_schedule_and_measured_mfu(tmp_path, capsys):
    """With --config: the schedule as the trainer derives it, s/step and days at the configured
    micro-batch, the measured MFU named as such, and the configured checkpointing set against the
    table's policies (here 'half' also checkpoints the decoder, the config does not)."""
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "model:\n  size: debug\n  num_frames: 8\n  img_size: 64\nmasking:\n  preset: mats+dual\n"
        "data:\n  dataset: list\n  train_list: none.txt\n  num_sample: 2\n  batch_size: 8\n"
        "optim:\n  grad_accum: 2\n  warmup_epochs: 1\ntrain:\n  epochs: 3\n"
        "parallel:\n  backend: deepspeed\n  zero_stage: 3\n  checkpoint_encoder_every: 2\n"
    )
    check = tmp_path / "gpucheck.json"
    check.write_text(json.dumps({"device": "NVIDIA B200", "results": [{"name": "ViT-debug", "mfu": 0.25}]}))
    common = ["--config", str(cfg), "--engines", "zero3", "--strategies", "mats+dual", "--no-progress"]
    argv = [*common, "--checkpoint", "none,half", "--node", "b200-192", "--train-videos", "1000"]
    assert plan_main([*argv, "--mfu-from", str(check), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    # ceil(1000 / 8) = 125 videos per GPU, 4 per micro-batch: 31 micro-batches, 15 steps per epoch.
    assert "train.epochs=3 -> train.steps=45, warm-up 15 steps (15 steps per epoch" in out
    assert "checkpointing (E,D) = (2,0): every 2nd encoder block, no decoder block" in out
    assert "not a policy of the table: none = (0,0), half = (2,2)" in out
    line = next(x for x in out.splitlines() if x.startswith("- time at the configured micro-batch 8: "))
    step_s = float(line.split(": ")[1].split(" s/step")[0])
    assert f"{45 * step_s / 86400:.1f} days for 45 steps (MFU 0.25, measured: mats-gpucheck" in line
    assert "entry 'ViT-debug'" in line
    assert "on 8 x 192 GiB (8x B200-192GB)" in (tmp_path / "o" / "feasibility.md").read_text()
    assert plan_main([*common, "--mfu", "0.3", "--mfu-from", str(check), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: --mfu and --mfu-from: give one of the two"
    assert plan_main([*common, "--train-clips", "5", "--out", str(tmp_path)]) == 2
    assert "--train-clips: renamed --train-videos" in capsys.readouterr().err
    nowhere = tmp_path / "never"
    assert plan_main([*common, "--train-videos", "30", "--out", str(nowhere)]) == 2  # 4 videos per GPU
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: train.epochs: 30 videos over 8 processes give no full optimizer step per epoch "
        "(data.batch_size=8, optim.grad_accum=2)"
    ]
    assert not nowhere.exists()  # refused before any planning


@pytest.mark.integration
def test_cli_progress_is_not_redrawn_into_a_pipe(tmp_path, capsys):
    """Without --no-progress and with stderr not a terminal (captured here, as in a pipe or a file):
    no bar, so no carriage returns (was: the bar redrew itself with \\r into pipes)."""
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model:\n  size: debug\n  num_frames: 8\n  img_size: 64\nmasking:\n  preset: mats+dual\n")
    argv = ["--config", str(cfg), "--engines", "zero3", "--strategies", "mats+dual", "--checkpoint", "none"]
    assert plan_main([*argv, "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out and "feasibility" in captured.out


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
