import csv
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mats_scale.config import ModelConfig
from mats_scale.launch import flops as flops_cli
from mats_scale.profiling.flops import count_flops, train_flops
from mats_scale.profiling.workload import Workload, build_model, make_inputs, masking_config, model_inputs

# VideoMAE V2's GMACs per 16x224 clip, tube 90% (benchmarks/README.md), kept in one place.
DESIGN = flops_cli.DESIGN_TABLE


@pytest.mark.integration
@pytest.mark.parametrize("size,rho_d,paper", DESIGN)
def test_reproduces_videomae_v2_table_within_1_percent(size, rho_d, paper):
    masking = masking_config("tube" if rho_d is None else "tube+rc", 0.9, decoder_ratio=rho_d or 0.5)
    r = count_flops(Workload(ModelConfig(size=size), masking), with_train=False, with_elementwise=False)
    assert abs(r.ref_macs / 1e9 / paper - 1) <= 0.01
    # The papers' convention embeds every token; this code embeds only the visible ones.
    assert r.fwd_macs < r.ref_macs


@pytest.mark.integration
def test_mats_plus_dual_is_cheaper_than_mats_and_than_dual():
    model = ModelConfig(size="B")
    reports = {
        st: count_flops(Workload(model, masking_config(st, 0.9))) for st in ("tube+rc", "mats", "mats+dual")
    }
    for key in ("ref_macs", "step_macs", "train_flops"):
        values = {st: getattr(r, key) for st, r in reports.items()}
        assert values["mats+dual"] < values["mats"], key
        assert values["mats+dual"] < values["tube+rc"], key
    # MATS pays the score, forward only: the masking suite embeds the 7 tubelet differences of the 8
    # tubelets (7 x 196 patches) and one zero patch, less than the whole clip's 1568 patches.
    k, d = 3 * 2 * 16 * 16, 768
    assert reports["mats"].score_macs == (7 * 196 + 1) * k * d < 1568 * k * d
    assert reports["tube+rc"].score_macs == 0


def test_sdpa_handle_equals_explicit_attention_count():
    """fvcore drops aten::scaled_dot_product_attention; our handle must count what the explicit math
    path (two matmuls, counted by fvcore itself) counts."""
    masking = masking_config("tube+rc", 0.9)
    fused = count_flops(Workload(ModelConfig(size="S"), masking), with_train=False, with_elementwise=False)
    math = count_flops(
        Workload(ModelConfig(size="S", attn_impl="math"), masking), with_train=False, with_elementwise=False
    )
    assert fused.fwd_macs == math.fwd_macs
    assert fused.by_module == math.by_module


@pytest.mark.integration
def test_fvcore_agrees_with_flop_counter_mode_and_step_is_three_forwards():
    wl = Workload(ModelConfig(size="S"), masking_config("tube+rc", 0.9))
    r = count_flops(wl)
    # PyTorch's counter: 2 FLOPs per MAC, no layer norms.
    model = build_model(wl, "meta")
    video, sel = make_inputs(wl, "meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*model_inputs(video, sel))
    assert counter.get_total_flops() == 2 * (r.fwd_macs - r.layer_norm_macs)
    # Backward = 2 x forward for every GEMM and the attention, except the patch embedding whose input
    # (pixels) needs no gradient.
    assert r.train_flops == 3 * 2 * (r.fwd_macs - r.layer_norm_macs) - 2 * r.by_module["patch_embed"]
    # Full checkpointing recomputes every block once more: strictly between 1 and 4/3 of the step.
    full = train_flops(replace(wl, checkpoint=(1, 1)))
    assert r.train_flops < full < r.train_flops * 4 / 3


def test_skipped_ops_are_reported_and_small():
    r = count_flops(Workload(ModelConfig(size="B"), masking_config("tube+rc", 0.9)), with_train=False)
    assert "aten::gelu" in r.skipped_ops and "aten::add" in r.skipped_ops
    assert "aten::scaled_dot_product_attention" not in r.skipped_ops
    assert 0 < r.elementwise_ops < 0.01 * r.fwd_macs


@pytest.mark.integration
def test_cli_writes_csv_markdown_and_plot(tmp_path):
    argv = [
        "--sizes",
        "debug",
        "--ratios",
        "0.75,0.9",
        "--strategies",
        "tube+rc,mats+dual",
        "--num-frames",
        "8",
        "--img-size",
        "64",
        "--checkpoint",
        "none,full",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert flops_cli.main(argv) == 0
    with open(tmp_path / "flops.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert {r["strategy"] for r in rows} == {"tube+rc", "mats+dual"}
    assert all(int(r["train_flops_full"]) > int(r["train_flops"]) for r in rows)
    assert (tmp_path / "flops.md").read_text().count("| debug |") == 4
    assert (tmp_path / "flops.png").stat().st_size > 0


def test_cli_bad_input_is_one_clear_error(tmp_path, capsys):
    assert flops_cli.main(["--ratios", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --ratios: ratios '1.5'")
    assert "open interval (0, 1)" in err[0]
    # MATS cannot keep fewer tokens than the encoder sees: the config's own check, one line, exit 2.
    code = flops_cli.main(
        [
            "--sizes",
            "debug",
            "--ratios",
            "0.5",
            "--strategies",
            "mats",
            "--num-frames",
            "8",
            "--img-size",
            "64",
            "--out",
            str(tmp_path),
            "--no-progress",
        ],
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: masking.keep_ratio=")


@pytest.mark.integration
def test_cli_out_that_is_a_file_is_refused_before_counting(tmp_path, monkeypatch, capsys):
    import subprocess
    import sys
    from pathlib import Path

    import mats_scale.profiling.flops as flops_mod

    existing = tmp_path / "flops.csv"
    existing.write_text("keep me\n")
    monkeypatch.setattr(flops_mod, "count_flops", lambda *a, **k: pytest.fail("counted first"))
    for argv in (["--out", str(existing)], ["--design-table", "--out", str(existing / "sub")]):
        assert flops_cli.main([*argv, "--sizes", "debug", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --out={argv[-1]!r}: "), err
    assert existing.read_text() == "keep me\n"
    # The script itself: one line, exit 2, no traceback (was FileExistsError after the whole sweep).
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "profiling" / "flops_per_mask_ratio.py"), "--out", str(existing)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --out={str(existing)!r}: exists and is not a folder; "
        "--out is the folder the results are written into"
    ]
