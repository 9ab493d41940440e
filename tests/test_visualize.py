"""The reconstruction picture (mats-visualize) on tiny pre-training runs: the rows show
exactly the tokens the masking chose, one block per checkpoint, and bad arguments are one line, exit 2."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from launch_util import ROOT, TINY, env
from PIL import Image

from mats_scale.config import load_config
from mats_scale.data import synth
from mats_scale.launch import visualize as viz
from mats_scale.launch.export import main as export_main
from mats_scale.launch.visualize import DIM, GAP, GREY, HEADER_H, LABEL_W, ROWS, main
from mats_scale.masking import TokenGrid, select_tokens, selection_counts
from mats_scale.train.loop import train

LOCAL = TINY + ["parallel.backend=none", "data.batch_size=2", "train.steps=2", "train.precision=fp32"]
SCALE = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-step runs: tube+rc (reference mode: zero-weight targets) and mats (embedding scores)."""
    out = {}
    for preset in ("tube+rc", "mats"):
        d = tmp_path_factory.mktemp(preset.replace("+", "_"))
        train(load_config(None, [*LOCAL, f"masking.preset={preset}", f"train.out_dir={d}"]))
        out[preset] = d
    return out


def cells(png, block: int = 0) -> np.ndarray:
    """The picture's cells of block `block`: (rows, T', H*SCALE, W*SCALE, 3) uint8, from the layout
    constants (labels and gaps cut away)."""
    img = np.asarray(Image.open(png).convert("RGB"))
    cfg = load_config(None, LOCAL)
    cols, cell = cfg.model.grid[0], cfg.model.img_size * SCALE
    top = block * (HEADER_H + len(ROWS) * (cell + GAP)) + HEADER_H
    return np.stack(
        [
            np.stack(
                [
                    img[top + r * (cell + GAP) :][:cell, LABEL_W + c * (cell + GAP) :][:, :cell]
                    for c in range(cols)
                ]
            )
            for r in range(len(ROWS))
        ]
    )


def patches(row: np.ndarray, grid: TokenGrid, p: int) -> np.ndarray:
    """(T', H, W, 3) -> (N, p*p*3) per token in flat-id order."""
    x = row.reshape(grid.t, grid.h, p, grid.w, p, 3).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(grid.num_tokens, -1).astype(np.int32)


def test_rows_show_exactly_the_tokens_the_masking_chose(runs, tmp_path, capsys):
    png = tmp_path / "tube_rc.png"
    assert main([str(runs["tube+rc"]), "--seed", "5", "--scale", str(SCALE), "--out", str(png)]) == 0
    stdout = capsys.readouterr().out
    cfg = load_config(None, [*LOCAL, "masking.preset=tube+rc"])
    grid, cell = TokenGrid.from_model(cfg.model), cfg.model.img_size * SCALE
    assert Image.open(png).size == (LABEL_W + grid.t * (cell + GAP), HEADER_H + len(ROWS) * (cell + GAP))

    # The same draw as PretrainTask.step with a generator seeded 5 (tube masking, then the cell phases).
    sel = select_tokens(cfg.masking, grid, 1, torch.Generator().manual_seed(5))
    visible = set(sel.visible_ids[0].tolist())
    scored = set(sel.target_ids[0][sel.target_weights[0] > 0].tolist())
    assert len(visible) == selection_counts(cfg.masking, grid)[0] and scored  # reference: some weights 0
    assert len(scored) < sel.target_ids.shape[1]

    inp, vis, tgt, rec = (patches(r, grid, cfg.model.patch * SCALE) for r in cells(png))
    for ids, row in ((visible, vis), (scored, tgt)):
        shown = [i for i in range(grid.num_tokens) if (row[i] == inp[i]).all() and not (row[i] == GREY).all()]
        grey = [i for i in range(grid.num_tokens) if (row[i] == GREY).all()]
        assert set(shown) == ids and set(grey) == set(range(grid.num_tokens)) - ids
    # Reconstruction: the dimmed input off the targets; the prediction painted on them.
    off = [i for i in range(grid.num_tokens) if i not in scored]
    assert np.abs(rec[off] - DIM * inp[off]).max() <= 1
    assert all(np.abs(rec[i] - DIM * inp[i]).max() > 1 for i in scored)
    m = re.search(r"tube\+rc step 2: loss ([\d.]+) on (\d+) target tokens; visible (\d+) / (\d+)", stdout)
    assert m, stdout
    assert (int(m[2]), int(m[3]), int(m[4])) == (len(scored), len(visible), grid.num_tokens)
    assert np.isfinite(float(m[1])) and f"wrote {png}" in stdout


@pytest.mark.integration
def test_two_checkpoints_give_two_blocks_from_the_command_line(runs, tmp_path):
    png = tmp_path / "both.png"
    args = [str(runs["tube+rc"]), "--ckpt", str(runs["mats"]), "--scale", str(SCALE), "--out", str(png)]
    proc = subprocess.run(
        [sys.executable, "-m", "mats_scale.launch.visualize", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(None, LOCAL)
    cell = cfg.model.img_size * SCALE
    assert Image.open(png).size[1] == 2 * (HEADER_H + len(ROWS) * (cell + GAP))
    # Blocks in command-line order, whether a checkpoint came positional or with --ckpt.
    assert proc.stdout.index("tube+rc step 2") < proc.stdout.index("mats step 2"), proc.stdout
    # Block 2 is the MATS checkpoint: its visible row shows the MATS count of visible tokens.
    grid = TokenGrid.from_model(cfg.model)
    inp, vis = (patches(r, grid, cfg.model.patch * SCALE) for r in cells(png, block=1)[:2])
    shown = sum(bool((vis[i] == inp[i]).all() and not (vis[i] == GREY).all()) for i in range(grid.num_tokens))
    mats = load_config(None, [*LOCAL, "masking.preset=mats"]).masking
    assert shown == selection_counts(mats, grid)[0]


def test_exported_weights_and_a_video_file(runs, tmp_path, capsys):
    pt, mp4 = tmp_path / "w.pt", tmp_path / "clip.mp4"
    assert export_main([str(runs["mats"]), str(pt)]) == 0
    frames, _ = synth.render_clip(synth.SynthParams(frames=8, height=64, width=80), "val", 0)
    synth.write_video(str(mp4), frames, fps=8)
    config = str(runs["mats"] / "config.yaml")
    png = tmp_path / "pt.png"
    assert main([str(pt), "--config", config, "--video", str(mp4), "--out", str(png)]) == 0
    assert "mats step ?" in capsys.readouterr().out and png.is_file()
    # A step_* directory directly (no --config needed: its meta records the config).
    step_dir = sorted((runs["mats"] / "checkpoints").glob("step_*"))[-1]
    assert main([str(step_dir), "--video", str(mp4), "--out", str(png)]) == 0
    assert f"mats step {int(step_dir.name[5:])}:" in capsys.readouterr().out


def test_help_documents_the_options_with_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "Example:" in out
    assert all(opt in out for opt in ("--video", "--index", "--seed", "--out", "--config", "--data-root"))


def _one_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_bad_arguments_are_one_line_and_exit_2(runs, tmp_path, capsys):
    run = str(runs["tube+rc"])
    out = ["--out", str(tmp_path / "x.png")]
    assert "no such file" in _one_error(capsys, [str(tmp_path / "missing"), *out])
    assert "no checkpoint" in _one_error(capsys, out)
    assert "existing directory" in _one_error(capsys, [run, "--out", str(tmp_path / "no" / "x.png")])
    assert "--index 99999" in _one_error(capsys, [run, "--index", "99999", *out])
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    assert "--video" in _one_error(capsys, [run, "--video", str(bad), *out])
    assert "--config" in _one_error(capsys, [str(runs["mats"] / "config.yaml"), *out])  # a file: no config
    classifier = tmp_path / "ft.pt"
    torch.save({"head.weight": torch.zeros(2, 2), "fc_norm.weight": torch.zeros(2)}, classifier)
    config = ["--config", str(runs["mats"] / "config.yaml")]
    assert "fine-tuned classifier" in _one_error(capsys, [str(classifier), *config, *out])
    assert "model.size" in _one_error(capsys, [run, "model.size=S", *out])  # weights of another size
    assert not (tmp_path / "x.png").exists()


def test_no_bundled_data_is_named_before_anything_is_generated(tmp_path, capsys):
    cfg = load_config(None, ["data.dataset=bundled", f"data.root={tmp_path / 'gone'}"])
    with pytest.raises(viz.UserError, match="no bundled dataset there"):
        viz.read_clip(cfg, None, 0, "val", 0)
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize("preset", ["tube+rc", "mats"])
def test_a_perfect_prediction_reconstructs_the_input_at_the_targets(runs, preset):
    """The de-normalisation (each target patch's own mean and std) and the painting positions: with the
    model's prediction replaced by its normalised target, the reconstruction row equals the input there."""
    cpu = torch.device("cpu")
    run = viz.load(str(runs[preset]), None, [], cpu)
    forward = run.model.forward
    run.model.forward = lambda *a: (lambda o: o._replace(pred=o.target))(forward(*a))
    batch, _ = viz.read_clip(run.cfg, None, 0, "val", 0)
    pic = viz.picture(run, batch, 0, cpu)
    assert run.model.norm_pix_loss  # the targets are normalised: the case that needs undoing
    grid = TokenGrid.from_model(run.cfg.model)
    inp, rec = (patches(r.permute(0, 2, 3, 1).numpy(), grid, run.cfg.model.patch) for r in pic.rows[[0, 3]])
    on = pic.loss_ids.tolist()
    off = [i for i in range(grid.num_tokens) if i not in on]
    assert np.abs(rec[on] - inp[on]).max() <= 1
    assert np.abs(rec[off] - DIM * inp[off]).max() <= 1 and inp[off].max() > 2  # dimmed, not just dark


def test_each_block_is_labelled_with_its_preset_and_context_share():
    masking = ["masking.strategy=mats", "masking.decoder=running_cell", "masking.decoder_mode=lean"]
    plain = viz.Loaded("a", load_config(None, masking), model=None, step=1000)
    ctx = viz.Loaded("b", load_config(None, [*masking, "masking.context_ratio=0.25"]), model=None, step=1000)
    tube = viz.Loaded("c", load_config(None, ["masking.strategy=tube", "masking.decoder=none"]), None, None)
    assert (plain.label, ctx.label) == ("mats+dual step 1000", "mats+dual + context 0.25 step 1000")
    assert tube.label == "tube step ?"
