"""Model FLOPs utilisation (MFU) of a run: model FLOPs per clip (the task's workload, counted once on
``meta``) x clips/s over the peak FLOP/s of its devices; docs/profiling.md, "MFU", gives the conventions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mats_scale.profiling.flops import model_flops

if TYPE_CHECKING:
    from mats_scale.train.task import Task

# Dense peaks per device in TFLOP/s from the vendors' datasheets: (bf16/fp16 tensor core, TF32).
# Matched as substrings of torch.cuda.get_device_name(), first match wins (H100 PCIe before H100).
GPU_PEAK_TFLOPS: dict[str, tuple[float, float]] = {
    "B200": (2250.0, 1100.0),  # HGX B200 datasheet: 4.5 PF bf16 / 2.2 PF TF32 with sparsity, halved
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
        cls, cfg: Any, task: Task, device: torch.device, precision: str, devices: int
    ) -> MfuMeter | None:
        """None for a task without a workload (the profilers cannot count it) or on an unknown GPU."""
        workload = task.workload()
        if workload is None:
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
        return cls(model_flops(workload), peak, devices, source)
