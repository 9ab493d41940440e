"""Cost of the loader's motion scores and shot-cut handling, per clip, against the loader's own rate.

    PYTHONPATH=. python benchmarks/bench_scores.py            # micro-benchmark + loader rates
    PYTHONPATH=. python benchmarks/bench_scores.py --quick    # fewer runs, for a smoke test
    PYTHONPATH=. python benchmarks/bench_scores.py --no-loader   # part 1 only

1. Per-clip milliseconds of each function on a 16x224x224 uint8 clip (the ViT-B input, one clip as
   the loader scores it): ``pixel_motion_scores``; ``compensated_motion_scores`` on a still-camera
   clip (the camera test says "no shift": phase correlation + candidate evidence, then the pixel
   score), on a panning, textured clip (plus refinement and the shifted residual) and on a zooming
   one, with zooms (``zoom=True``, masking.score=compensated_zoom) on the still and zooming clips, and
   where the panning clip's time goes (``global_shifts`` alone; the score given the shifts);
   the paper's ``embed_motion_scores`` through a ViT-B patch embedding (what the training step pays
   per clip on a CPU); ``detect_cuts`` on the decoded window (16 frames of 256x320 uint8). The
   functions take turns in every round after a warm-up; medians over rounds of the wall and of the
   process CPU time (one thread: the work, which a loaded machine inflates less than the wall time),
   and the per-round ratio of CPU times to the pixel score's, then its median.
2. The in-process loader (num_workers=0, one thread; what one worker process does) in clips/s on
   generated 64x256x320 videos -> 16x224 clips (sampling rate 4, data.num_sample=2): tube masking
   without cut handling (the loader before this change) against MATS with the pixel or the
   compensated score and data.shot_cuts=limit, on still-camera videos, panning textured videos
   (pan 1 px/frame, texture 0.3) and videos with one hard cut each (re-drawn windows decode twice).
   Configurations take turns in every round; medians over rounds.
3. For the planner (``mats-plan --data-rate``): clips/s per loader core = 1 / (1 / --base-rate + the
   score's CPU seconds per clip), for the loader scores of part 1.
JSON on stdout. Wrap timing runs in ``flock /tmp/mats-bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from mats_scale.config import load_config
from mats_scale.data import synth
from mats_scale.data.cuts import detect_cuts
from mats_scale.data.loader import build_pretrain_loader
from mats_scale.masking import (
    compensated_motion_scores,
    embed_motion_scores,
    global_shifts,
    pixel_motion_scores,
)
from mats_scale.models.layers import PatchEmbed3D

LARGE = dict(num_train=16, num_val=0, frames=64, height=256, width=320)
VIDEOS = {"still": {}, "pan": {"pan": 1.0, "texture": 0.3}, "cut": {"cut": True}}
LOADERS = {
    "tube, no cut handling (before)": ["masking.strategy=tube", "data.shot_cuts=ignore"],
    "tube + cuts": ["masking.strategy=tube"],
    "mats pixel + cuts": ["masking.strategy=mats", "masking.score=pixel"],
    "mats compensated + cuts": ["masking.strategy=mats", "masking.score=compensated"],
}


def clip_224(params: synth.SynthParams) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, 3, 16, 224, 224) float clip (frames 0, 4, .., 60, centre crop) and its (16, 256, 320, 3)
    uint8 decoded-window stand-in."""
    frames, _ = synth.render_clip(params, "train", 0)
    window = torch.from_numpy(frames[::4].copy())  # (16, 256, 320, 3)
    crop = window[:, 16:240, 48:272].permute(3, 0, 1, 2)[None].float()
    return crop, window


def load_reference(path: str):
    """``compensated_motion_scores`` of another version of ``mats_scale/masking/compensated.py``."""
    spec = importlib.util.spec_from_file_location("reference_compensated", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compensated_motion_scores


def micro(runs: int, warmup: int, reference: str | None = None) -> dict:
    still, window = clip_224(synth.SynthParams(**LARGE))
    pan, _ = clip_224(synth.SynthParams(**LARGE, pan=1.0, texture=0.3))
    zoom, _ = clip_224(synth.SynthParams(**LARGE, zoom=0.005, texture=0.3))
    still, pan, zoom = (x.to(torch.uint8) for x in (still, pan, zoom))  # as the loader holds them
    shifts = global_shifts(pan, 2, 16)
    torch.manual_seed(0)
    embed = PatchEmbed3D(in_chans=3, embed_dim=768, tubelet_size=2, patch_size=16)  # ViT-B's
    fns = {
        "pixel": lambda: pixel_motion_scores(still, 2, 16),
        "compensated, still camera": lambda: compensated_motion_scores(still, 2, 16),
        "compensated, panning camera": lambda: compensated_motion_scores(pan, 2, 16),
        "compensated, zooming camera (0.5 %/frame)": lambda: compensated_motion_scores(zoom, 2, 16),
        "compensated_zoom, still camera": lambda: compensated_motion_scores(still, 2, 16, zoom=True),
        "compensated_zoom, zooming camera (0.5 %/frame)": lambda: compensated_motion_scores(
            zoom, 2, 16, zoom=True
        ),
        "  panning: global_shifts alone": lambda: global_shifts(pan, 2, 16),
        "  panning: the score given the shifts": lambda: compensated_motion_scores(pan, 2, 16, shifts=shifts),
        "embed (ViT-B patch embedding, float input)": lambda: embed_motion_scores(embed, still.float()),
        "detect_cuts (16 x 256x320 window)": lambda: detect_cuts(window),
    }
    if reference:
        ref = load_reference(reference)
        fns["reference compensated, still camera"] = lambda: ref(still, 2, 16)
        fns["reference compensated, panning camera"] = lambda: ref(pan, 2, 16)
    for _ in range(warmup):
        for f in fns.values():
            f()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t, c = time.perf_counter(), time.process_time()
            f()
            cpu[k].append(time.process_time() - c)
            wall[k].append(time.perf_counter() - t)
    base = cpu["pixel"]
    return {
        k: {
            "ms_per_clip": round(1e3 * statistics.median(v), 2),
            "cpu_ms_per_clip": round(1e3 * statistics.median(cpu[k]), 2),
            "vs_pixel": round(statistics.median(a / b for a, b in zip(cpu[k], base, strict=True)), 2),
        }
        for k, v in wall.items()
    }


def loader_rates(cache: str, runs: int, batches: int, warmup: int) -> dict:
    out = {}
    for video, extra in VIDEOS.items():
        params = synth.SynthParams(**LARGE, **extra)
        root = os.path.join(cache, video)
        if not synth.is_complete(root, params):
            synth.generate(root, params, workers=min(2, os.cpu_count() or 1), verbose=False)
        iters = {}
        for name, over in LOADERS.items():
            cfg = load_config(
                None,
                [
                    "model.size=B",
                    "model.num_frames=16",
                    "model.img_size=224",
                    "data.dataset=bundled",
                    f"data.root={root}",
                    "data.batch_size=4",
                    "data.num_sample=2",
                    "data.num_workers=0",
                    "data.sampling_rate=4",
                    *over,
                ],
            )
            iters[name] = build_pretrain_loader(cfg, rank=0, world_size=1).endless()
            for _ in range(warmup):
                next(iters[name])
        times: dict[str, list[float]] = {k: [] for k in iters}
        for _ in range(runs):
            for k, it in iters.items():
                t = time.perf_counter()
                for _ in range(batches):
                    next(it)
                times[k].append((time.perf_counter() - t) / (4 * batches))
        base = times["tube, no cut handling (before)"]
        out[video] = {
            k: {
                "clips_per_s": round(1 / statistics.median(v), 1),
                "ms_per_clip": round(1e3 * statistics.median(v), 1),
                "extra_ms_per_clip": round(1e3 * statistics.median(np.subtract(v, base).tolist()), 1),
            }
            for k, v in times.items()
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cache",
        default=os.path.join("profiling", "out", "bench_scores"),
        help="where the benchmark videos are generated (reused)",
    )
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--batches", type=int, default=4, help="loader batches (of 4 clips) per timed run")
    ap.add_argument("--quick", action="store_true", help="2 runs, 1 batch: a smoke test")
    ap.add_argument("--no-loader", action="store_true", help="the score functions only (part 1)")
    ap.add_argument(
        "--reference",
        help="another version of mats_scale/masking/compensated.py (git show), timed beside this one",
    )
    ap.add_argument(
        "--base-rate",
        type=float,
        default=38.1,
        help="clips/s one loader core delivers without a loader score (benchmarks/bench_data.py on your "
        "files; 38.1: the prepared K400-like files, docs/profiling.md): part 3",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.batches = 2, 1
    if args.runs < 1 or args.batches < 1:
        ap.error("--runs and --batches must be >= 1")
    if args.reference and not os.path.isfile(args.reference):
        ap.error(f"--reference={args.reference}: no such file")
    if not args.base_rate > 0:
        ap.error(f"--base-rate={args.base_rate}: must be > 0 (clips/s per core)")
    torch.set_num_threads(1)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    scores = micro(max(args.runs, 3) * 3, 2, args.reference)
    result = {
        "machine": machine,
        "score_functions": scores,
        # Part 3: clips/s per core for mats-plan --data-rate, the loader's rate plus each score's cost.
        "loader_clips_per_s_per_core_with_score": {
            k: round(1 / (1 / args.base_rate + v["cpu_ms_per_clip"] / 1e3), 1)
            for k, v in scores.items()
            if k.startswith(("pixel", "compensated"))
        },
    }
    if not args.no_loader:
        result["loader_num_workers0_num_sample2"] = loader_rates(args.cache, args.runs, args.batches, 1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
