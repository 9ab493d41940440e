"""Shot cuts: detection on decoded frames, windows limited to one shot in the loader, generator options."""

import functools
import logging

import numpy as np
import pytest
import torch

from mats_scale.config import ConfigError, load_config
from mats_scale.data import synth
from mats_scale.data.cuts import (
    cuts_between,
    cuts_from_changes,
    detect_cuts,
    limit_to_shot,
    loop_seams,
)
from mats_scale.data.loader import build_pretrain_loader
from mats_scale.data.sampler import _TEMPORAL, make_generator
from mats_scale.data.video import clip_indices

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


def test_cut_rule_needs_colour_and_area():
    d = torch.tensor([0.02] * 10 + [0.12, 0.4])
    assert cuts_from_changes(d).nonzero()[:, 0].tolist() == [10, 11]  # >= 0.10, the median is small
    noisy = torch.tensor([0.06] * 10 + [0.15, 0.5])  # ordinary steps of 0.06: a cut needs 3 x 0.06
    assert cuts_from_changes(noisy).nonzero()[:, 0].tolist() == [11]
    assert cuts_from_changes(torch.full((6,), 0.3)).all()  # all above the threshold: all cuts
    assert not cuts_from_changes(torch.full((6,), 0.09)).any()
    # A weak cut (colours alike, the whole picture new) is one; a strong colour step that changes
    # a third of the picture (a large object entering) is not.
    both = cuts_from_changes(
        torch.tensor([0.01, 0.12, 0.01, 0.19, 0.01]), torch.tensor([0.0, 0.8, 0.0, 0.3, 0.0])
    )
    assert both.tolist() == [False, True, False, False, False]


def test_extreme_cut_rate_is_logged_once_per_video(caplog):
    rapid = _spliced(synth.SynthParams(cut=True), 0, set(range(15)))
    ids = list(range(16))
    with caplog.at_level(logging.WARNING, logger="mats_scale.data.cuts"):
        for _ in range(2):  # the second window of the same video logs nothing
            _, new_ids, met, left = limit_to_shot(
                rapid, ids, lambda n: [0] * 16, lambda new: rapid[new], 16, video="rapid/montage.mp4"
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


def test_cuts_between_kept_frames_and_loop_seams():
    cuts = torch.tensor([False, True, False, False, True, False])  # 7 frames: shots 0-1, 2-4, 5-6
    assert cuts_between(cuts, torch.tensor([0, 1, 3, 4, 6])).tolist() == [False, True, False, True]
    assert loop_seams([0, 1, 2, 0, 1, 2, 0]).tolist() == [False, False, True, False, False, True]
    assert not loop_seams([3, 3, 4, 9]).any()  # repeats (segments of a short video) are no seam


def _two_shots(lengths=(32, 32)):
    """A video of two shots: frames of two default generated clips one after the other."""
    a, _ = synth.render_clip(synth.SynthParams(), "train", 0)
    b, _ = synth.render_clip(synth.SynthParams(), "train", 1)
    return torch.from_numpy(np.concatenate([a[: lengths[0]], b[: lengths[1]]]))


def _limit(video, ids, rate, gen=None):
    reads = []

    def read(new):
        assert new == sorted(set(new))
        reads.append(new)
        return video[new]

    out = limit_to_shot(video[ids], ids, lambda n: clip_indices(n, len(ids), rate, gen), read, len(video))
    assert torch.equal(out[0], video[out[1]])
    return (*out, reads)


def test_redraw_keeps_the_stride_inside_the_whole_shot():
    video = _two_shots()  # cut at frame 32
    ids = list(range(8, 37, 4))  # 8 frames 4 apart, the last after the cut
    _, new_ids, met, left, reads = _limit(video, ids, 4)
    # The first shot (0-31) holds a clip 4 apart (29 frames); the decoded frames alone (8-28) do not.
    assert met == 1 and not left.any()
    assert max(new_ids) < 32 and all(b - a == 4 for a, b in zip(new_ids, new_ids[1:], strict=False))
    head = list(range(0, 29, 4))  # inside the first shot: unchanged, nothing read
    same, same_ids, met, left, reads = _limit(video, head, 4)
    assert met == 0 and same_ids == head and not reads and not left.any()


def test_redraw_that_must_loop_marks_the_seam():
    video = _two_shots((10, 10))  # two shots of 10 frames, a clip of 16 at rate 1 needs a loop
    for start in (0, 2, 4):
        ids = list(range(start, start + 16))
        _, new_ids, met, left, _ = _limit(video, ids, 1)
        assert met == 1
        assert max(new_ids) < 10 or min(new_ids) >= 10  # one shot, looped
        seams = [j for j in range(15) if new_ids[j + 1] < new_ids[j]]
        assert seams and all(left[j] for j in seams)  # every jump back is a cut for the scores


def test_redraw_of_segments_covers_the_whole_shot():
    from mats_scale.data.video import segment_indices

    video = _two_shots()  # cut at frame 32
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        ids = segment_indices(64, 8, gen)  # one frame from each of 8 segments of 64: crosses the cut
        pick = functools.partial(segment_indices, length=8, generator=gen)
        _, new_ids, met, left = limit_to_shot(video[ids], ids, pick, lambda new: video[new], 64)
        lo, hi = (0, 31) if max(new_ids) < 32 else (32, 63)
        assert met == 1 and not left.any() and min(new_ids) >= lo
        assert min(new_ids) - lo < 4 and hi - max(new_ids) < 4  # segments over all of the shot


def test_flash_and_fast_object_are_no_cuts():
    for kw in (dict(flash=True), dict(fast_object=16.0), dict(fast_object=16.0, pan=2.0, texture=0.3)):
        params = synth.SynthParams(**kw)
        for i in range(3):
            video = torch.from_numpy(synth.render_clip(params, "train", i)[0])
            for rate in (1, 2, 4):
                for phase in range(rate):
                    ids = list(range(phase, 32, rate))[:8]
                    out, new_ids, met, left, _ = _limit(video, ids, rate)
                    assert met == 0 and new_ids == ids and not left.any(), (kw, i, rate, phase)


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


SHORT_SHOTS = synth.SynthParams(num_train=4, num_val=0, seed=5, frames=24, height=120, width=128, cut=True)


def test_training_clips_never_loop_across_a_cut_and_mark_every_seam(make_dataset):
    root = make_dataset(SHORT_SHOTS)  # shots of 6-18 frames: a clip of 16 must often loop
    cut_at = [synth.clip_spec(SHORT_SHOTS, "train", i)[0].cut for i in range(SHORT_SHOTS.num_train)]
    loops = 0
    for mode in ("limit", "ignore"):
        ds = build_pretrain_loader(
            cfg_for(root, "model.num_frames=16", "data.sampling_rate=1", f"data.shot_cuts={mode}"),
            rank=0,
            world_size=1,
        ).dataset
        for i in range(len(ds) if mode == "limit" else 2):
            for pos in range(2):
                _, ids, _, cuts, _ = ds._decode(i, make_generator(_TEMPORAL, 0, 0, pos, 0))
                seams = [j for j in range(len(ids) - 1) if ids[j + 1] < ids[j]]
                assert all(cuts[j] for j in seams), (mode, i, ids)  # a seam is never left unmarked
                if mode == "limit":
                    assert max(ids) < cut_at[i] or min(ids) >= cut_at[i], (i, ids)
                loops += bool(seams)
    assert loops  # the case was met


def test_loop_seams_are_cuts_for_the_loader_scores(make_dataset):
    from mats_scale.data.device import to_model_input
    from mats_scale.masking import loader_motion_scores

    root = make_dataset(SHORT_SHOTS)
    cfg = cfg_for(
        root, "model.num_frames=16", "data.sampling_rate=1", "masking.strategy=mats", "masking.score=pixel"
    )
    ds = build_pretrain_loader(cfg, rank=0, world_size=1).dataset
    masked = 0
    for i in range(len(ds)):
        b = ds[(0, 0, i)]
        video = to_model_input(b, "cpu")
        seams = loop_seams(b["frame_index"][0].tolist())
        want = loader_motion_scores("pixel", video, 2, 16, seams.expand(len(video), -1))
        torch.testing.assert_close(b["scores"], want, rtol=1e-4, atol=1e-4)
        masked += seams.any() and not torch.allclose(want, loader_motion_scores("pixel", video, 2, 16))
    assert masked  # a looped clip whose seam changes the scores was met


def test_loop_seams_reach_the_models_embedding_score(make_dataset):
    """masking.score=embed is computed in the step: the batch carries each clip's cuts and seams to
    it, and no embedding difference across one is counted (as for the loader's scores)."""
    from mats_scale.data.device import to_model_input
    from mats_scale.models.pretrain import build_pretrain_model

    root = make_dataset(SHORT_SHOTS)
    cfg = cfg_for(
        root, "model.num_frames=16", "data.sampling_rate=1", "masking.strategy=mats", "masking.score=embed"
    )
    model = build_pretrain_model(cfg.model, device="cpu")
    batch = next(iter(build_pretrain_loader(cfg, rank=0, world_size=1)))
    seams = torch.stack([loop_seams(ids) for ids in batch["frame_index"].tolist()])
    assert torch.equal(batch["cuts"], seams) and seams.any()  # a looped clip in the batch
    video = to_model_input(batch, "cpu")
    from mats_scale.train.pretrain import PretrainTask

    class _Engine:  # what PretrainTask.motion_scores uses of an engine
        module = model

        @staticmethod
        def autocast():
            return torch.autocast("cpu", enabled=False)

    got = PretrainTask(cfg).motion_scores(_Engine, video, batch)
    torch.testing.assert_close(got, model.motion_scores(video, "embed", seams))
    assert not torch.allclose(got, model.motion_scores(video, "embed"))  # the seam changed the scores


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
