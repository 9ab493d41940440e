"""Motion scores on moving cameras and across shot cuts: the compensated score and cut masking."""

import numpy as np
import pytest
import torch

from mats_scale.config import ConfigError, load_config
from mats_scale.data import synth
from mats_scale.masking import (
    compensated_motion_scores,
    global_shifts,
    loader_motion_scores,
    mats_selection,
    pixel_motion_scores,
    select_frames,
    valid_transitions,
)
from mats_scale.masking.compensated import global_motion
from mats_scale.masking.frames import pair_motion_counts

TUBELET, PATCH, STRIDE, FRAMES = 2, 16, 2, 16


def clip(params, index):
    """(1, 3, 16, H, W) float frames 0, 2, .. 30 of a generated clip (no codec), its spec and frame ids."""
    frames, spec = synth.render_clip(params, "train", index)
    ids = list(range(0, FRAMES * STRIDE, STRIDE))
    return torch.from_numpy(frames[ids]).permute(3, 0, 1, 2)[None].float(), spec, ids


def kept_share(scores, obj, seed=0):
    """Share of MATS's kept tokens (visible + targets, rho_pre 0.3, rho 0.9) that lie on the object."""
    sel = mats_selection(scores[None], 0.9, 0.3, torch.Generator().manual_seed(seed))
    kept = torch.cat([sel.visible_ids, sel.target_ids], dim=1)[0]
    return obj[kept].float().mean().item()


def test_compensated_puts_twice_the_share_on_the_object_over_a_panning_texture():
    params = synth.SynthParams(pan=2.0, texture=0.5)  # 8 px of pan between tubelets, high-contrast texture
    pixel, comp, area = [], [], []
    for i in range(6):
        v, spec, ids = clip(params, i)
        obj = torch.from_numpy(synth.object_tokens(spec, ids, params.height, params.width, TUBELET, PATCH))
        pixel.append(kept_share(pixel_motion_scores(v, TUBELET, PATCH)[0], obj))
        comp.append(kept_share(compensated_motion_scores(v, TUBELET, PATCH)[0], obj))
        area.append(obj.float().mean().item())
    assert np.mean(comp) >= 2 * np.mean(pixel), (pixel, comp)
    assert np.mean(comp) > 2.5 * np.mean(area)  # well above chance (the object's share of the grid)


def test_global_shift_recovers_the_camera_pan():
    params = synth.SynthParams(pan=1.0, texture=0.3)
    for i in range(3):
        v, _, ids = clip(params, i)
        _, offset = synth.camera_path(params, synth._effects_rng(params, "train", i, 3))
        # The camera moves by offset: the picture moves the other way, one tubelet = 2 sampled frames.
        truth = torch.tensor(-(offset[ids[TUBELET]] - offset[ids[0]]), dtype=torch.float32)
        shifts = global_shifts(v, TUBELET, PATCH)[0]  # (T'-1, 2)
        assert (shifts - truth).abs().max() < 0.1, (i, shifts, truth)


@pytest.mark.parametrize("texture", [0.0, 0.5])
def test_still_camera_scores_agree(texture):
    params = synth.SynthParams(texture=texture)  # a still camera; objects moving up to 2.6 px/frame
    for i in range(6):
        v, _, _ = clip(params, i)
        assert not global_shifts(v, TUBELET, PATCH).any()  # a moving object alone never moves the camera
        pixel, comp = pixel_motion_scores(v, TUBELET, PATCH), compensated_motion_scores(v, TUBELET, PATCH)
        assert torch.equal(comp, pixel)  # hence the same scores and the same kept set


def still_camera_with_large_object(seed, texture, noise=2.0):
    """(1, 3, 16, 128, 176) float: a still background (smooth shading, plus a random texture of this
    amplitude) with sensor noise, and a textured 96x128 object (55 % of the picture) moving 1, 1.5 px
    per frame inside it (it never reaches the border)."""
    g = torch.Generator().manual_seed(seed)
    H, W, (h, w) = 128, 176, (96, 128)
    rows = torch.arange(H, dtype=torch.float32)[:, None]
    bg = (100 + 40 * torch.sin(rows / 20)).expand(3, H, W)
    bg = bg + texture * torch.nn.functional.avg_pool2d(
        torch.rand(3, H + 2, W + 2, generator=g) * 255 - 128, 3, 1
    )
    obj = torch.nn.functional.avg_pool2d(torch.rand(3, h + 2, w + 2, generator=g) * 255, 3, 1)
    frames = []
    for f in range(FRAMES):
        frame = bg.clone()
        y, x = int(10 + f), int(8 + 1.5 * f)
        frame[:, y : y + h, x : x + w] = obj
        frames.append(frame + noise * torch.randn(3, H, W, generator=g))
    return torch.stack(frames, dim=1)[None].clamp(0, 255)


@pytest.mark.parametrize("texture", [0.0, 0.3])
def test_still_camera_with_a_large_moving_object_is_the_pixel_score(texture):
    # The object's motion explains more than half of the picture's changing tokens, but not the border
    # (a flat, noisy background there: interpolation alone lowers its residual; or a textured one).
    for seed in range(2):
        v = still_camera_with_large_object(seed, texture)
        shifts, zooms = global_motion(v, TUBELET, PATCH, zoom=True)
        assert not shifts.any() and (zooms == 1).all(), seed
        pixel = pixel_motion_scores(v, TUBELET, PATCH)
        assert torch.equal(compensated_motion_scores(v, TUBELET, PATCH), pixel)
        assert torch.equal(compensated_motion_scores(v, TUBELET, PATCH, zoom=True), pixel)


def test_camera_pan_is_found_behind_a_large_object():
    # A textured scene, the camera panning 2 px per frame, and a 72x112 object (36 % of the picture,
    # within a token of the border) drifting on the screen: the background's shift is the camera's.
    g = torch.Generator().manual_seed(3)
    world = torch.nn.functional.avg_pool2d(torch.rand(3, 130, 176 + 64 + 2, generator=g) * 255, 3, 1)
    obj = still_camera_with_large_object(3, 0.3)[0, :, :, 20:92, 40:152]  # (3, 16, 72, 112): moving texture
    frames = []
    for f in range(FRAMES):
        frame = world[:, :, 2 * f : 2 * f + 176].clone()
        frame[:, 16 + f // 2 : 88 + f // 2, 48:160] = obj[:, f]
        frames.append(frame)
    v = torch.stack(frames, dim=1)[None]  # (1, 3, 16, 128, 176)
    shifts = global_shifts(v, TUBELET, PATCH)[0]  # the picture moves left 4 px per tubelet
    torch.testing.assert_close(shifts, torch.tensor([0.0, -4.0]).expand_as(shifts), atol=0.1, rtol=0)


def test_zoom_is_found_and_compensated_over_a_zooming_texture():
    params = synth.SynthParams(zoom=0.01, texture=0.3)  # 4 % scale change between tubelets
    pixel, zoomed = [], []
    for i in range(4):
        v, spec, ids = clip(params, i)
        obj = torch.from_numpy(synth.object_tokens(spec, ids, params.height, params.width, TUBELET, PATCH))
        scales, _ = synth.camera_path(params, synth._effects_rng(params, "train", i, 3))
        truth = scales[ids[TUBELET]] / scales[ids[0]]  # the same between any two consecutive tubelets
        shifts, zooms = global_motion(v, TUBELET, PATCH, zoom=True)
        found = zooms[0] != 1
        assert found.sum() >= 5 and (zooms[0][found] - truth).abs().max() < 0.005, (i, zooms, truth)
        assert shifts[0][found].abs().max() < 0.5  # the generator zooms about the centre
        assert (global_motion(v, TUBELET, PATCH)[1] == 1).all()  # zoom only when asked for
        pixel.append(kept_share(pixel_motion_scores(v, TUBELET, PATCH)[0], obj))
        zoomed.append(kept_share(compensated_motion_scores(v, TUBELET, PATCH, zoom=True)[0], obj))
    assert np.mean(zoomed) > 1.2 * np.mean(pixel), (pixel, zoomed)


def test_known_shift_leaves_no_residual_inside_the_frame():
    g = torch.Generator().manual_seed(0)
    world = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 120, 140, generator=g) * 255, 3, 1)  # smooth-ish
    frames = [world[:, :, 4:68, 3 * f : 3 * f + 96] for f in range(8)]  # camera moves right 3 px per frame
    v = torch.stack(frames, dim=2)  # (1, 3, 8, 64, 96): picture moves left 6 px per tubelet
    shifts = global_shifts(v, TUBELET, PATCH)
    torch.testing.assert_close(shifts, torch.tensor([0.0, -6.0]).expand(1, 3, 2), atol=0.05, rtol=0)
    comp = compensated_motion_scores(v, TUBELET, PATCH).view(4, 4, 6)
    pixel = pixel_motion_scores(v, TUBELET, PATCH).view(4, 4, 6)
    assert comp[:, :, 1:-1].max() < 0.05 * pixel[:, :, 1:-1].min()  # interior tokens: nothing moves
    assert torch.equal(
        compensated_motion_scores(v, TUBELET, PATCH, shifts=torch.zeros(1, 3, 2)), pixel.flatten()[None]
    )
    with pytest.raises(ValueError, match="not divisible into tubelets"):
        compensated_motion_scores(v[:, :, :7], TUBELET, PATCH)


def test_loader_scores_dispatch():
    v = torch.rand(2, 3, 4, 32, 32)
    assert torch.equal(loader_motion_scores("pixel", v, 2, 16), pixel_motion_scores(v, 2, 16))
    assert torch.equal(loader_motion_scores("compensated", v, 2, 16), compensated_motion_scores(v, 2, 16))
    torch.testing.assert_close(
        loader_motion_scores("compensated_zoom", v, 2, 16), compensated_motion_scores(v, 2, 16, zoom=True)
    )
    assert loader_motion_scores("embed", v, 2, 16) is None
    assert load_config(None, ["masking.score=compensated_zoom"]).masking.score == "compensated_zoom"
    with pytest.raises(ConfigError, match="compensated_zoom"):  # the error lists every choice
        load_config(None, ["masking.score=zoom"])


# ---- shot cuts in the scores --------------------------------------------------------------------
def test_valid_transitions_follow_the_cuts():
    cuts = torch.zeros(2, 7, dtype=torch.bool)  # 8 frames, 4 tubelets
    cuts[0, 3] = True  # frame 4 starts a shot: on the boundary of tubelets 1 | 2
    cuts[1, 2] = True  # frame 3 starts a shot: inside tubelet 1
    assert valid_transitions(cuts, 2).tolist() == [[False, True, False, True], [False, False, False, True]]
    with pytest.raises(ValueError, match="do not fit tubelets"):
        valid_transitions(torch.zeros(1, 6, dtype=torch.bool), 2)


def test_cut_limited_scores_carry_no_cut_spike():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 3, 1, 32, 32, generator=g) * 255
    b = torch.rand(1, 3, 1, 32, 32, generator=g) * 255
    noise = lambda: torch.randn(1, 3, 6, 32, 32, generator=g)  # noqa: E731 - small motion within a shot
    shot1, shot2 = a + noise(), b + noise()
    video = torch.cat([shot1, shot2], dim=2)  # (1, 3, 12, 32, 32): a hard cut before frame 6
    cuts = torch.zeros(1, 11, dtype=torch.bool)
    cuts[0, 5] = True
    raw = pixel_motion_scores(video, 2, 16).view(6, 4)
    assert raw[3].min() > 10 * raw[[1, 2, 4, 5]].max()  # the raw score spikes after the cut
    for score in (pixel_motion_scores, compensated_motion_scores):
        limited = score(video, 2, 16, cuts)
        # Each shot is scored exactly as if it were a clip of its own (its first tubelet copies the next).
        torch.testing.assert_close(limited, torch.cat([score(shot1, 2, 16), score(shot2, 2, 16)], dim=1))
    # A cut inside a tubelet: that tubelet has no predecessor in its shot and no successor either.
    cuts = torch.zeros(1, 11, dtype=torch.bool)
    cuts[0, 6] = True
    video = torch.cat([shot1, shot2[:, :, :1], shot2[:, :, :5]], dim=2)
    limited = pixel_motion_scores(video, 2, 16, cuts).view(6, 4)
    assert (limited[3] == 0).all() and limited.max() < raw[3].min() / 10


def test_frame_selection_never_counts_a_cut():
    g = torch.Generator().manual_seed(2)
    static_a = torch.rand(3, 1, 32, 32, generator=g).expand(3, 12, 32, 32).clone() * 255
    static_b = torch.rand(3, 1, 32, 32, generator=g).expand(3, 12, 32, 32).clone() * 255
    cand = torch.cat([static_a, static_b], dim=1)  # 24 candidates = 12 pairs, a cut before frame 12
    for f in range(24):  # a small object moving in every frame
        cand[:, f, 4:10, f : f + 6] = 0.0
    cuts = torch.zeros(23, dtype=torch.bool)
    cuts[11] = True
    raw = pair_motion_counts(cand, 16, 0.3)
    limited = pair_motion_counts(cand, 16, 0.3, cuts)
    assert raw[6] == raw.max() and raw[6] > raw[7]  # the pair after the cut looks like the most motion
    assert limited[6] == limited[7]  # ... limited: it takes its successor's count, as pair 0 does
    keep = select_frames(cand, 4, torch.Generator().manual_seed(0), patch=16, keep_ratio=0.3, cuts=cuts)
    assert keep.shape == (8,)
