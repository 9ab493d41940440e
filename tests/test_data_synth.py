"""The bundled dataset generator: real files that decode back to the clips we drew."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pytest

from mats_scale.data import synth
from mats_scale.data.lists import read_list_file

ROOT = Path(__file__).resolve().parents[1]
SMALL = synth.SynthParams(num_train=6, num_val=2, seed=3, frames=12, height=96, width=128)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.generate(str(out), SMALL, workers=1, verbose=False)
    return out


def _md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def test_round_trip_frames_size_and_object_position(small_dataset):
    for split, count in (("train", SMALL.num_train), ("val", SMALL.num_val)):
        for i in range(count):
            path = small_dataset / synth.relpath(split, i)
            vr = decord.VideoReader(str(path))
            assert len(vr) == SMALL.frames
            frames = vr.get_batch(list(range(SMALL.frames))).asnumpy()
            assert frames.shape == (SMALL.frames, SMALL.height, SMALL.width, 3)
            spec, _ = synth.clip_spec(SMALL, split, i)
            bg = synth.render_background(SMALL, split, i)
            for t in (0, SMALL.frames // 2, SMALL.frames - 1):
                centre = _locate_object(frames[t], bg, spec.radius)
                assert np.abs(centre - spec.centers[t]).max() < 2.0, (split, i, t, centre, spec.centers[t])


def _locate_object(frame, background, radius):
    """Centre (y, x) of the object in a decoded frame: the densest blob of pixels that differ from
    the object-free scene (chroma subsampling leaves scattered small differences elsewhere)."""
    mask = (np.abs(frame.astype(np.int16) - background).max(axis=-1) > 12).astype(np.float64)
    k = int(2 * radius)
    density = np.cumsum(np.cumsum(np.pad(mask, ((1, 0), (1, 0))), 0), 1)  # summed-area table
    box = density[k:, k:] - density[:-k, k:] - density[k:, :-k] + density[:-k, :-k]
    by, bx = np.unravel_index(box.argmax(), box.shape)
    assert box[by, bx] > 0.5 * k * k, "no object-sized blob in the frame"
    cy, cx, r = by + k / 2, bx + k / 2, 1.5 * radius  # refine: centroid of the mask near the blob
    ys, xs = np.nonzero(mask)
    near = (np.abs(ys + 0.5 - cy) < r) & (np.abs(xs + 0.5 - cx) < r)
    return np.array([ys[near].mean() + 0.5, xs[near].mean() + 0.5])


def test_list_files_in_videomae_format(small_dataset):
    items = read_list_file(str(small_dataset / "train.txt"), str(small_dataset))
    assert len(items) == SMALL.num_train
    for i, item in enumerate(items):
        assert item.path == os.path.join(str(small_dataset), synth.relpath("train", i))
        assert os.path.isfile(item.path)
        assert item.label == synth.clip_spec(SMALL, "train", i)[0].label
    assert len((small_dataset / "val.txt").read_text().splitlines()) == SMALL.num_val
    assert synth.is_complete(str(small_dataset), SMALL)


def test_deterministic_from_seed(small_dataset, tmp_path):
    params = synth.SynthParams(**{**SMALL.__dict__, "num_train": 2, "num_val": 0})
    synth.generate(str(tmp_path / "a"), params, workers=1, verbose=False)
    for i in range(2):  # same seed: byte-identical files (single-threaded encoder)
        assert _md5(tmp_path / "a" / synth.relpath("train", i)) == _md5(
            small_dataset / synth.relpath("train", i)
        )
    other = synth.SynthParams(**{**params.__dict__, "seed": 4})
    a, _ = synth.render_clip(params, "train", 0)
    b, _ = synth.render_clip(other, "train", 0)
    assert not np.array_equal(a, b)


def test_classes_are_defined_by_motion_not_appearance():
    params = synth.SynthParams()
    specs = [synth.clip_spec(params, "train", i)[0] for i in range(400)]
    shapes_per_class = {}
    for s in specs:
        name = synth.CLASSES[s.label]
        shapes_per_class.setdefault(name, set()).add(s.shape)
        disp = s.centers[-1] - s.centers[0]  # (dy, dx) over the clip
        step = np.linalg.norm(np.diff(s.centers, axis=0), axis=1)  # px per frame
        if name.startswith("circle"):
            # Turning direction: cross products of consecutive steps in (x, y-down) coordinates are
            # positive for a clockwise turn on screen.
            v = np.diff(s.centers, axis=0)
            turn = np.sum(v[:-1, 1] * v[1:, 0] - v[:-1, 0] * v[1:, 1])
            assert (turn > 0) == (name == "circle_cw"), name
        else:
            direction, band = name.split("_")
            axis, sign = {"right": (1, 1), "left": (1, -1), "down": (0, 1), "up": (0, -1)}[direction]
            assert sign * disp[axis] > 2 * abs(disp[1 - axis]), name
            lo, hi = synth.SLOW_SPEED if band == "slow" else synth.FAST_SPEED
            assert lo - 1e-4 <= step.mean() <= hi + 1e-4, name
        # The object stays fully inside the frame.
        assert (s.centers - s.radius >= 0).all()
        assert (s.centers[:, 0] + s.radius <= params.height).all() and (
            s.centers[:, 1] + s.radius <= params.width
        ).all()
    # Appearance is drawn independently of the class: every class shows every shape.
    assert set(shapes_per_class) == set(synth.CLASSES)
    assert all(v == set(synth.SHAPES) for v in shapes_per_class.values())


def test_cli_writes_dataset_and_rejects_bad_arguments(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "mats_scale.launch.synth",
        str(out),
        "--num-train",
        "2",
        "--num-val",
        "1",
        "--frames",
        "8",
        "--height",
        "80",
        "--width",
        "96",
        "--workers",
        "1",
        "--codec",
        "mpeg4",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (out / "meta.json").is_file() and (out / "classes.txt").is_file()
    lines = (out / "train.txt").read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["train/000000.mp4", "train/000001.mp4"]
    assert len(decord.VideoReader(str(out / "val" / "000000.mp4"))) == 8
    bad = subprocess.run(cmd[:4] + ["--height", "81"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "--height=81" in bad.stderr


def test_fast_object_and_flash_options():
    plain, _ = synth.render_clip(synth.SynthParams(), "train", 2)
    fast, _ = synth.render_clip(synth.SynthParams(fast_object=12.0), "train", 2)
    again, _ = synth.render_clip(synth.SynthParams(fast_object=12.0), "train", 2)
    assert np.array_equal(fast, again)  # drawn from the clip's own stream
    covered = np.abs(fast.astype(int) - plain).max(axis=3) > 0  # (L, H, W) where the box is
    cols = [np.nonzero(c.any(axis=0))[0] for c in covered]
    seen = [i for i, c in enumerate(cols) if len(c) and c.min() > 0 and c.max() < plain.shape[2] - 1]
    assert len(seen) >= 2  # fully on screen in some frames: its edges move 12 px per frame
    a, b = seen[0], seen[1]
    assert abs(abs(int(cols[b].min()) - int(cols[a].min())) - 12 * (b - a)) <= 1
    assert covered[seen[0]].mean() >= 0.5 * 0.4 - 0.02  # at least 50% x 40% of the frame
    flash, _ = synth.render_clip(synth.SynthParams(flash=True), "train", 2)
    brighter = [i for i in range(len(flash)) if not np.array_equal(flash[i], plain[i])]
    assert len(brighter) == 1 and 0 < brighter[0] < len(flash) - 1
    k = brighter[0]
    assert (flash[k].astype(int) >= plain[k]).all() and flash[k].mean() - plain[k].mean() > 40
    assert synth.params_dict(synth.SynthParams(flash=True, fast_object=3.0))["fast_object"] == 3.0
    with pytest.raises(ValueError, match="--fast-object"):
        synth.SynthParams(fast_object=-1.0).check()


def test_cli_takes_the_fast_object_and_flash_options(tmp_path, capsys):
    from mats_scale.launch.synth import main

    assert main([str(tmp_path / "x"), "--fast-object", "99"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("error: --fast-object=99.0: must be in [0, 24.0]")
    out = tmp_path / "ok"
    size = ["--frames", "8", "--height", "80", "--width", "96"]
    argv = [str(out), "--num-train", "1", "--num-val", "0", *size, "--workers", "1"]
    assert main([*argv, "--fast-object", "6", "--flash"]) == 0
    meta = (out / "meta.json").read_text()
    assert '"fast_object": 6.0' in meta and '"flash": true' in meta
