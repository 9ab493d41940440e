"""Model FLOPs utilisation (MFU) of a run: achieved model FLOP/s over the hardware's peak.

    mfu = model FLOPs per clip x clips/s / (peak FLOP/s per device x devices)

* Model FLOPs per clip: forward + backward of one clip as the profiler counts them on ``meta``
  (``profiling.flops.train_flops``, FlopCounterMode, 2 FLOPs per MAC) without activation
  recomputation (the convention of the PaLM / nanoGPT MFU: recomputed work is not useful work), plus
  the forward of the MATS embedding score when the run computes it. Counted once at start-up.
* Peak per device: ``logging.peak_tflops`` when set; on CUDA the dense peak of the device from
  :data:`GPU_PEAK_TFLOPS` (bf16 tensor core, or TF32 for an fp32 run); on CPU a short GEMM sample in
  the run's dtype (what this process's threads reach on a large matrix product, i.e. an achievable
  rather than a datasheet peak, so CPU MFU reads higher than a GPU one would).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

# Dense peaks per device in TFLOP/s from the vendors' datasheets: (bf16/fp16 tensor core, TF32).
# Matched as substrings of torch.cuda.get_device_name(), first match wins (H100 PCIe before H100).
GPU_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 494.5),
    "H100 PCIe": (756.0, 378.0),
    "H100": (989.0, 494.5),
    "A100": (312.0, 156.0),
    "A10G": (70.0, 35.0),
    "A10": (125.0, 62.5),
    "L40S": (362.0, 183.0),
    "L4": (121.0, 60.0),
    "V100": (125.0, 15.7),  # fp16 tensor core; no TF32: the fp32 CUDA-core peak
}


def mfu(flops_per_clip: float, clips_per_s: float, peak_flops_per_device: float, devices: int) -> float:
    """Fraction of the peak reached: flops_per_clip x clips_per_s / (peak x devices)."""
    if peak_flops_per_device <= 0 or devices < 1:
        raise ValueError("peak FLOP/s and the device count must be positive")
    return flops_per_clip * clips_per_s / (peak_flops_per_device * devices)


def gpu_peak_flops(name: str, bf16: bool) -> float | None:
    """Dense peak FLOP/s of a CUDA device by name, None when the table does not know it."""
    for key, (half, tf32) in GPU_PEAK_TFLOPS.items():
        if key in name:
            return (half if bf16 else tf32) * 1e12
    return None


def gemm_peak_flops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matrix product on the CPU with this process's threads (best of
    `repeats` after one warm-up; best, not median: a peak is what the hardware can reach)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up (packing buffers, thread pool)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def model_flops_per_clip(cfg: Any) -> int:
    """Training FLOPs of one clip of the pre-training model of `cfg` (no recomputation), on meta."""
    # What profiling.flops.train_flops counts, without importing fvcore there (seconds at start-up).
    from torch.utils.flop_counter import FlopCounterMode

    from mats_scale.profiling.workload import Workload, build_model, make_inputs, model_inputs

    wl = Workload(cfg.model, cfg.masking)  # batch 1, no checkpointing: model FLOPs, not hardware FLOPs
    model = build_model(wl, "meta")
    video, sel = make_inputs(wl, "meta")
    with FlopCounterMode(display=False) as counter:
        model(*model_inputs(video, sel)).loss.backward()
        if wl.uses_embed_score:
            with torch.no_grad():
                model.motion_scores(video)
    return counter.get_total_flops()


@dataclass(frozen=True)
class MfuMeter:
    """What a run needs to turn its clips/s into MFU (built once at start-up)."""

    flops_per_clip: int
    peak_flops: float  # per device
    devices: int
    peak_source: str  # "config", a GPU name, or "cpu-gemm"

    def __call__(self, clips_per_s: float) -> float:
        return mfu(self.flops_per_clip, clips_per_s, self.peak_flops, self.devices)

    @classmethod
    def for_run(
        cls, cfg: Any, task_name: str, device: torch.device, precision: str, devices: int
    ) -> MfuMeter | None:
        """None for tasks the profiler does not count (only pre-training is counted)."""
        if task_name != "pretrain":
            return None
        peak_tflops = cfg.logging.peak_tflops
        if peak_tflops > 0:
            peak, source = peak_tflops * 1e12, "config"
        elif device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak, source = gpu_peak_flops(name, precision == "bf16"), name
            if peak is None:
                return None  # an unknown GPU: set logging.peak_tflops to get MFU
        else:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            peak, source = gemm_peak_flops(dtype), "cpu-gemm"
        return cls(model_flops_per_clip(cfg), peak, devices, source)
