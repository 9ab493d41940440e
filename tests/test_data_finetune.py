"""Fine-tuning and evaluation loaders: labels, the views they make, sharding, bad files."""

import pytest
import torch

from mats_scale.config import load_config
from mats_scale.data import synth
from mats_scale.data.device import to_model_input as device_input
from mats_scale.data.errors import DataError
from mats_scale.data.finetune import build_eval_loader, build_finetune_loader
from mats_scale.data.transforms import short_side_resize, to_model_input
from mats_scale.data.video import open_video, read_frames

SMALL = synth.SynthParams(num_train=8, num_val=5, seed=11, frames=16, height=96, width=128)
BASE = [
    "model.size=debug",
    "model.num_frames=4",
    "model.img_size=32",
    "data.sampling_rate=2",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def dataset(make_dataset):
    return make_dataset(SMALL)


def cfg_for(root, *overrides):
    return load_config(None, [*BASE, "data.dataset=bundled", f"data.root={root}", *overrides])


def spec_label(split, i):
    return synth.clip_spec(SMALL, split, i)[0].label


def find_crop(clip, resized):
    """(dy, dx, flipped) where `clip` (3, T, S, S) equals a crop of `resized` (3, T, h, w), or None."""
    S = clip.shape[-1]
    h, w = resized.shape[-2:]
    for flipped in (False, True):
        target = clip.flip(-1) if flipped else clip
        for dy in range(h - S + 1):
            for dx in range(w - S + 1):
                if torch.equal(resized[..., dy : dy + S, dx : dx + S], target):
                    return dy, dx, flipped
    return None


def test_finetune_clips_are_random_crops_of_the_short_side_resize(dataset):
    cfg = cfg_for(dataset, "data.batch_size=4")
    batches = list(build_finetune_loader(cfg))
    assert len(batches) == 2
    flips = set()
    for b in batches:
        assert b["video"].shape == (4, 3, 4, 32, 32) and b["video"].dtype == torch.uint8
        assert b["label"].tolist() == [spec_label("train", i) for i in b["index"].tolist()]
        video = device_input(b, "cpu")  # normalised as the training loop does
        for clip, index, frame_ids in zip(
            video, b["index"].tolist(), b["frame_index"].tolist(), strict=False
        ):
            path = str(dataset / synth.relpath("train", index))
            frames = read_frames(open_video(path), frame_ids, path)  # (T, 96, 128, 3)
            resized = to_model_input(short_side_resize(frames, round(32 * 256 / 224)))  # (3, T, 37, 49)
            hit = find_crop(clip, resized)
            assert hit is not None, f"clip of video {index} is no crop of its resized frames"
            flips.add(hit[2])
    assert flips == {False, True}  # 8 clips: flipped and unflipped both occur for this seed
    # Deterministic like the pre-training loader: the same config gives the same clips.
    again = list(build_finetune_loader(cfg))
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(batches, again, strict=False))


def test_finetune_refuses_videos_without_labels(dataset, tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"{synth.relpath('train', i)}\n" for i in range(4)))  # path only: label -1
    cfg = load_config(None, [*BASE, "data.dataset=list", f"data.train_list={lst}", f"data.root={dataset}"])
    with pytest.raises(DataError, match=r"4 of 4 videos have no label \(first: .*000000"):
        build_finetune_loader(cfg)


def test_eval_loader_scores_every_video_once_over_the_ranks(dataset):
    cfg = cfg_for(dataset, "data.batch_size=2", "data.eval_clips=2", "data.eval_crops=3")
    seen = []
    for rank in range(2):
        batches = list(build_eval_loader(cfg, rank=rank, world_size=2))
        for b in batches:
            assert b["views"].shape[1:] == (6, 3, 4, 32, 32)
            assert b["label"].tolist() == [spec_label("val", i) for i in b["index"].tolist()]
        indices = [i for b in batches for i in b["index"].tolist()]
        assert indices == list(range(rank, SMALL.num_val, 2))  # list order, no padding
        seen += indices
        again = list(build_eval_loader(cfg, rank=rank, world_size=2))
        assert all(torch.equal(a["views"], b["views"]) for a, b in zip(batches, again, strict=False))
    assert sorted(seen) == list(range(SMALL.num_val))


def test_eval_leaves_an_unreadable_video_out_and_names_it(dataset, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    lst = tmp_path / "val.txt"
    lst.write_text(f"{dataset / synth.relpath('val', 0)} 1\n{bad} 2\n")
    cfg = load_config(
        None,
        [*BASE, "data.dataset=list", f"data.train_list={lst}", f"data.val_list={lst}", "data.batch_size=1"],
    )
    it = iter(build_eval_loader(cfg))
    first = next(it)
    assert first["views"].shape == (1, 1, 3, 4, 32, 32) and first["skipped"] == []
    second = next(it)
    assert second["views"] is None and second["index"].numel() == 0
    assert [p for p, _ in second["skipped"]] == [str(bad)]
