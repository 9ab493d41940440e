"""The pre-training loader: batches, bad files, determinism, resume, bundled data on first use."""

import logging
import os
import shutil
import threading

import numpy as np
import pytest
import torch

from mats_scale.config import ConfigError, load_config
from mats_scale.data import sources, synth
from mats_scale.data.device import to_model_input
from mats_scale.data.errors import DataError, ListFileError
from mats_scale.data.loader import build_pretrain_loader

SMALL = synth.SynthParams(num_train=8, num_val=0, seed=5, frames=16, height=96, width=128)
# Tiny clips keep the tests fast: 4 frames of 32 x 32 (a 2 x 2 patch grid of the debug model).
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


def cfg_for(dataset_root, *overrides, list_file=None):
    if list_file is None:
        data = ["data.dataset=bundled", f"data.root={dataset_root}"]
    else:
        data = ["data.dataset=list", f"data.train_list={list_file}"]
        data += [f"data.root={dataset_root}"] if dataset_root else []
    return load_config(None, [*BASE, *data, *overrides])


def write_list(path, rel_paths):
    path.write_text("".join(f"{p} 0\n" for p in rel_paths))
    return path


def epoch_batches(ld):
    return list(ld)


def good_videos(k=3):
    return [synth.relpath("train", i) for i in range(k)]


# ---- batches ----------------------------------------------------------------------------------
def test_bundled_batches_shapes_labels_and_epochs(dataset):
    ld = build_pretrain_loader(cfg_for(dataset), rank=0, world_size=1)
    assert len(ld) == 2  # 8 videos / 4 per batch
    labels = [synth.clip_spec(SMALL, "train", i)[0].label for i in range(SMALL.num_train)]
    batches = epoch_batches(ld)
    assert len(batches) == 2
    for b in batches:
        assert b["video"].shape == (4, 3, 4, 32, 32) and b["video"].dtype == torch.uint8
        assert to_model_input(b, "cpu").dtype == torch.float32
        assert b["label"].dtype == torch.int64 and b["label"].tolist() == [labels[i] for i in b["index"]]
        assert b["skipped"] == [] and "scores" not in b
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(8))  # each once
    assert ld.state_dict()["epoch"] == 1 and ld.state_dict()["batch"] == 0


def test_repeated_sampling_gives_num_sample_clips_per_video(dataset):
    ld = build_pretrain_loader(cfg_for(dataset, "data.num_sample=2"), rank=0, world_size=1)
    assert len(ld) == 4  # 2 videos per batch of 4 clips
    batches = epoch_batches(ld)
    differ = False
    for b in batches:
        assert b["video"].shape[0] == 4
        idx = b["index"].tolist()
        assert idx[0] == idx[1] and idx[2] == idx[3] and idx[0] != idx[2]
        differ |= not torch.equal(b["video"][0], b["video"][1])  # own crop per repeat
    assert differ
    with pytest.raises(ConfigError, match="data.batch_size=3: must be divisible by data.num_sample=2"):
        cfg_for(dataset, "data.num_sample=2", "data.batch_size=3")


def test_synthetic_dataset_through_the_same_interface():
    cfg = load_config(None, [*BASE, "data.dataset=synthetic"])
    b = next(iter(build_pretrain_loader(cfg, rank=0, world_size=1)))
    assert b["video"].shape == (4, 3, 4, 32, 32) and b["skipped"] == []
    assert ((b["label"] >= 0) & (b["label"] < 4)).all()


def test_endless_batches_run_on_across_epochs(dataset):
    loader = build_pretrain_loader(cfg_for(dataset), rank=0, world_size=1)
    per_epoch, it = len(loader), loader.endless()
    batches = [next(it) for _ in range(2 * per_epoch + 1)]
    assert (loader.epoch, loader.batch) == (2, 1) and all(b["video"].shape[0] == 4 for b in batches)


def test_default_dataset_is_bundled_under_the_working_directory(tmp_path, monkeypatch):
    cfg = load_config(None, [])
    assert cfg.data.dataset == "bundled"
    monkeypatch.chdir(tmp_path)
    assert sources.bundled_root(cfg) == os.path.join(str(tmp_path), "data", "bundled")


def test_bundled_dataset_generated_once_on_first_use(tmp_path, monkeypatch):
    tiny = synth.SynthParams(num_train=4, num_val=1, frames=8, height=80, width=96)
    monkeypatch.setattr(sources, "BUNDLED_PARAMS", tiny)
    calls = []
    real = synth.generate

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **{**kwargs, "workers": 1})

    monkeypatch.setattr(synth, "generate", counting)
    root = tmp_path / "fresh"
    # Two "ranks" race for the lock (separate open files, so flock serialises them even in one process).
    threads = [threading.Thread(target=sources.ensure_bundled, args=(str(root),)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [str(root)]
    cfg = load_config(None, [*BASE, f"data.root={root}"])
    assert len(build_pretrain_loader(cfg, rank=0, world_size=1)) == 1  # reads what was generated
    assert calls == [str(root)]


def test_folder_scan_labels_by_subfolder(dataset, tmp_path):
    for cls, ids in (("a_class", [0, 1]), ("b_class", [2, 3])):
        (tmp_path / cls).mkdir()
        for i in ids:
            shutil.copy(dataset / synth.relpath("train", i), tmp_path / cls / f"{i}.mp4")
    (tmp_path / "notes.txt").write_text("not a video")
    cfg = load_config(None, [*BASE, "data.dataset=folder", f"data.root={tmp_path}"])
    b = next(iter(build_pretrain_loader(cfg, rank=0, world_size=1)))
    assert sorted(zip(b["index"].tolist(), b["label"].tolist(), strict=False)) == [
        (0, 0),
        (1, 0),
        (2, 1),
        (3, 1),
    ]


# ---- bad input --------------------------------------------------------------------------------
def _make_bad(kind, dataset, tmp_path):
    good = dataset / synth.relpath("train", 0)
    path = tmp_path / f"{kind}.mp4"
    if kind == "missing":
        pass
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "not_a_video":
        path.write_text("this is a text file, not a video\n" * 20)
    elif kind == "too_short":  # 2 frames < data.min_frames=4
        frames = np.full((2, 96, 128, 3), 128, np.uint8)
        synth.write_video(str(path), frames, fps=8)
    elif kind == "one_pixel_wide":  # valid H.264 (4:4:4 allows an odd width), 1 x 96 frames
        import av

        with av.open(str(path), "w", format="mp4") as c:
            s = c.add_stream("libx264", rate=8)
            s.width, s.height, s.pix_fmt = 1, 96, "yuv444p"
            for i in range(16):
                frame = np.full((96, 1, 3), 10 * i, np.uint8)
                for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    return path


REASONS = {
    "missing": "missing file",
    "empty": "empty file",
    "truncated": "cannot open as video",
    "not_a_video": "cannot open as video",
    "too_short": "too short: 2 frames",
    "one_pixel_wide": "1x96 frames cannot give a clip",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_bad_file_is_skipped_warned_and_counted(kind, dataset, tmp_path, caplog):
    bad = _make_bad(kind, dataset, tmp_path)
    lst = write_list(tmp_path / "list.txt", [str(bad)] + [str(dataset / p) for p in good_videos(3)])
    cfg = cfg_for("", "data.max_bad_fraction=1.0", list_file=lst)
    ld = build_pretrain_loader(cfg, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="mats_scale.data"):
        (b,) = epoch_batches(ld)
    assert b["video"].shape == (4, 3, 4, 32, 32) and torch.isfinite(b["video"]).all()
    assert 0 not in b["index"].tolist()  # the bad video was replaced
    assert len(b["skipped"]) >= 1 and all(p == str(bad) for p, _ in b["skipped"])
    assert REASONS[kind] in b["skipped"][0][1]
    warnings = [r.getMessage() for r in caplog.records if str(bad) in r.getMessage()]
    assert len(warnings) == 1 and REASONS[kind] in warnings[0]  # one warning per file
    st = ld.skip_stats
    assert st.skipped == len(b["skipped"]) and st.reads == 4 + st.skipped
    assert list(st.bad_files) == [str(bad)]


def test_too_many_bad_files_stop_with_one_error_across_workers(dataset, tmp_path):
    rel = [str(tmp_path / f"gone_{i}.mp4") for i in range(4)] + [str(dataset / p) for p in good_videos(4)]
    lst = write_list(tmp_path / "list.txt", rel)
    cfg = cfg_for("", "data.num_workers=2", "data.batch_size=2", "data.max_bad_fraction=0.1", list_file=lst)
    ld = build_pretrain_loader(cfg, rank=0, world_size=1)
    with pytest.raises(DataError, match=r"too many bad videos: \d+ of \d+ reads failed") as err:
        epoch_batches(ld)
    msg = str(err.value)
    assert "data.max_bad_fraction=0.1" in msg and "gone_" in msg and "missing file" in msg
    assert ld.skip_stats.skipped >= 1 and ld.skip_stats.fraction > 0.1


def test_skip_counts_aggregate_from_workers_like_in_process(dataset, tmp_path):
    rel = [str(tmp_path / "gone.mp4")] + [str(dataset / p) for p in good_videos(7)]
    lst = write_list(tmp_path / "list.txt", rel)
    runs = []
    for workers in (0, 2):
        cfg = cfg_for(
            "", f"data.num_workers={workers}", "data.batch_size=2", "data.max_bad_fraction=1.0", list_file=lst
        )
        ld = build_pretrain_loader(cfg, rank=0, world_size=1)
        batches = epoch_batches(ld)
        runs.append((batches, ld.skip_stats.state_dict()))
    (b0, s0), (b2, s2) = runs
    assert s0 == s2 and s0["skipped"] >= 1 and s0["bad_files"][0][0] == str(tmp_path / "gone.mp4")
    assert all(torch.equal(x["video"], y["video"]) for x, y in zip(b0, b2, strict=False))


def test_malformed_list_line_reported_with_line_number(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("a.mp4 1\n\nb.mp4 two\n")
    cfg = cfg_for(str(tmp_path), list_file=lst)
    with pytest.raises(ListFileError, match=r"list\.txt:3: 'b.mp4 two': expected 'path label'"):
        build_pretrain_loader(cfg, rank=0, world_size=1)
    with pytest.raises(ListFileError, match="no such file"):
        build_pretrain_loader(cfg_for(str(tmp_path), list_file=tmp_path / "nope.txt"), rank=0, world_size=1)


# ---- determinism and resume -------------------------------------------------------------------
def _videos(batches):
    return torch.cat([to_model_input(b, "cpu") for b in batches])


def test_same_seed_same_clips_workers_do_not_matter(dataset):
    a = epoch_batches(build_pretrain_loader(cfg_for(dataset), rank=0, world_size=1))
    b = epoch_batches(build_pretrain_loader(cfg_for(dataset, "data.num_workers=2"), rank=0, world_size=1))
    assert torch.equal(_videos(a), _videos(b))
    c = epoch_batches(build_pretrain_loader(cfg_for(dataset, "train.seed=1"), rank=0, world_size=1))
    assert not torch.equal(_videos(a), _videos(c))


def test_decoded_cache_gives_the_same_clips_and_stops_at_its_budget(dataset, monkeypatch):
    from mats_scale.data import video as video_mod

    def two_epochs(*overrides):
        ld = build_pretrain_loader(cfg_for(dataset, *overrides), rank=0, world_size=1)
        return _videos(epoch_batches(ld) + epoch_batches(ld))

    reference = two_epochs()
    opened = []
    real_open = video_mod.DecordVideo
    monkeypatch.setattr(
        video_mod,
        "_READERS",
        {**video_mod._READERS, "decord": lambda p, **kw: opened.append(p) or real_open(p, **kw)},
    )
    monkeypatch.setattr(video_mod, "_CACHE", video_mod.DecodedCache())
    assert torch.equal(two_epochs("data.cache_gib=1"), reference)  # same frames, crops and order
    assert len(opened) == SMALL.num_train  # each file opened once: epoch 2 came from memory
    one_video = SMALL.frames * SMALL.height * SMALL.width * 3
    assert video_mod._CACHE.bytes == SMALL.num_train * one_video

    # A budget of 2.5 videos keeps 2; the others are read from their files every time.
    opened.clear()
    monkeypatch.setattr(video_mod, "_CACHE", video_mod.DecodedCache())
    assert torch.equal(two_epochs(f"data.cache_gib={2.5 * one_video / 1024**3}"), reference)
    assert video_mod._CACHE.bytes == 2 * one_video and video_mod._CACHE.full
    assert len(opened) == 2 * SMALL.num_train - 2
    with pytest.raises(ConfigError, match="data.cache_gib"):
        cfg_for(dataset, "data.cache_gib=-1")


def test_ranks_get_different_clips_and_epochs_differ(dataset):
    cfg = cfg_for(dataset, "data.batch_size=2")
    r0, r1 = (build_pretrain_loader(cfg, rank=r, world_size=2) for r in (0, 1))
    e0_r0, e0_r1 = epoch_batches(r0), epoch_batches(r1)
    idx0 = set(torch.cat([b["index"] for b in e0_r0]).tolist())
    idx1 = set(torch.cat([b["index"] for b in e0_r1]).tolist())
    assert idx0.isdisjoint(idx1) and len(idx0 | idx1) == 8  # the ranks split the epoch
    e1_r0 = epoch_batches(r0)  # the loader moved on to epoch 1: a new order and new crops
    assert not torch.equal(_videos(e0_r0), _videos(e1_r0))


def test_resume_yields_exactly_the_uninterrupted_batches(dataset):
    cfg = cfg_for(dataset, "data.batch_size=2")  # 4 batches per epoch
    full = build_pretrain_loader(cfg, rank=0, world_size=1)
    reference = epoch_batches(full) + epoch_batches(full)  # two epochs, 8 batches

    first = build_pretrain_loader(cfg, rank=0, world_size=1)
    got = []
    for i, b in enumerate(first):  # stop after 3 batches of epoch 0
        got.append(b)
        if i == 2:
            break
    state = first.state_dict()
    assert (state["epoch"], state["batch"]) == (0, 3)

    resumed = build_pretrain_loader(
        cfg_for(dataset, "data.batch_size=2", "data.num_workers=2"), rank=0, world_size=1
    )
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # a loop that calls set_epoch after loading must not rewind
    got += epoch_batches(resumed) + epoch_batches(resumed)
    assert len(got) == len(reference)
    for x, y in zip(got, reference, strict=False):
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["index"], y["index"])

    other = build_pretrain_loader(cfg, rank=0, world_size=2)
    with pytest.raises(DataError, match="cannot resume the data position"):
        other.load_state_dict(state)


def test_segment_sampling_turns_flip_off(tmp_path):
    frames = np.full((16, 64, 64, 3), 250, np.uint8)
    frames[:, :, :32] = 5  # dark left half: a flipped clip is bright on the left
    synth.write_video(str(tmp_path / "half.mp4"), frames, fps=8)
    lst = write_list(tmp_path / "list.txt", [str(tmp_path / "half.mp4")])

    def flipped(*overrides):
        ld = build_pretrain_loader(
            cfg_for("", "data.num_sample=4", *overrides, list_file=lst), rank=0, world_size=1
        )
        v = torch.cat([_videos(epoch_batches(ld)) for _ in range(3)])  # 12 clips (B, 3, T, H, W)
        return (v[..., :4].mean(dim=(1, 2, 3, 4)) > v[..., -4:].mean(dim=(1, 2, 3, 4))).tolist()

    assert any(flipped()) and not all(flipped())
    assert not any(flipped("data.segment_sampling=true"))
    assert not any(flipped("data.flip=false"))


# ---- motion: frame selection and pixel scores -------------------------------------------------
def _grating(shift):
    x = np.arange(64, dtype=np.float32)
    row = 128 + 100 * np.sin((x + shift) * 2 * np.pi / 16)
    return np.broadcast_to(row[None, :, None], (64, 64, 3)).astype(np.uint8)


def test_frame_selection_skips_the_still_tail(tmp_path):
    # 48 frames: a grating sliding 3 px per frame for frames 0-15, then still (frame 15) to the end.
    frames = np.stack([_grating(3 * min(t, 15)) for t in range(48)])
    synth.write_video(str(tmp_path / "early_motion.mp4"), frames, fps=8)
    lst = write_list(tmp_path / "list.txt", [str(tmp_path / "early_motion.mp4")] * 2)
    # T = 4 -> tau = 2 pairs; alpha 1.5 -> 6 candidates s + 8k (s <= 7): pairs P0 = (s, s+8),
    # P1 = (s+16, s+24), P2 = (s+32, s+40). A pair's score is its change from the previous pair (P0
    # copies P1's): P0 and P1 score the motion, P2 (still, like P1) scores 0 and is never drawn.
    over = ["data.sampling_rate=8", "data.num_sample=2", "masking.frame_selection=true"]
    ld = build_pretrain_loader(cfg_for("", *over, list_file=lst), rank=0, world_size=1)
    ids = torch.cat([b["frame_index"] for _ in range(4) for b in epoch_batches(ld)])  # (16, 4)
    assert ids.shape == (16, 4)
    assert (ids[:, 1] - ids[:, 0] == 8).all() and (ids[:, 3] - ids[:, 2] == 8).all()  # whole pairs
    assert (ids.diff(dim=1) > 0).all()  # temporal order
    assert (ids.max(dim=1).values < 32).all()
    assert torch.equal(ids[0::2], ids[1::2])  # the num_sample clips of a video share their frames
    plain = build_pretrain_loader(cfg_for("", *over[:2], list_file=lst), rank=0, world_size=1)
    plain_ids = torch.cat([b["frame_index"] for _ in range(4) for b in epoch_batches(plain)])
    assert (plain_ids.max(dim=1).values >= 32).any()  # without selection the still tail is sampled


def test_pixel_scores_in_the_batch_feed_mats(dataset):
    from mats_scale.masking import TokenGrid, pixel_motion_scores, select_tokens

    cfg = cfg_for(dataset, "model.img_size=64", "masking.strategy=mats", "masking.score=pixel")
    b = next(iter(build_pretrain_loader(cfg, rank=0, world_size=1)))
    grid = TokenGrid.from_model(cfg.model)
    assert b["scores"].shape == (4, grid.num_tokens) and b["scores"].dtype == torch.float32
    # In the units of the normalised clip, although the worker sent uint8 (float rounding aside).
    torch.testing.assert_close(b["scores"], pixel_motion_scores(to_model_input(b, "cpu"), 2, 16))
    assert (b["scores"] > 0).any()  # the objects move
    sel = select_tokens(cfg.masking, grid, 4, torch.Generator().manual_seed(0), b["scores"])
    assert sel.visible_ids.shape[0] == 4


def test_bundled_refuses_to_generate_into_foreign_data(tmp_path):
    (tmp_path / "my_video.mp4").write_bytes(b"\0" * 10)
    cfg = load_config(None, [*BASE, f"data.root={tmp_path}"])
    with pytest.raises(DataError, match=r"is not a bundled dataset .*my_video\.mp4"):
        build_pretrain_loader(cfg, rank=0, world_size=1)
    assert sorted(os.listdir(tmp_path)) == ["my_video.mp4"]


def test_a_video_too_narrow_for_frame_selection_is_skipped_with_its_reason(dataset, tmp_path):
    """Frame selection scores whole patches of the decoded frames: a valid 1-pixel-wide video is a
    bad input (skipped, reason named), not a crash of the worker."""
    bad = _make_bad("one_pixel_wide", dataset, tmp_path)
    lst = write_list(tmp_path / "list.txt", [str(bad)] + [str(dataset / p) for p in good_videos(3)])
    extra = ["masking.score=pixel", "masking.frame_selection=true", "data.max_bad_fraction=1.0"]
    ld = build_pretrain_loader(cfg_for("", *extra, list_file=lst), rank=0, world_size=1)
    (b,) = epoch_batches(ld)
    assert b["video"].shape == (4, 3, 4, 32, 32) and 0 not in b["index"].tolist()
    assert b["skipped"] and "at least 16 pixels for frame selection" in b["skipped"][0][1]
