"""Motion scores (pixel and patch-embedding) and adaptive frame selection."""

import pytest
import torch
import torch.nn.functional as F

from mats_scale.data.inmemory import render_squares, textured_background
from mats_scale.masking import (
    candidate_frame_count,
    embed_motion_scores,
    pixel_motion_scores,
    select_frames,
    weighted_sample_without_replacement,
)
from mats_scale.masking.frames import pair_motion_counts
from mats_scale.models.layers import PatchEmbed3D


def _loop_scores(feats):
    """Independent reference: feats[b][t][s] vectors -> list of scores, tubelet 0 copies tubelet 1."""
    B, T, S = len(feats), len(feats[0]), len(feats[0][0])
    out = torch.zeros(B, T, S)
    for b in range(B):
        for t in range(1, T):
            for s in range(S):
                out[b, t, s] = (feats[b][t][s] - feats[b][t - 1][s]).pow(2).sum().sqrt()
        out[b, 0] = out[b, 1]
    return out.flatten(1)


def test_pixel_scores_match_a_loop_and_accept_uint8():
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (2, 3, 6, 8, 12), generator=g, dtype=torch.uint8)  # 3 x 2 x 3 tokens
    v = video.float()
    feats = [
        [
            [
                v[b, :, 2 * t : 2 * t + 2, 4 * h : 4 * h + 4, 4 * w : 4 * w + 4].flatten()
                for h in range(2)
                for w in range(3)
            ]
            for t in range(3)
        ]
        for b in range(2)
    ]
    expected = _loop_scores(feats)
    scores = pixel_motion_scores(video, 2, 4)
    assert scores.shape == (2, 18) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(pixel_motion_scores(v / 255, 2, 4), expected / 255)


def test_pixel_scores_single_tubelet_and_bad_shapes():
    assert torch.equal(pixel_motion_scores(torch.rand(2, 3, 2, 8, 8), 2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="not divisible into tubelets of 2x4x4"):
        pixel_motion_scores(torch.rand(1, 3, 5, 8, 8), 2, 4)


@pytest.mark.parametrize("frames", [4, 6, 16])
@pytest.mark.parametrize("affine", [True, False])
def test_embed_scores_match_the_embedding_difference(frames, affine):
    g = torch.Generator().manual_seed(1)
    pe = PatchEmbed3D(in_chans=3, embed_dim=8, tubelet_size=2, patch_size=4)
    with torch.no_grad():
        pe.proj.bias.normal_(generator=g)  # a non-zero bias, which the affine path must cancel
    calls = []
    pe.register_forward_hook(lambda *_: calls.append(1))
    video = torch.randn(2, 3, frames, 8, 8, generator=g)
    scores = embed_motion_scores(pe, video, affine=affine)
    emb = F.conv3d(video, pe.proj.weight, pe.proj.bias, stride=(2, 4, 4))  # (B, D, T', H', W')
    feats = [
        [[emb[b, :, t].flatten(1)[:, s] for s in range(4)] for t in range(frames // 2)] for b in range(2)
    ]
    torch.testing.assert_close(scores, _loop_scores(feats), rtol=1e-4, atol=1e-5)
    assert calls  # the module itself ran (ZeRO-3 hooks would fire)
    assert not scores.requires_grad and pe.proj.weight.grad is None


def test_embed_scores_single_tubelet_are_zero():
    pe = PatchEmbed3D(in_chans=3, embed_dim=8, tubelet_size=2, patch_size=4)
    assert torch.equal(embed_motion_scores(pe, torch.randn(3, 3, 2, 8, 8)), torch.zeros(3, 4))


def test_weighted_sampling_without_replacement_is_proportional():
    w = torch.tensor([1.0, 3.0, 0.0, 0.0, 4.0])
    firsts = torch.zeros(5)
    for seed in range(800):
        idx = weighted_sample_without_replacement(w, 3, torch.Generator().manual_seed(seed))
        assert len(set(idx.tolist())) == 3
        # Zero weights come only after all positive ones: the first three are always {0, 1, 4}.
        assert set(idx.tolist()) == {0, 1, 4}
        firsts[idx[0]] += 1
    torch.testing.assert_close(firsts / 800, w / w.sum(), atol=0.05, rtol=0)
    # Fewer positive weights than draws (torch.multinomial fails here) and all-zero weights.
    idx = weighted_sample_without_replacement(
        torch.tensor([0.0, 2.0, 0.0]), 3, torch.Generator().manual_seed(0)
    )
    assert idx[0] == 1 and sorted(idx.tolist()) == [0, 1, 2]
    counts = torch.zeros(4)
    for seed in range(400):
        counts[
            weighted_sample_without_replacement(torch.zeros(4), 1, torch.Generator().manual_seed(seed))
        ] += 1
    assert (counts > 60).all()  # uniform: about 100 each


def _half_moving_clip(frames=24, size=64, moving_from=12, seed=0):
    """(3, F, S, S) candidates: a square that stays still, then moves from frame `moving_from` on."""
    g = torch.Generator().manual_seed(seed)
    bg = textured_background(1, size, size, g)
    t = torch.arange(frames, dtype=torch.float32)
    step = (t - moving_from).clamp(min=0)[:, None] * torch.tensor([2.0, 1.5])  # px per frame (y, x)
    pos = (torch.tensor([4.0, 6.0]) + step)[None]  # (1, F, 2)
    return render_squares(bg, pos, 16, torch.rand(1, 3, generator=g))[0]


def test_frame_selection_prefers_the_moving_half_keeps_order_and_pairs():
    clip = _half_moving_clip()  # 12 candidate pairs; pairs 6..11 have motion
    counts = pair_motion_counts(clip, 16, 0.3)
    assert (counts[:6] == 0).all() and (counts[6:] > 0).all()
    late = 0
    for seed in range(20):
        frames = select_frames(clip, 8, torch.Generator().manual_seed(seed), patch=16, keep_ratio=0.3)
        assert frames.dtype == torch.int64 and frames.shape == (16,)
        assert (frames[1:] > frames[:-1]).all()  # temporal order, no duplicates
        assert torch.equal(frames[1::2], frames[::2] + 1) and (frames[::2] % 2 == 0).all()  # whole pairs
        # Every moving pair is always drawn before any still one (they have probability 0 while
        # positive weights remain); the 2 remaining pairs come from the still half.
        assert set(range(12, 24)) <= set(frames.tolist())
        late += int((frames >= 12).sum())
    assert late / (20 * 16) == 0.75


def test_frame_selection_static_clip_uniform_seeded_and_uint8():
    clip = (_half_moving_clip(moving_from=100) * 255).to(torch.uint8)  # nothing moves
    picks = torch.zeros(12)
    for seed in range(30):
        frames = select_frames(clip, 4, torch.Generator().manual_seed(seed), patch=16, keep_ratio=0.3)
        picks[frames[::2] // 2] += 1
    assert (picks > 0).all()  # uniform over the 12 pairs: each drawn at some point
    moving = _half_moving_clip()
    a = select_frames(moving, 8, torch.Generator().manual_seed(7), patch=16, keep_ratio=0.3)
    b = select_frames(
        (moving * 255).to(torch.uint8), 8, torch.Generator().manual_seed(7), patch=16, keep_ratio=0.3
    )
    assert torch.equal(a, b)
    draws = {
        tuple(select_frames(moving, 8, torch.Generator().manual_seed(s), patch=16, keep_ratio=0.3).tolist())
        for s in range(6)
    }
    assert len(draws) > 1  # different seeds, different still pairs


def test_frame_selection_crops_to_whole_patches_and_rejects_bad_input():
    clip = _half_moving_clip(size=72)  # 72 = 4 * 16 + 8: the last 8 px are ignored
    assert select_frames(clip, 8, torch.Generator().manual_seed(0), patch=16, keep_ratio=0.3).shape == (16,)
    with pytest.raises(ValueError, match="num_pairs=13 must be in 1..12"):
        select_frames(clip, 13, torch.Generator(), patch=16, keep_ratio=0.3)
    with pytest.raises(ValueError, match="need an even count"):
        select_frames(clip[:, :23], 8, torch.Generator(), patch=16, keep_ratio=0.3)
    with pytest.raises(ValueError, match="one video"):
        select_frames(clip[None], 8, torch.Generator(), patch=16, keep_ratio=0.3)
    assert candidate_frame_count(8, 1.5) == 24 and candidate_frame_count(5, 1.5) == 16
    assert candidate_frame_count(4, 1.0) == 8
