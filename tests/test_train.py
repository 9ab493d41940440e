"""The training loop in one process (parallel.backend=none): resume, signals, the non-finite policy,
logging, checkpoint bookkeeping and the DeepSpeed config templates."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_util import PRETRAIN, ROOT, TINY, env, metric_runs

from mats_scale.config import ConfigError, load_config
from mats_scale.launch.export import main as export_main
from mats_scale.parallel.distributed import DistEnv
from mats_scale.parallel.ds_config import resolve_ds_config
from mats_scale.resources import ds_template
from mats_scale.run.checkpoint import CheckpointError, CheckpointManager
from mats_scale.train.loop import TrainingError, train

LOCAL = TINY + ["parallel.backend=none", "data.batch_size=2", "train.steps=6", "logging.log_every=1"]


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, LOCAL + [f"train.out_dir={tmp_path}", *overrides])


# ---- exact resume, SIGTERM, export (one process) -----------------------------------------------
@pytest.mark.integration
def test_sigterm_then_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    # Dual masking with loss weights, drop path (torch RNG), accumulation and a data worker process.
    extra = [
        "masking.decoder=running_cell",
        "masking.ratio=0.5",
        "model.drop_path=0.2",
        "optim.grad_accum=2",
        "data.num_workers=1",
    ]
    full = train(_cfg(tmp_path / "a", *extra))
    monkeypatch.setenv("MATS_FAULT_SIGTERM_AT_STEP", "2")
    first = train(_cfg(tmp_path / "b", *extra))
    assert first.stopped_by_signal and first.step == 2
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step_00000002"
    monkeypatch.delenv("MATS_FAULT_SIGTERM_AT_STEP")
    second = train(_cfg(tmp_path / "b", *extra))
    assert second.step == 6 and not second.stopped_by_signal and second.last_loss == full.last_loss
    ref = metric_runs(tmp_path / "a")[0]["steps"]
    runs = metric_runs(tmp_path / "b")
    assert [sorted(r["steps"]) for r in runs] == [[1, 2], [3, 4, 5, 6]]
    for run in runs:
        for step, rec in run["steps"].items():
            assert (rec["loss"], rec["grad_norm"]) == (ref[step]["loss"], ref[step]["grad_norm"]), step
    # The exported weights agree bit for bit too, and load into the model.
    assert export_main([str(tmp_path / "a"), str(tmp_path / "a.pt")]) == 0
    assert export_main([str(tmp_path / "b"), str(tmp_path / "b.pt")]) == 0
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finished_run_resumes_to_nothing_and_fresh_start_over_checkpoints_is_refused(tmp_path):
    train(_cfg(tmp_path, "train.steps=2"))
    again = train(_cfg(tmp_path, "train.steps=2"))  # resume=auto: already done
    assert again.step == 2 and len(metric_runs(tmp_path)) == 2 and not metric_runs(tmp_path)[1]["steps"]
    with pytest.raises(CheckpointError, match="already holds checkpoints .* train.resume=auto"):
        train(_cfg(tmp_path, "train.steps=2", "train.resume=none"))


# ---- non-finite losses ---------------------------------------------------------------------------
def test_nan_policy_skip_drops_the_step_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("MATS_FAULT_NAN_STEPS", "2")
    result = train(_cfg(tmp_path, "train.nan_policy=skip"))
    assert result.step == 6 and result.skipped_steps == 1 and math.isfinite(result.last_loss)
    steps = metric_runs(tmp_path)[0]["steps"]
    assert [s for s in steps if not steps[s]["applied"]] == [2] and steps[6]["skipped_steps"] == 1
    log = (tmp_path / "train.log").read_text()
    assert "step 2: non-finite loss in 1 of 1 micro-batches; update skipped" in log


def test_nan_policy_stop_ends_the_run_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MATS_FAULT_NAN_STEPS", "2")
    with pytest.raises(TrainingError, match=r"step 2: non-finite loss .*train.nan_policy=stop"):
        train(_cfg(tmp_path, "train.nan_policy=stop"))


def test_nan_policy_skip_stops_after_k_in_a_row(tmp_path, monkeypatch):
    monkeypatch.setenv("MATS_FAULT_NAN_STEPS", "2,4,5")
    with pytest.raises(TrainingError, match=r"step 5: .* after 2 skipped step\(s\) in a row .*steps=2"):
        train(_cfg(tmp_path, "train.max_nan_steps=2"))
    steps = metric_runs(tmp_path)[0]["steps"]
    assert [s for s in steps if not steps[s]["applied"]] == [2, 4, 5]  # 2 alone was tolerated


# ---- logging -------------------------------------------------------------------------------------
def test_tensorboard_text_log_and_progress_bar(tmp_path, capsys, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar is drawn on a terminal only
    train(
        _cfg(
            tmp_path,
            "train.steps=3",
            "logging.tensorboard=true",
            "logging.progress_bar=true",
            "logging.log_every=2",
        )
    )
    tb = EventAccumulator(str(tmp_path / "tb"))
    tb.Reload()
    tags = set(tb.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "perf/clips_per_s",
        "perf/step_time_s",
        "perf/data_wait",
        "perf/data_wait_mean_over_ranks",
        "perf/data_wait_rank/0",
        "tokens/encoder_per_step",
        "tokens/decoder_per_step",
        "memory/peak_gib",
        "data/skipped_files",
        "train/skipped_steps",
    } <= tags
    assert [e.step for e in tb.Scalars("train/loss")] == [1, 2, 3]
    # tube 0.9 on a 2x4x4 grid: 2 x 2 visible + 2 x 14 targets per clip, 2 clips per step
    assert [e.value for e in tb.Scalars("tokens/encoder_per_step")] == [8, 8, 8]
    assert [e.value for e in tb.Scalars("tokens/decoder_per_step")] == [64, 64, 64]
    log = (tmp_path / "train.log").read_text()
    assert "step      2/3" in log and "step      3/3" in log and "clips/s" in log
    losses = [e.value for e in tb.Scalars("train/loss")]  # k = 1 of 3 steps: first vs last step
    assert (
        f"loss: mean of the first 1 steps {losses[0]:.4f} -> mean of the last 1 steps {losses[-1]:.4f}" in log
    )
    err = capsys.readouterr().err
    assert "3/3" in err and "step/s" in err  # tqdm bar with rate / ETA on stderr


def test_no_progress_bar_when_stderr_is_not_a_terminal_and_log_lines_average_the_window(tmp_path, capsys):
    train(_cfg(tmp_path, "train.steps=6", "logging.progress_bar=true", "logging.log_every=3"))
    err = capsys.readouterr().err
    assert "\r" not in err and "step/s" not in err  # stderr is captured here: no bar redraws
    losses = {s: r["loss"] for s, r in metric_runs(tmp_path)[0]["steps"].items()}
    lines = [ln for ln in (tmp_path / "train.log").read_text().splitlines() if " step " in ln]
    assert len(lines) == 3  # steps 1, 3, 6
    # Step 6: the mean over steps 4-6 (the window since the line of step 3), the epoch (1024 synthetic
    # clips / 2 per step = 512 steps per epoch) and the ETA.
    mean = sum(losses[s] for s in (4, 5, 6)) / 3
    assert f"step      6/6  epoch 0.01  loss {mean:.4f} (mean of 3)" in lines[2]
    assert f"loss {(losses[2] + losses[3]) / 2:.4f} (mean of 2)" in lines[1] and "ETA 0m00s" in lines[2]


# ---- checkpoint bookkeeping ----------------------------------------------------------------------
class _FileEngine:
    name = "fake"

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def save(self, path: str) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "w.txt").write_text(str(self.value))

    def load(self, path: str) -> None:
        self.value = int((Path(path) / "w.txt").read_text())


ONE = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), amp_dtype=None)


def test_checkpoints_keep_last_k_and_pointer(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2, env=ONE)
    for step in (2, 4, 6):
        mgr.save(step, _FileEngine(step), {"n": step}, {"world_size": 1})
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    assert mgr.resolve("auto") == root / "step_00000006"
    engine = _FileEngine()
    meta, state = mgr.load(mgr.resolve("auto"), engine, {"world_size": 1})
    assert (engine.value, state, meta["step"]) == (6, {"n": 6}, 6)


def test_crash_mid_save_keeps_previous_and_next_save_cleans_up(tmp_path):
    def crash(step):
        if step == 4:
            raise KeyboardInterrupt  # stands in for a kill in the middle of writing

    mgr = CheckpointManager(str(tmp_path), keep_last=3, env=ONE, on_save=crash)
    mgr.save(2, _FileEngine(2), {}, {})
    with pytest.raises(KeyboardInterrupt):
        mgr.save(4, _FileEngine(4), {}, {})
    root = tmp_path / "checkpoints"
    assert (root / ".tmp-step_00000004" / "engine" / "w.txt").exists()
    assert mgr.resolve("auto") == root / "step_00000002"
    mgr.save(6, _FileEngine(6), {}, {})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000006"]


def test_unusable_checkpoints_are_refused_with_the_reason(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2, env=ONE)
    mgr.save(2, _FileEngine(), {}, {"world_size": 2, "engine": "deepspeed-zero3"})
    with pytest.raises(CheckpointError, match="written with world_size=2, this run has world_size=1"):
        mgr.load(mgr.resolve("auto"), _FileEngine(), {"world_size": 1, "engine": "deepspeed-zero3"})
    with pytest.raises(CheckpointError, match="not a complete mats-scale checkpoint"):
        mgr.resolve(str(tmp_path))
    # A dangling pointer is reported, and the newest checkpoint that verifies is used.
    (tmp_path / "checkpoints" / "latest").write_text("step_00000099")
    fresh = CheckpointManager(str(tmp_path), keep_last=2, env=ONE)
    assert fresh.resolve("auto") == tmp_path / "checkpoints" / "step_00000002"
    assert any("names step_00000099, which does not exist" in n for n in fresh.notes)


# ---- DeepSpeed config templates ------------------------------------------------------------------
@pytest.mark.parametrize("template", sorted(p.name for p in Path(ds_template("")).glob("*.json")))
def test_every_template_resolves_from_the_typed_config(template):
    stage = int(template[4])
    extra = ["parallel.offload_optimizer=true"] if "offload" in template else []
    cfg = load_config(
        None,
        [
            "data.batch_size=3",
            "optim.grad_accum=2",
            "optim.clip_grad=1.5",
            f"parallel.zero_stage={stage}",
            *extra,
        ],
    )
    ds, path = resolve_ds_config(cfg, world_size=4, bf16=True, cuda=True)
    assert Path(path).name == template
    batch = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batch == (24, 3, 2)
    assert ds["gradient_clipping"] == 1.5 and ds["zero_optimization"]["stage"] == stage
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and ds["bf16"]["enabled"] is False
    assert '"auto"' not in json.dumps(ds)
    if extra:
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert ds["zero_force_ds_cpu_optimizer"] is True  # DeepSpeedCPUAdam on GPUs


def _template(tmp_path, **fields) -> str:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **fields}))
    return str(path)


def test_template_values_that_contradict_the_typed_config_are_refused(tmp_path):
    cfg = load_config(
        None, [f"parallel.ds_config={_template(tmp_path, train_batch_size=32)}", "data.batch_size=4"]
    )
    with pytest.raises(
        ConfigError,
        match=r"train_batch_size=32 contradicts the typed config \("
        r"data.batch_size=4 x 2 processes x optim.grad_accum=1 gives 8\)",
    ):
        resolve_ds_config(cfg, world_size=2, bf16=False, cuda=False)
    cfg = load_config(None, [f"parallel.ds_config={_template(tmp_path, optimizer={'type': 'Adam'})}"])
    with pytest.raises(ConfigError, match="'optimizer' must not be set; it comes from optim"):
        resolve_ds_config(cfg, world_size=1, bf16=False, cuda=False)
    ok = load_config(
        None, [f"parallel.ds_config={_template(tmp_path, train_batch_size=8)}", "data.batch_size=4"]
    )
    assert resolve_ds_config(ok, world_size=2, bf16=False, cuda=False)[0]["train_batch_size"] == 8


@pytest.mark.integration
def test_launcher_refuses_a_contradicting_template_with_one_line(tmp_path):
    template = _template(tmp_path, gradient_clipping=2.0)
    proc = subprocess.run(
        [
            sys.executable,
            str(PRETRAIN),
            *LOCAL,
            "parallel.backend=deepspeed",
            "optim.clip_grad=0.5",
            f"parallel.ds_config={template}",
            f"train.out_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env(),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"config error: {template}: gradient_clipping=2.0 contradicts the typed config "
        '(optim.clip_grad=0.5 gives 0.5); remove it or write "auto"'
    ]
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ---- schedule warnings ---------------------------------------------------------------------------
def test_schedule_warns_of_a_warmup_as_long_as_the_run_and_of_videos_no_batch_holds():
    from mats_scale.train.schedule import schedule_warnings

    cfg = load_config(None, ["train.steps=100", "optim.warmup_steps=10", "data.batch_size=4"])
    assert schedule_warnings(cfg, 1, 8) == []  # 8 videos in 2 whole batches
    (w,) = schedule_warnings(cfg, 1, 6)  # 6 videos at batch 4: one batch, 2 left out each epoch
    assert w.startswith("data: 6 videos on 1 process(es) at 4 videos per batch: 2 of them are left out")
    assert schedule_warnings(cfg, 2, 8) == []  # 4 per process: one whole batch each
    assert "4 of them" in schedule_warnings(cfg, 2, 12)[0]  # 6 per process: 4 used, 2 x 2 left out
    repeated = load_config(None, ["data.batch_size=4", "data.num_sample=2"])  # 2 videos per batch
    assert schedule_warnings(repeated, 1, 6) == []
    long = load_config(None, ["train.steps=10", "optim.warmup_steps=10"])
    assert schedule_warnings(long, 1, 8)[0].startswith("optim.warmup_steps=10 >= train.steps=10: ")


def test_the_trainer_logs_the_schedule_warnings(tmp_path):
    train(_cfg(tmp_path, "train.steps=3", "optim.warmup_steps=5"))
    log = (tmp_path / "train.log").read_text()
    assert "optim.warmup_steps=5 >= train.steps=3: the learning rate only ramps up" in log
