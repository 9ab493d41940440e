"""MFU arithmetic (mats_scale.train.mfu) against hand-computed cases, and the config override."""

from __future__ import annotations

import pytest
import torch

from mats_scale.config import load_config
from mats_scale.train.mfu import MfuMeter, gpu_peak_flops, mfu


def test_mfu_hand_computed():
    # 3e12 FLOPs per clip x 40 clips/s = 1.2e14 FLOP/s on 8 devices of 312e12: 1.2e14 / 2.496e15.
    assert mfu(3e12, 40.0, 312e12, 8) == pytest.approx(0.0480769, rel=1e-5)
    # One device reaching exactly its peak.
    assert mfu(1e9, 2.0, 2e9, 1) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mfu(1e9, 1.0, 0.0, 1)


def test_gpu_table_matches_by_name_and_precision():
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", bf16=True) == 312e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", bf16=False) == 156e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", bf16=True) == 756e12
    assert gpu_peak_flops("NVIDIA B200", bf16=True) == 2250e12  # the planner's b200-192 node too
    assert gpu_peak_flops("Some Unknown GPU", bf16=True) is None


class WorkloadTask:
    """The one Task method the meter calls."""

    def __init__(self, workload) -> None:
        self._workload = workload

    def workload(self):
        return self._workload


DEBUG = ["model.size=debug", "model.num_frames=4", "model.img_size=64"]


def test_meter_uses_the_config_peak_and_the_profiler_flops():
    from mats_scale.train.pretrain import PretrainTask

    cfg = load_config(None, [*DEBUG, "masking.preset=tube", "logging.peak_tflops=0.5"])
    meter = MfuMeter.for_run(cfg, PretrainTask(cfg), torch.device("cpu"), "fp32", devices=2)
    assert meter.peak_source == "config" and meter.peak_flops == 0.5e12
    assert meter.flops_per_clip > 0
    # clips/s such that the run reaches a quarter of the 2 x 0.5 TFLOP/s peak.
    assert meter(0.25e12 / meter.flops_per_clip) == pytest.approx(0.25)
    # A task the profilers cannot count (no workload) gets no meter; the loop never asks its name.
    assert MfuMeter.for_run(cfg, WorkloadTask(None), torch.device("cpu"), "fp32", 1) is None


def test_model_flops_match_the_profiler():
    from mats_scale.profiling.flops import count_flops, model_flops
    from mats_scale.profiling.workload import Workload
    from mats_scale.train.pretrain import PretrainTask

    cfg = load_config(None, [*DEBUG, "masking.preset=mats+dual", "masking.ratio=0.75"])
    wl = PretrainTask(cfg).workload()
    assert wl == Workload(cfg.model, cfg.masking)
    assert model_flops(wl) == count_flops(wl).train_flops
    # Checkpointing recomputes, but the model FLOPs (the MFU numerator) stay those of the plain step.
    ckpt = Workload(cfg.model, cfg.masking, 1, torch.float32, (1, 1))
    assert model_flops(ckpt) == model_flops(wl) < count_flops(ckpt).train_flops


@pytest.mark.integration
def test_fine_tuning_is_counted_by_the_same_workload_path():
    from mats_scale.profiling.finetune import plan_rows
    from mats_scale.profiling.flops import model_flops, score_flops, train_flops
    from mats_scale.profiling.workload import FinetuneWorkload

    cfg = load_config(None, [*DEBUG, "logging.peak_tflops=1", "masking.finetune_keep_ratio=0.5"])
    wl = FinetuneWorkload.of(cfg, num_classes=5)
    assert (wl.keep_ratio, wl.num_tokens, wl.uses_embed_score) == (0.5, 16, True)
    meter = MfuMeter.for_run(cfg, WorkloadTask(wl), torch.device("cpu"), "fp32", devices=1)
    assert meter.flops_per_clip == model_flops(wl) == train_flops(wl) + score_flops(wl)
    every = FinetuneWorkload.of(load_config(None, [*DEBUG, "finetune.select=all"]), num_classes=5)
    assert every.keep_ratio is None and score_flops(every) == 0
    assert model_flops(every) > meter.flops_per_clip  # all 32 tokens through the encoder
    # The fine-tuning planner's step FLOPs of the selected tokens are the same count.
    from mats_scale.profiling.feasibility import NODES

    plans = plan_rows(
        cfg.model, 5, 0.5, NODES["a100-40"], dtype=torch.float32, mfu=0.3, epochs=1, train_clips=10
    )
    step = {(p.strategy, p.checkpoint): p.train_flops_per_clip for p in plans}
    assert step[("top 0.5", "none")] == meter.flops_per_clip
    assert step[("all", "none")] == model_flops(every)
