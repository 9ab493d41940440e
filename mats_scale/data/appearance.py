"""Bundled tasks that appearance decides, made from real photographs (``data.bundled=objects|scenes``).

The bundled motion set (:mod:`mats_scale.data.synth`) labels the direction of a drawn shape: motion decides
it. These two tasks label *what* is seen, while things move in a way that carries no label:

- ``objects``: the class is which of ten photographs a sprite is cut from (a random square crop of it,
  random size, brightness jitter), moving in a straight line at a random direction and speed, bouncing
  off the frame's edges, over a random crop of a texture photograph that every class shares;
- ``scenes``: the class is which of ten photographs the frame shows (a random crop and scale of it,
  brightness jitter), with a distractor sprite from a pool of other photographs moving over it.

The label is the first draw of a clip's stream and nothing after it depends on it except which photograph
is read, so motion, sizes, crops and textures have the same distribution in every class (the tests check
it). The photographs ship inside the scikit-image wheel (``skimage.data``; no download): licenses in their
docstrings (``skimage/data/_fetchers.py``) and in docs/data.md. Files, list files (VideoMAE ``path label``),
``classes.txt`` and ``meta.json`` (written last: the done-marker) are laid out as the motion set's, with
its H.264 writer; everything is drawn from ``numpy.random.default_rng([seed, split, index, task])``.
Difficulty knobs (:class:`AppearanceParams`) are recorded in meta.json.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from mats_scale.data.dataset_files import FileParams, write_dataset
from mats_scale.data.synth import SPLITS, available_codec, write_video

TASKS = ("objects", "scenes")
# Each class: the skimage.data loader of its photograph (classes.txt names the class by it).
CLASSES = {
    "objects": (
        "astronaut",
        "camera",
        "chelsea",
        "coffee",
        "coins",
        "clock",
        "horse",
        "retina",
        "rocket",
        "cell",
    ),
    "scenes": (
        "astronaut",
        "chelsea",
        "coffee",
        "rocket",
        "hubble_deep_field",
        "retina",
        "immunohistochemistry",
        "camera",
        "brick",
        "gravel",
    ),
}
BACKGROUNDS = ("brick", "grass", "gravel")  # objects: the shared texture photographs
DISTRACTORS = ("coins", "clock", "horse", "cell", "text")  # scenes: the distractor pool
META_VERSION = 1


@dataclass(frozen=True)
class AppearanceParams(FileParams):
    """Everything that determines the generated files (stored in meta.json)."""

    task: str = "objects"
    version: int = META_VERSION
    sprite: tuple[int, int] = (32, 56)
    """Side of the moving sprite in px (objects: the labelled object; scenes: the distractor)."""
    crop: tuple[float, float] = (0.3, 1.0)
    """Crop of the class photograph, as a fraction of its (largest fitting) side, drawn in this range."""
    jitter: float = 0.3
    """Brightness gain of the class photograph drawn in [1 - jitter, 1 + jitter]."""
    noise: float = 0.0
    """Standard deviation of per-pixel, per-frame Gaussian noise, as a fraction of the range."""
    gray: bool = False
    """Show every photograph in grey (colour then says nothing about the class)."""
    speed: tuple[float, float] = (1.0, 3.0)
    """Sprite speed in px per frame (direction uniform; it bounces off the edges)."""

    def check(self) -> None:
        """Raise ValueError naming the parameter for values out of range."""
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: allowed: {', '.join(TASKS)}")
        if self.num_train < 0 or self.num_val < 0 or self.fps < 1 or self.frames < 8:
            raise ValueError(
                f"num_train={self.num_train} num_val={self.num_val} fps={self.fps} frames={self.frames}: "
                "counts must be >= 0, fps >= 1 and frames >= 8"
            )
        if self.height % 2 or self.width % 2:
            raise ValueError(f"height={self.height} width={self.width}: both must be even (yuv420p)")
        lo, hi = self.sprite
        if not 4 <= lo <= hi < min(self.height, self.width):
            raise ValueError(
                f"sprite={self.sprite}: need 4 <= min <= max < {min(self.height, self.width)} px"
            )
        if not 0.05 <= self.crop[0] <= self.crop[1] <= 1.0:
            raise ValueError(f"crop={self.crop}: need 0.05 <= min <= max <= 1")
        if not 0.0 <= self.jitter < 1.0 or not 0.0 <= self.noise <= 0.5:
            raise ValueError(
                f"jitter={self.jitter} noise={self.noise}: need jitter in [0, 1), noise in [0, 0.5]"
            )
        if not 0.0 <= self.speed[0] <= self.speed[1]:
            raise ValueError(f"speed={self.speed}: need 0 <= min <= max px per frame")

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES[self.task]


DEFAULTS = {
    "objects": AppearanceParams(task="objects", gray=True, crop=(0.3, 1.0)),
    "scenes": AppearanceParams(task="scenes", gray=True, crop=(0.1, 0.35)),
}
"""What data.dataset=bundled data.bundled=<task> generates on first use: the difficulty at which from-scratch
fine-tuning lands between chance and ceiling at the study's budget (calibration: docs/learning-study.md)."""


def params_dict(params: AppearanceParams) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(params).items()}


@functools.cache
def photo(name: str) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] of a photograph shipped in scikit-image (``skimage.data.<name>``)."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    img = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else max(float(img.max()), 1.0))
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def _crop_resize(
    img: np.ndarray, rng: np.random.Generator, frac: float, out_hw: tuple[int, int]
) -> np.ndarray:
    """A crop of `img` with the aspect of `out_hw`, `frac` of the largest such crop's side, at a random
    place, resized to `out_hw` (area-averaged when shrinking)."""
    from skimage.transform import resize

    H, W = img.shape[:2]
    aspect = out_hw[1] / out_hw[0]
    ch = min(H, W / aspect) * frac
    cw = ch * aspect
    y0 = rng.uniform(0, H - ch)
    x0 = rng.uniform(0, W - cw)
    patch = img[int(y0) : int(y0 + ch) + 1, int(x0) : int(x0 + cw) + 1]
    return resize(patch, out_hw, order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


def _look(img: np.ndarray, params: AppearanceParams, gain: float) -> np.ndarray:
    if params.gray:
        img = np.repeat((img @ np.array([0.299, 0.587, 0.114], np.float32))[..., None], 3, axis=2)
    return np.clip(img * gain, 0.0, 1.0)


@dataclass(frozen=True)
class ClipSpec:
    """One clip: its label and the sprite's top-left corner per frame (frames, 2) as (y, x)."""

    label: int
    size: int
    corners: np.ndarray
    velocity: np.ndarray  # (vy, vx) at the first frame, px per frame


def _bounce(start: np.ndarray, v: np.ndarray, frames: int, limit: np.ndarray) -> np.ndarray:
    """Positions of a point moving at `v` from `start` inside [0, limit], reflected at the edges."""
    p = start[None, :] + np.arange(frames)[:, None] * v[None, :]
    period = 2 * np.maximum(limit, 1e-6)
    p = np.mod(p, period)
    return np.where(p > limit, period - p, p)


def _rng(params: AppearanceParams, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([params.seed, SPLITS[split], index, 1 + TASKS.index(params.task)])


def clip_spec(params: AppearanceParams, split: str, index: int) -> tuple[ClipSpec, np.random.Generator]:
    """The clip's label and sprite path (the label is the first draw, then the motion's draws, none of
    which depend on it); returns the rng for the pictures."""
    rng = _rng(params, split, index)
    label = int(rng.integers(len(params.classes)))
    size = int(rng.integers(params.sprite[0], params.sprite[1] + 1))
    angle = rng.uniform(0, 2 * math.pi)
    v = np.array([math.sin(angle), math.cos(angle)]) * rng.uniform(*params.speed)
    limit = np.array([params.height - size, params.width - size], np.float64)
    start = rng.uniform(0, 1, 2) * limit
    corners = _bounce(start, v, params.frames, limit)
    return ClipSpec(label, size, corners.astype(np.float32), v), rng


def render_clip(params: AppearanceParams, split: str, index: int) -> tuple[np.ndarray, ClipSpec]:
    """(frames, H, W, 3) uint8 RGB of clip `index` of `split`, and its recipe."""
    spec, rng = clip_spec(params, split, index)
    H, W = params.height, params.width
    gain = rng.uniform(1 - params.jitter, 1 + params.jitter)
    name = params.classes[spec.label]
    if params.task == "objects":
        sprite = _crop_resize(photo(name), rng, rng.uniform(*params.crop), (spec.size, spec.size))
        sprite = _look(sprite, params, gain)
        texture = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        back = _look(
            _crop_resize(photo(texture), rng, rng.uniform(0.3, 1.0), (H, W)), params, rng.uniform(0.7, 1.1)
        )
    else:
        back = _look(_crop_resize(photo(name), rng, rng.uniform(*params.crop), (H, W)), params, gain)
        pool = DISTRACTORS[int(rng.integers(len(DISTRACTORS)))]
        sprite = _crop_resize(photo(pool), rng, rng.uniform(0.4, 1.0), (spec.size, spec.size))
        sprite = _look(sprite, params, rng.uniform(0.7, 1.3))
    out = np.empty((params.frames, H, W, 3), np.float32)
    out[:] = back
    s = spec.size
    for i, (y, x) in enumerate(np.rint(spec.corners).astype(int)):
        out[i, y : y + s, x : x + s] = sprite
    if params.noise:
        out += rng.normal(0.0, params.noise, out.shape).astype(np.float32)
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8), spec


def _write_one(job: tuple[AppearanceParams, str, int, str]) -> None:
    params, split, index, path = job
    frames, _ = render_clip(params, split, index)
    write_video(path, frames, params.fps, params.codec, params.crf)


def _label(params: AppearanceParams, split: str, index: int) -> int:
    return clip_spec(params, split, index)[0].label


def is_complete(out_dir: str, params: AppearanceParams | None = None) -> bool:
    """True when meta.json exists (written last) and, if `params` is given, records them."""
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return params is None or meta.get("params") == params_dict(params)


def generate(out_dir: str, params: AppearanceParams, workers: int = 2, verbose: bool = True) -> dict:
    """Write the task's videos, list files, classes.txt and last meta.json. Returns the meta dict."""
    import skimage

    params.check()
    params = AppearanceParams(**{**asdict(params), "codec": available_codec(params.codec)})
    meta = {
        "params": params_dict(params),
        "classes": list(params.classes),
        "photographs": f"skimage.data (scikit-image {skimage.__version__}, see docs/data.md for licenses)",
    }
    meta = write_dataset(out_dir, params, _write_one, _label, params.classes, meta, workers)
    if verbose:
        print(
            f"wrote {params.task}: {params.num_train} + {params.num_val} clips ({params.frames} frames "
            f"{params.height}x{params.width}, {params.codec}) to {out_dir} in {meta['seconds']} s",
            flush=True,
        )
    return meta


def meta_task(out_dir: str) -> str | None:
    """Which bundled task a complete dataset directory holds (motion, objects, scenes), else None."""
    try:
        with open(os.path.join(out_dir, "meta.json")) as f:
            return json.load(f).get("params", {}).get("task", "motion")
    except (OSError, ValueError, AttributeError):
        return None
