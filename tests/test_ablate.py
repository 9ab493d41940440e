"""Ablation sweeps (mats_scale.experiments): a real two-point grid end to end with its report, failures
recorded while the sweep goes on, resuming that skips finished points, refusing to mix rows into results
of another commit or configuration (unless --append), and throughput as a median over repeated runs with
its spread and the device it was timed on."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from mats_scale import cli as cli_mod
from mats_scale.config import ConfigError
from mats_scale.experiments import sweep as sweep_mod
from mats_scale.experiments.grid import expand, load_grid
from mats_scale.experiments.report import render
from mats_scale.experiments.sweep import load_results, sweep
from mats_scale.launch.ablate import main as ablate_main

TINY_BASE = {
    "model.size": "debug",
    "model.num_frames": 4,
    "model.img_size": 64,
    "data.dataset": "synthetic",
    "data.num_workers": 0,
    "data.batch_size": 2,
    "train.device": "cpu",
    "train.steps": 3,
    "parallel.backend": "none",
}


def _write_grid(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def two_point(tmp_path_factory):
    """The two-point debug grid, run for real once (one process each, the plain launcher)."""
    tmp = tmp_path_factory.mktemp("ablate")
    grid = _write_grid(
        tmp / "grid.yaml",
        name="two",
        base={**TINY_BASE, "masking.preset": "tube"},
        axes={"masking.ratio": [0.5, 0.75]},
        run={"launcher": "python", "warmup_steps": 1, "loss_window": 2, "time_limit_s": 240, "repeats": 2},
    )
    out = tmp / "out"
    assert ablate_main(["--grid", str(grid), "--out", str(out)]) == 0
    return grid, out


@pytest.mark.integration
def test_two_point_grid_runs_end_to_end_and_the_report_renders(two_point, capsys):
    grid, out = two_point
    records = load_results(str(out / "results.jsonl"))
    assert [r["status"] for r in records] == ["ok", "ok"], [r.get("error") for r in records]
    for rec, ratio in zip(records, (0.5, 0.75), strict=True):
        m = rec["measured"]
        assert rec["config"]["masking"]["ratio"] == ratio and rec["config"]["masking"]["strategy"] == "tube"
        assert m["steps"] == 3 and m["clips_per_s"] > 0 and m["step_time_s"] > 0 and m["peak_mem_gib"] > 0
        # Two real runs of the point, each in its own run directory: the median and its spread.
        assert m["repeats"] == 2 and len(m["clips_per_s_runs"]) == 2 and m["device"] == "cpu"
        assert m["clips_per_s_min"] <= m["clips_per_s"] <= m["clips_per_s_max"]
        assert all((out / "runs" / rec["key"] / f"run{i}" / "metrics.jsonl").is_file() for i in (1, 2))
        assert 0 < m["mfu"] < 1
        assert rec["predicted"]["per_rank_gib"] > 0 and rec["flops"]["train_gflops"] > 0
        # Tokens per clip measured in the run agree with the profiler's count for the same config.
        assert m["tokens_encoder_per_clip"] == rec["flops"]["tokens_encoder"]
        assert rec["git_commit"] and rec["versions"]["torch"]
    # Fewer visible tokens at the higher ratio: the counts follow the resolved configs.
    tokens = [r["measured"]["tokens_encoder_per_clip"] for r in records]
    assert tokens[1] < tokens[0]

    paths = render(str(out / "results.jsonl"))
    names = {Path(p).name for p in paths}
    assert {"two_report.md", "two_mask_ratio.png", "two_memory_check.png"} <= names
    md = (out / "two_report.md").read_text()
    assert "| masking.ratio |" in md and "model.size=debug" in md
    assert "**CPU timings.**" in md and "(2 runs)" in md and "| timed on |" in md
    assert all(Path(p).stat().st_size > 0 for p in paths)

    # Re-running skips both finished points: no new record, no new run.
    capsys.readouterr()
    assert ablate_main(["--grid", str(grid), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("done before (ok), skipped") == 2
    assert len(load_results(str(out / "results.jsonl"))) == 2


@pytest.mark.integration
def test_failures_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    # Stand-in runs (no torch start-up): exit 1 with an error line, a hang past the time limit, a
    # process killed by SIGKILL (what the kernel's OOM killer does); then a profiler-only point.
    behaviour = {
        "0.5": "import sys; print('error: boom at step 1', file=sys.stderr); sys.exit(1)",
        "0.75": "import time; time.sleep(60)",
        "0.8": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    }
    calls = []

    def fake_command(run, args):
        ratio = next(a.split("=")[1] for a in args if a.startswith("masking.ratio="))
        calls.append(ratio)
        return [sys.executable, "-c", behaviour[ratio]]

    monkeypatch.setattr(sweep_mod, "launch_command", fake_command)
    spec = {
        "name": "fail",
        "base": {**TINY_BASE, "masking.preset": "tube"},
        "axes": {"masking.ratio": [0.5, 0.75, 0.8, 0.9, 1.5]},
        "run": {"launcher": "python", "time_limit_s": 2},
        "measure": ["train"],
        "rules": [{"when": {"masking.ratio": 0.9}, "measure": ["memory", "feasibility"]}],
    }
    grid = expand(spec)
    out = tmp_path / "out"
    sweep(grid, str(out), echo=lambda s: None)
    recs = {r["point"]["masking.ratio"]: r for r in load_results(str(out / "results.jsonl"))}
    assert recs[0.5]["status"] == "error" and "boom at step 1" in recs[0.5]["error"]
    assert recs[0.75]["status"] == "timeout" and "time_limit_s=2" in recs[0.75]["error"]
    assert recs[0.8]["status"] == "oom"
    assert recs[1.5]["status"] == "config" and "masking.ratio" in recs[1.5]["error"]
    prof = recs[0.9]
    assert prof["status"] == "profiled" and "measured" not in prof
    assert prof["feasibility"]["max_batch"] > 0 and prof["predicted"]["per_rank_gib"] > 0
    assert calls == ["0.5", "0.75", "0.8"]

    # Resuming skips everything; --retry-failed re-runs only the runs that failed.
    sweep(grid, str(out), echo=lambda s: None)
    assert calls == ["0.5", "0.75", "0.8"]
    sweep(grid, str(out), retry_failed=True, echo=lambda s: None)
    assert calls[3:] == ["0.5", "0.75", "0.8"]
    assert len(render(str(out / "results.jsonl"))) >= 1  # a sweep of failures still renders its table


def test_grid_rules_presets_and_errors(tmp_path):
    grid = expand(
        {
            "config": "default",
            "axes": {"masking.preset": ["tube+rc", "mats+dual"], "run.nproc": [1, 2]},
            "rules": [{"when": {"run.nproc": 2}, "run": {"launcher": "deepspeed"}}],
        }
    )
    assert len(grid.points) == 4
    first = grid.points[0]
    # The preset brings its own fields over a base config that names a strategy.
    assert {"masking.preset=tube+rc", "masking.strategy=tube", "masking.decoder=running_cell"} <= set(
        first.overrides
    )
    assert [p.run["launcher"] for p in grid.points] == ["torchrun", "deepspeed", "torchrun", "deepspeed"]
    with pytest.raises(ConfigError, match="measure"):
        expand({"measure": ["speed"]})
    with pytest.raises(ConfigError, match="axes.model.size"):
        expand({"axes": {"model.size": "S"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("axes: {model.size: [S]}\nrunz: {}\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_grid(str(bad))
    assert ablate_main(["--grid", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.parametrize("name", ["mask_ratio", "strategy", "zero_stage", "model_size", "vitg_step"])
def test_shipped_grids_expand_and_validate(name):
    from mats_scale.experiments.sweep import resolve
    from mats_scale.launch.ablate import grid_path

    grid = load_grid(grid_path(name))
    assert grid.points
    for point in grid.points:
        resolve(point)  # every shipped point is a valid configuration
    assert json.dumps([p.overrides for p in grid.points])


@pytest.mark.slow
def test_vitg_real_step_against_the_planner(tmp_path):
    """One training step of the full ViT-g on 2 CPU processes under FSDP2 (shipped grid vitg_step):
    the process tree's peak RSS next to the planner's prediction. Needs ~20 GiB of free RAM (measured:
    18.1 GiB peak RSS for 17.6 GiB predicted, 2 min, profiling/results/ablations/vitg_step)."""
    import os

    from mats_scale.launch.ablate import grid_path

    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    if available < 20:
        pytest.skip(f"ViT-g step needs ~20 GiB of free RAM, {available:.1f} GiB available")
    out = tmp_path / "vitg"
    grid = load_grid(grid_path("vitg_step"))
    grid.points[0].run["repeats"] = 1  # a memory check: one run
    sweep(grid, str(out))
    (rec,) = load_results(str(out / "results.jsonl"))
    assert rec["status"] == "ok", rec.get("error")
    measured, predicted = rec["measured"]["peak_mem_gib"], rec["predicted"]["total_gib"]
    print(
        f"ViT-g step on 2 CPU processes (FSDP2): peak RSS {measured:.2f} GiB, predicted {predicted:.2f} GiB"
    )
    # The profiler counts tensors only; the processes also hold the interpreter and libraries.
    assert predicted <= measured <= predicted + 4.0


def test_peak_memory_includes_the_last_optimizer_step(tmp_path):
    """The step records' peak is read before each optimizer step; the run's "end" record (after the last
    step, e.g. the first AdamW update of a one-step ViT-g run) is part of the measured peak."""
    path = tmp_path / "metrics.jsonl"
    records = [
        {"event": "start", "step": 0, "device": "cpu", "total_batch": 2, "world_size": 2},
        {
            "step": 1,
            "loss": 1.0,
            "clips_per_s": 1.0,
            "step_time_s": 2.0,
            "peak_mem_gib": 3.0,
            "peak_mem_sum_gib": 6.0,
            "tokens_encoder": 2,
            "tokens_decoder": 4,
        },
        {"event": "end", "at_step": 1, "peak_mem_gib": 5.0, "peak_mem_sum_gib": 10.0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = sweep_mod.summarize_metrics(str(path), 0, 1)
    assert out["steps"] == 1 and out["peak_mem_gib"] == 10.0
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:2]))  # a run killed before its end
    assert sweep_mod.summarize_metrics(str(path), 0, 1)["peak_mem_gib"] == 6.0


def test_an_unwritable_out_is_one_line_before_the_sweep(tmp_path, monkeypatch, capsys):
    # A destination under a regular file, from the command line: one line naming --out, exit 2.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "launchers" / "ablate.py"), "--grid", "mask_ratio"]
        + ["--out", str(blocker / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: --out {blocker / 'out'}: {blocker} is not a folder"
    )

    # A read-only file system (tests run as root, where chmod does not stop writes): nothing runs.
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cli_mod, "tempfile", types.SimpleNamespace(TemporaryFile=read_only))
    monkeypatch.setattr(sweep_mod, "sweep", lambda *a, **k: pytest.fail("the sweep started"))
    out = tmp_path / "ro"
    assert ablate_main(["--grid", "mask_ratio", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: --out {out}: cannot write there (Read-only file system); "
        "it is the folder the results are written into"
    ]

    # The report: its --out, and by default the results' own folder.
    results = tmp_path / "results.jsonl"
    results.write_text("")
    assert ablate_main(["report", str(results), "--out", str(blocker / "rep")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {blocker / 'rep'}: {blocker} is not a folder")
    assert ablate_main(["report", str(results)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path} (the results' folder; pass --out DIR): ")


# ---- results of another commit or configuration; repeated runs and their spread ------------------


def _metrics(clips_per_s: float) -> str:
    """A metrics.jsonl of one CPU run with one timed step at `clips_per_s`."""
    step = {"step": 1, "loss": 1.0, "clips_per_s": clips_per_s, "step_time_s": 2 / clips_per_s}
    step.update(peak_mem_gib=1.0, peak_mem_sum_gib=1.0, tokens_encoder=8, tokens_decoder=16)
    start = {"event": "start", "step": 0, "device": "cpu", "total_batch": 2, "world_size": 1}
    return "".join(json.dumps(r) + "\n" for r in (start, step))


@pytest.fixture
def fake_runs(monkeypatch):
    """Stand-in training runs (no torch start-up): each writes a metrics.jsonl into its train.out_dir with
    the next clips/s of its masking.ratio from `speeds` (the last one again when one is left); `calls`
    lists (ratio, run directory)."""
    speeds: dict[str, list[float]] = {}
    calls: list[tuple[str, str]] = []

    def fake_command(run, args):
        opts = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("--"))
        ratio, out = opts["masking.ratio"], opts["train.out_dir"]
        calls.append((ratio, out))
        text = _metrics(speeds[ratio].pop(0) if len(speeds[ratio]) > 1 else speeds[ratio][0])
        return [sys.executable, "-c", f"open({out + '/metrics.jsonl'!r}, 'w').write({text!r})"]

    monkeypatch.setattr(sweep_mod, "launch_command", fake_command)
    return speeds, calls


def _fake_grid(path: Path, repeats: int | None = None, **base) -> Path:
    run = {"launcher": "python", "warmup_steps": 0, **({"repeats": repeats} if repeats else {})}
    return _write_grid(
        path,
        name="mix",
        base={**TINY_BASE, "masking.preset": "tube", **base},
        axes={"masking.ratio": [0.5, 0.75]},
        run=run,
        measure=["train"],
    )


def test_a_sweep_never_appends_to_results_of_another_config_or_commit(
    tmp_path, fake_runs, capsys, monkeypatch
):
    speeds, calls = fake_runs
    prov = {"git_commit": "a" * 40, "versions": {"torch": "x"}, "host": {"cpus": 2}}
    monkeypatch.setattr(sweep_mod, "provenance", lambda: dict(prov))
    speeds.update({"0.5": [1.0], "0.75": [2.0]})  # every run of a point (3 by default) at the same speed
    out, results = tmp_path / "out", tmp_path / "out" / "results.jsonl"
    grid = _fake_grid(tmp_path / "g.yaml")
    assert ablate_main(["--grid", str(grid), "--out", str(out)]) == 0
    assert len(load_results(str(results))) == 2 and len(calls) == 6
    # The same grid at the same commit resumes: both points done, nothing appended.
    assert ablate_main(["--grid", str(grid), "--out", str(out)]) == 0
    assert len(load_results(str(results))) == 2 and len(calls) == 6

    # Another configuration of the same points (as after a change of the config's defaults): one line,
    # exit 2, nothing runs and the results file is untouched.
    before = results.read_text()
    changed = _fake_grid(tmp_path / "g2.yaml", **{"train.steps": 4})
    capsys.readouterr()
    assert ablate_main(["--grid", str(changed), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(
        f"error: {results}: holds 2 rows of these points made at this commit with another "
    )
    assert "differs in train.steps" in line and "new --out" in line and "--append" in line
    assert results.read_text() == before and len(calls) == 6 and captured.out == ""

    # --append adds the new rows, labelled; the report keeps the newest row of each point and says so.
    speeds.update({"0.5": [1.5], "0.75": [2.5]})
    assert ablate_main(["--grid", str(changed), "--out", str(out), "--append"]) == 0
    records = load_results(str(results))
    assert len(records) == 4 and [r.get("appended") for r in records] == [None, None, True, True]
    assert len({r["session"] for r in records}) == 2
    render(str(results))
    md = (out / "mix_report.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| 0.")]
    assert len(table) == 2 and "1.50" in table[0] and "2.50" in table[1]  # the newest clips/s
    assert "2 older rows of these points left out" in md

    # Another commit, same configuration: done points are still skipped ...
    fresh = tmp_path / "fresh"
    speeds.update({"0.5": [1.0], "0.75": [2.0], "0.8": [3.0]})
    assert ablate_main(["--grid", str(changed), "--out", str(fresh)]) == 0
    prov["git_commit"] = "f" * 40 + "+dirty"
    assert ablate_main(["--grid", str(changed), "--out", str(fresh)]) == 0
    # ... but a new point is not appended to them without --append.
    spec = yaml.safe_load(changed.read_text())
    spec["axes"]["masking.ratio"].append(0.8)
    _write_grid(changed, **spec)
    capsys.readouterr()
    assert ablate_main(["--grid", str(changed), "--out", str(fresh)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"holds 2 rows made at commit {'a' * 12} (this is {'f' * 12}+dirty)" in line
    assert len(load_results(str(fresh / "results.jsonl"))) == 2 and len(calls) == 18


def test_repeated_runs_give_a_median_and_spread_and_the_report_marks_cpu_timings(tmp_path, fake_runs):
    speeds, calls = fake_runs
    speeds.update({"0.5": [1.0, 3.0, 2.0], "0.75": [2.5, 2.6, 2.4]})
    out = tmp_path / "out"
    sweep(load_grid(str(_fake_grid(tmp_path / "g.yaml", repeats=3))), str(out), echo=lambda s: None)
    first, second = load_results(str(out / "results.jsonl"))
    m = first["measured"]
    assert m["repeats"] == 3 and m["clips_per_s_runs"] == [1.0, 3.0, 2.0]
    assert (m["clips_per_s"], m["clips_per_s_min"], m["clips_per_s_max"]) == (2.0, 1.0, 3.0)
    assert m["step_time_s"] == 1.0  # the median of the runs' 2.0, 0.667 and 1.0 s
    assert len({d for _, d in calls}) == 6  # every run in a fresh directory
    assert second["measured"]["clips_per_s"] == 2.5

    render(str(out / "results.jsonl"))
    md = (out / "mix_report.md").read_text()
    assert "| 1.00-3.00 (3 runs) | CPU (" in md and "| timed on | train GFLOPs/clip |" in md
    assert "**CPU timings.** 2 of 2 timed points ran on a CPU" in md
    # 2.4-2.6 lies inside 1.0-3.0: the two points' order is not resolved by these timings.
    assert "**Spread.** 1 of 1 pairs of timed points differ by less than their runs' spread" in md
    assert "not resolved" in md and "the widest spread is 100% of its median" in md


def test_the_report_of_gpu_timings_apart_and_of_single_runs(tmp_path):
    """Hand-made records: GPU runs whose ranges are apart have no CPU note and a resolved order; an old
    single run says it has no spread."""

    def record(ratio, clips, lo, hi, repeats, device="cuda:0"):
        measured = {"steps": 3, "device": device, "clips_per_s": clips, "peak_mem_gib": 1.0}
        measured.update(repeats=repeats, clips_per_s_min=lo, clips_per_s_max=hi, step_time_s=1.0)
        measured.update(tokens_encoder_per_clip=8, tokens_decoder_per_clip=16)
        host = {"cpus": 16, "gpu": "NVIDIA H100", "gpus": 1}
        return {"grid": "g", "point": {"masking.ratio": ratio}, "key": str(ratio), "status": "ok"} | {
            "measured": measured,
            "host": host,
            "git_commit": "a" * 40,
        }

    results = tmp_path / "results.jsonl"
    older = {**record(0.5, 30.0, 29.0, 31.0, 3), "key": "old", "git_commit": "b" * 40}  # another config
    rows = [older, record(0.5, 10.0, 9.5, 10.5, 3), record(0.75, 12.0, 11.0, 13.0, 3)]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = Path(render(str(results))[0]).read_text()
    # One row per point, the newest; the older one is counted and named by its commit.
    assert [ln.split(" | ")[0] for ln in md.splitlines() if "| ok |" in ln] == ["| 0.50", "| 0.75"]
    assert "1 older row of these points left out, made at commit bbbbbbbbbbbb." in md
    assert "| commit |" not in md  # the rows shown are all from one commit
    assert "| 9.50-10.50 (3 runs) | NVIDIA H100 |" in md and "CPU timings" not in md
    assert "0 of 1 pairs" in md and "every order is resolved" in md and "No spread" not in md
    rows.append(record(0.9, 1.0, None, None, 1, device="cpu"))
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = Path(render(str(results))[0]).read_text()
    assert "**No spread** for 1 of 3 timed points" in md and "**CPU timings.** 1 of 3" in md
    assert "| - (1 run) | CPU (16 cores) |" in md


def test_repeats_must_be_a_whole_number(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"run.repeats=0: must be a whole number >= 1"):
        expand({"run": {"repeats": 0}})
    with pytest.raises(ConfigError, match=r"run.repeats=1.5"):
        expand({"run": {"repeats": 1.5}})
    assert ablate_main(["--grid", "mask_ratio", "--repeats", "0", "--dry-run"]) == 2
    assert (
        capsys.readouterr().err.strip() == "error: --repeats 0: must be a whole number >= 1 (runs per point)"
    )
    assert ablate_main(["--grid", "mask_ratio", "--repeats", "5", "--dry-run"]) == 0
    assert capsys.readouterr().out.count(", 5 runs;") == 12
