"""mats-prepare (mats_scale.data.prepare): re-encoding, resume, bad sources, list files."""

import errno
import os
import re
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest

from mats_scale.config import load_config
from mats_scale.data.lists import read_list_file
from mats_scale.data.loader import build_pretrain_loader
from mats_scale.data.prepare import REPORT, PrepareOptions, output_size, prepare
from mats_scale.data.video import open_video, read_frames
from mats_scale.launch.prepare import main

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


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("where", ["dst_in_src", "src_in_dst", "same", "dst_in_src_via_link"])
def test_overlapping_src_and_dst_are_refused_before_anything_is_written(src, tmp_path, capsys, where):
    (tmp_path / "link").symlink_to(src)
    src_arg, dst_arg = {
        "dst_in_src": (src, src / "out"),
        "src_in_dst": (src, tmp_path),
        "same": (src, tmp_path / "link"),
        "dst_in_src_via_link": (src, tmp_path / "link" / "out"),
    }[where]
    before = files_under(tmp_path)
    assert main([str(src_arg), str(dst_arg), "--short-side", "48", "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert f"SRC={str(src_arg)!r}" in err[0] and f"DST={str(dst_arg)!r}" in err[0]
    assert "DST must be a directory outside SRC" in err[0]
    assert files_under(tmp_path) == before and not (src / "out").exists()


def test_each_output_is_listed_once(src, tmp_path):
    write(src / "run" / "b.avi", frames=8)  # the same output run/b.mp4 as run/b.mp4
    dst = tmp_path / "dst"
    for _ in range(2):
        r = prepare(str(src), str(dst), OPTS, workers=2, progress=False)
        assert (dst / "list.txt").read_text().splitlines() == ["jump/a.mp4 0", "run/b.mp4 1", "run/c.mp4 1"]
        assert (dst / "classes.txt").read_text().splitlines() == ["0 jump", "1 run"]
        assert "same output" in r["failed"][str(src / "run" / "b.mp4")]
    assert len(open_video(str(dst / "run" / "b.mp4"))) == 8  # from b.avi, the first in scan order
    lst = tmp_path / "train.txt"
    lst.write_text("jump/a.mp4 0\n./jump/a.mp4 0\nrun/c.mkv 1\njump/a.mp4 0\n")
    prepare(str(src), str(tmp_path / "dst2"), OPTS, list_files=[str(lst)], workers=1, progress=False)
    assert (tmp_path / "dst2" / "train.txt").read_text().splitlines() == ["jump/a.mp4 0", "run/c.mp4 1"]


def test_list_mode_keeps_the_v2_format_and_writes_class_names(src, tmp_path):
    """A VideoMAE V2 pre-training list ('path 0 -1') stays one (was: rewritten as 'path -1'), and
    labelled lists in the class-folder layout get classes.txt (was: none in list mode)."""
    v2, train, val = tmp_path / "pre.txt", tmp_path / "train.txt", tmp_path / "val.txt"
    v2.write_text("jump/a.mp4 0 -1\nrun/c.mkv 0 -1\n")
    train.write_text("jump/a.mp4 0\nrun/b.mp4 1\n")
    val.write_text("run/c.mkv 1\n")
    dst = tmp_path / "dst"
    prepare(str(src), str(dst), OPTS, list_files=[str(v2), str(train), str(val)], workers=1, progress=False)
    assert (dst / "pre.txt").read_text().splitlines() == ["jump/a.mp4 0 -1", "run/c.mp4 0 -1"]
    assert read_list_file(str(dst / "pre.txt")).source_format == read_list_file(str(v2)).source_format
    assert (dst / "train.txt").read_text().splitlines() == ["jump/a.mp4 0", "run/b.mp4 1"]
    assert (dst / "classes.txt").read_text().splitlines() == ["0 jump", "1 run"]
    # Labels that do not follow the folders: no class names are invented.
    (tmp_path / "odd.txt").write_text("jump/a.mp4 1\nrun/b.mp4 0\nrun/c.mkv 0\njump/a.mp4 1\n")
    dst2 = tmp_path / "dst2"
    prepare(str(src), str(dst2), OPTS, list_files=[str(tmp_path / "odd.txt")], workers=1, progress=False)
    assert (dst2 / "classes.txt").read_text().splitlines() == ["0 run", "1 jump"]
    (tmp_path / "mixed.txt").write_text("jump/a.mp4 0\nrun/b.mp4 0\n")
    dst3 = tmp_path / "dst3"
    prepare(str(src), str(dst3), OPTS, list_files=[str(tmp_path / "mixed.txt")], workers=1, progress=False)
    assert not (dst3 / "classes.txt").exists()


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0 and out.startswith("usage: ")
    d = PrepareOptions()
    for shown in (
        f"(default {d.short_side})",
        f"(default {d.gop})",
        f"(default {d.crf})",
        f"(default {d.preset})",
        f"(default {d.tune})",
        "(default: all cores)",
    ):
        assert shown in out, shown


def test_progress_is_not_redrawn_into_a_pipe(src, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "mats_scale.launch.prepare", str(src), str(tmp_path / "dst")]
        + ["--short-side", "48", "--workers", "1"],
        capture_output=True,  # bytes: text mode would turn each \r into a newline
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert b"\r" not in r.stderr + r.stdout and b"3 encoded" in r.stdout


def test_a_file_name_that_is_not_utf8_round_trips_through_the_list(src, tmp_path, capsys):
    good = os.fsencode(src / "run") + b"/caf\xe9.avi"
    os.rename(write(src / "run" / "x.mp4", frames=8), good)
    bad = os.fsencode(src / "jump") + b"/bad\xff.mp4"
    with open(bad, "wb") as f:
        f.write(b"not a video\n" * 30)
    dst = tmp_path / "dst"
    for done in ("4 encoded, 0 already done", "0 encoded, 4 already done"):  # the rerun too
        assert main([str(src), str(dst), "--short-side", "48", "--workers", "1", "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert f"6 videos: {done}, 2 failed" in out and "bad\\xff.mp4" in out
    assert not [f for _, _, fs in os.walk(dst) for f in fs if f.endswith(".part")]
    items = read_list_file(str(dst / "list.txt"), root=str(dst))
    assert [os.fsencode(it.path) for it in items] == [
        os.fsencode(dst / "jump" / "a.mp4"),
        os.fsencode(dst / "run" / "b.mp4"),
        os.fsencode(dst / "run") + b"/c.mp4",
        os.fsencode(dst / "run") + b"/caf\xe9.mp4",
    ]
    assert all(os.path.isfile(it.path) for it in items) and [it.label for it in items] == [0, 1, 1, 1]
    assert len(open_video(items[-1].path)) == 8
    report = (dst / REPORT).read_bytes().splitlines()
    assert [line.split(b"\t")[0] for line in report] == [bad, os.fsencode(src / "run" / "broken.mp4")]


def one_error_line(capsys, dst):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: DST {dst}: ") and "DST must be a writable directory" in err[0]
    return err[0]


def test_an_unwritable_destination_is_one_error_line(src, tmp_path, capsys, monkeypatch):
    args = ["--short-side", "48", "--workers", "2", "--no-progress"]
    afile = tmp_path / "afile"
    afile.write_text("")
    dst = afile / "sub"  # under a regular file: NotADirectoryError
    assert main([str(src), str(dst), *args]) == 2
    assert "Not a directory" in one_error_line(capsys, dst)
    dst = tmp_path / "dst"
    (dst / "run").mkdir(parents=True)
    (dst / "run" / "b.mp4.part").mkdir()  # an output's file cannot be written (in a worker)
    assert main([str(src), str(dst), *args]) == 2
    assert "b.mp4.part" in one_error_line(capsys, dst) and not (dst / "list.txt").exists()
    os.rmdir(dst / "run" / "b.mp4.part")
    real_replace = os.replace

    def read_only(a, b):
        if str(b).endswith("list.txt"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(a))
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", read_only)  # the file system turns read-only before the lists
    assert main([str(src), str(dst), "--short-side", "48", "--workers", "1", "--no-progress"]) == 2
    assert "Read-only file system" in one_error_line(capsys, dst)
    monkeypatch.undo()
    if os.geteuid() != 0:  # root writes through chmod 0o555
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert main([str(src), str(ro / "dst"), *args]) == 2
        assert "Permission denied" in one_error_line(capsys, ro / "dst")


def test_a_stopped_pool_ends_even_when_the_parent_handles_sigterm(src, tmp_path):
    """Pool.terminate sends SIGTERM; a handler of the calling process (a Trainer run earlier in it) is
    forked into the workers and must not keep them alive. A hang fails through the timeout."""
    dst = tmp_path / "dst"
    (dst / "run").mkdir(parents=True)
    (dst / "run" / "b.mp4.part").mkdir()  # a worker fails: the pool is terminated early
    code = (
        "import signal, sys; signal.signal(signal.SIGTERM, lambda *_: None); "
        "from mats_scale.launch.prepare import main; sys.exit(main(sys.argv[1:]))"
    )
    args = [str(src), str(dst), "--short-side", "48", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 2 and "b.mp4.part" in err and "Traceback" not in err, err


@pytest.mark.integration
def test_ctrl_c_is_one_line_exit_130_and_the_rerun_completes(tmp_path):
    src = tmp_path / "src"
    for i in range(8):
        write(src / f"c{i % 2}" / f"v{i}.mp4", frames=60, height=240, width=320)
    dst = tmp_path / "dst"
    cmd = [sys.executable, "-m", "mats_scale.launch.prepare", str(src), str(dst), "--short-side", "240"]
    cmd += ["--preset", "medium", "--workers", "2", "--no-progress"]
    p = subprocess.Popen(  # SIGINT as a terminal's foreground job has it, also when the tests run in
        cmd,  # the background of a script (where the shell makes children ignore it)
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not [f for _, _, fs in os.walk(dst) for f in fs if f.endswith(".mp4.part")]:  # encoding
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the parent and its workers
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert re.fullmatch(r"interrupted: \d of 8 videos done; rerun the same command to resume", err.strip())
    assert not (dst / "list.txt").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = (dst / "list.txt").read_text().splitlines()
    assert lines == [f"c{i % 2}/v{i}.mp4 {i % 2}" for i in (0, 2, 4, 6, 1, 3, 5, 7)]
