"""The measuring half of ``mats-gpucheck``: each function runs in its own subprocess (a fresh CUDA
context, allocator and process group per run, so one run's memory never shows in the next) and returns
a JSON-able dict. docs/gpu.md lists what is measured and how.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mats_scale.profiling.gpucheck import GIB, Point, sdpa_backend, step_records, summarize_steps


def register_reduced_size(name: str) -> None:
    """Add ``<size>-<N>blk`` (the size's full width with N encoder blocks) to the size registry of this
    process, so a config can name it; the config layer checks model.size against the registry."""
    from mats_scale.models.sizes import SIZES

    base, _, blocks = name.rpartition("-")
    if base not in SIZES or not blocks.endswith("blk") or not blocks[:-3].isdigit():
        raise ValueError(f"{name!r}: expected <size>-<N>blk with a registered size")
    SIZES[name] = dataclasses.replace(SIZES[base], depth=int(blocks[:-3]))


class DispatchedOps(TorchDispatchMode):
    """The names of the aten ops dispatched inside the mode (what actually ran, kernels included)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


class AttentionCalls(TorchFunctionMode):
    """Counts ``F.scaled_dot_product_attention`` calls (the math path shows no op of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def detect_sdpa_backend(model: torch.nn.Module, args: tuple) -> str:
    """The SDPA backend(s) torch picks for one forward of `model` (read from the dispatched aten ops,
    not assumed from the device and dtype)."""
    with AttentionCalls() as calls, DispatchedOps() as ops:
        model(*args)
    return sdpa_backend(ops.names, calls.calls)


def run_sdpa_probe(cfg, device: torch.device, dtype: torch.dtype) -> str:
    """The backend of a one-clip forward of the run's model, shapes and compute dtype on `device`."""
    from mats_scale.profiling.workload import Workload, build_model

    wl = Workload(cfg.model, cfg.masking, 1, dtype)
    model = build_model(wl, device)
    try:
        return detect_sdpa_backend(model, wl.inputs(device))
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def cuda_memory(device: torch.device) -> dict[str, float]:
    """Peaks of the caching allocator, and what the device holds outside it (CUDA context, cuBLAS and
    NCCL workspaces), read at the same moment: (total - free) - reserved."""
    free, total = torch.cuda.mem_get_info(device)
    return {
        "max_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "max_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        "outside_allocator_gib": (total - free - torch.cuda.memory_reserved(device)) / GIB,
        "device_total_gib": total / GIB,
    }


def run_point(point: Point, run_dir: str) -> dict[str, Any]:
    """Train `point` for its steps with the project's Trainer into `run_dir`; the medians of its
    metrics.jsonl, the peak memory and the SDPA backend used."""
    from mats_scale.config import load_config
    from mats_scale.parallel.distributed import shutdown
    from mats_scale.train.loop import train

    if point.depth is not None:
        register_reduced_size(point.model_size)
    cfg = load_config(None, point.overrides(run_dir))
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.train.device != "cpu" else None
    measured = cuda_memory(device) if device is not None else {}
    shutdown()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        row = summarize_steps(step_records(f), point.batch, point.warmup)
    dtype = torch.bfloat16 if device is not None else torch.float32
    row["sdpa_backend"] = run_sdpa_probe(cfg, device or torch.device("cpu"), dtype)
    return {**row, **measured, "run_s": wall}


def loader_rate(
    overrides: list[str], *, batches: int, warmup: int, config: str | None = None
) -> dict[str, Any]:
    """Clips/s of the pre-training loader (workers, decode, augment, collate) for a config: `warmup`
    batches (worker start-up), then `batches` timed."""
    from mats_scale.config import load_config
    from mats_scale.data.loader import build_pretrain_loader

    cfg = load_config(config, overrides)
    loader = build_pretrain_loader(cfg, rank=0, world_size=1)
    it = loader.endless()
    try:
        for _ in range(warmup):
            next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        wall = time.perf_counter() - t0
    finally:
        loader.close()
    return {"clips_per_s": batches * cfg.data.batch_size / wall, "workers": cfg.data.num_workers}


def nvdec_rate(paths: list[str], *, num_frames: int, rate: int, size: int, rounds: int = 2) -> dict[str, Any]:
    """NVDEC in this process: clips/s of open + decode + crop/resize on the GPU (``device_clip``) over
    `paths`, and the pixel difference to the CPU path (decord, the workers' augment) for the same frame
    indices and crop draws."""
    from mats_scale.data.gpu_decode import device_clip
    from mats_scale.data.transforms import pretrain_augment
    from mats_scale.data.video import clip_indices, open_video, read_frames

    def clip(path: str, decoder: str, seed: int) -> torch.Tensor:
        vr = open_video(path, decoder=decoder)
        ids = clip_indices(len(vr), num_frames, rate, torch.Generator().manual_seed(seed))
        frames = read_frames(vr, ids, path)
        gen = torch.Generator().manual_seed(seed + 1)
        if decoder == "nvdec":
            return device_clip(frames, size, gen)
        return pretrain_augment(frames, size, gen, normalize=False)

    clip(paths[0], "nvdec", 0)  # warm-up: decoder session, kernels
    torch.cuda.synchronize()
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        for i, p in enumerate(paths):
            clip(p, "nvdec", 1000 * r + i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    diffs = [
        (clip(p, "nvdec", i).cpu().int() - clip(p, "decord", i).int()).abs().float()
        for i, p in enumerate(paths[:4])
    ]
    return {
        "clips_per_s": len(paths) / statistics.median(times),
        "workers": 0,
        "max_abs_diff": max(float(d.max()) for d in diffs),
        "mean_abs_diff": statistics.mean(float(d.mean()) for d in diffs),
    }


__all__ = [
    "AttentionCalls",
    "DispatchedOps",
    "cuda_memory",
    "detect_sdpa_backend",
    "loader_rate",
    "nvdec_rate",
    "register_reduced_size",
    "run_point",
]
