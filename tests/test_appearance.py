"""The appearance tasks (data.bundled=objects / scenes): deterministic photographs-based clips whose labels
motion does not predict, laid out like the bundled motion set, generated on first use through the loader."""

import json
import os

import numpy as np
import pytest

from mats_scale.config import ConfigError, load_config
from mats_scale.data import appearance, sources
from mats_scale.data.errors import DataError
from mats_scale.data.loader import build_pretrain_loader

TINY = {
    task: appearance.AppearanceParams(
        task=task, num_train=4, num_val=2, frames=8, height=64, width=80, sprite=(16, 24)
    )
    for task in appearance.TASKS
}
LOADER = [
    "model.size=debug",
    "model.num_frames=4",
    "model.img_size=32",
    "data.sampling_rate=2",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.shot_cuts=ignore",
]


@pytest.mark.parametrize("task", appearance.TASKS)
def test_a_clip_is_a_pure_function_of_seed_split_and_index(task):
    p = TINY[task]
    a, spec = appearance.render_clip(p, "train", 1)
    b, _ = appearance.render_clip(p, "train", 1)
    assert a.shape == (8, 64, 80, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, appearance.render_clip(p, "val", 1)[0])
    other_seed = appearance.AppearanceParams(**{**p.__dict__, "seed": 1})
    assert not np.array_equal(a, appearance.render_clip(other_seed, "train", 1)[0])
    # The sprite moves: consecutive frames differ, and only where the sprite was or is.
    assert (a[0] != a[1]).any()


@pytest.mark.parametrize("task", appearance.TASKS)
def test_the_photograph_decides_the_label_and_motion_has_the_same_distribution_in_every_class(task):
    from scipy.stats import ks_2samp

    p = appearance.AppearanceParams(task=task)
    specs = [appearance.clip_spec(p, "train", i)[0] for i in range(12000)]
    labels = np.array([s.label for s in specs])
    assert set(labels) == set(range(10))
    speed = np.array([np.hypot(*s.velocity) for s in specs])
    angle = np.array([np.arctan2(*s.velocity) for s in specs])
    size = np.array([s.size for s in specs]).astype(float)
    start = np.array([s.corners[0] for s in specs])
    # Each class's speed, direction, size and start against the other classes' (two-sample KS): a motion
    # that depends on the class (the motion set's, or a speed 10% higher in some classes) fails this.
    for values in (speed, angle, size, start[:, 0], start[:, 1]):
        for c in range(10):
            assert ks_2samp(values[labels == c], values[labels != c]).pvalue > 1e-4, c


def test_classes_are_ten_distinct_shipped_photographs_and_their_pixels_differ():
    for task in appearance.TASKS:
        names = appearance.CLASSES[task]
        assert len(names) == len(set(names)) == 10
        for name in names:
            img = appearance.photo(name)
            assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.float32
            assert img.min() >= 0.0 and img.max() <= 1.0 and img.std() > 0.02
    # The scenes' distractors never show a scene class.
    assert not set(appearance.DISTRACTORS) & set(appearance.CLASSES["scenes"])


@pytest.mark.parametrize("task", appearance.TASKS)
def test_generated_files_lists_classes_and_meta_like_the_bundled_set(tmp_path, task):
    p = TINY[task]
    meta = appearance.generate(str(tmp_path), p, workers=1, verbose=False)
    assert sorted(os.listdir(tmp_path)) == [
        "classes.txt",
        "meta.json",
        "train",
        "train.txt",
        "val",
        "val.txt",
    ]
    for split, count in (("train", 4), ("val", 2)):
        lines = (tmp_path / f"{split}.txt").read_text().splitlines()
        assert len(lines) == count
        for i, line in enumerate(lines):
            path, label = line.split(" ")
            assert path == f"{split}/{i:06d}.mp4" and (tmp_path / path).stat().st_size > 0
            assert int(label) == appearance.clip_spec(p, split, i)[0].label
    classes = (tmp_path / "classes.txt").read_text().splitlines()
    assert classes == [f"{i} {n}" for i, n in enumerate(appearance.CLASSES[task])]
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk == meta and on_disk["params"]["task"] == task and on_disk["params"]["crop"] == list(p.crop)
    assert appearance.is_complete(str(tmp_path), p) and appearance.meta_task(str(tmp_path)) == task
    # Other workers, the same lists (the frames are a pure function of the clip, tested above; the
    # encoder's bytes are not compared: libx264 rarely encodes the same frames differently under load).
    again = tmp_path / "again"
    appearance.generate(str(again), p, workers=2, verbose=False)
    for name in ("train.txt", "val.txt", "classes.txt"):
        assert (again / name).read_text() == (tmp_path / name).read_text()


def test_bad_generator_parameters_name_the_parameter():
    for bad, name in (
        ({"sprite": (8, 90)}, "sprite="),
        ({"crop": (0.5, 0.2)}, "crop="),
        ({"task": "digits"}, "task="),
    ):
        with pytest.raises(ValueError, match=name):
            appearance.AppearanceParams(**{**TINY["objects"].__dict__, **bad}).check()


def test_data_bundled_key_default_folder_and_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(None, []).data.bundled == "motion"
    assert sources.bundled_root(load_config(None, [])) == os.path.join(str(tmp_path), "data", "bundled")
    cfg = load_config(None, ["data.bundled=scenes"])
    assert sources.bundled_root(cfg) == os.path.join(str(tmp_path), "data", "bundled-scenes")
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.bundled=digits"])
    assert str(e.value) == "data.bundled='digits': allowed: motion, objects, scenes"


def test_first_use_generates_the_task_through_the_loader_and_another_task_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "APPEARANCE_PARAMS", TINY)
    root = tmp_path / "objects"
    cfg = load_config(None, [*LOADER, "data.bundled=objects", f"data.root={root}"])
    batch = next(iter(build_pretrain_loader(cfg, rank=0, world_size=1)))
    assert batch["video"].shape[:3] == (2, 3, 4)
    assert appearance.is_complete(str(root), TINY["objects"])
    assert sources.class_names(cfg) == dict(enumerate(appearance.CLASSES["objects"]))
    wrong = load_config(None, [*LOADER, "data.bundled=scenes", f"data.root={root}"])
    with pytest.raises(DataError, match="holds the bundled 'objects' task, not data.bundled='scenes'"):
        sources.resolve_items(wrong, "train")
