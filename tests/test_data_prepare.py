"""python -m mats_scale.data.prepare: re-encoding, resume, bad sources, list files."""

import os

import av
import numpy as np
import pytest

from mats_scale.config import load_config
from mats_scale.data.loader import build_pretrain_loader
from mats_scale.data.prepare import REPORT, PrepareOptions, main, output_size, prepare
from mats_scale.data.video import open_video, read_frames

OPTS = PrepareOptions(short_side=48, gop=4, crf=18)


def write(path, frames=16, height=80, width=120, fps=8):
    """A small moving-gradient H.264 file: (frames, height, width)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "ultrafast", "threads": "1"}  # x264's default keyframe interval (250)
        for i in range(frames):
            img = np.stack([(x * 2 + 4 * i) % 256, (y * 3) % 256, np.full_like(x, 20 * (i % 8))], -1)
            for p in s.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    write(root / "jump" / "a.mp4")
    write(root / "run" / "b.mp4", height=120, width=80)  # portrait
    write(root / "run" / "c.mkv", frames=12)
    (root / "run" / "broken.mp4").write_text("not a video\n" * 30)
    return root


def keyframes(path):
    with av.open(path) as c:
        return [i for i, p in enumerate(c.demux(c.streams.video[0])) if p.pts is not None and p.is_keyframe]


def test_reencodes_scaled_short_gop_and_reports_the_bad_source(src, tmp_path):
    dst = tmp_path / "dst"
    r = prepare(str(src), str(dst), OPTS, workers=1, progress=False)
    assert (r["videos"], r["encoded"], r["already_done"]) == (4, 3, 0)
    assert list(r["failed"]) == [str(src / "run" / "broken.mp4")]
    report = (dst / REPORT).read_text().splitlines()
    assert len(report) == 1 and report[0].startswith(str(src / "run" / "broken.mp4") + "\t")
    assert (dst / "list.txt").read_text().splitlines() == ["jump/a.mp4 0", "run/b.mp4 1", "run/c.mp4 1"]
    assert (dst / "classes.txt").read_text().splitlines() == ["0 jump", "1 run"]
    a = str(dst / "jump" / "a.mp4")
    vr = open_video(a)
    assert len(vr) == 16 and read_frames(vr, [0], a).shape == (1, 48, 72, 3)  # short side 80 -> 48
    assert read_frames(open_video(str(dst / "run" / "b.mp4")), [0], "").shape == (1, 72, 48, 3)
    assert keyframes(a) == [0, 4, 8, 12]  # --gop 4; the source has one keyframe
    assert keyframes(str(src / "jump" / "a.mp4")) == [0]
    assert not [f for _, _, fs in os.walk(dst) for f in fs if f.endswith(".part")]
    # The prepared set trains as a list dataset.
    cfg = load_config(
        None,
        [
            "model.size=debug",
            "model.num_frames=4",
            "model.img_size=32",
            "data.dataset=list",
            f"data.root={dst}",
            f"data.train_list={dst / 'list.txt'}",
            "data.batch_size=3",
            "data.num_workers=0",
            "data.sampling_rate=2",
        ],
    )
    (batch,) = list(build_pretrain_loader(cfg))
    assert batch["video"].shape == (3, 3, 4, 32, 32) and batch["skipped"] == []


def test_resumes_where_it_stopped_and_refuses_other_options(src, tmp_path):
    dst = tmp_path / "dst"
    prepare(str(src), str(dst), OPTS, workers=1, progress=False)
    done = dst / "jump" / "a.mp4"
    stamp = os.stat(done).st_mtime_ns
    # An interrupted run: one output missing, its half-written .part left behind.
    os.remove(dst / "run" / "b.mp4")
    (dst / "run" / "b.mp4.part").write_bytes(b"\0" * 100)
    r = prepare(str(src), str(dst), OPTS, workers=1, progress=False)
    assert (r["encoded"], r["already_done"], len(r["failed"])) == (1, 2, 1)
    assert os.stat(done).st_mtime_ns == stamp  # finished outputs are not redone
    assert len(open_video(str(dst / "run" / "b.mp4"))) == 16 and not (dst / "run" / "b.mp4.part").exists()
    with pytest.raises(ValueError, match=r"prepared with other options: --gop 4 \(now 8\)"):
        prepare(str(src), str(dst), PrepareOptions(short_side=48, gop=8, crf=18), workers=1, progress=False)


def test_list_files_keep_labels_and_fps_resamples(src, tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_text("jump/a.mp4 7\nrun/broken.mp4 3\nrun/c.mkv 2\n")
    dst = tmp_path / "dst"
    r = prepare(
        str(src),
        str(dst),
        PrepareOptions(short_side=48, gop=4, fps=4),
        list_files=[str(lst)],
        workers=2,
        progress=False,
    )
    assert r["encoded"] == 2 and len(r["failed"]) == 1
    assert (dst / "train.txt").read_text().splitlines() == ["jump/a.mp4 7", "run/c.mp4 2"]
    assert len(open_video(str(dst / "jump" / "a.mp4"))) == 8  # 16 frames at 8 fps -> 8 at 4 fps
    with av.open(str(dst / "jump" / "a.mp4")) as c:
        assert c.streams.video[0].average_rate == 4


def test_cli_runs_and_bad_options_give_one_line(src, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main([str(src), str(dst), "--short-side", "48", "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4 videos: 3 encoded, 0 already done, 1 failed" in out and "broken.mp4" in out
    assert main([str(src), str(tmp_path / "d2"), "--short-side", "47"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --short-side=47: must be an even number >= 16"]
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "d3")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_output_size_scales_down_only_and_keeps_sides_even():
    assert output_size(340, 256, 256) == (340, 256)
    assert output_size(1280, 720, 256) == (456, 256)
    assert output_size(720, 1280, 256) == (256, 456)
    assert output_size(200, 150, 256) == (200, 150)  # never upscaled
    assert output_size(101, 75, 48) == (64, 48)
