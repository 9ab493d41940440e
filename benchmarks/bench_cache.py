"""CPU ms per training clip of the loader with and without the decoded-video cache (``data.cache_gib``).

    PYTHONPATH=. python benchmarks/bench_cache.py [--root DIR] [--videos 64] [--rounds 5] [--config NAME]

One process, no workers: the dataset's ``__getitem__`` (decode or slice from memory, shot-cut check,
augmentation, for MATS pre-training the loader's motion score) over the first --videos training videos
of the bundled dataset (generated into --root on first use). Configurations take turns within each round
(so machine load hits them alike): the cache off, the cache warm (filled before the round), each with
``data.shot_cuts`` limit (the default) and ignore. Reported: the median over rounds of CPU ms per clip
(``time.process_time``) and its ratio to the uncached default, taken within a round.
"""

from __future__ import annotations

import argparse
import statistics
import time

from mats_scale.config import load_config
from mats_scale.data import video as video_mod
from mats_scale.data.clips import TrainClips
from mats_scale.data.sources import resolve_items
from mats_scale.resources import config_path

SETTINGS = {
    "no cache": ["data.cache_gib=0"],
    "cache": ["data.cache_gib=2"],
    "no cache, shot_cuts=ignore": ["data.cache_gib=0", "data.shot_cuts=ignore"],
    "cache, shot_cuts=ignore": ["data.cache_gib=2", "data.shot_cuts=ignore"],
}


def per_clip_ms(ds: TrainClips, videos: int, epoch: int) -> float:
    t0 = time.process_time()
    for i in range(videos):
        ds[(epoch, i, i)]
    return (time.process_time() - t0) * 1e3 / videos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data/bundled", help="the bundled dataset (generated if missing)")
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--config", default="finetune_default", help="shipped config (finetune_default, default)")
    args = ap.parse_args()
    augment = "finetune" if "finetune" in args.config else "pretrain"
    datasets = {}
    for name, overrides in SETTINGS.items():
        cfg = load_config(
            config_path(args.config), [f"data.root={args.root}", "data.num_workers=0", *overrides]
        )
        datasets[name] = TrainClips.from_config(cfg, resolve_items(cfg, "train"), seed=0, augment=augment)
    times: dict[str, list[float]] = {n: [] for n in SETTINGS}
    ratios: dict[str, list[float]] = {n: [] for n in SETTINGS}
    for r in range(args.rounds + 1):  # round 0: warm-up (first decode, imports), not counted
        video_mod._CACHE = video_mod.DecodedCache()
        per_clip_ms(datasets["cache"], args.videos, 10_000 + r)  # fill the cache (not timed)
        row = {n: per_clip_ms(ds, args.videos, r) for n, ds in datasets.items()}
        if r:
            for n, ms in row.items():
                times[n].append(ms)
                ratios[n].append(ms / row["no cache"])
    print(f"{args.config} clips, {args.videos} videos of {args.root}, median of {args.rounds} rounds:")
    for n in SETTINGS:
        print(
            f"  {n:28s} {statistics.median(times[n]):6.2f} CPU ms/clip  x{statistics.median(ratios[n]):.2f}"
        )


if __name__ == "__main__":
    main()
