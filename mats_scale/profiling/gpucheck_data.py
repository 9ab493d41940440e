"""The data half of ``mats-gpucheck``: the two file sets (the bundled videos, a generated K400-like set),
the loader measurements per decoder and the data-stall run (docs/gpu.md).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace
from multiprocessing import get_context

import numpy as np

from mats_scale.profiling.gpucheck import Point

K400_LIKE = dict(videos=128, frames=300, height=256, width=340, fps=30)
"""K400 after the usual preparation: 10 s at 30 fps, short side 256, H.264 (libx264, CRF 23)."""
TINY_SET = dict(videos=4, frames=24, height=64, width=88, fps=30)


@dataclass(frozen=True)
class FileSet:
    name: str
    root: str
    list_file: str
    config: str | None  # a shipped config giving the clip shape (None: the defaults, ViT-B 16x224)
    shape: tuple[int, int, int]  # frames per clip, sampling rate, crop size

    @property
    def overrides(self) -> list[str]:
        return ["data.dataset=list", f"data.root={self.root}", f"data.train_list={self.list_file}"]

    def paths(self, n: int) -> list[str]:
        with open(self.list_file) as f:
            return [os.path.join(self.root, line.split()[0]) for line in f if line.strip()][:n]


def k400_like_frames(seed: int, frames: int, height: int, width: int) -> np.ndarray:
    """(frames, height, width, 3) uint8: a camera panning over random-phase gratings and blocks, a disc
    on a circular path, sensor noise; enough detail and motion that H.264 costs what real footage does."""
    rng = np.random.default_rng(seed)
    H, W = height + frames // 2 + 2, width + frames + 2
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    scene = np.full((H, W, 3), 110.0, np.float32)
    for _ in range(5):
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 80)
        wave = np.sin((x * np.cos(angle) + y * np.sin(angle)) * (2 * np.pi / period) + rng.uniform(0, 6.3))
        scene += wave[..., None] * rng.uniform(8, 25, 3).astype(np.float32)
    cells = rng.uniform(-50, 50, (H // 24 + 1, W // 24 + 1, 3)).astype(np.float32)
    scene += np.repeat(np.repeat(cells, 24, 0), 24, 1)[:H, :W]
    out = np.empty((frames, height, width, 3), np.uint8)
    fy, fx = np.mgrid[0:height, 0:width]
    for t in range(frames):
        f = scene[t // 2 : t // 2 + height, t : t + width].copy()
        cy, cx = height * (0.5 + 0.3 * np.sin(t / 15)), width * (0.5 + 0.3 * np.cos(t / 20))
        f[(fy - cy) ** 2 + (fx - cx) ** 2 < (height / 8) ** 2] = (210, 70, 40)
        f += rng.normal(0, 4, f.shape).astype(np.float32)
        out[t] = np.clip(f, 0, 255)
    return out


def _write(job: tuple[str, int, dict]) -> None:
    from mats_scale.data.synth import write_video

    path, seed, spec = job
    frames = k400_like_frames(seed, spec["frames"], spec["height"], spec["width"])
    write_video(path, frames, spec["fps"], "libx264", crf=23)


def k400_like_set(root: str, spec: dict, workers: int) -> str:
    """Generate the set into `root` once (the list file is written last); returns the list file."""
    list_file = os.path.join(root, "train.txt")
    if os.path.isfile(list_file):
        return list_file
    os.makedirs(os.path.join(root, "videos"), exist_ok=True)
    jobs = [(os.path.join(root, "videos", f"{i:04d}.mp4"), i, spec) for i in range(spec["videos"])]
    jobs = [j for j in jobs if not os.path.isfile(j[0])]
    if workers > 1 and len(jobs) > 1:
        with get_context("fork").Pool(workers) as pool:
            pool.map(_write, jobs)
    else:
        for job in jobs:
            _write(job)
    with open(list_file + ".part", "w") as f:
        f.writelines(f"videos/{i:04d}.mp4 {i % 10}\n" for i in range(spec["videos"]))
    os.replace(list_file + ".part", list_file)
    return list_file


def prepare_datasets(cache: str, *, tiny: bool = False) -> dict[str, FileSet]:
    """The bundled videos (generated as a run would, into `cache`) and the K400-like set."""
    from mats_scale.data.sources import ensure_bundled
    from mats_scale.resources import DEFAULT_CONFIG, config_path

    workers = max(1, (os.cpu_count() or 2) - 1)
    sets = {}
    if tiny:  # the dry run: a few small files stand in for both sets
        root = os.path.join(cache, "tiny")
        tiny_set = FileSet("bundled", root, k400_like_set(root, TINY_SET, 1), None, (4, 2, 32))
        return {"bundled": tiny_set, "k400-like": replace(tiny_set, name="k400-like")}
    root = ensure_bundled(os.path.join(cache, "bundled"), workers=workers)
    # The bundled job's own clip shape (the shipped default config: 8 frames at 128).
    sets["bundled"] = FileSet(
        "bundled", root, os.path.join(root, "train.txt"), config_path(DEFAULT_CONFIG), (8, 4, 128)
    )
    root = os.path.join(cache, "k400-like")
    sets["k400-like"] = FileSet(
        "k400-like", root, k400_like_set(root, K400_LIKE, workers), None, (16, 4, 224)
    )
    return sets


LOADER_WORKERS = 8
"""DataLoader workers per measurement (half of a 16-core GPU machine: what one GPU of 8 gets)."""


def measure_loaders(runner, sets: dict[str, FileSet], *, tiny: bool = False) -> list[dict]:
    """Clips/s per file set and decoder: decord and pyav through the training loader, nvdec in the
    training process (with its pixel difference to decord) when PyNvVideoCodec is installed."""
    rows = []
    workers = 0 if tiny else LOADER_WORKERS
    shape = ["model.size=debug", "model.num_frames=4", "model.img_size=32", "data.sampling_rate=2"]
    shape += ["data.batch_size=4"] if tiny else ["data.batch_size=16"]
    for s in sets.values():
        if tiny and s.name != "bundled":
            continue
        for decoder in ("decord", "pyav"):
            job = {
                "kind": "loader",
                "overrides": [*s.overrides, f"data.decoder={decoder}", f"data.num_workers={workers}",
                              *(shape if tiny else shape[-1:])],
                "config": s.config,
                "batches": 2 if tiny else 12,
                "warmup": 1 if tiny else 3,
            }  # fmt: skip
            m = runner(f"loader {s.name} {decoder}", job)
            if m is not None:
                rows.append({"name": "loader", "dataset": s.name, "decoder": decoder, **m})
        name = f"loader {s.name} nvdec"
        if importlib.util.find_spec("PyNvVideoCodec") is None:
            runner.skipped.append(
                {"name": name, "reason": "PyNvVideoCodec is not installed (pip install PyNvVideoCodec)"}
            )
            continue
        if tiny:
            continue
        frames, rate, size = s.shape
        job = {"kind": "nvdec", "paths": s.paths(32), "num_frames": frames, "rate": rate, "size": size}
        m = runner(name, job)
        if m is not None:
            rows.append({"name": "loader", "dataset": s.name, "decoder": "nvdec", **m})
    return rows


def stall_point(s: FileSet, *, tiny: bool = False) -> Point:
    """A short ViT-B MATS + dual run on the file set with the loader's workers: its data_wait."""
    p = Point(
        f"stall B mats+dual {s.name}",
        preset="mats+dual",
        batch=32,
        steps=24,
        warmup=6,
        dataset="list",
        workers=LOADER_WORKERS,
        extra=(f"data.root={s.root}", f"data.train_list={s.list_file}", "data.num_sample=2"),
    )
    if tiny:
        from mats_scale.profiling.gpucheck import tiny_point

        return tiny_point(replace(p, extra=(*p.extra[:2], "data.sampling_rate=2")))
    return p


def stall_row(p: Point, m: dict) -> dict:
    """The stall run as a loader row: wall clips/s of the training run and its median data_wait."""
    return {
        "name": "data stall",
        "dataset": p.name.rsplit(" ", 1)[-1],
        "decoder": "decord",
        "workers": p.workers,
        "clips_per_s": p.batch / m["wall_step_s"],
        "data_wait": m.get("data_wait"),
        "step_s": m["step_s"],
    }


__all__ = ["K400_LIKE", "FileSet", "k400_like_frames", "k400_like_set", "measure_loaders", "prepare_datasets",
           "stall_point", "stall_row"]  # fmt: skip
