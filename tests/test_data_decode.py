"""Decoders (decord, PyAV, decord -> PyAV fallback) and the uint8 path to the training device."""

import logging

import av
import numpy as np
import pytest
import torch

from mats_scale.config import ConfigError, load_config
from mats_scale.data import synth
from mats_scale.data import video as video_mod
from mats_scale.data.device import bytes_per_clip, normalize_video, to_model_input
from mats_scale.data.errors import VideoReadError
from mats_scale.data.loader import build_pretrain_loader
from mats_scale.data.transforms import to_model_input as clip_to_model_input
from mats_scale.data.video import open_video, read_frames

SMALL = synth.SynthParams(num_train=4, num_val=0, seed=3, frames=16, height=96, width=128)
BASE = [
    "model.size=debug",
    "model.num_frames=4",
    "model.img_size=32",
    "data.sampling_rate=2",
    "data.batch_size=4",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def dataset(make_dataset):
    return make_dataset(SMALL)


def encode(path, frames, gop=None):
    """(T, H, W, 3) uint8 -> H.264 .mp4, optionally a keyframe every `gop` frames."""
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"crf": "18", "preset": "ultrafast", "threads": "1", **({"g": str(gop)} if gop else {})}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def ramp(t, h, w):
    """Smooth frames that move: a diagonal gradient shifted by 3 px per frame, (T, H, W, 3) uint8."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [
            np.stack([(x + 3 * i) * 5 % 256, (y * 7) % 256, np.full_like(x, 40 * (i % 6))], -1)
            for i in range(t)
        ]
    ).astype(np.uint8)


# ---- decoders -------------------------------------------------------------------------------------
def test_pyav_returns_decords_frames(dataset, tmp_path):
    """Same frame numbering and RGB pixels from both decoders, across keyframes (the PyAV reader seeks
    to the keyframe before the first wanted frame), in any order and with repeats."""
    long_gop = encode(tmp_path / "gop5.mp4", ramp(40, 64, 96), gop=5)
    for path in [str(dataset / synth.relpath("train", 0)), long_gop]:
        n = len(open_video(path))
        for ids in ([n - 1, 0, 7, 7, 3], list(range(n)), [n // 2 + 1, n - 2]):
            a = read_frames(open_video(path, decoder="decord"), ids, path)
            b = read_frames(open_video(path, decoder="pyav"), ids, path)
            assert a.shape == (len(ids), *a.shape[1:]) and a.dtype == torch.uint8
            assert torch.equal(a, b)


def test_loader_batches_identical_with_either_decoder(dataset):
    over = [*BASE, "data.dataset=bundled", f"data.root={dataset}"]
    runs = [
        list(build_pretrain_loader(load_config(None, [*over, f"data.decoder={d}"])))
        for d in ("decord", "pyav")
    ]
    assert all(
        torch.equal(a["video"], b["video"]) and torch.equal(a["frame_index"], b["frame_index"])
        for a, b in zip(*runs, strict=True)
    )


def test_decoder_choice_is_validated():
    with pytest.raises(ConfigError, match=r"data.decoder='torchvision'.*allowed: decord, pyav"):
        load_config(None, ["data.decoder=torchvision"])


@pytest.mark.parametrize("height,width", [(64, 16), (64, 24), (64, 48), (600, 8), (8, 600)])
def test_narrow_valid_videos_are_read_not_rejected(height, width, tmp_path, caplog):
    """decord fails on some narrow frames (its row copy); the file is read with PyAV instead, the
    same pixels as PyAV gives, close to what was encoded; one log line per file, not per read."""
    frames = ramp(6, height, width)
    path = encode(tmp_path / f"n{height}x{width}.mp4", frames)
    with caplog.at_level(logging.INFO, logger="mats_scale.data"):
        reads = [read_frames(open_video(path), [0, 5, 2], path) for _ in range(3)]
    pyav = read_frames(open_video(path, decoder="pyav"), [0, 5, 2], path)
    assert all(torch.equal(r, pyav) for r in reads)
    assert (pyav.float() - torch.from_numpy(frames[[0, 5, 2]]).float()).abs().mean() < 8  # codec tolerance
    notes = [r.getMessage() for r in caplog.records if path in r.getMessage()]
    assert len(notes) <= 1 and all("reading it with PyAV" in m and "too small for decord" in m for m in notes)


def test_decord_error_line_not_repeated_on_stderr(tmp_path, capfd):
    """decord prints "ERROR opening: PATH, CAUSE" to file descriptor 2 on every failed open; the cause
    becomes the reason (which the loader logs once per file) and the raw line never reaches stderr."""
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video\n" * 50)
    reasons = []
    for _ in range(3):
        with pytest.raises(VideoReadError) as e:
            open_video(str(junk))
        reasons.append(e.value.reason)
    err = capfd.readouterr().err
    assert "ERROR opening" not in err and "video_reader.cc" not in err
    assert reasons == ["cannot open as video (Invalid data found when processing input)"] * 3


def test_quiet_stderr_passes_other_output_on(capfd):
    import os

    with video_mod._quiet_decord_stderr() as logged:
        os.write(2, b"[12:00:00] /src/video/video_reader.cc:83: ERROR opening: x, y\nsomething else\n")
    assert logged == ["[12:00:00] /src/video/video_reader.cc:83: ERROR opening: x, y"]
    assert capfd.readouterr().err == "something else\n"


# ---- uint8 to the device ------------------------------------------------------------------------
def test_uint8_path_gives_the_float_paths_clips_and_scores(dataset):
    """Workers send uint8; to_model_input gives bit for bit the clips the workers used to normalise,
    with the same pixel motion scores, at a quarter of the bytes."""
    over = [
        *BASE,
        "data.dataset=bundled",
        f"data.root={dataset}",
        "data.num_sample=2",
        "model.img_size=64",
        "masking.strategy=mats",
        "masking.score=pixel",
    ]
    u8 = list(build_pretrain_loader(load_config(None, over)))
    f32 = list(build_pretrain_loader(load_config(None, [*over, "data.normalize_on_device=false"])))
    assert len(u8) == len(f32) == 2
    for a, b in zip(u8, f32, strict=True):
        assert a["video"].dtype == torch.uint8 and b["video"].dtype == torch.float32
        assert torch.equal(to_model_input(a, "cpu"), b["video"])
        assert torch.equal(to_model_input(b, "cpu"), b["video"])  # a float batch is only moved
        torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-4)
        assert a["video"].nbytes * 4 == b["video"].nbytes
        assert bytes_per_clip(a) < bytes_per_clip(b) / 3.9


def test_normalize_video_matches_the_per_clip_transform():
    clip = torch.randint(0, 256, (2, 3, 4, 8, 8), dtype=torch.uint8)
    expected = torch.stack([clip_to_model_input(c.permute(1, 0, 2, 3)) for c in clip])  # (T, 3, H, W) each
    assert torch.equal(normalize_video(clip), expected)
    with pytest.raises(ValueError, match="uint8"):
        normalize_video(clip.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_normalisation_on_cuda_matches_cpu():
    clip = torch.randint(0, 256, (2, 3, 4, 16, 16), dtype=torch.uint8)
    out = to_model_input({"video": clip.pin_memory()}, "cuda")
    torch.cuda.synchronize()
    assert out.device.type == "cuda" and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), normalize_video(clip), rtol=0, atol=1e-6)


def test_num_sample_clips_share_one_decode(dataset, monkeypatch):
    """Repeated sampling decodes each video once: one decode call per video, num_sample clips from it."""
    calls = []
    real = video_mod.DecordVideo.decode

    def counting(self, frames):
        calls.append(list(frames))
        return real(self, frames)

    monkeypatch.setattr(video_mod.DecordVideo, "decode", counting)
    cfg = load_config(None, [*BASE, "data.dataset=bundled", f"data.root={dataset}", "data.num_sample=2"])
    batches = list(build_pretrain_loader(cfg))
    clips = sum(b["video"].shape[0] for b in batches)
    assert clips == 8 and len(calls) == 4  # 4 videos, 2 clips each
    for b in batches:
        assert torch.equal(b["frame_index"][0::2], b["frame_index"][1::2])


def test_uint8_augment_is_the_crop_resized_and_normalises_to_the_float_view():
    """pretrain_augment(normalize=False) = the multi-scale crop resized as a channels-first copy would
    be (the channels-last crop is only faster), and normalising it gives the float view."""
    from mats_scale.data.transforms import multiscale_crop_box, pretrain_augment, resize_clip

    frames = torch.randint(0, 256, (4, 70, 90, 3), dtype=torch.uint8)
    for seed in range(6):
        u8 = pretrain_augment(frames, 48, torch.Generator().manual_seed(seed), flip=False, normalize=False)
        top, left, ch, cw = multiscale_crop_box(70, 90, 48, torch.Generator().manual_seed(seed))
        crop = frames[:, top : top + ch, left : left + cw].permute(0, 3, 1, 2).contiguous()  # (T, 3, ch, cw)
        assert u8.dtype == torch.uint8 and torch.equal(u8, resize_clip(crop, (48, 48)).permute(1, 0, 2, 3))
        f32 = pretrain_augment(frames, 48, torch.Generator().manual_seed(seed), flip=False)
        assert torch.equal(normalize_video(u8[None])[0], f32)
