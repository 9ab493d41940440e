"""One meaning of "epoch": a visit of every training video (data.num_sample clips each), as the trainer
derives train.steps from train.epochs. The planner counts steps the same way for every shipped config
(experiment configs, every ablation-grid point and learning-study run), and the shipped K400 / SSv2
configs write their schedules in that unit."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from mats_scale.config import ConfigError, load_config
from mats_scale.profiling.feasibility import Node, config_schedule, plan_point, run_steps
from mats_scale.profiling.memory import GIB, ActivationModel
from mats_scale.profiling.states import ModelStates
from mats_scale.resources import CONFIG_DIR, GRID_DIR, STUDY_DIR, config_path, shipped_configs
from mats_scale.train import schedule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "mats_scale" / "configs"
# (processes, videos): one node, a 64-GPU job, one process; K400's and SSv2's sizes and a small odd one.
LAYOUTS = [(8, 240_000), (64, 240_000), (1, 1013), (8, 168_913), (8, 400)]


def _shipped() -> list[tuple[str, object]]:
    """(label, Config) of every shipped config: the experiment configs, each grid point, each study run."""
    from mats_scale.experiments.grid import load_grid
    from mats_scale.experiments.study import load_study
    from mats_scale.experiments.study import plan as study_plan

    out = [(name, load_config(config_path(name), [])) for name in shipped_configs(CONFIG_DIR)]
    for name in shipped_configs(GRID_DIR):
        for point in load_grid(config_path(name, GRID_DIR)).points:
            out.append((f"{name}[{point.label}]", load_config(config_path(point.config), point.overrides)))
    for name in shipped_configs(STUDY_DIR):
        for job in study_plan(load_study(config_path(name, STUDY_DIR)), "/tmp/unused-study-out"):
            out.append((f"{name}[{job.name}]", job.cfg))
    return out


SHIPPED = _shipped()


def test_every_kind_of_shipped_config_is_covered():
    labels = [label for label, _ in SHIPPED]
    assert {"k400_vit_g_mats_dual", "k400_vit_b_mats_dual", "default", "finetune_default"} <= set(labels)
    assert any(label.startswith("model_size[") for label in labels)  # grid points
    assert any(label.startswith("presets[finetune-") for label in labels)  # study runs
    assert sum(cfg.train.epochs is not None for _, cfg in SHIPPED) >= 6  # the K400 / SSv2 configs


@pytest.mark.parametrize("label,cfg", SHIPPED, ids=[label for label, _ in SHIPPED])
def test_planner_steps_are_the_trainers_for_every_shipped_config(label, cfg, monkeypatch):
    for world, videos in LAYOUTS:
        monkeypatch.setattr(schedule, "num_videos", lambda _cfg, n=videos: n)  # the trainer counts its list
        try:
            derived, _ = schedule.resolve_epochs(cfg, world)
        except ConfigError as e:
            with pytest.raises(ConfigError, match="no full optimizer step"):
                config_schedule(cfg, world, videos)
            assert "no full optimizer step" in str(e)
            continue
        planned = config_schedule(cfg, world, videos)
        assert (planned.steps, planned.warmup_steps) == (derived.train.steps, derived.optim.warmup_steps), (
            label,
            world,
            videos,
        )
        if cfg.train.epochs is not None:  # the log's epoch count at the last step is train.epochs
            assert planned.epochs == pytest.approx(cfg.train.epochs, rel=1 / planned.steps_per_epoch)


def test_vit_g_config_states_its_schedule_in_one_unit():
    """VideoMAE V2 counts an epoch as one visit of every video (--epochs), each visit num_sample clips;
    the ViT-g config gives its schedule only so: 200 epochs x 4 clips = 800 clips per video, the clip
    budget of VideoMAE's 800 epochs at one clip per video (on ~240k videos and 8 GPUs: 187400 steps)."""
    path = CONFIGS / "k400_vit_g_mats_dual.yaml"
    raw = yaml.safe_load(path.read_text())
    assert "steps" not in raw["train"] and "warmup_steps" not in raw["optim"]
    assert (raw["train"]["epochs"], raw["optim"]["warmup_epochs"], raw["data"]["num_sample"]) == (200, 10, 4)
    assert raw["train"]["epochs"] * raw["data"]["num_sample"] == 800
    s = config_schedule(load_config(str(path), []), 8, 240_000)
    assert (s.steps_per_epoch, s.steps, s.warmup_steps) == (937, 187_400, 9370)
    text = path.read_text()
    assert "visit of every training video" in text and "data.num_sample" in text
    assert "187400 steps" in text and "9370 warm-up" in text  # the comment's arithmetic is the trainer's


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_no_shipped_config_counts_epochs_in_clips(path):
    """The old unit ("800 epochs of ~240k clips") is gone: a comment that counts epochs names videos."""
    for line in path.read_text().splitlines():
        assert not re.search(r"epochs? of [~\d.,k ]*clips", line), f"{path.name}: {line.strip()}"


def test_k400_pretraining_configs_keep_the_clip_budget_in_trainer_epochs():
    """ViT-B: 400 epochs x 2 clips, ViT-g: 200 x 4 -- 800 clips per video each, as written."""
    for name, epochs, warmup in (
        ("k400_vit_b_mats_dual", 400, 20),
        ("k400_vit_b_videomae_v2", 400, 20),
        ("k400_vit_g_mats_dual", 200, 10),
    ):
        cfg = load_config(config_path(name), [])
        assert (cfg.train.epochs, cfg.optim.warmup_epochs) == (epochs, warmup)
        assert cfg.train.epochs * cfg.data.num_sample == 800


def _states() -> ModelStates:
    return ModelStates(
        params=int(2 * GIB), grads=0, master=0, optimizer=0, comm_buffers=0, gathered=0, step_temp=0
    )


def test_plan_days_count_the_trainers_steps_at_the_largest_micro_batch(monkeypatch):
    """The table's days: train.epochs at the largest micro-batch, steps as the trainer derives them for
    that batch (num_sample clips per video, grad_accum micro-batches per step), times the step time."""
    node = Node(gpus=8, mem_gib=80.0, peak_tflops=100.0)
    act = ActivationModel(
        saved_per_clip=0, saved_const=0, peak_per_clip=int(0.25 * GIB), peak_const=0, input_per_clip=0
    )
    p = plan_point(
        "mats+dual", "zero3", "none", _states(), act, 10**12, node, mfu=0.5, epochs=200, videos=240_000,
        num_sample=4, grad_accum=2,
    )  # fmt: skip
    assert p.max_batch % 4 != 0  # 279: the trainer would run 276 clips, the same 69 videos per micro-batch
    cfg = load_config(
        None,
        [
            "model.size=debug",
            f"data.batch_size={p.max_batch // 4 * 4}",
            "data.num_sample=4",
            "optim.grad_accum=2",
            "train.epochs=200",
            "data.dataset=synthetic",
        ],
    )
    monkeypatch.setattr(schedule, "num_videos", lambda _cfg: 240_000)
    trainer_steps = schedule.resolve_epochs(cfg, 8)[0].train.steps
    assert p.steps == trainer_steps == run_steps(200, 240_000, 8, p.max_batch, 4, 2)
    micro_s = 10**12 * p.max_batch / (100e12 * 0.5)
    assert p.step_s == pytest.approx(2 * micro_s)
    assert p.days == pytest.approx(trainer_steps * 2 * micro_s / 86400)


def test_run_steps_by_hand():
    # 240000 videos / 8 GPUs = 30000 per GPU; 128 clips of 4 per video = 32 videos per micro-batch:
    # 937 whole micro-batches per epoch (the trainer drops the last partial one); 200 epochs = 187400.
    assert run_steps(200, 240_000, 8, 128, 4) == 187_400
    assert run_steps(200, 240_000, 8, 128, 1) == 200 * (30_000 // 128)  # num_sample 1: 4x fewer steps
    assert run_steps(1, 240_000, 8, 128, 4, grad_accum=4) == 937 // 4
    assert run_steps(1, 7, 8, 8, 4) == 0  # 1 video per GPU, 2 per micro-batch: no whole step
    assert run_steps(1, 240_000, 8, 3, 4) == 0  # fewer clips than one video yields
    assert not math.isnan(config_schedule(load_config(None, []), 1, 400).epochs)
