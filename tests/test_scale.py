"""Long scale checks, opt-in: ``python -m pytest --run-slow tests/test_scale.py`` (about a minute on
the 2-core development CPU; skipped without --run-slow). CI runs the short versions of the same checks
in the other files: smaller models and inputs, a 60-step default job."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mats_scale.config import ModelConfig
from mats_scale.profiling.memory import measure_activations
from mats_scale.profiling.workload import Workload, masking_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("size,strategy", [("L", "mats+dual"), ("L", "tube+rc"), ("H", "mats+dual")])
def test_meta_memory_equals_a_real_cpu_run_at_full_input(size, strategy):
    """The profiler's activation figures are exact at the real input (16x224) for the big sizes too."""
    wl = Workload(ModelConfig(size=size), masking_config(strategy, 0.9), batch=1)
    meta = measure_activations(wl, device="meta", target="cpu")
    assert meta == measure_activations(wl, device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("size", ["B", "L"])
def test_full_clip_training_step_gives_every_parameter_a_gradient(size):
    from mats_scale.config import MaskingConfig
    from mats_scale.data.inmemory import moving_square_clips, normalize
    from mats_scale.masking import TokenGrid, embed_motion_scores, select_tokens
    from mats_scale.models.pretrain import build_pretrain_model

    cfg = ModelConfig(size=size)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg)
    g = torch.Generator().manual_seed(0)
    video = normalize(moving_square_clips(1, cfg.num_frames, cfg.img_size, g)[0])
    masking = MaskingConfig(strategy="mats", decoder="running_cell", decoder_mode="lean")
    sel = select_tokens(
        masking, TokenGrid.from_model(cfg), 1, g, embed_motion_scores(model.encoder.patch_embed, video)
    )
    out = model(video, *sel)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.slow
def test_full_default_job_loss_falls(tmp_path):
    """The whole bundled default job (1000 steps, one process here): the loss clearly falls."""
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launchers" / "pretrain.py"),
            "parallel.backend=none",
            f"train.out_dir={run}",
            "logging.progress_bar=false",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [
        json.loads(line)["loss"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert len(losses) == 1000
    assert statistics.mean(losses[-30:]) < 0.85 * statistics.mean(losses[:5])
