"""Shot cuts: detection on decoded frames, windows limited to one shot in the loader, generator options."""

import logging

import numpy as np
import pytest
import torch

from mats_scale.config import ConfigError, load_config
from mats_scale.data import synth
from mats_scale.data.cuts import cuts_between, cuts_from_changes, detect_cuts, limit_to_shot, longest_shot
from mats_scale.data.loader import build_pretrain_loader

CUT = synth.SynthParams(num_train=6, num_val=0, seed=7, frames=32, height=120, width=128, cut=True)
BASE = [
    "model.size=debug",
    "model.num_frames=8",
    "model.img_size=32",
    "data.sampling_rate=2",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.flip=false",
]


@pytest.fixture(scope="module")
def cut_dataset(make_dataset):
    return make_dataset(CUT)


def cfg_for(root, *overrides):
    return load_config(None, [*BASE, "data.dataset=bundled", f"data.root={root}", *overrides])


# ---- detection ----------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("camera", [{}, {"pan": 2.0, "texture": 0.3}, {"zoom": 0.02, "texture": 0.3}])
def test_detect_cuts_finds_the_cut_and_nothing_else(camera):
    for i in range(4):
        with_cut, spec = synth.render_clip(synth.SynthParams(cut=True, **camera), "train", i)
        one_shot, _ = synth.render_clip(synth.SynthParams(**camera), "train", i)
        for stride in (1, 4):  # consecutive frames, and a sampling rate of 4
            ids = list(range(0, 32, stride))
            found = detect_cuts(torch.from_numpy(with_cut[ids])).nonzero()[:, 0].tolist()
            assert found == [j for j in range(len(ids) - 1) if ids[j] < spec.cut <= ids[j + 1]], (stride, i)
            assert not detect_cuts(torch.from_numpy(one_shot[ids])).any()


def _spliced(params, index, cut_steps, steps=15):
    """Frames alternating between the two shots of a generated cut clip, switching shot exactly at
    `cut_steps`; each shot's frames stay in their own order (consecutive within a shot)."""
    frames, spec = synth.render_clip(params, "train", index)
    shots = [iter(range(spec.cut)), iter(range(spec.cut, len(frames)))]
    shot, ids = 0, []
    for j in range(steps + 1):
        ids.append(next(shots[shot]))
        shot ^= j in cut_steps
    return torch.from_numpy(frames[ids])


RAPID = [synth.SynthParams(cut=True), synth.SynthParams(cut=True, pan=2.0, texture=0.3)]


@pytest.mark.parametrize("params", RAPID)
def test_detect_cuts_in_a_video_of_nothing_but_cuts(params):
    for i in range(3):
        found = detect_cuts(_spliced(params, i, set(range(15))))
        assert found.tolist() == [True] * 15, i  # a median over all steps would hide every cut


@pytest.mark.parametrize("params", RAPID)
def test_detect_cuts_when_most_steps_are_cuts(params):
    steps = [1, 2, 4, 7, 8, 10, 13, 14]  # 8 of 15
    for i in range(3):
        assert detect_cuts(_spliced(params, i, set(steps))).nonzero()[:, 0].tolist() == steps, i


def test_cut_rule_absolute_threshold_with_a_relative_floor():
    d = torch.tensor([0.02] * 10 + [0.16, 0.4])
    assert cuts_from_changes(d).nonzero()[:, 0].tolist() == [10, 11]  # above 0.15, the median is small
    noisy = torch.tensor([0.1] * 10 + [0.2, 0.5])  # ordinary steps of 0.1: a cut needs 3 x 0.1
    assert cuts_from_changes(noisy).nonzero()[:, 0].tolist() == [11]
    assert cuts_from_changes(torch.full((6,), 0.3)).all()  # all above the threshold: all cuts
    assert not cuts_from_changes(torch.full((6,), 0.14)).any()


def test_extreme_cut_rate_is_logged_once_per_video(caplog):
    rapid = _spliced(synth.SynthParams(cut=True), 0, set(range(15)))
    ids = list(range(16))
    with caplog.at_level(logging.WARNING, logger="mats_scale.data.cuts"):
        for _ in range(2):  # the second window of the same video logs nothing
            _, new_ids, met, left = limit_to_shot(
                rapid, ids, lambda n: [0] * 16, lambda new: rapid[new], video="rapid/montage.mp4"
            )
            assert met == 15 and len(set(new_ids)) == 1 and not left.any()  # one frame of one shot
    lines = [r for r in caplog.records if r.name == "mats_scale.data.cuts"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "15 of 15 frame steps are shot cuts in rapid/montage.mp4" in lines[0].getMessage()
    assert "cut handling treats each such step as a cut" in lines[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mats_scale.data.cuts"):
        detect_cuts(_spliced(synth.SynthParams(cut=True), 0, {7}), video="one-cut.mp4")  # 1 of 15
        detect_cuts(_spliced(synth.SynthParams(cut=True), 1, set(range(15))))  # unnamed: still logged
    assert [r.getMessage()[:30] for r in caplog.records] == ["15 of 15 frame steps are shot "]


def test_longest_shot_and_cuts_between_kept_frames():
    cuts = torch.tensor([False, True, False, False, True, False])  # 7 frames: shots 0-1, 2-4, 5-6
    assert longest_shot(cuts) == (2, 4)
    assert longest_shot(torch.zeros(3, dtype=torch.bool)) == (0, 3)
    assert longest_shot(torch.tensor([True, False, True])) == (1, 2)  # the earliest of equal runs
    assert cuts_between(cuts, torch.tensor([0, 1, 3, 4, 6])).tolist() == [False, True, False, True]


def test_limit_to_shot_redraws_inside_the_longest_shot():
    frames, spec = synth.render_clip(synth.SynthParams(cut=True), "train", 0)
    video = torch.from_numpy(frames)
    ids = list(range(0, 32, 4))  # crosses the cut
    reads = []

    def read(new):
        reads.append(new)
        return video[new]

    out, new_ids, met, left = limit_to_shot(video[ids], ids, lambda n: list(range(min(n, 8))), read)
    assert met == 1 and len(reads) == 1 and len(new_ids) == 8 and not left.any()
    assert all(i < spec.cut for i in new_ids) or all(i >= spec.cut for i in new_ids)
    assert torch.equal(out, video[new_ids])
    head = list(range(8))  # inside the first shot (the cut comes at frame 8 or later)
    same, same_ids, met, left = limit_to_shot(video[head], head, None, None)  # nothing to pick or read
    assert met == 0 and same_ids == head and torch.equal(same, video[head]) and not left.any()


# ---- the loader -----------------------------------------------------------------------------------
def _windows(ld, epochs=3):
    out = []
    for _ in range(epochs):
        for b in ld:
            out += list(zip(b["index"].tolist(), b["frame_index"].tolist(), strict=True))
    return out


def test_no_window_crosses_a_cut(cut_dataset, caplog):
    cut_at = [synth.clip_spec(CUT, "train", i)[0].cut for i in range(CUT.num_train)]

    def crosses(index, ids):
        return min(ids) < cut_at[index] <= max(ids)

    # Without cut handling many windows (8 frames 2 apart of 32) cross the cut: the test can fail.
    off = _windows(build_pretrain_loader(cfg_for(cut_dataset, "data.shot_cuts=ignore"), rank=0, world_size=1))
    assert sum(crosses(i, ids) for i, ids in off) >= len(off) // 3
    with caplog.at_level(logging.INFO, logger="mats_scale.data"):
        ld = build_pretrain_loader(cfg_for(cut_dataset), rank=0, world_size=1)
        limited = _windows(ld)
    assert not any(crosses(i, ids) for i, ids in limited)
    crossing = sum(crosses(i, ids) for i, ids in off)  # same draws: the same windows met the cut
    assert ld.cut_stats.windows == crossing and ld.cut_stats.cuts == crossing
    assert "windows limited to one shot so far" in caplog.text and "shot cut in" in caplog.text
    sd = ld.state_dict()
    assert sd["cut_stats"]["windows"] == crossing
    again = build_pretrain_loader(cfg_for(cut_dataset), rank=0, world_size=1)
    again.load_state_dict(sd)
    assert again.cut_stats.windows == crossing
    del sd["cut_stats"]  # a checkpoint from before shot-cut handling still loads
    build_pretrain_loader(cfg_for(cut_dataset), rank=0, world_size=1).load_state_dict(sd)


@pytest.mark.parametrize("score", ["pixel", "compensated"])
def test_loader_scores_and_frame_selection_on_cut_clips(cut_dataset, score):
    from mats_scale.data.device import to_model_input
    from mats_scale.masking import TokenGrid, loader_motion_scores

    cfg = cfg_for(
        cut_dataset,
        "masking.strategy=mats",
        f"masking.score={score}",
        "masking.frame_selection=true",
        "data.num_sample=2",
    )
    grid = TokenGrid.from_model(cfg.model)
    cut_at = [synth.clip_spec(CUT, "train", i)[0].cut for i in range(CUT.num_train)]
    for b in build_pretrain_loader(cfg, rank=0, world_size=1):
        assert b["scores"].shape == (2, grid.num_tokens) and torch.isfinite(b["scores"]).all()
        video = to_model_input(b, "cpu")  # the workers send uint8; the scores are in the normalised units
        torch.testing.assert_close(
            b["scores"], loader_motion_scores(score, video, 2, 16), rtol=1e-4, atol=1e-4
        )
        for i, ids in zip(b["index"].tolist(), b["frame_index"].tolist(), strict=True):
            assert not min(ids) < cut_at[i] <= max(ids)


def test_shot_cuts_config_is_checked():
    with pytest.raises(ConfigError, match=r"data.shot_cuts='sometimes': allowed: limit, ignore"):
        load_config(None, ["data.shot_cuts=sometimes"])
    assert load_config(None, ["masking.score=compensated"]).masking.score == "compensated"
    with pytest.raises(ConfigError, match=r"masking.score='flow'"):
        load_config(None, ["masking.score=flow"])


# ---- generator options ------------------------------------------------------------------------------
def test_generator_options_leave_the_default_alone():
    default = synth.SynthParams()
    assert not default.effects and set(synth.params_dict(default)) == {
        "num_train",
        "num_val",
        "seed",
        "frames",
        "height",
        "width",
        "fps",
        "codec",
        "crf",
        "version",
    }
    plain, spec = synth.render_clip(default, "train", 3)
    cut, cut_spec = synth.render_clip(synth.SynthParams(cut=True), "train", 3)
    assert np.array_equal(spec.centers, cut_spec.centers) and spec.cut == 0 and 8 <= cut_spec.cut <= 24
    assert np.array_equal(cut[: cut_spec.cut], plain[: cut_spec.cut])  # the first shot is the default clip
    assert np.abs(cut[cut_spec.cut :].astype(int) - plain[cut_spec.cut :]).mean() > 10
    panned, pan_spec = synth.render_clip(synth.SynthParams(pan=1.0), "train", 3)
    assert np.array_equal(panned[0], plain[0]) and not np.array_equal(panned[-1], plain[-1])
    assert np.array_equal(pan_spec.centers, spec.centers)  # the object's path is on the screen
    for bad, flag in (
        (dict(pan=-1.0), "--pan"),
        (dict(zoom=0.5), "--zoom"),
        (dict(texture=2.0), "--texture"),
    ):
        with pytest.raises(ValueError, match=flag):
            synth.SynthParams(**bad).check()
