"""The bundled sample dataset: procedurally moving objects over textured static backgrounds.

The command is ``mats-synth OUT_DIR [options]`` (:mod:`mats_scale.launch.synth`). :func:`generate`
writes ``OUT_DIR/{train,val}/NNNNNN.mp4`` (real H.264 through PyAV/libx264, or MPEG-4 part 2), the list
files ``train.txt`` / ``val.txt`` in the VideoMAE ``path label`` format (paths relative to OUT_DIR),
``classes.txt`` and last, atomically, ``meta.json`` (the done-marker the loader checks).

Design, so that a tiny model learns something in a few minutes and labels need motion:
- Classes are defined only by the object's motion (:data:`CLASSES`): straight lines in 4 directions
  at 2 speed bands (non-overlapping, so speed is decidable), and circles clockwise / anticlockwise.
  Shape, size, colour, start point and background are drawn independently of the class, so
  appearance alone cannot solve them. Left/right and cw/ccw swap under a horizontal flip: train a
  classifier on this data without flips (``data.flip=false``).
- Scenes are coarse and lit: a static albedo (a base colour, low-frequency gratings with periods of
  64-128 px, two soft-edged rectangles) times a light fall-off from the top edge (direction jittered
  by +-35 degrees, strength 60-85%), which also shades the object. Structure continues across 16 px
  patches, so a masked patch is predictable after the per-patch normalisation of the targets (which
  removes colour and brightness; fine textures or flat areas would leave only codec noise). Measured:
  the debug model's normalised loss falls from ~0.95 to ~0.65 in 150 steps (docs/data.md, "The
  bundled dataset"); with per-channel gradients in random directions it stayed at ~1.0.
- Objects are large (22-34 px), opaque, anti-aliased, contrasting with the base colour, and
  persist through the whole clip.
Everything is drawn from ``numpy.random.default_rng([seed, split, index])``: the same seed gives the
same clips; the encoder runs single-threaded so the files are byte-identical too.

Camera and editing options (off by default; the default dataset is unchanged by them, file for file),
for studying motion scores on footage that is not a still camera (docs/masking.md, "Which motion score"):
- ``pan`` px/frame: the camera pans over the scene in a direction drawn per clip;
- ``zoom``: the camera zooms in or out (drawn per clip) by this relative scale change per frame;
- ``texture``: a fine high-contrast luminance texture (value noise, 4 px cells) of this amplitude
  on the scene, which a moving camera turns into frame differences everywhere;
- ``cut``: one hard cut per clip, at a frame drawn in the middle half; from it on the clip shows
  another scene with another object (:attr:`ClipSpec.cut`);
- ``fast_object`` px/frame: a large flat-coloured box (50-80% of the height, 40-60% of the width: a
  car passing close to the camera) crosses the screen horizontally at this speed, entering at a frame
  drawn in the first half: a large colour change that is no cut;
- ``flash``: one frame per clip (drawn, not the first or last) brightened 50-80% of the way to white.
The object's path stays defined on the screen (labels keep their meaning; it stays fully in view);
the camera moves the scene only. These draws come from separate streams
(``[seed, split, index, 1]`` and ``[..., 2]`` for the second shot, ``[..., 5]`` for the fast object,
``[..., 6]`` for the flash), after the default ones.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace

import numpy as np

from mats_scale.data.dataset_files import FileParams, write_dataset
from mats_scale.data.dataset_files import relpath as relpath  # where a clip lives (used with the module)
from mats_scale.data.synth_effects import add_fast_object, add_flash, soft_box, value_noise

CLASSES = (
    "right_slow",
    "left_slow",
    "up_slow",
    "down_slow",
    "right_fast",
    "left_fast",
    "up_fast",
    "down_fast",
    "circle_cw",
    "circle_ccw",
)
_DIRECTIONS = {"right": 0.0, "left": math.pi, "up": -math.pi / 2, "down": math.pi / 2}  # image y points down
SLOW_SPEED = (0.8, 1.3)  # px per frame
FAST_SPEED = (2.0, 2.6)
SHAPES = ("disc", "square", "diamond")
RADIUS = (11.0, 17.0)  # object half-size, px
ORBIT = (18.0, 30.0)  # circle radius, px
LIGHT_JITTER = math.radians(35)  # light direction: from the top edge +- this
LIGHT_STRENGTH = (0.6, 0.85)  # fraction of light lost across the frame
SPLITS = {"train": 0, "val": 1}
META_VERSION = 1
MAX_PAN = 8.0  # px per frame
MAX_ZOOM = 0.05  # relative scale change per frame
MAX_TEXTURE = 0.5
MAX_FAST_OBJECT = 24.0  # px per frame


@dataclass(frozen=True)
class SynthParams(FileParams):
    """Everything that determines the generated files (stored in meta.json)."""

    version: int = META_VERSION
    pan: float = 0.0
    """Camera pan speed in px per frame (direction drawn per clip); 0: still camera."""
    zoom: float = 0.0
    """Camera zoom: relative scale change per frame (in or out, drawn per clip); 0: none."""
    texture: float = 0.0
    """Amplitude of a fine high-contrast texture added to the scene's albedo (0 to 0.5)."""
    cut: bool = False
    """One hard cut per clip (frame drawn in the middle half) to another scene and object."""
    fast_object: float = 0.0
    """Speed in px per frame of a large box crossing the screen (a passing car); 0: none."""
    flash: bool = False
    """One frame per clip brightened towards white (a photographer's flash)."""

    @property
    def effects(self) -> bool:
        """True when any camera / editing option is on (the default dataset has none)."""
        return bool(self.pan or self.zoom or self.texture or self.cut or self.fast_object or self.flash)

    def check(self) -> None:
        """Raise ValueError naming the (CLI) option for values the motion classes do not fit in."""
        if self.num_train < 0 or self.num_val < 0 or self.fps < 1:
            raise ValueError(
                f"--num-train={self.num_train} --num-val={self.num_val} --fps={self.fps}: "
                "counts must be >= 0 and fps >= 1"
            )
        if self.frames < 8:
            raise ValueError(f"--frames={self.frames}: must be >= 8")
        if self.height % 2 or self.width % 2:
            raise ValueError(f"--height={self.height} --width={self.width}: both must be even (yuv420p)")
        side = 2 * (RADIUS[1] + 2)
        need = max(side + FAST_SPEED[1] * (self.frames - 1), side + 2 * ORBIT[0])
        if min(self.height, self.width) < need:
            raise ValueError(
                f"--height={self.height} --width={self.width}: an object at the fast speed "
                f"over --frames={self.frames} needs both >= {math.ceil(need)} px"
            )
        if not 0.0 <= self.pan <= MAX_PAN:
            raise ValueError(f"--pan={self.pan}: must be in [0, {MAX_PAN}] px per frame")
        if not 0.0 <= self.zoom <= MAX_ZOOM:
            raise ValueError(f"--zoom={self.zoom}: must be in [0, {MAX_ZOOM}] (scale change per frame)")
        if not 0.0 <= self.texture <= MAX_TEXTURE:
            raise ValueError(f"--texture={self.texture}: must be in [0, {MAX_TEXTURE}]")
        if not 0.0 <= self.fast_object <= MAX_FAST_OBJECT:
            raise ValueError(
                f"--fast-object={self.fast_object}: must be in [0, {MAX_FAST_OBJECT}] px per frame"
            )


# Fields added after version 1 are written to meta.json only when set, so a default dataset's
# meta.json is what it always was.
_OPTIONAL_FIELDS = {"pan": 0.0, "zoom": 0.0, "texture": 0.0, "cut": False, "fast_object": 0.0, "flash": False}


def params_dict(params: SynthParams) -> dict:
    """The parameters as stored in meta.json (camera / editing options only when set)."""
    return {k: v for k, v in asdict(params).items() if k not in _OPTIONAL_FIELDS or v != _OPTIONAL_FIELDS[k]}


@dataclass(frozen=True)
class ClipSpec:
    """One clip: its class and the object trajectory, as float pixel centres per frame."""

    label: int
    shape: str
    radius: float  # half the object's side / radius, px
    centers: np.ndarray  # (frames, 2) as (y, x)
    cut: int = 0  # first frame of the second shot (SynthParams.cut); 0: one shot. The fields above
    # describe the first shot; the second has its own scene and object.


def clip_spec(params: SynthParams, split: str, index: int) -> tuple[ClipSpec, np.random.Generator]:
    """The deterministic recipe of clip `index` of `split`; returns the rng for the scene too."""
    spec, rng = _draw_spec(params, np.random.default_rng([params.seed, SPLITS[split], index]))
    if params.cut:  # own stream, so the draws above (and the scene's, from rng) are the default ones
        L = params.frames
        spec = replace(spec, cut=int(_effects_rng(params, split, index).integers(L // 4, 3 * L // 4 + 1)))
    return spec, rng


def _draw_spec(params: SynthParams, rng: np.random.Generator) -> tuple[ClipSpec, np.random.Generator]:
    label = int(rng.integers(len(CLASSES)))
    name = CLASSES[label]
    radius = float(rng.uniform(*RADIUS))
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    H, W, L = params.height, params.width, params.frames
    t = np.arange(L, dtype=np.float64)
    margin = radius + 2
    if name.startswith("circle"):
        # Radius of the orbit 18-30 px, about one turn in 24-40 frames.
        orbit = min(rng.uniform(*ORBIT), min(H, W) / 2 - margin)
        omega = 2 * math.pi / rng.uniform(24, 40) * (1 if name == "circle_cw" else -1)
        cy = rng.uniform(margin + orbit, H - margin - orbit)
        cx = rng.uniform(margin + orbit, W - margin - orbit)
        phase = rng.uniform(0, 2 * math.pi)
        # Clockwise on screen (y down) means increasing angle.
        centers = np.stack(
            [cy + orbit * np.sin(phase + omega * t), cx + orbit * np.cos(phase + omega * t)], 1
        )
    else:
        direction, band = name.split("_")
        speed = rng.uniform(*(SLOW_SPEED if band == "slow" else FAST_SPEED))
        angle = _DIRECTIONS[direction] + rng.uniform(-0.3, 0.3)  # +-17 degrees of jitter
        v = np.array([math.sin(angle), math.cos(angle)]) * speed  # (vy, vx)
        travel = v * (L - 1)
        # Start so that the whole path stays inside the frame with the object fully visible.
        limit = np.array([H - margin, W - margin])
        lo = np.maximum(margin, margin - travel)
        hi = np.minimum(limit, limit - travel)
        start = lo + rng.uniform(0, 1, 2) * np.maximum(hi - lo, 0)
        centers = start[None, :] + t[:, None] * v[None, :]
    return ClipSpec(label, shape, radius, centers.astype(np.float32)), rng


def _effects_rng(params: SynthParams, split: str, index: int, stream: int = 1) -> np.random.Generator:
    return np.random.default_rng([params.seed, SPLITS[split], index, stream])


@dataclass(frozen=True)
class SceneRecipe:
    """The random draws of one static scene, so that it can be evaluated at any coordinates."""

    height: int
    width: int
    base: np.ndarray  # (3,) base colour
    gratings: tuple  # per channel (angle, period, phase)
    boxes: tuple  # two (h, w, y0, x0, colour (3,)) soft rectangles
    light_angle: float
    light_range: tuple  # (min, max) of the light coordinate over the H x W frame
    light_strength: float


def draw_scene(height: int, width: int, rng: np.random.Generator) -> SceneRecipe:
    """Draw a scene's parameters (in the order the bundled dataset always drew them)."""
    base = rng.uniform(0.3, 1.0, 3).astype(np.float32)
    gratings = tuple(
        (rng.uniform(0, 2 * math.pi), rng.uniform(64, 128), rng.uniform(0, 2 * math.pi)) for _ in range(3)
    )  # one low-frequency grating per channel
    boxes = []
    for _ in range(2):
        h, w = rng.uniform(24, 64, 2)
        y0, x0 = rng.uniform(-h / 2, height - h / 2), rng.uniform(-w / 2, width - w / 2)
        boxes.append((h, w, y0, x0, rng.uniform(0.3, 1.0, 3).astype(np.float32)))
    a = math.pi / 2 + rng.uniform(-LIGHT_JITTER, LIGHT_JITTER)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    d = xs * math.cos(a) + ys * math.sin(a)
    return SceneRecipe(
        height, width, base, gratings, tuple(boxes), a, (d.min(), d.max()), rng.uniform(*LIGHT_STRENGTH)
    )


def scene_at(recipe: SceneRecipe, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Albedo (H, W, 3) in [0, 1] and light (H, W, 1) of the scene at float32 coordinates (H, W) each
    (the static scene at integer pixel coordinates; a moving camera samples it elsewhere)."""
    albedo = np.empty((*ys.shape, 3), np.float32)
    for c, (a, period, phase) in enumerate(recipe.gratings):
        wave = np.sin((xs * math.cos(a) + ys * math.sin(a)) * (2 * math.pi / period) + phase)
        albedo[..., c] = recipe.base[c] + 0.08 * wave
    for h, w, y0, x0, colour in recipe.boxes:
        inside = 0.5 * soft_box(ys, xs, y0, x0, h, w)[..., None]
        albedo = albedo * (1 - inside) + inside * colour
    # Light falls off away from the top edge: 1 at the lit edge, 1 - strength at the far one.
    a, (lo, hi) = recipe.light_angle, recipe.light_range
    d = xs * math.cos(a) + ys * math.sin(a)
    d = (d - lo) / (hi - lo)
    light = (1.0 - recipe.light_strength * d)[..., None]
    return np.clip(albedo, 0, 1), light.astype(np.float32)


def scene(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The static scene: albedo (H, W, 3) and light (H, W, 1), float32 in [0, 1], and the base colour (3,)."""
    recipe = draw_scene(height, width, rng)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return (*scene_at(recipe, ys, xs), recipe.base)


def object_color(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An albedo that differs from the scene's base colour by >= 0.4 in some channel."""
    for _ in range(32):
        color = rng.uniform(0, 1, 3).astype(np.float32)
        if np.abs(color - base).max() >= 0.4:
            return color
    return (1.0 - base).astype(np.float32)


def _coverage(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape centred at the origin (one-pixel soft edge)."""
    if shape == "disc":
        dist = np.sqrt(dy * dy + dx * dx)
    elif shape == "square":
        dist = np.maximum(np.abs(dy), np.abs(dx))
    else:  # diamond with the same area scale
        dist = (np.abs(dy) + np.abs(dx)) / math.sqrt(2)
    return np.clip(radius - dist + 0.5, 0.0, 1.0)


def object_tokens(
    spec: ClipSpec, ids: list[int], height: int, width: int, tubelet: int, patch: int
) -> np.ndarray:
    """(N,) bool in token order: the tubelet-patches (frames `ids`, `tubelet` per tubelet, `patch` px
    squares) that hold more than half a pixel of the object in any of their frames; the ground truth of
    which tokens are the moving object's, for the motion-score benchmarks and tests."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    cover = np.stack(
        [
            _coverage(spec.shape, ys + 0.5 - spec.centers[f][0], xs + 0.5 - spec.centers[f][1], spec.radius)
            > 0.5
            for f in ids
        ]
    )
    m = cover.reshape(len(ids) // tubelet, tubelet, height // patch, patch, width // patch, patch)
    return m.any(axis=(1, 3, 5)).reshape(-1)


def render(spec: ClipSpec, albedo: np.ndarray, light: np.ndarray, color: np.ndarray) -> np.ndarray:
    """(frames, H, W, 3) uint8: the object (albedo `color`) composited over the static albedo at each
    centre, then everything lit by `light`."""
    H, W, _ = albedo.shape
    out = np.empty((len(spec.centers), H, W, 3), np.uint8)
    lit = albedo * light * 255.0
    color = color.astype(np.float32) * 255.0
    for i, (cy, cx) in enumerate(spec.centers):
        out[i] = _composite(lit.copy(), light, spec, cy, cx, color)
    return out


def _composite(
    frame: np.ndarray, light: np.ndarray, spec: ClipSpec, cy: float, cx: float, color: np.ndarray
) -> np.ndarray:
    """The object (albedo `color` x 255, lit by `light`) over a lit frame (H, W, 3) float32 -> uint8."""
    H, W, _ = frame.shape
    box = int(math.ceil(spec.radius * math.sqrt(2))) + 2
    y0, y1 = max(int(cy) - box, 0), min(int(cy) + box + 1, H)
    x0, x1 = max(int(cx) - box, 0), min(int(cx) + box + 1, W)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    # Pixel (y, x) covers [y, y+1): its centre is y + 0.5.
    alpha = _coverage(spec.shape, ys + 0.5 - cy, xs + 0.5 - cx, spec.radius)[..., None]
    frame[y0:y1, x0:x1] = frame[y0:y1, x0:x1] * (1 - alpha) + color * light[y0:y1, x0:x1] * alpha
    return np.clip(frame + 0.5, 0, 255).astype(np.uint8)


def camera_path(params: SynthParams, fx: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per frame the camera's scale (L,) (> 1: zoomed in) and offset (L, 2) (y, x) in scene pixels."""
    t = np.arange(params.frames, dtype=np.float64)
    angle = fx.uniform(0, 2 * math.pi)
    sign = 1.0 if fx.uniform() < 0.5 else -1.0
    offset = t[:, None] * params.pan * np.array([math.sin(angle), math.cos(angle)])[None, :]
    return (1.0 + sign * params.zoom) ** t, offset


def render_shot(
    params: SynthParams, spec: ClipSpec, rng: np.random.Generator, fx: np.random.Generator
) -> np.ndarray:
    """(frames, H, W, 3) uint8 of one shot with the camera / texture options: the scene (drawn from
    `rng`, then the object colour) seen through the camera of `fx` (then the texture); the object
    follows ``spec.centers`` on the screen."""
    H, W, L = params.height, params.width, params.frames
    recipe = draw_scene(H, W, rng)
    color = object_color(recipe.base, rng).astype(np.float32) * 255.0
    scale, offset = camera_path(params, fx)
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    cy, cx = (H - 1) / 2, (W - 1) / 2
    # Screen pixel (y, x) of frame i sees scene point c + (y - c) / scale_i + offset_i.
    corners = [
        (cy + (y - cy) / z + o[0], cx + (x - cx) / z + o[1])
        for z, o in zip(scale, offset, strict=True)
        for y in (0, H - 1)
        for x in (0, W - 1)
    ]
    texture = value_noise(fx, np.min(corners, axis=0), np.max(corners, axis=0)) if params.texture else None
    out = np.empty((L, H, W, 3), np.uint8)
    for i in range(L):
        wy = (cy + (ys - cy) / scale[i] + offset[i, 0]).astype(np.float32)
        wx = (cx + (xs - cx) / scale[i] + offset[i, 1]).astype(np.float32)
        albedo, light = scene_at(recipe, wy, wx)
        if texture is not None:
            albedo = np.clip(albedo + params.texture * texture(wy, wx)[..., None], 0, 1)
        light = np.maximum(light, 0.05)  # zooming out sees past the lit range of the frame
        out[i] = _composite(albedo * light * 255.0, light, spec, *spec.centers[i], color)
    return out


def render_clip(params: SynthParams, split: str, index: int) -> tuple[np.ndarray, ClipSpec]:
    """(frames, H, W, 3) uint8 RGB of clip `index` of `split`, and its recipe."""
    spec, rng = clip_spec(params, split, index)
    if not params.effects:
        albedo, light, base = scene(params.height, params.width, rng)
        return render(spec, albedo, light, object_color(base, rng)), spec
    frames = render_shot(params, spec, rng, _effects_rng(params, split, index, 3))
    if spec.cut:  # the second shot: its own object, scene and camera
        other, rng2 = _draw_spec(params, _effects_rng(params, split, index, 2))
        frames[spec.cut :] = render_shot(params, other, rng2, _effects_rng(params, split, index, 4))[
            spec.cut :
        ]
    if params.fast_object:
        add_fast_object(frames, params.fast_object, _effects_rng(params, split, index, 5))
    if params.flash:
        add_flash(frames, _effects_rng(params, split, index, 6))
    return frames, spec


def render_background(params: SynthParams, split: str, index: int) -> np.ndarray:
    """(H, W, 3) uint8: the clip's scene without the object (to locate the object in tests)."""
    _, rng = clip_spec(params, split, index)
    albedo, light, _ = scene(params.height, params.width, rng)
    return np.clip(albedo * light * 255.0 + 0.5, 0, 255).astype(np.uint8)


def available_codec(preferred: str) -> str:
    import av

    codecs = av.codecs_available
    if preferred in codecs:
        return preferred
    if "mpeg4" in codecs:
        return "mpeg4"
    raise RuntimeError(f"codec {preferred!r} is not in this PyAV build and neither is mpeg4")


def write_video(path: str, frames: np.ndarray, fps: int, codec: str = "libx264", crf: int = 18) -> None:
    """Encode (T, H, W, 3) uint8 RGB frames into an .mp4 with PyAV (single-threaded: deterministic)."""
    import av

    tmp = path + ".part"
    with av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
        else:  # mpeg4: quantiser scale 2-4 is visually lossless at this size
            stream.options = {"qscale": "3"}
            stream.codec_context.qscale = 3
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def _write_one(job: tuple[SynthParams, str, int, str]) -> None:
    params, split, index, path = job
    frames, _ = render_clip(params, split, index)
    write_video(path, frames, params.fps, params.codec, params.crf)


def is_complete(out_dir: str, params: SynthParams | None = None) -> bool:
    """True when meta.json exists (written last) and, if `params` is given, matches them."""
    meta = os.path.join(out_dir, "meta.json")
    if not os.path.isfile(meta):
        return False
    if params is None:
        return True
    try:
        with open(meta) as f:
            return json.load(f).get("params") == params_dict(params)
    except (OSError, ValueError):
        return False


def _label(params: SynthParams, split: str, index: int) -> int:
    return clip_spec(params, split, index)[0].label


def generate(
    out_dir: str, params: SynthParams = SynthParams(), workers: int = 2, verbose: bool = True
) -> dict:
    """Write the dataset (files, list files, meta.json last). Returns the meta dict."""
    params.check()
    params = SynthParams(**{**asdict(params), "codec": available_codec(params.codec)})
    meta = {"params": params_dict(params), "classes": list(CLASSES)}
    meta = write_dataset(out_dir, params, _write_one, _label, CLASSES, meta, workers)
    if verbose:
        print(
            f"wrote {params.num_train} + {params.num_val} clips ({params.frames} frames "
            f"{params.height}x{params.width}, {params.codec}) to {out_dir} in {meta['seconds']} s",
            flush=True,
        )
    return meta


if __name__ == "__main__":
    sys.exit("the command is mats-synth (python -m mats_scale.launch.synth)")
