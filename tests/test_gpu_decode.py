"""GPU decoding (data.decoder=nvdec) without a GPU: the refusal, the config rule, and the reader's index
and crop logic against the CPU path, with a CPU stand-in for PyNvVideoCodec's decoder."""

import numpy as np
import pytest
import torch

from mats_scale.config import ConfigError, load_config
from mats_scale.data import gpu_decode
from mats_scale.data.errors import DataError
from mats_scale.data.gpu_decode import GpuDecodeUnavailable, NvdecVideo, device_clip, gpu_decode_problem
from mats_scale.data.loader import build_pretrain_loader
from mats_scale.data.synth import write_video
from mats_scale.data.transforms import pretrain_augment
from mats_scale.data.video import DECODERS, clip_indices, open_video, read_frames, segment_indices


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """An H.264 file of 12 frames, 48 x 64, moving content (frame i shifted by 3 px)."""
    y, x = np.mgrid[0:48, 0:64]
    frames = np.stack(
        [np.stack([(x + 3 * i) * 4 % 256, y * 5 % 256, np.full_like(x, 20 * i)], -1) for i in range(12)]
    )
    path = str(tmp_path_factory.mktemp("nvdec") / "v.mp4")
    write_video(path, frames.astype(np.uint8), fps=8)
    return path


class StandIn:
    """PyNvVideoCodec's SimpleDecoder interface (``len()``, ``get_batch_frames_by_index``, DLPack frames)
    over frames decoded on the CPU; records what it was asked for."""

    def __init__(self, frames: torch.Tensor) -> None:
        self.frames, self.asked = frames, []

    def __len__(self) -> int:
        return len(self.frames)

    def get_batch_frames_by_index(self, indices):
        self.asked.append(list(indices))
        return [self.frames[i] for i in indices]  # torch tensors speak DLPack, as the decoder's frames do


def nvdec_on_cpu(path: str, **kw) -> tuple[NvdecVideo, StandIn]:
    ref = open_video(path, decoder="pyav")
    stand_in = StandIn(read_frames(ref, list(range(len(ref))), path))
    return NvdecVideo(path, device="cpu", open_decoder=lambda p, index: stand_in, **kw), stand_in


def test_same_frames_as_the_cpu_readers_for_the_loaders_indices(video):
    vr, stand_in = nvdec_on_cpu(video)
    cpu = open_video(video, decoder="decord")
    assert len(vr) == len(cpu) == 12
    gen = torch.Generator().manual_seed(0)
    for ids in (
        clip_indices(len(vr), 8, 1, gen),  # a training clip
        clip_indices(len(vr), 16, 4, None),  # longer than the video: looped, repeats
        segment_indices(len(vr), 4, gen),
    ):
        assert torch.equal(read_frames(vr, ids, video), read_frames(cpu, ids, video))
        assert stand_in.asked[-1] == sorted(set(ids))  # each frame decoded once, ascending


def test_device_clip_is_the_workers_view(video):
    vr, _ = nvdec_on_cpu(video)
    ids = clip_indices(len(vr), 8, 1, torch.Generator().manual_seed(1))
    frames = read_frames(vr, ids, video)
    for seed in range(4):  # crop box, scale and flip drawn alike
        got = device_clip(frames, 32, torch.Generator().manual_seed(seed))
        want = pretrain_augment(frames, 32, torch.Generator().manual_seed(seed), normalize=False)
        assert got.shape == (3, 8, 32, 32) and got.dtype == torch.uint8 and torch.equal(got, want)


def test_resize_on_the_device_matches_the_size_asked(video):
    vr, _ = nvdec_on_cpu(video, width=32, height=24)
    assert vr.decode([0, 5]).shape == (2, 24, 32, 3)


def test_decode_checks_its_frame_list(video):
    vr, _ = nvdec_on_cpu(video)
    with pytest.raises(ValueError, match="ascending"):
        vr.decode([3, 1])
    with pytest.raises(ValueError, match="outside"):
        vr.decode([11, 12])


def test_loader_batches_equal_the_cpu_decoders(video, tmp_path, monkeypatch):
    """The training loader with the reader (on the CPU stand-in) gives pyav's batches: frame indices,
    shot-cut handling, crops, flips and motion scores all come from the same code."""
    from mats_scale.data import video as video_mod

    monkeypatch.setitem(video_mod._READERS, "nvdec", lambda path, **kw: nvdec_on_cpu(path, **kw)[0])
    monkeypatch.setattr(gpu_decode, "check_gpu_decoder", lambda decoder: None)
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"{video} 0\n" for _ in range(4)))
    base = [
        "model.size=debug", "model.num_frames=4", "model.img_size=64", "data.sampling_rate=2",
        "data.batch_size=2", "data.num_workers=0", "data.dataset=list", f"data.train_list={lst}",
        "train.device=cpu", "masking.strategy=mats", "masking.score=pixel",
    ]  # fmt: skip
    batches = {
        decoder: next(iter(build_pretrain_loader(load_config(None, [*base, f"data.decoder={decoder}"]))))
        for decoder in ("nvdec", "pyav")
    }
    for key in ("video", "frame_index", "scores"):
        assert torch.equal(batches["nvdec"][key], batches["pyav"][key]), key


def test_problem_lines():
    assert gpu_decode_problem("nvdec", cuda=True, installed=True) is None
    no_gpu = gpu_decode_problem("nvdec", cuda=False, installed=True)
    assert "no CUDA device" in no_gpu and "data.decoder=decord" in no_gpu and "\n" not in no_gpu
    assert "PyNvVideoCodec" in gpu_decode_problem("nvdec", cuda=True, installed=False)
    assert "not a GPU decoder" in gpu_decode_problem("decord", cuda=True, installed=True)


def test_cpu_machine_refuses_nvdec_in_one_line(video, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GpuDecodeUnavailable, match="no CUDA device") as e:
        open_video(video, decoder="nvdec")  # not a VideoReadError: no file is skipped for it
    assert isinstance(e.value, DataError) and len(str(e.value).splitlines()) == 1


def test_loader_stops_with_the_refusal(video, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"{video} 0\n" for _ in range(4)))
    cfg = load_config(
        None,
        [
            "model.size=debug", "model.num_frames=4", "model.img_size=32", "data.sampling_rate=2",
            "data.batch_size=2", "data.num_workers=0", "data.decoder=nvdec", "data.dataset=list",
            f"data.train_list={lst}", "train.device=cpu",
        ],
    )  # fmt: skip
    with pytest.raises(GpuDecodeUnavailable, match="nvdec"):
        next(iter(build_pretrain_loader(cfg)))


def test_config_rules():
    assert "nvdec" in DECODERS and set(gpu_decode.GPU_DECODERS) <= set(DECODERS)
    assert load_config(None, ["data.decoder=nvdec", "data.num_workers=0"]).data.decoder == "nvdec"
    with pytest.raises(ConfigError, match="num_workers=0"):
        load_config(None, ["data.decoder=nvdec"])  # the default has 2 workers
    with pytest.raises(ConfigError, match="cache_gib=0"):
        load_config(None, ["data.decoder=nvdec", "data.num_workers=0", "data.cache_gib=1"])
    with pytest.raises(ConfigError, match="nvdec"):
        load_config(None, ["data.decoder=ffmpeg"])  # the allowed list names it


def test_gpu_decoded_batches_are_not_pinned():
    from mats_scale.config import load_config
    from mats_scale.data.loader import wants_pinned_memory

    cfg = load_config(None, ["data.decoder=nvdec", "data.num_workers=0", "train.device=cuda"])
    assert wants_pinned_memory(cfg) is False  # already in device memory: pin_memory would fail
