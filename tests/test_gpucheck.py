"""mats-gpucheck's CPU-side pieces: refusal, the metrics -> row reduction, SDPA backend reading, the memory
prediction and the fit of the planner's constants, results.json / results.md (recorded inputs)."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mats_scale.config import load_config
from mats_scale.launch import gpucheck as launch
from mats_scale.models.sizes import SIZES
from mats_scale.profiling import gpucheck as gc
from mats_scale.profiling.feasibility import ENGINE_CHOICES, Node, max_micro_batch
from mats_scale.profiling.gpucheck_data import k400_like_frames, stall_row
from mats_scale.profiling.gpucheck_run import detect_sdpa_backend, register_reduced_size
from mats_scale.profiling.memory import GIB, ActivationModel, Allowance
from mats_scale.profiling.states import ModelStates

# Step records as metrics.jsonl holds them (a start event first, an end event last).
METRICS = [
    {"event": "start", "step": 0},
    *(
        {"step": i, "step_time_s": t, "data_time_s": d, "clips_per_s": 32 / t, "mfu": m, "data_wait": d / t}
        for i, (t, d, m) in enumerate(
            [(9.0, 0.5, 0.01), (0.50, 0.10, 0.2), (0.40, 0.00, 0.3), (0.44, 0.04, 0.25), (0.42, 0.02, 0.27)],
            1,
        )
    ),
    {"event": "end", "step": 5, "peak_mem_gib": 3.0},
]

# Memory rows as a GPU run would give them (GiB): allocated / reserved peaks, memory outside the allocator.
MEMORY = [
    {"max_allocated_gib": 10.0, "max_reserved_gib": 11.0, "outside_allocator_gib": 0.62, "ratio": 1.02},
    {"max_allocated_gib": 20.0, "max_reserved_gib": 23.0, "outside_allocator_gib": 0.71, "ratio": 0.97},
    {"max_allocated_gib": 5.0, "max_reserved_gib": 5.2, "outside_allocator_gib": 0.55, "ratio": 1.10},
]


# ---- the command ----------------------------------------------------------------------------------


def test_help_answers_without_torch():
    code = (
        "import contextlib, io, sys\n"
        "from mats_scale.launch import gpucheck\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    gpucheck.main(['--help'])\n"
        "sys.exit(('torch' in sys.modules) or 'results.json' not in out.getvalue())\n"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


def test_refuses_without_a_gpu_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.main(["--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0] and err[0].startswith("error: mats-gpucheck")
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()  # nothing started


def test_cuda_problem():
    assert launch.cuda_problem(True, 1) is None
    assert "NVIDIA GPU" in launch.cuda_problem(False, 0)
    assert launch.cuda_problem(True, 0) is not None  # CUDA built in, but no device


def test_cpu_device_only_as_dry_run(capsys):
    assert launch.main(["--device", "cpu"]) == 2
    assert "--tiny" in capsys.readouterr().err


@pytest.mark.integration
def test_runner_reports_a_failed_run_and_the_budget(tmp_path):
    """A subprocess per run (about 6 s: it imports torch)."""
    runner = launch.Runner(str(tmp_path), budget_s=600)
    assert runner("bad job", {"kind": "nonsense"}) is None
    (skip,) = runner.skipped
    assert skip["name"] == "bad job" and skip["reason"].startswith("exit 1:") and "nonsense" in skip["reason"]
    assert launch.Runner(str(tmp_path), budget_s=1)("late", {"kind": "env"}) is None  # budget used up


# ---- a run's metrics -> a row ---------------------------------------------------------------------


def test_step_records_keeps_steps_only():
    records = gc.step_records(json.dumps(r) + "\n" for r in METRICS)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]


def test_summarize_steps_medians_after_warmup():
    records = gc.step_records(json.dumps(r) for r in METRICS)
    row = gc.summarize_steps(records, batch=32, warmup=1)
    # device step = wall - data time: 0.40, 0.40, 0.40, 0.40 -> 0.40; wall median of 0.5, 0.4, 0.44, 0.42
    assert row["step_s"] == pytest.approx(0.40)
    assert row["wall_step_s"] == pytest.approx(0.43)
    assert row["clips_per_s"] == pytest.approx(80.0)
    assert row["steps_timed"] == 4
    # MFU of the logged (wall) rate scaled to the device step: 0.2 * 0.5 / 0.4 = 0.25, 0.3, 0.275, 0.283
    assert row["mfu"] == pytest.approx(statistics_median([0.25, 0.3, 0.275, 0.27 * 0.42 / 0.40]))
    assert row["data_wait"] == pytest.approx(statistics_median([0.2, 0.0, 0.04 / 0.44, 0.02 / 0.42]))
    with pytest.raises(ValueError, match="warm-up"):
        gc.summarize_steps(records, batch=32, warmup=5)


def statistics_median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def test_stall_row_reports_wall_rate_and_wait():
    p = gc.Point("stall B mats+dual k400-like", batch=32)
    row = stall_row(p, {"wall_step_s": 0.5, "step_s": 0.3, "data_wait": 0.4})
    assert (
        row["clips_per_s"] == pytest.approx(64.0)
        and row["data_wait"] == 0.4
        and row["dataset"] == "k400-like"
    )


# ---- what runs ------------------------------------------------------------------------------------


def test_points_cover_the_acceptance_matrix():
    steps = gc.step_points()
    assert {(p.model_size, p.preset, p.compile) for p in steps} == {
        (m, s, c)
        for m in ("B", f"g-{gc.G_DEPTH}blk")
        for s in ("tube+rc", "mats+dual")
        for c in (False, True)
    }
    mem = [
        p for p in steps if not p.compile and p.depth is None and p.preset == "tube+rc"
    ] + gc.memory_points()
    assert len(mem) >= 6
    assert {p.engine for p in mem} == {"none", "zero2", "zero3", "fsdp2"}
    assert {p.checkpoint_every for p in mem} == {0, 2}
    assert len({p.batch for p in mem}) >= 2
    assert all(p.planner_engine in ENGINE_CHOICES for p in mem)


def test_point_overrides_make_a_valid_config(tmp_path):
    for p in [*gc.step_points(), *gc.memory_points()]:
        if p.depth is not None:
            continue  # its size is registered by the run (test_reduced_size_is_full_width)
        cfg = load_config(None, p.overrides(str(tmp_path / "run")))
        assert (cfg.model.size, cfg.train.compile, cfg.data.batch_size) == (p.size, p.compile, p.batch)
        assert cfg.parallel.checkpoint_encoder_every == p.checkpoint_every


def test_reduced_size_is_full_width(tmp_path):
    p = next(p for p in gc.step_points() if p.depth is not None)
    register_reduced_size(p.model_size)
    try:
        cfg = load_config(None, p.overrides(str(tmp_path / "run")))
        assert cfg.model.arch.depth == gc.G_DEPTH
        assert cfg.model.arch.embed_dim == SIZES["g"].embed_dim and cfg.model.patch == 14
        assert gc.result_row(p, {"step_s": 1.0})["full_depth"] == SIZES["g"].depth
    finally:
        SIZES.pop(p.model_size)
    with pytest.raises(ValueError, match="blk"):
        register_reduced_size("g-four")


# ---- SDPA backend ---------------------------------------------------------------------------------


def test_sdpa_backend_from_recorded_op_names():
    assert gc.sdpa_backend(["aten::linear", "aten::_scaled_dot_product_flash_attention"]) == "flash"
    assert gc.sdpa_backend(["aten._scaled_dot_product_efficient_attention.default"]) == "efficient"
    assert gc.sdpa_backend(["aten::_scaled_dot_product_cudnn_attention", "aten::mm"]) == "cudnn"
    names = ["_scaled_dot_product_attention_math", "_scaled_dot_product_flash_attention"]
    assert gc.sdpa_backend(names) == "flash+math"
    assert gc.sdpa_backend(["aten::mm", "aten::softmax"]) == "none"
    # Two attention calls, one fused op: the other call decomposed (the math path).
    one_fused = ["aten::_scaled_dot_product_flash_attention", "aten::bmm"]
    assert gc.sdpa_backend(one_fused, calls=2) == "flash+math"
    assert gc.sdpa_backend(["aten::bmm", "aten::_softmax"], calls=1) == "math"


class Attention(torch.nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q)


def test_sdpa_backend_is_read_from_torch_not_assumed():
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    assert detect_sdpa_backend(Attention(), (q,)) == "cpu_flash"  # torch's CPU fused kernel
    with sdpa_kernel(SDPBackend.MATH):  # the same call, torch made to pick another kernel
        assert detect_sdpa_backend(Attention(), (q,)) == "math"


# ---- memory ----------------------------------------------------------------------------------------


def test_fit_allowance_covers_every_measured_run():
    fit = gc.fit_allowance(MEMORY)
    assert fit["cuda_context_gib"] == pytest.approx(0.71)
    assert fit["fragmentation"] == pytest.approx(0.15)  # 23 / 20 - 1, the largest share
    assert (fit["ratio_min"], fit["ratio_max"], fit["points"]) == (0.97, 1.10, 3)
    allowance = Allowance(fit["cuda_context_gib"], fit["fragmentation"])
    for r in MEMORY:  # what the planner adds on top of allocated covers what the GPU held
        need = (r["max_reserved_gib"] + r["outside_allocator_gib"]) * GIB
        assert r["max_allocated_gib"] * GIB + allowance.total(int(r["max_allocated_gib"] * GIB)) >= need - 1
    with pytest.raises(ValueError, match="no memory"):
        gc.fit_allowance([])


def test_fitted_constants_change_the_planners_batch():
    states = ModelStates(0, 0, 0, 0, 0, 0, 0)
    act = ActivationModel(0, 0, peak_per_clip=GIB, peak_const=0, input_per_clip=0)
    node = Node(1, 80.0, 989.0)
    fit = gc.fit_allowance(MEMORY)
    guessed = max_micro_batch(states, act, node, Allowance())
    fitted = max_micro_batch(states, act, node, Allowance(fit["cuda_context_gib"], fit["fragmentation"]))
    assert fitted < guessed  # 15 % fragmentation measured instead of the 10 % guess


def test_memory_row_ratio():
    p = gc.memory_points()[0]
    measured = {"max_allocated_gib": 6.0, "max_reserved_gib": 6.5, "outside_allocator_gib": 0.6}
    row = gc.memory_row(p, measured, {"predicted_gib": 5.0})
    assert row["ratio"] == pytest.approx(1.2) and row["engine"] == p.engine and row["batch"] == p.batch


def test_prediction_follows_engine_checkpointing_and_batch():
    base = gc.Point("m", size="debug", batch=8)

    def gib(**kw):
        return gc.predict_memory(gc.Point(**{**gc.asdict_point(base), **kw}))["predicted_gib"]

    assert gib(batch=16) > gib()
    assert gib(checkpoint_every=1) < gib()
    # The engine's model states enter (at dp = 1 nothing is sharded, but buffers and copies differ).
    assert len({gib(), gib(backend="deepspeed", zero_stage=3), gib(backend="fsdp2")}) == 3
    parts = gc.predict_memory(base)
    assert parts["predicted_gib"] >= parts["predicted_states_gib"]


# ---- results ---------------------------------------------------------------------------------------


def results(**kw):
    res = gc.Results("NVIDIA H100 80GB HBM3", "580.1", "2.14.1", "13.0", "bf16", "abc1234", date="2026-12-07")
    res.results = [
        gc.result_row(gc.step_points()[0], {"sdpa_backend": "flash", "step_s": 0.5, "clips_per_s": 64.0,
                                            "mfu": 0.41, "max_allocated_gib": 20.0})
    ]  # fmt: skip
    res.memory = [gc.memory_row(gc.memory_points()[0], MEMORY[0], {"predicted_gib": 9.8})]
    res.fit = gc.fit_allowance(res.memory)
    res.loader = [{"name": "loader", "dataset": "k400-like", "decoder": "pyav", "clips_per_s": 120.0}]
    res.skipped = [{"name": "loader k400-like nvdec", "reason": "PyNvVideoCodec is not installed"}]
    for k, v in kw.items():
        setattr(res, k, v)
    return res


def test_results_json_schema_and_markdown(tmp_path):
    json_path, md_path = gc.write_results(results(), str(tmp_path / "out"))
    with open(json_path) as f:
        data = json.load(f)
    for key, kind in dict(device=str, driver=str, torch=str, cuda=str, dtype=str, commit=str).items():
        assert isinstance(data[key], kind)
    for key in ("results", "memory", "loader"):
        assert isinstance(data[key], list) and data[key]
    row = data["results"][0]
    assert {"name", "model", "preset", "compile", "sdpa_backend", "step_s", "clips_per_s", "mfu"} <= set(row)
    assert row["max_reserved_gib"] is None  # not measured: present, null
    assert data["fit"]["cuda_context_gib"] == pytest.approx(0.62)
    with open(md_path) as f:
        md = f.read()
    assert "NVIDIA H100 80GB HBM3" in md and "commit abc1234" in md and "driver 580.1" in md
    assert "| B tube+rc | B | tube+rc | False | flash | 32 | 0.500 | 64.0 | 41.0% |" in md
    assert "PyNvVideoCodec is not installed" in md and "Dry run" not in md


def test_markdown_marks_the_dry_run_and_missing_values():
    md = gc.markdown(results(dry_run=True, results=[{"name": "x", "mfu": math.nan}], fit={}))
    assert "not a measurement" in md
    assert "| x | - | - | - | - | - | - | - | - | - | - |" in gc.markdown(
        results(results=gc.fill([{"name": "x", "mfu": math.nan}], gc.TABLE_KEYS["results"]))
    )


def test_device_dir_name():
    assert gc.device_dir_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gc.device_dir_name("  ") == "device"


def test_k400_like_frames_move():
    f = k400_like_frames(0, frames=6, height=32, width=48)
    assert f.shape == (6, 32, 48, 3) and f.dtype.name == "uint8"
    assert (f[1:].astype(int) - f[:-1]).__abs__().mean() > 5  # the camera pans: consecutive frames differ


@pytest.mark.integration
def test_dry_run_end_to_end(tmp_path, monkeypatch):
    """The whole pipeline on the CPU with the debug model (subprocess per run; about 60 s on 2 cores)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    assert launch.main(["--device", "cpu", "--tiny", "--out", str(out), "--cache", str(tmp_path / "c")]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["dry_run"] is True and data["device"] == "cpu"
    (step,) = data["results"]
    assert step["sdpa_backend"] == "cpu_flash" and step["step_s"] > 0 and step["preset"] == "tube+rc"
    assert {r["decoder"] for r in data["loader"] if r["name"] == "loader"} == {"decord", "pyav"}
    (stall,) = [r for r in data["loader"] if r["name"] == "data stall"]
    assert 0.0 <= stall["data_wait"] <= 1.0
    assert all(s["name"] == "loader bundled nvdec" for s in data["skipped"])  # without PyNvVideoCodec
