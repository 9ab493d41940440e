"""List-file formats of VideoMAE / VideoMAE V2, rawframe folders, odd file names and binary lists."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from launch_util import PRETRAIN, ROOT
from torchvision.io import write_jpeg

from mats_scale.config import load_config
from mats_scale.data import synth
from mats_scale.data.errors import ListFileError, VideoReadError
from mats_scale.data.lists import FORMATS, read_list_file, scan_folder
from mats_scale.data.loader import build_pretrain_loader
from mats_scale.data.video import open_video, read_frames

BASE = [
    "model.size=debug",
    "model.num_frames=4",
    "model.img_size=32",
    "data.sampling_rate=1",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.max_bad_fraction=0.0",
]


def _frames(n=8, h=64, w=96):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (n, h, w, 3), dtype=np.uint8)


def _video(path, n=8):
    synth.write_video(str(path), _frames(n), fps=8)
    return path


def _frame_folder(path, n=8, start=1):
    path.mkdir(parents=True)
    for i, frame in enumerate(_frames(n)):
        image = torch.from_numpy(frame).permute(2, 0, 1).contiguous()  # (3, H, W)
        write_jpeg(image, str(path / f"img_{start + i:05d}.jpg"))
    return path


def _loader(lst, *extra):
    cfg = load_config(None, [*BASE, "data.dataset=list", f"data.train_list={lst}", *extra])
    return build_pretrain_loader(cfg, rank=0, world_size=1)


@pytest.mark.parametrize(
    "text,fmt,parsed",
    [
        ("a.mp4 3\nb c.mp4 5\n", "path_label", [("a.mp4", 3, -1, -1), ("b c.mp4", 5, -1, -1)]),
        (
            "a.mp4 0 -1\nsub/b.mp4 0 -1\n",
            "path_start_total",
            [("a.mp4", -1, 0, -1), ("sub/b.mp4", -1, 0, -1)],
        ),
        ("frames/1 1 47\nv.mp4 0 -1\n", "path_start_total", [("frames/1", -1, 1, 47), ("v.mp4", -1, 0, -1)]),
        (
            "frames/1 47 12\nframes/2 30 0\n",
            "folder_total_label",
            [("frames/1", 12, -1, 47), ("frames/2", 0, -1, 30)],
        ),
    ],
)
def test_videomae_and_videomae_v2_list_formats(tmp_path, text, fmt, parsed):
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\n\n" + text)
    items = read_list_file(str(lst))
    assert items.source_format == FORMATS[fmt]
    assert [tuple(it) for it in items] == parsed


@pytest.mark.parametrize(
    "text,needle",
    [
        ("a.mp4 3\nb.mp4 0 -1\n", r"list\.txt:4: 'b.mp4 0 -1': three fields, but line 3 has two"),
        ("a.mp4 0 -1\nb.mp4 cat\n", r"list\.txt:4: 'b.mp4 cat': expected 'path label'"),
        ("a.mp4 0 0\n", r"list\.txt:3: 'a.mp4 0 0': total_frames must be > 0 .* or -1"),
    ],
)
def test_a_line_that_fits_no_format_is_named(tmp_path, text, needle):
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\n\n" + text)
    with pytest.raises(ListFileError, match=needle):
        read_list_file(str(lst))


def test_videomae_v2_pretraining_list_reads_videos_and_rawframe_folders(tmp_path, caplog):
    _video(tmp_path / "v.mp4")
    _frame_folder(tmp_path / "frames" / "clip", start=1)
    lst = tmp_path / "k400_pretrain.txt"
    lst.write_text("v.mp4 0 -1\nframes/clip 1 8\n")
    with caplog.at_level("INFO", logger="mats_scale.data"):
        (batch,) = list(_loader(lst, f"data.root={tmp_path}"))
    assert f"data: 2 videos from {lst}, read as VideoMAE V2 pre-training" in caplog.text
    assert batch["video"].shape == (2, 3, 4, 32, 32) and batch["skipped"] == []
    assert sorted(batch["index"].tolist()) == [0, 1]


def test_rawframe_folders_from_a_folder_scan(tmp_path):
    _frame_folder(tmp_path / "root" / "classA" / "clip1", start=1)
    _frame_folder(tmp_path / "root" / "classB" / "clip2", start=0)
    _video(tmp_path / "root" / "classB" / "v.mp4")
    items = scan_folder(str(tmp_path / "root"))
    assert [(os.path.relpath(it.path, tmp_path / "root"), it.label) for it in items] == [
        ("classA/clip1", 0),
        ("classB/v.mp4", 1),
        ("classB/clip2", 1),
    ]  # files, then sub-folders
    assert "1 video files, 2 rawframe folders" in items.source_format
    cfg = load_config(
        None, [*BASE, "data.dataset=folder", f"data.root={tmp_path / 'root'}", "data.batch_size=3"]
    )
    (batch,) = list(build_pretrain_loader(cfg, rank=0, world_size=1))
    assert batch["skipped"] == [] and batch["video"].shape[0] == 3


def test_a_missing_frame_is_a_bad_file_naming_the_frame(tmp_path):
    folder = _frame_folder(tmp_path / "clip", start=1)
    os.remove(folder / "img_00003.jpg")
    reader = open_video(str(folder), start=1, frames=8)
    assert len(reader) == 8
    with pytest.raises(VideoReadError, match="img_00003.jpg: missing"):
        read_frames(reader, [0, 1, 2, 3], str(folder))
    assert len(open_video(str(folder))) == 2  # counted on disk: img_00001, img_00002


def test_a_non_utf8_file_name_in_a_list_is_found_and_read(tmp_path):
    name = os.fsencode(tmp_path) + b"/caf\xe9.mp4"  # Latin-1 bytes: not UTF-8
    with open(name, "wb") as f:
        f.write(_video(tmp_path / "plain.mp4").read_bytes())
    lst = tmp_path / "list.txt"
    lst.write_bytes(name + b" 0\n" + name + b" 1\n")
    items = read_list_file(str(lst))
    assert os.fsencode(items[0].path) == name and os.path.isfile(items[0].path)
    (batch,) = list(_loader(lst))
    assert batch["skipped"] == [] and batch["video"].abs().sum() > 0


def test_a_binary_list_file_has_no_valid_line(tmp_path):
    lst = tmp_path / "list.bin"
    lst.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00")  # 9 bytes
    with pytest.raises(ListFileError, match="no valid line: it is a binary file"):
        read_list_file(str(lst))


def test_list_errors_stop_the_launcher_before_torch_is_imported(tmp_path):
    # A `torch` that fails on import: the launcher must report the list before it needs torch.
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    lst = tmp_path / "list.txt"
    lst.write_text("a.mp4 1\nb.mp4 two\n")
    proc = subprocess.run(
        [
            sys.executable,
            str(PRETRAIN),
            "data.dataset=list",
            f"data.train_list={lst}",
            f"train.out_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": f"{fake}:{ROOT}", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {lst}:2: 'b.mp4 two': expected 'path label' with an "
        "integer label (or just 'path'), or 'path start_index "
        "total_frames' (VideoMAE V2)"
    ]
    assert not (tmp_path / "run").exists()


def test_a_list_is_read_and_logged_once_per_process_until_it_changes(tmp_path, caplog, monkeypatch):
    # Start-up asks for the training list three times (the schedule, the task, the loader): a
    # Kinetics list is read once and "data: N videos" is logged once, until the file changes.
    from mats_scale.data import sources
    from mats_scale.train.schedule import num_videos

    lst = tmp_path / "train.txt"
    lst.write_text("".join(f"v{i}.mp4 {i % 2}\n" for i in range(3)))
    reads = []
    real = sources.read_list_file
    monkeypatch.setattr(sources, "read_list_file", lambda *a: reads.append(a) or real(*a))
    cfg = load_config(None, [*BASE, "data.dataset=list", f"data.train_list={lst}", f"data.root={tmp_path}"])
    with caplog.at_level("INFO", logger="mats_scale.data"):
        assert num_videos(cfg) == 3
        first = sources.train_items(cfg)
        first.clear()  # a caller's change to its list is not the next caller's
        again = sources.resolve_items(cfg, "train")
    assert [it.path for it in again] == [str(tmp_path / f"v{i}.mp4") for i in range(3)]
    assert again.source_format == real(str(lst)).source_format
    assert len(reads) == 1
    assert sum("data: 3 videos" in r.getMessage() for r in caplog.records) == 1

    lst.write_text("v0.mp4 0\nv1.mp4 1\n")
    assert len(sources.resolve_items(cfg, "train")) == 2
    assert len(reads) == 2
