"""Cost of the loader's motion scores and shot-cut handling, per clip, against the loader's own rate.

    PYTHONPATH=. python benchmarks/bench_scores.py            # micro-benchmark + loader rates
    PYTHONPATH=. python benchmarks/bench_scores.py --quick    # fewer runs, for a smoke test

1. Per-clip milliseconds of each function on a 16x224x224 clip (the ViT-B input, one clip as the
   loader scores it): ``pixel_motion_scores``; ``compensated_motion_scores`` on a still-camera clip
   (the shift test says "no shift": phase correlation + candidate residuals only) and on a panning,
   textured clip (plus refinement and warping); ``detect_cuts`` on the decoded window (16 frames of
   256x320 uint8). The functions take turns in every round after a warm-up; medians over rounds, and
   the per-round ratio to the pixel score, then its median.
2. The in-process loader (num_workers=0, one thread; what one worker process does) in clips/s on
   generated 64x256x320 videos -> 16x224 clips (sampling rate 4, data.num_sample=2): tube masking
   without cut handling (the loader before this change) against MATS with the pixel or the
   compensated score and data.shot_cuts=limit, on still-camera videos, panning textured videos
   (pan 1 px/frame, texture 0.3) and videos with one hard cut each (re-drawn windows decode twice).
   Configurations take turns in every round; medians over rounds.
JSON on stdout. Wrap timing runs in ``flock /tmp/mats-bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
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
from mats_scale.masking import compensated_motion_scores, pixel_motion_scores

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


def micro(runs: int, warmup: int) -> dict:
    still, window = clip_224(synth.SynthParams(**LARGE))
    pan, _ = clip_224(synth.SynthParams(**LARGE, pan=1.0, texture=0.3))
    fns = {
        "pixel": lambda: pixel_motion_scores(still, 2, 16),
        "compensated, still camera": lambda: compensated_motion_scores(still, 2, 16),
        "compensated, panning camera": lambda: compensated_motion_scores(pan, 2, 16),
        "detect_cuts (16 x 256x320 window)": lambda: detect_cuts(window),
    }
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    base = times["pixel"]
    return {
        k: {
            "ms_per_clip": round(1e3 * statistics.median(v), 2),
            "vs_pixel": round(statistics.median(a / b for a, b in zip(v, base, strict=True)), 2),
        }
        for k, v in times.items()
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
            ld = build_pretrain_loader(cfg, rank=0, world_size=1)

            def forever(ld=ld):
                while True:
                    yield from ld

            iters[name] = forever()
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
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.batches = 2, 1
    if args.runs < 1 or args.batches < 1:
        ap.error("--runs and --batches must be >= 1")
    torch.set_num_threads(1)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    result = {
        "machine": machine,
        "score_functions": micro(max(args.runs, 3) * 3, 2),
        "loader_num_workers0_num_sample2": loader_rates(args.cache, args.runs, args.batches, 1),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
