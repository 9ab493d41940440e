"""Clips/s of the pre-training loader (decode + augment + collate), per worker.

    PYTHONPATH=. python profiling/bench_data.py                 # bundled-format + large clips
    PYTHONPATH=. python profiling/bench_data.py --step          # plus the ViT-B MATS step, same run
    PYTHONPATH=. python profiling/bench_data.py --quick         # fewer batches, for a smoke run

Datasets (generated once into --cache, reused afterwards):
  bundled  the bundled format: 32 frames of 128x176 -> 8 frames at 112x112 (the default job)
  large    64 frames of 256x320 -> 16 frames at 224x224, sampling rate 4 (the ViT-B input)
For each, with data.num_sample 1 and 2 (repeated sampling), the loader runs with num_workers=1 (one
worker process feeding the trainer: the number the issue asks for) and num_workers=0 (the same work in
the calling process, no inter-process transfer). Baseline measured in the same run: decoding alone
(decord open + get_batch of the same frames), in clips/s. Each timing: warm-up batches, then --runs
timed runs of --batches batches; the median is reported.

With --step, profiling/bench_step.py (masking helper) times the ViT-B MATS + dual-masking step at
batch 2, 16x224 in the same run and the JSON gets the clips/s it consumes next to the loader's.
Wrap timing runs in ``flock /tmp/mats-bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from mats_scale.config import load_config
from mats_scale.data import synth
from mats_scale.data.lists import read_list_file
from mats_scale.data.loader import build_pretrain_loader
from mats_scale.data.video import clip_indices, open_video, read_frames

DATASETS = {
    "bundled": dict(params=synth.SynthParams(num_train=64, num_val=0),
                    cfg=["model.size=debug", "model.num_frames=8", "model.img_size=112"]),
    "large": dict(params=synth.SynthParams(num_train=32, num_val=0, frames=64, height=256, width=320),
                  cfg=["model.size=B", "model.num_frames=16", "model.img_size=224"]),
}


def ensure(cache: str, name: str) -> str:
    root = os.path.join(cache, name)
    params = DATASETS[name]["params"]
    if not synth.is_complete(root, params):
        synth.generate(root, params, workers=min(2, os.cpu_count() or 1), verbose=False)
    return root


def timed_batches(loader, warmup: int, batches: int, runs: int) -> list[float]:
    """Seconds per timed run of `batches` batches, after `warmup` batches (worker start-up included
    in the warm-up). The loader wraps around epochs."""
    def forever():
        while True:
            yield from loader

    it = forever()
    for _ in range(warmup):
        next(it)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        times.append(time.perf_counter() - t)
    return times


def decode_baseline(root: str, frames: int, rate: int, videos: int, runs: int) -> float:
    """Clips/s of decoding alone: open each video and read one clip of `frames` frames at `rate`."""
    items = read_list_file(os.path.join(root, "train.txt"), root)[:videos]
    g = torch.Generator().manual_seed(0)

    def one_pass():
        for item in items:
            vr = open_video(item.path)
            read_frames(vr, clip_indices(len(vr), frames, rate, g), item.path)

    one_pass()  # warm-up (file cache)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t)
    return len(items) / statistics.median(times)


def bench_step(runs: int) -> dict:
    """The ViT-B MATS + dual-masking (lean) step of profiling/bench_step.py, batch 2, 16x224."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_step.py")
    if not os.path.isfile(script):
        return {"error": "profiling/bench_step.py not found (masking branch not merged)"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, script, "--setting", "mats-dual-lean", "--runs", str(runs)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["bench_step failed"]}
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    setting = out["settings"]["mats-dual-lean"] if "settings" in out else out
    return {"setting": "mats-dual-lean", "raw": setting}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.path.join("profiling", "out", "bench_data"),
                    help="where the benchmark datasets are generated (reused)")
    ap.add_argument("--dataset", action="append", choices=sorted(DATASETS), help="repeatable; default all")
    ap.add_argument("--batches", type=int, default=8, help="batches per timed run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="clips per batch (divisible by 2)")
    ap.add_argument("--step", action="store_true", help="also time the ViT-B MATS step (bench_step.py)")
    ap.add_argument("--quick", action="store_true", help="2 batches x 1 run, for a smoke test")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.runs, args.warmup = 2, 1, 1
    if args.batches < 1 or args.runs < 1 or args.warmup < 1 or args.batch_size < 2 or args.batch_size % 2:
        ap.error("--batches, --runs, --warmup must be >= 1; --batch-size even and >= 2")
    torch.set_num_threads(1)

    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__}, "batch_size": args.batch_size, "datasets": {}}
    for name in args.dataset or sorted(DATASETS):
        root = ensure(args.cache, name)
        spec = DATASETS[name]
        rows = {}
        for num_sample in (1, 2):
            for workers in (1, 0):
                cfg = load_config(None, [*spec["cfg"], "data.dataset=bundled", f"data.root={root}",
                                         f"data.batch_size={args.batch_size}", f"data.num_sample={num_sample}",
                                         f"data.num_workers={workers}", "data.sampling_rate=4"])
                loader = build_pretrain_loader(cfg, rank=0, world_size=1)
                times = timed_batches(loader, args.warmup, args.batches, args.runs)
                clips = args.batches * args.batch_size
                rows[f"num_sample={num_sample},workers={workers}"] = {
                    "clips_per_s": round(clips / statistics.median(times), 2),
                    "runs_s": [round(t, 3) for t in times]}
                del loader
        cfg = load_config(None, spec["cfg"])
        base = decode_baseline(root, cfg.model.num_frames, 4, min(16, spec["params"].num_train), args.runs)
        p = spec["params"]
        result["datasets"][name] = {
            "source": f"{p.frames}x{p.height}x{p.width}", "clip": f"{cfg.model.num_frames}x{cfg.model.img_size}",
            "decode_only_clips_per_s": round(base, 2), "loader": rows,
            "ratio_one_worker_num_sample2_vs_decode": round(
                rows["num_sample=2,workers=1"]["clips_per_s"] / base, 2)}
    if args.step:
        step = bench_step(args.runs)
        result["vit_b_step"] = step
        large = result["datasets"].get("large")
        raw = step.get("raw", {})
        if large and "clips_per_s" in raw:
            have = large["loader"]["num_sample=2,workers=1"]["clips_per_s"]
            result["one_worker_vs_step"] = {"loader_clips_per_s": have, "step_clips_per_s": raw["clips_per_s"],
                                            "ratio": round(have / raw["clips_per_s"], 2)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
