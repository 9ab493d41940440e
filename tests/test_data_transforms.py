"""Frame sampling and clip augmentation (uint8 torch ops)."""

import pytest
import torch

from mats_scale.config import IMAGENET_MEAN, IMAGENET_STD
from mats_scale.data.inmemory import normalize
from mats_scale.data.transforms import (
    SCALES,
    ClipRandAugment,
    eval_views,
    finetune_augment,
    multiscale_crop_box,
    pretrain_augment,
    short_side_resize,
    spatial_crops,
    to_model_input,
)
from mats_scale.data.video import clip_indices, segment_indices


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- frame sampling ---------------------------------------------------------------------------
def test_clip_indices_strided_and_random_start():
    starts = set()
    for s in range(20):
        idx = clip_indices(100, 8, 4, gen(s))
        assert [b - a for a, b in zip(idx, idx[1:], strict=False)] == [4] * 7
        assert idx[0] >= 0 and idx[-1] < 100
        starts.add(idx[0])
    assert len(starts) > 5
    assert clip_indices(100, 8, 4, None) == [35 + 4 * i for i in range(8)]  # centred: (100 - 29) // 2


def test_clip_indices_short_video_fallback():
    # 20 frames cannot hold 8 frames at stride 4 (span 29): the stride shrinks to (20 - 1) // 7 = 2.
    idx = clip_indices(20, 8, 4, gen())
    assert [b - a for a, b in zip(idx, idx[1:], strict=False)] == [2] * 7 and idx[-1] < 20
    # 5 frames cannot hold 8 distinct frames: the video is looped.
    assert clip_indices(5, 8, 4, gen()) == [0, 1, 2, 3, 4, 0, 1, 2]


def test_segment_indices_one_per_segment():
    for s in range(10):
        idx = segment_indices(40, 8, gen(s))
        assert [i // 5 for i in idx] == list(range(8))
    assert segment_indices(40, 8, None) == [2 + 5 * i for i in range(8)]
    assert segment_indices(4, 8, gen()) == sorted(segment_indices(4, 8, gen()))  # short: repeats, in order


# ---- augmentation -----------------------------------------------------------------------------
def test_multiscale_crop_box_sides_and_bounds():
    H, W, S = 128, 176, 112
    allowed = {S if abs(int(128 * s) - S) < 3 else int(128 * s) for s in SCALES}
    seen = set()
    for s in range(200):
        top, left, ch, cw = multiscale_crop_box(H, W, S, gen(s))
        assert ch in allowed and cw in allowed
        assert top >= 0 and top + ch <= H and left >= 0 and left + cw <= W
        seen.add((ch, cw))
    assert (128, 128) in seen and (84, 84) in seen and (112, 128) in seen


def test_pretrain_augment_shapes_dtype_and_input_untouched():
    frames = torch.randint(0, 256, (8, 128, 176, 3), dtype=torch.uint8)
    before = frames.clone()
    out = pretrain_augment(frames, 112, gen())
    assert out.shape == (3, 8, 112, 112) and out.dtype == torch.float32
    assert torch.equal(frames, before)
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert (out.amin(dim=(1, 2, 3)) >= lo - 1e-5).all() and (out.amax(dim=(1, 2, 3)) <= hi + 1e-5).all()


def _left_dark_clip():
    frames = torch.full((4, 64, 64, 3), 250, dtype=torch.uint8)
    frames[:, :, :32] = 5  # dark left half, bright right half
    return frames


def _is_flipped(out):
    return bool(out[:, :, :, :4].mean() > out[:, :, :, -4:].mean())


def test_flip_happens_only_when_enabled():
    flips_on = [_is_flipped(pretrain_augment(_left_dark_clip(), 48, gen(s), flip=True)) for s in range(40)]
    flips_off = [_is_flipped(pretrain_augment(_left_dark_clip(), 48, gen(s), flip=False)) for s in range(40)]
    assert 5 < sum(flips_on) < 35
    assert not any(flips_off)


def test_normalisation_matches_imagenet_constants_and_inmemory():
    x = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    out = to_model_input(x.permute(0, 3, 1, 2))  # (3, T, H, W)
    ref = normalize((x.permute(3, 0, 1, 2).float() / 255)[None])[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    mean_pixel = torch.tensor([round(m * 255) for m in IMAGENET_MEAN], dtype=torch.uint8).view(1, 3, 1, 1)
    assert to_model_input(mean_pixel).abs().max() < 0.01  # the ImageNet mean colour maps to ~0


def test_eval_views_short_side_resize_and_three_crops():
    frames = torch.zeros(4, 120, 160, 3, dtype=torch.uint8)
    frames[..., 0] = torch.arange(160, dtype=torch.uint8)  # red encodes x
    assert short_side_resize(frames, 96).shape == (4, 3, 96, 128)
    views = eval_views(frames, 96, num_crops=3)
    assert views.shape == (3, 3, 4, 96, 96) and views.dtype == torch.float32
    red = views[:, 0, 0, 0]  # (crop, x) of the first row
    assert red[0, 0] < red[1, 0] < red[2, 0]  # left, centre, right crop along the long side
    assert eval_views(frames, 96).shape == (1, 3, 4, 96, 96)
    tall = short_side_resize(frames.transpose(1, 2), 96)  # portrait: crops run top to bottom
    crops = spatial_crops(tall, 96, 3)
    assert [c.shape[-2:] for c in crops] == [(96, 96)] * 3
    with pytest.raises(ValueError, match="num_crops"):
        spatial_crops(tall, 96, 2)


@pytest.mark.parametrize(
    "height,width", [(256, 340), (240, 320), (340, 256), (128, 171), (257, 383), (224, 300)]
)
@pytest.mark.parametrize("size", [224, 112])
def test_eval_views_are_videomae_test_views(height, width, size):
    """The short-side resize and three crops of VideoMAE V2's test mode (VideoClsDataset, "test"),
    transcribed: video_transforms.Resize(short_side_size) gives (size, int(size * long / short)) without
    antialiasing, then spatial_step = (max(h, w) - size) / (test_num_crop - 1) and crop k starts at
    int(k * spatial_step) along the long side, the full short side kept."""
    from mats_scale.data.transforms import resize_clip

    gen = torch.Generator().manual_seed(height * width + size)
    frames = torch.randint(0, 256, (2, height, width, 3), dtype=torch.uint8, generator=gen)
    if width < height:
        oh, ow = int(size * height / width), size
    else:
        oh, ow = size, int(size * width / height)
    buffer = resize_clip(frames.permute(0, 3, 1, 2).contiguous(), (oh, ow), antialias=False)
    spatial_step = 1.0 * (max(oh, ow) - size) / (3 - 1)
    expected = []
    for split_nb in range(3):
        start = int(split_nb * spatial_step)
        if oh >= ow:
            expected.append(buffer[:, :, start : start + size, :])
        else:
            expected.append(buffer[:, :, :, start : start + size])
    views = eval_views(frames, size, num_crops=3)
    assert views.shape == (3, 3, 2, size, size)
    for got, want in zip(views, expected, strict=True):
        assert torch.equal(got, to_model_input(want))


def test_finetune_augment_shape():
    out = finetune_augment(torch.randint(0, 256, (8, 128, 176, 3), dtype=torch.uint8), 112, gen())
    assert out.shape == (3, 8, 112, 112) and out.dtype == torch.float32


def test_rand_augment_is_one_draw_for_the_whole_clip():
    """A clip of identical frames stays identical frame to frame (every frame gets the same ops and
    magnitudes), the clip is a function of the generator, and over seeds the ops change the pixels."""
    frame = torch.randint(0, 256, (1, 3, 72, 96), dtype=torch.uint8)
    clip = frame.expand(8, -1, -1, -1).contiguous()
    ra = ClipRandAugment("rand-m7-n4-mstd0.5-inc1", 64)
    import random

    import numpy as np

    before = random.getstate(), np.random.get_state()[1].copy()
    changed = 0
    for seed in range(6):
        out = ra(clip, gen(seed))
        assert out.shape == clip.shape and out.dtype == torch.uint8
        assert all(torch.equal(out[0], out[t]) for t in range(1, 8))
        assert torch.equal(out, ra(clip, gen(seed)))
        changed += not torch.equal(out, clip)
    assert changed >= 5
    # timm's global generators are left as they were
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    # inside the fine-tuning view (before the crop): still one draw for every frame
    out = finetune_augment(clip.permute(0, 2, 3, 1), 64, gen(3), flip=False, normalize=False, rand_aug=ra)
    assert out.shape == (3, 8, 64, 64) and all(torch.equal(out[:, 0], out[:, t]) for t in range(8))


def test_multi_clip_views_spread_over_the_video():
    from mats_scale.data.video import multi_clip_indices

    def videomae_test_starts(n: int, clip_len: int, rate: int, num_segment: int) -> list[int]:
        # Transcribed from VideoMAE datasets/kinetics.py (VideoClsDataset, mode "test"):
        #   all_index = [x for x in range(0, len(vr), self.frame_sample_rate)]  (loadvideo_decord)
        #   temporal_step = max(1.0 * (buffer.shape[0] - self.clip_len) / (self.test_num_segment - 1), 0)
        #   temporal_start = int(chunk_nb * temporal_step)
        all_index = list(range(0, n, rate))
        temporal_step = max(1.0 * (len(all_index) - clip_len) / (num_segment - 1), 0)
        return [all_index[int(chunk_nb * temporal_step)] for chunk_nb in range(num_segment)]

    for n, length, rate, clips in [(100, 8, 4, 5), (300, 16, 4, 5), (64, 16, 2, 2), (250, 16, 4, 3)]:
        views = multi_clip_indices(n, length, rate, clips)
        assert [v[0] for v in views] == videomae_test_starts(n, length, rate, clips)
        assert all(v == list(range(v[0], v[0] + length * rate, rate)) for v in views)
        assert views[-1][-1] < n
    assert [v[0] for v in multi_clip_indices(100, 8, 4, 5)] == [0, 16, 32, 48, 68]  # the case
    seg = multi_clip_indices(40, 8, 4, 2, segments=True)
    assert seg[0] != seg[1] and all(i // 5 == k for v in seg for k, i in enumerate(v))

    def videomae_test_clips(n: int, clip_len: int, rate: int, num_segment: int) -> list[list[int]]:
        # VideoMAE V2 loadvideo_decord (test): a short buffer is padded with its last index,
        #   while len(all_index) < self.clip_len: all_index.append(all_index[-1])
        # then the clip is buffer[temporal_start : temporal_start + clip_len].
        all_index = list(range(0, n, rate))
        while len(all_index) < clip_len:
            all_index.append(all_index[-1])
        temporal_step = max(1.0 * (len(all_index) - clip_len) / (num_segment - 1), 0)
        starts = [int(chunk_nb * temporal_step) for chunk_nb in range(num_segment)]
        return [all_index[t : t + clip_len] for t in starts]

    for n, length, rate, clips in [
        (5, 8, 4, 3),
        (40, 16, 4, 5),
        (60, 16, 4, 2),
        (61, 16, 4, 5),
        (1, 4, 2, 2),
    ]:
        assert multi_clip_indices(n, length, rate, clips) == videomae_test_clips(n, length, rate, clips), n
    assert multi_clip_indices(5, 8, 4, 3) == [[0, 4, 4, 4, 4, 4, 4, 4]] * 3  # the last frame repeated


def test_read_eval_views_shapes(tmp_path):
    import numpy as np

    from mats_scale.data.synth import write_video
    from mats_scale.data.video import read_eval_views

    write_video(str(tmp_path / "v.mp4"), np.zeros((24, 64, 96, 3), np.uint8), fps=8)
    views = read_eval_views(str(tmp_path / "v.mp4"), length=4, rate=2, size=32, num_clips=2, num_crops=3)
    assert views.shape == (6, 3, 4, 32, 32) and views.dtype == torch.float32
