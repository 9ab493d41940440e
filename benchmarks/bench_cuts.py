"""Shot-cut detection at sampling rates 1, 2, 4 and 8: recall on hard cuts, false cuts on footage
without cuts (fast large objects, pans, flashes), rapid-cut montages; the loader's rule against the
colour-histogram-only rule it replaced, on the same windows.

    PYTHONPATH=. python benchmarks/bench_cuts.py [--clips 30] [--frames 61] [--window 8] [--workers 2]
    PYTHONPATH=. python benchmarks/bench_cuts.py --timing   # the rule's cost per window instead

Clips come from the bundled generator (``mats_scale.data.synth``: ``--cut``, ``--pan``, ``--texture``,
``--fast-object``, ``--flash``), 200x256 px, written as H.264 into a temporary directory and decoded
with decord, as the loader reads them. Windows: `--window` frames `rate` apart, every start and phase
that fits in a clip. Each window is judged as the loader judges it: the rule on the window's frames
(``cuts_from_features``), each flagged step confirmed and placed on every frame around it
(``ShotReader.cuts_in``). A window that spans a true cut counts towards recall when the cut is found at
its exact frame; every cut found at any other frame is a false cut. The old rule (histogram distance
>= 0.15 and >= 3x the median of the quiet steps, no confirmation) runs on the same windows. Rapid-cut
montages: shots of 1-4 frames, each from another generated clip, spliced and encoded; recall there is
over the window steps that span at least one cut (a step must find one of them). Cuts between alike
colours: pairs of generated shots whose joint moves the histogram by 0.10-0.20, spliced.

``--timing``: milliseconds per decoded window (16 frames of 256x320, sampling rate 4, a panning
textured clip with a fast object) of ``detect_cuts`` against the old rule's histograms + threshold,
taking turns after a warm-up, medians of 15 rounds and the median per-round ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import date

import numpy as np
import torch

from mats_scale.data import synth
from mats_scale.data.cuts import (
    ShotReader,
    cuts_from_changes,
    cuts_from_features,
    detect_cuts,
    frame_changes,
    frame_features,
    histogram_change,
)
from mats_scale.data.video import open_video, read_frames

RATES = (1, 2, 4, 8)
SIZE = dict(height=200, width=256)
CONDITIONS = {
    "hard cuts, still camera": dict(cut=True),
    "hard cuts, pan 2 px/frame + texture": dict(cut=True, pan=2.0, texture=0.3),
    "fast object 16 px/frame": dict(fast_object=16.0),
    "fast object 16 px/frame + pan 2 + texture": dict(fast_object=16.0, pan=2.0, texture=0.3),
    "pan 4 px/frame + texture": dict(pan=4.0, texture=0.3),
    "flash": dict(flash=True),
}
OLD_MIN_CHANGE = 0.15  # the rule this replaced: histogram distance alone


def decode_all(path: str) -> torch.Tensor:
    vr = open_video(path)
    return read_frames(vr, list(range(len(vr))), path)


def generate(root: str, name: str, params: synth.SynthParams, workers: int) -> list[tuple[torch.Tensor, set]]:
    """Write and decode the clips of one condition -> [(frames (F, H, W, 3) uint8, shot of each frame)]."""
    out = os.path.join(root, name.replace(" ", "_").replace("/", "_"))
    synth.generate(out, params, workers=workers, verbose=False)
    clips = []
    for i in range(params.num_train):
        spec, _ = synth.clip_spec(params, "train", i)
        clips.append(
            (
                decode_all(os.path.join(out, synth.relpath("train", i))),
                [int(spec.cut and f >= spec.cut) for f in range(params.frames)],
            )
        )
    return clips


def montages(root: str, shots: list[torch.Tensor], count: int, frames: int, seed: int = 0):
    """Rapid-cut videos: shots of 1-4 frames, each from the next source shot -> [(frames, source shot of
    each frame)]."""
    rng = np.random.default_rng(seed)
    out = []
    for m in range(count):
        parts, shot, n, k = [], [], 0, m
        while n < frames:
            src = shots[k % len(shots)]
            length = min(int(rng.integers(1, 5)), frames - n, len(src))
            start = int(rng.integers(0, len(src) - length + 1))
            parts.append(src[start : start + length])
            shot += [k % len(shots)] * length
            n, k = n + length, k + 7  # a step through the sources, so neighbours differ
        path = os.path.join(root, f"montage_{m}.mp4")
        synth.write_video(path, torch.cat(parts).numpy(), fps=16)
        out.append((decode_all(path), shot))
    return out


def weak_cuts(root: str, shots: list[torch.Tensor], count: int, frames: int):
    """Cuts between shots of alike colours: two source shots whose joint is a histogram step of
    0.10-0.20 (below the old rule's 0.15 and just above it), spliced and encoded -> [(frames, shot)]."""
    ends = [frame_features(s[[0, -1]]) for s in shots]
    out = []
    for i, a in enumerate(shots):
        for j, b in enumerate(shots):
            if len(out) == count:
                return out
            if i // 2 == j // 2 or len(a) + len(b) < frames:
                continue  # two shots of one clip, or too short together
            if 0.10 <= float(histogram_change(ends[i][[1]], ends[j][[0]])) < 0.20:
                k = min(len(a), frames // 2)
                path = os.path.join(root, f"weak_{i}_{j}.mp4")
                synth.write_video(path, torch.cat([a[-k:], b[: frames - k]]).numpy(), fps=16)
                out.append((decode_all(path), [0] * k + [1] * (frames - k)))
    return out


def judge(clips, rate: int, window: int) -> dict:
    """Counts over every window of `window` frames `rate` apart in `clips`."""
    keys = "windows spanning found false old_found old_false cut_steps step_found old_step_found"
    c: dict = dict.fromkeys(keys.split(), 0) | {"max_hist": 0.0, "min_cut": 1.0}
    for frames, shot in clips:
        true = {t for t in range(1, len(shot)) if shot[t] != shot[t - 1]}  # frames that start a shot
        n = len(frames)
        feats = frame_features(frames)
        reader = ShotReader(lambda ids, f=frames: f[ids], n, [], [])
        confirmed: dict[tuple[int, int], list[int]] = {}
        for phase in range(rate):
            sampled = list(range(phase, n, rate))
            for w in range(len(sampled) - window + 1):
                ids = sampled[w : w + window]
                f = feats[ids]
                flagged = cuts_from_features(f).nonzero()[:, 0].tolist()
                starts = set()
                for j in flagged:
                    key = (ids[j], ids[j + 1])
                    if key not in confirmed:
                        confirmed[key] = reader.cuts_in(*key)
                    starts.update(confirmed[key])
                d = histogram_change(f[:-1], f[1:])
                old = cuts_from_changes(d, min_change=OLD_MIN_CHANGE)
                old_steps = {j for j in old.nonzero()[:, 0].tolist()}
                inside = {t for t in true if ids[0] < t <= ids[-1]}
                hit = {j for j in range(window - 1) if shot[ids[j]] != shot[ids[j + 1]]}  # visible cuts
                calm = [j for j in range(window - 1) if j not in hit]
                if calm:
                    c["max_hist"] = max(c["max_hist"], float(d[calm].max()))
                if hit:
                    c["min_cut"] = min(c["min_cut"], float(d[sorted(hit)].min()))
                c["windows"] += 1
                c["spanning"] += bool(inside)
                c["found"] += bool(inside) and inside <= starts
                c["false"] += len(starts - true)
                c["old_found"] += bool(inside) and hit <= old_steps
                c["old_false"] += len(old_steps - hit)
                c["cut_steps"] += len(hit)
                c["old_step_found"] += len(hit & old_steps)
                c["step_found"] += sum(any(ids[j] < s <= ids[j + 1] for s in starts & true) for j in hit)
    return c


HIST = "histogram step: weakest cut, strongest other"
RAPID = ("step_found", "old_step_found", "cut_steps")
CUTS = ("found", "old_found", "spanning")


def _row(name: str, rate: int, c: dict, recall: tuple[str, str, str]) -> None:
    """One table line; `recall`: the counts found (new rule, old rule) and the count to find."""
    new, old, total = (c[k] for k in recall)
    found = f"{new / total:.3f} ({old / total:.3f})" if total else "-"
    per_k = 1000 / max(c["windows"], 1)
    hist = f"{c['min_cut']:.3f}, " if c["cut_steps"] else "-, "
    print(
        f"| {name} | {rate} | {c['windows']} | {found} | {c['false'] * per_k:.1f} "
        f"({c['old_false'] * per_k:.1f}) | {hist}{c['max_hist']:.3f} |",
        flush=True,
    )


def timing(rounds: int = 15) -> None:
    """The rule's cost per window against the histogram-only rule, in the same rounds."""
    params = synth.SynthParams(frames=61, height=256, width=320, pan=2.0, texture=0.3, fast_object=16.0)
    window = torch.from_numpy(synth.render_clip(params, "train", 0)[0][0:61:4])  # (16, 256, 320, 3)

    def old() -> None:
        cuts_from_changes(frame_changes(window), min_change=OLD_MIN_CHANGE)

    runs = {"histogram-only rule (before)": old, "detect_cuts": lambda: detect_cuts(window)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds + 2):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            if r >= 2:  # two warm-up rounds
                times[name].append(1000 * (time.perf_counter() - t))
    base = times["histogram-only rule (before)"]
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, base, strict=True))
        print(f"| {name} | {statistics.median(ts):.2f} ms | x{ratio:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=30, help="clips per condition")
    ap.add_argument("--frames", type=int, default=61, help="frames per clip")
    ap.add_argument("--window", type=int, default=8, help="frames per window")
    ap.add_argument("--workers", type=int, default=2, help="encoding processes")
    ap.add_argument("--timing", action="store_true", help="the rule's cost per window instead")
    a = ap.parse_args(argv)
    if a.timing:
        torch.set_num_threads(1)
        timing()
        return 0
    if a.clips < 1 or a.window < 2 or a.frames < (a.window - 1) * max(RATES) + 1:
        sys.exit(
            f"--clips={a.clips} --window={a.window} --frames={a.frames}: need clips >= 1, window >= 2 "
            f"and frames >= (window - 1) * {max(RATES)} + 1"
        )
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print(
        f"# bench_cuts {date.today()}: {a.clips} clips x {a.frames} frames of "
        f"{SIZE['height']}x{SIZE['width']} per condition, windows of {a.window} frames "
        f"(torch {torch.__version__})"
    )
    print(f"| footage | rate | windows | recall (old rule) | false cuts / 1000 windows (old rule) | {HIST} |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as root:
        shots = []
        for name, kw in CONDITIONS.items():
            params = synth.SynthParams(num_train=a.clips, num_val=0, frames=a.frames, **SIZE, **kw)
            clips = generate(root, name, params, a.workers)
            if kw == {"cut": True}:
                shots = [s for f, t in clips for s in (f[: t.index(1)], f[t.index(1) :])]
            for rate in RATES:
                c = judge(clips, rate, a.window)
                _row(name, rate, c, CUTS)
        weak = weak_cuts(root, shots, a.clips, a.frames)
        for rate in RATES:
            _row(f"hard cuts, alike colours ({len(weak)} spliced)", rate, judge(weak, rate, a.window), CUTS)
        rapid = montages(root, shots, a.clips, a.frames)
        for rate in RATES:
            _row("rapid-cut montage (recall: steps over a cut)", rate, judge(rapid, rate, a.window), RAPID)
    print(f"# {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
