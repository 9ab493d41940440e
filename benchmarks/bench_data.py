"""Clips/s of the pre-training loader (decode + augment + collate) per worker, with the float32 worker
output of the earlier loader and with the uint8 path.

    PYTHONPATH=. python benchmarks/bench_data.py                     # every dataset below, 3 pipelines
    PYTHONPATH=. python benchmarks/bench_data.py --dataset k400 --dataset k400-prepared
    PYTHONPATH=. python benchmarks/bench_data.py --step              # plus the ViT-B MATS step, same run
    PYTHONPATH=. python benchmarks/bench_data.py --quick             # 1 round of 2 batches, a smoke run
    PYTHONPATH=. python benchmarks/bench_data.py --prepare-sweep     # decode cost of prepare's options
    PYTHONPATH=. python benchmarks/bench_data.py --list train.txt --root /data/k400 \\
        --config k400_vit_b_mats_dual --out rate.json  # your files: clips/s per core

Datasets (generated once into --cache, reused afterwards):
  bundled        the bundled format: 32 frames of 128x176 -> 8 frames at 112x112 (the default job)
  large          64 frames of 256x320 -> 16 frames at 224x224, sampling rate 4 (the ViT-B input)
  k400           K400-like: 300 frames of 340x256 at 30 fps, PyAV's libx264 defaults (CRF 23, preset
                 medium, a keyframe every 250 frames), a panning textured scene with a moving disc and
                 sensor noise -> 16 frames at 224, rate 4
  k400-prepared  the k400 files after ``mats-prepare`` with its defaults (short
                 side 256, keyframe every 16 frames, CRF 23, preset veryfast, tune fastdecode)
Pipelines, all with one worker process feeding the caller:
  before         decord, the worker normalises to float32 (data.normalize_on_device=false): the loader
                 as it was before the uint8 path
  uint8          decord, the worker sends uint8 (the default now; normalised on the training device)
  uint8+pyav     the same with data.decoder=pyav
For each dataset, num_sample 1 and 2. The configurations take turns within a round (so machine load
hits them alike); each turn builds the loader, consumes --warmup batches (worker start-up), then
times --batches batches: wall clips/s, and clips per CPU second of the worker process (its utime +
stime from /proc: what one core delivers when the worker has it to itself, robust to machine load),
and the main process's CPU ms per clip (receiving the batches). Medians over --rounds; ratios are
taken within a round, then the median.
Also per dataset: decoding alone (open + one clip per video, in this process, wall and CPU time per
decoder), the bytes per clip that cross the worker boundary, and where a worker's time goes.

``--prepare-sweep`` prepares the k400 set with other options (keyframe interval 8 / 32, no tune,
preset medium, and the source's own 250) and times decoding alone (both decoders, CPU clips/s, rounds
taking turns), with the file sizes: how prepare's defaults were chosen.

``--list FILE`` measures your own files with your config instead (``data.dataset=list``): clips/s of
one worker = one CPU core, written with --out as JSON for ``mats-plan --data-rate``.
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

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mats_scale.config import ConfigError, load_config  # noqa: E402
from mats_scale.data import synth  # noqa: E402
from mats_scale.data.device import bytes_per_clip, to_model_input  # noqa: E402
from mats_scale.data.errors import DataError  # noqa: E402
from mats_scale.data.lists import read_list_file  # noqa: E402
from mats_scale.data.loader import build_pretrain_loader  # noqa: E402
from mats_scale.data.prepare import PrepareOptions, prepare  # noqa: E402
from mats_scale.data.transforms import pretrain_augment  # noqa: E402
from mats_scale.data.video import clip_indices, open_video, read_frames  # noqa: E402

VIT_B = ["model.size=B", "model.num_frames=16", "model.img_size=224", "data.sampling_rate=4"]
DATASETS = {
    "bundled": dict(
        params=synth.SynthParams(num_train=64, num_val=0),
        cfg=["model.size=debug", "model.num_frames=8", "model.img_size=112", "data.sampling_rate=4"],
    ),
    "large": dict(
        params=synth.SynthParams(num_train=32, num_val=0, frames=64, height=256, width=320), cfg=VIT_B
    ),
    "k400": dict(videos=16, cfg=VIT_B),
    "k400-prepared": dict(cfg=VIT_B),
}
PIPELINES = {
    "before": ["data.decoder=decord", "data.normalize_on_device=false"],
    "uint8": ["data.decoder=decord", "data.normalize_on_device=true"],
    "uint8+pyav": ["data.decoder=pyav", "data.normalize_on_device=true"],
}


# ---- datasets -----------------------------------------------------------------------------------
def k400_like_video(
    path: str, seed: int, frames: int = 300, height: int = 256, width: int = 340, fps: int = 30
) -> None:
    """A K400-like H.264 file: a camera panning over a textured scene (gratings of 8-90 px periods and
    32 px blocks), a moving disc, Gaussian noise (sigma 5); PyAV's libx264 defaults (CRF 23, preset
    medium, keyint 250), about 200 kbit/s."""
    import av

    rng = np.random.default_rng(seed)
    H, W = height + 2 * frames // 3 + 8, width + frames + 8
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    scene = np.zeros((H, W, 3), np.float32)
    for _ in range(6):
        a, period, phase = rng.uniform(0, 2 * np.pi), rng.uniform(8, 90), rng.uniform(0, 2 * np.pi)
        grating = np.sin((xs * np.cos(a) + ys * np.sin(a)) * 2 * np.pi / period + phase)
        scene += rng.uniform(10, 30, 3).astype(np.float32) * grating[..., None]
    blocks = rng.uniform(0, 255, (H // 32 + 2, W // 32 + 2, 3)).astype(np.float32)
    scene += np.kron(blocks, np.ones((32, 32, 1), np.float32))[:H, :W] * 0.5
    vy, vx = rng.uniform(-0.3, 0.3), rng.uniform(0.3, 1.0)  # pan, px per frame
    y0 = (H - height) // 2
    fy, fx = ys[:height, :width], xs[:height, :width]
    tmp = path + ".part"
    with av.open(tmp, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)  # no options: libx264's defaults, as a new user gets
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            y, x = int(y0 + vy * t), int(4 + vx * t)
            f = scene[y : y + height, x : x + width].copy()
            cy, cx = height / 2 + 80 * np.sin(t / 17), width / 2 + 120 * np.cos(t / 23)
            f[(fy - cy) ** 2 + (fx - cx) ** 2 < 30**2] = (200, 60, 40)
            f += rng.normal(0, 5, f.shape).astype(np.float32)
            img = np.clip(f + 60, 0, 255).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    os.replace(tmp, path)


def _k400_job(job):
    k400_like_video(*job)


def ensure(cache: str, name: str) -> tuple[str, str]:
    """(root, train list) of dataset `name`, generated (or prepared) on first use."""
    root = os.path.join(cache, name)
    spec = DATASETS[name]
    if name in ("bundled", "large"):
        if not synth.is_complete(root, spec["params"]):
            synth.generate(root, spec["params"], workers=min(2, os.cpu_count() or 1), verbose=False)
        return root, os.path.join(root, "train.txt")
    if name == "k400":
        lst = os.path.join(root, "train.txt")
        if not os.path.isfile(lst):
            os.makedirs(os.path.join(root, "videos"), exist_ok=True)
            jobs = [(os.path.join(root, "videos", f"{i:03d}.mp4"), i) for i in range(spec["videos"])]
            from multiprocessing import get_context

            with get_context("fork").Pool(min(2, os.cpu_count() or 1)) as pool:
                pool.map(_k400_job, [j for j in jobs if not os.path.isfile(j[0])])
            with open(lst + ".part", "w") as f:
                f.writelines(f"videos/{i:03d}.mp4 {i % 4}\n" for i in range(spec["videos"]))
            os.replace(lst + ".part", lst)
        return root, lst
    src, src_list = ensure(cache, "k400")
    prepare(
        src,
        root,
        PrepareOptions(),
        list_files=[src_list],
        workers=min(2, os.cpu_count() or 1),
        progress=False,
    )
    return root, os.path.join(root, "train.txt")


def dataset_cfg(name: str, root: str, lst: str, extra: list[str]):
    return load_config(
        None,
        [*DATASETS[name]["cfg"], "data.dataset=list", f"data.root={root}", f"data.train_list={lst}", *extra],
    )


# ---- timing -------------------------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # from field 3 (state) on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_turn(cfg, warmup: int, batches: int) -> tuple[float, float, float, dict]:
    """(wall seconds, worker CPU seconds, main-process CPU seconds) for `batches` batches after
    `warmup` (worker start-up included there), and the last batch. The worker's CPU seconds measure
    its work whatever share of a core the loaded machine gives it: clips per worker CPU second is what
    one core delivers when the worker has it to itself."""
    loader = build_pretrain_loader(cfg, rank=0, world_size=1)
    it = loader.endless()
    try:
        for _ in range(warmup):
            next(it)
        workers = [w.pid for w in loader.loader._iterator._workers]  # torch's worker processes
        w0, c0, t = sum(map(_cpu_seconds, workers)), time.process_time(), time.perf_counter()
        for _ in range(batches):
            batch = next(it)
        wall, main = time.perf_counter() - t, time.process_time() - c0
        return wall, sum(map(_cpu_seconds, workers)) - w0, main, batch
    finally:
        loader.close()


def decode_only(
    root: str, lst: str, frames: int, rate: int, decoder: str, videos: int, threads: int = 1
) -> tuple[float, float]:
    """(wall, CPU) clips/s of opening each video and reading one clip, in this process; the CPU time
    counts every thread of the process (decoder threads included)."""
    items = read_list_file(lst, root)[:videos]
    g = torch.Generator().manual_seed(0)
    t, c = time.perf_counter(), time.process_time()
    for item in items:
        vr = open_video(item.path, decoder=decoder, threads=threads)
        read_frames(vr, clip_indices(len(vr), frames, rate, g), item.path)
    return len(items) / (time.perf_counter() - t), len(items) / (time.process_time() - c)


def worker_profile(root: str, lst: str, cfg, videos: int, decoder: str) -> dict:
    """CPU milliseconds per clip of what a worker does (decode with `decoder`, crop + resize + flip
    on uint8) and of what moved to the training device (float conversion and normalisation, here on
    this CPU). CPU time, so machine load does not inflate it."""
    items = read_list_file(lst, root)[:videos]
    g = torch.Generator().manual_seed(0)
    T, S, r = cfg.model.num_frames, cfg.model.img_size, cfg.data.sampling_rate
    t_dec = t_aug = t_norm = 0.0
    for item in items:
        t = time.process_time()
        vr = open_video(item.path, decoder=decoder)
        frames = read_frames(vr, clip_indices(len(vr), T, r, g), item.path)
        t_dec += time.process_time() - t
        t = time.process_time()
        clip = pretrain_augment(frames, S, g, normalize=False)
        t_aug += time.process_time() - t
        t = time.process_time()
        to_model_input({"video": clip[None]}, "cpu")
        t_norm += time.process_time() - t
    n = len(items)
    return {
        "decode_ms": round(1000 * t_dec / n, 1),
        "crop_resize_flip_uint8_ms": round(1000 * t_aug / n, 1),
        "normalize_ms_now_on_device": round(1000 * t_norm / n, 1),
    }


def bench_step(runs: int) -> dict:
    """The ViT-B MATS + dual-masking (lean) step of benchmarks/bench_step.py, batch 2, 16x224."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_step.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, script, "--setting", "mats-dual-lean", "--runs", str(runs)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["bench_step failed"]}
    out = json.loads(proc.stdout[proc.stdout.index("{") :])
    setting = out["settings"]["mats-dual-lean"] if "settings" in out else out
    return {"setting": "mats-dual-lean", "raw": setting}


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


# ---- the two modes ------------------------------------------------------------------------------
def run_datasets(args) -> dict:
    names = args.dataset or list(DATASETS)
    roots = {n: ensure(args.cache, n) for n in names}
    configs = {
        (n, ns, p): dataset_cfg(
            n,
            *roots[n],
            [f"data.batch_size={args.batch_size}", f"data.num_sample={ns}", "data.num_workers=1", *extra],
        )
        for n in names
        for ns in (1, 2)
        for p, extra in PIPELINES.items()
    }
    times: dict = {k: [] for k in configs}  # per round: (wall clips/s, clips per worker CPU s, main ms/clip)
    bytes_: dict = {}
    clips = args.batches * args.batch_size
    for rnd in range(args.rounds):
        for key, cfg in configs.items():
            wall, worker_cpu, main_cpu, batch = timed_turn(cfg, args.warmup, args.batches)
            times[key].append((clips / wall, clips / worker_cpu, 1000 * main_cpu / clips))
            bytes_.setdefault(key[2], {})[key[0]] = bytes_per_clip(batch)
        print(
            f"round {rnd + 1}/{args.rounds} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True
        )

    def med(key, i):
        return round(statistics.median(x[i] for x in times[key]), 2)

    def ratio(a, b, i=1):  # per round, then the median; default: per worker CPU second
        return round(statistics.median(x[i] / y[i] for x, y in zip(times[a], times[b], strict=True)), 2)

    out = {}
    for n in names:
        cfg = dataset_cfg(n, *roots[n], [])
        rows = {}
        for ns in (1, 2):
            for p in PIPELINES:
                key = (n, ns, p)
                rows[f"num_sample={ns},{p}"] = {
                    "clips_per_worker_cpu_s": med(key, 1),
                    "wall_clips_per_s": med(key, 0),
                    "main_process_cpu_ms_per_clip": med(key, 2),
                    "rounds_clips_per_worker_cpu_s": [round(x[1], 2) for x in times[key]],
                    "vs_before": ratio(key, (n, ns, "before")),
                    "vs_before_wall": ratio(key, (n, ns, "before"), 0),
                }
        dec = {}
        for d in ("decord", "pyav"):
            runs = [
                decode_only(*roots[n], cfg.model.num_frames, cfg.data.sampling_rate, d, 16)
                for _ in range(args.rounds)
            ]
            dec[d] = {
                "wall_clips_per_s": round(statistics.median(r[0] for r in runs), 2),
                "cpu_clips_per_s": round(statistics.median(r[1] for r in runs), 2),
            }
        out[n] = {
            "clip": f"{cfg.model.num_frames}x{cfg.model.img_size}, rate {cfg.data.sampling_rate}",
            "loader_one_worker": rows,
            "decode_only_in_process": dec,
            "bytes_per_clip": {p: bytes_[p][n] for p in PIPELINES},
            "worker_cpu_ms_per_clip": {d: worker_profile(*roots[n], cfg, 8, d) for d in ("decord", "pyav")},
        }
    result = {"datasets": out}
    if "k400" in names and "k400-prepared" in names:
        result["prepared_vs_raw_before"] = {
            f"num_sample={ns},{p}": {
                "per_worker_cpu_s": ratio(("k400-prepared", ns, p), ("k400", ns, "before")),
                "wall": ratio(("k400-prepared", ns, p), ("k400", ns, "before"), 0),
            }
            for ns in (1, 2)
            for p in PIPELINES
        }
    return result


SWEEP = {
    "default (gop 16, fastdecode, veryfast)": PrepareOptions(),
    "gop 8": PrepareOptions(gop=8),
    "gop 32": PrepareOptions(gop=32),
    "no tune": PrepareOptions(tune=""),
    "preset medium": PrepareOptions(preset="medium"),
    "gop 250, no tune, medium (the source's encoding)": PrepareOptions(gop=250, tune="", preset="medium"),
}


def run_sweep(args) -> dict:
    """Decode-only CPU clips/s of the k400 set prepared with each of SWEEP's options."""
    src, src_list = ensure(args.cache, "k400")
    sets = {"source (k400)": (src, src_list)}
    for i, (name, opts) in enumerate(SWEEP.items()):
        root = os.path.join(args.cache, f"k400-sweep-{i}")
        prepare(src, root, opts, list_files=[src_list], workers=min(2, os.cpu_count() or 1), progress=False)
        sets[name] = (root, os.path.join(root, "train.txt"))
    cfg = dataset_cfg("k400", src, src_list, [])
    cpu: dict = {(n, d): [] for n in sets for d in ("decord", "pyav")}
    default = next(iter(SWEEP))
    threaded: dict = {d: [] for d in ("decord", "pyav")}  # 2 decoder threads (frame threads) per reader
    for _ in range(args.rounds):
        for (n, d), runs in cpu.items():
            runs.append(decode_only(*sets[n], cfg.model.num_frames, cfg.data.sampling_rate, d, 16))
        for d, runs in threaded.items():
            runs.append(decode_only(*sets[default], cfg.model.num_frames, cfg.data.sampling_rate, d, 16, 2))
    out = {}
    for n, (root, lst) in sets.items():
        files = [it.path for it in read_list_file(lst, root)]
        out[n] = {
            "kbytes_per_video": round(sum(os.path.getsize(f) for f in files) / len(files) / 1000),
            **{
                f"{d}_{k}": round(statistics.median(r[i] for r in cpu[(n, d)]), 1)
                for d in ("decord", "pyav")
                for i, k in ((0, "wall_clips_per_s"), (1, "cpu_clips_per_s"))
            },
            **{
                f"{d}_cpu_vs_source": round(
                    statistics.median(
                        x[1] / y[1] for x, y in zip(cpu[(n, d)], cpu[("source (k400)", d)], strict=True)
                    ),
                    2,
                )
                for d in ("decord", "pyav")
            },
        }
    out[f"{default}, 2 decoder threads"] = {
        f"{d}_{k}": round(statistics.median(r[i] for r in runs), 1)
        for d, runs in threaded.items()
        for i, k in ((0, "wall_clips_per_s"), (1, "cpu_clips_per_s"))
    }
    return {"prepare_sweep": out, "clip": "16 frames at rate 4, one per video, 16 videos"}


def run_list(args) -> dict:
    """Your files: clips/s of one worker (one core) with your config."""
    if not os.path.isfile(args.list):
        raise ValueError(f"--list={args.list!r}: no such file")
    over = [
        *args.overrides,
        "data.dataset=list",
        f"data.train_list={args.list}",
        f"data.root={args.root}",
        "data.num_workers=1",
        f"data.batch_size={args.batch_size}",
    ]
    try:
        cfg = load_config(args.config, over)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    if args.batch_size % cfg.data.num_sample:
        raise ValueError(
            f"--batch-size={args.batch_size}: must be divisible by data.num_sample={cfg.data.num_sample}"
        )
    rates, walls = [], []
    for rnd in range(args.rounds):
        wall, worker_cpu, _, batch = timed_turn(cfg, args.warmup, args.batches)
        rates.append(args.batches * args.batch_size / worker_cpu)
        walls.append(args.batches * args.batch_size / wall)
        print(
            f"round {rnd + 1}/{args.rounds}: {rates[-1]:.2f} clips per worker CPU second, "
            f"{walls[-1]:.2f} clips/s wall",
            file=sys.stderr,
            flush=True,
        )
    d = cfg.data
    return {
        "list": args.list,
        "clip": f"{cfg.model.num_frames}x{cfg.model.img_size}",
        "sampling_rate": d.sampling_rate,
        "num_sample": d.num_sample,
        "decoder": d.decoder,
        "normalize_on_device": d.normalize_on_device,
        "bytes_per_clip": bytes_per_clip(batch),
        "clips_per_s_per_core": round(statistics.median(rates), 2),
        "rounds": [round(r, 2) for r in rates],
        "wall_clips_per_s": round(statistics.median(walls), 2),
        "note": "clips per CPU second of one loader worker process (one core when it has the core "
        "to itself); wall_clips_per_s is what it got on this machine",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (with --list)")
    ap.add_argument(
        "--cache",
        default=os.path.join("profiling", "out", "bench_data"),
        help="where the benchmark datasets are generated (reused)",
    )
    ap.add_argument("--dataset", action="append", choices=list(DATASETS), help="repeatable; default all")
    ap.add_argument("--list", help="measure your own list file instead (clips/s per core)")
    ap.add_argument("--root", default="", help="with --list: prefix of its relative paths")
    ap.add_argument("--config", help="with --list: your project config (else the defaults)")
    ap.add_argument("--out", help="write the JSON here too")
    ap.add_argument("--batches", type=int, default=8, help="batches per timed turn")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="clips per batch (divisible by 2)")
    ap.add_argument("--step", action="store_true", help="also time the ViT-B MATS step (bench_step.py)")
    ap.add_argument("--quick", action="store_true", help="1 round of 2 batches, for a smoke test")
    ap.add_argument("--prepare-sweep", action="store_true", help="decode cost of prepare's options instead")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.rounds, args.warmup = 2, 1, 1
    if args.batches < 1 or args.rounds < 1 or args.warmup < 1 or args.batch_size < 2 or args.batch_size % 2:
        ap.error("--batches, --rounds, --warmup must be >= 1; --batch-size even and >= 2")
    if args.overrides and not args.list:
        ap.error("key=value overrides apply to --list only")
    torch.set_num_threads(1)
    result = {
        "machine": machine(),
        "batch_size": args.batch_size,
        "batches": args.batches,
        "rounds": args.rounds,
    }
    try:
        result.update(
            run_list(args) if args.list else run_sweep(args) if args.prepare_sweep else run_datasets(args)
        )
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.step:
        step = bench_step(args.rounds)
        result["vit_b_step"] = step
        raw = step.get("raw", {})
        for name in ("k400-prepared", "large"):
            rows = result.get("datasets", {}).get(name, {}).get("loader_one_worker")
            if rows and "clips_per_s" in raw:
                have = rows["num_sample=2,uint8"]["wall_clips_per_s"]
                result["one_worker_vs_step"] = {
                    "dataset": name,
                    "loader_clips_per_s": have,
                    "step_clips_per_s": raw["clips_per_s"],
                    "ratio": round(have / raw["clips_per_s"], 2),
                }
                break
    result["machine"]["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
