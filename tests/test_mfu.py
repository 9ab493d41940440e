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
    assert gpu_peak_flops("Some Unknown GPU", bf16=True) is None


def test_meter_uses_the_config_peak_and_the_profiler_flops():
    cfg = load_config(
        None,
        [
            "model.size=debug",
            "model.num_frames=4",
            "model.img_size=64",
            "masking.preset=tube",
            "logging.peak_tflops=0.5",
        ],
    )
    meter = MfuMeter.for_run(cfg, "pretrain", torch.device("cpu"), "fp32", devices=2)
    assert meter.peak_source == "config" and meter.peak_flops == 0.5e12
    assert meter.flops_per_clip > 0
    # clips/s such that the run reaches a quarter of the 2 x 0.5 TFLOP/s peak.
    assert meter(0.25e12 / meter.flops_per_clip) == pytest.approx(0.25)
    assert MfuMeter.for_run(cfg, "finetune", torch.device("cpu"), "fp32", 1) is None


def test_model_flops_match_the_profiler():
    from mats_scale.profiling.flops import count_flops
    from mats_scale.profiling.workload import Workload
    from mats_scale.train.mfu import model_flops_per_clip

    cfg = load_config(
        None,
        [
            "model.size=debug",
            "model.num_frames=4",
            "model.img_size=64",
            "masking.preset=mats+dual",
            "masking.ratio=0.75",
        ],
    )
    assert model_flops_per_clip(cfg) == count_flops(Workload(cfg.model, cfg.masking)).train_flops
