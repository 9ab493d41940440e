"""The learning study (launchers/study.py): its smallest configuration end to end, reuse of finished runs,
bad study files."""

import csv
import subprocess
import sys

import pytest
from launch_util import ROOT, env, tail

from mats_scale.config import ConfigError
from mats_scale.data import synth
from mats_scale.experiments import study as st
from mats_scale.launch.study import study_path

STUDY = ROOT / "launchers" / "study.py"
# Two presets x two seeds (a spread needs two), a few steps per stage, tiny clips and a tiny dataset.
SMALLEST = [
    "presets=[tube,mats+dual]",
    "seeds=[0,1]",
    "pretrain.train.steps=3",
    "pretrain.train.save_every=3",
    "finetune.train.steps=2",
    "finetune.optim.warmup_steps=1",
    "common.model.num_frames=4",
    "common.model.img_size=64",
    "common.data.batch_size=2",
    "common.data.root=data",
    "common.data.eval_clips=1",
    "common.data.eval_crops=1",
]


def run_study(tmp_path, *args, timeout=400):
    return subprocess.run(
        [sys.executable, str(STUDY), "--out", "out", *SMALLEST, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=env(),
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The smallest study, run once (16 runs, two at a time)."""
    tmp = tmp_path_factory.mktemp("study")
    params = synth.SynthParams(num_train=4, num_val=2, seed=3, frames=16, height=96, width=128)
    synth.generate(str(tmp / "data"), params, workers=1, verbose=False)
    proc = run_study(tmp)
    return tmp, proc


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_smallest_study_runs_every_stage_and_writes_its_table(finished):
    tmp, proc = finished
    assert proc.returncode == 0, tail(proc)
    out = tmp / "out"
    for name in ("runs.csv", "summary.csv", "study.md", "study.png", "reconstruction.png"):
        assert (out / name).stat().st_size > 0
    for name in ("study.png", "reconstruction.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The reconstruction picture: one block per preset (the first seed's pre-training run).
    assert proc.stdout.count("(val video 0 ") == 2 and "mats+dual step 3" in proc.stdout
    rows = read_csv(out / "runs.csv")
    assert [(r["preset"], r["seed"]) for r in rows] == [
        (p, s) for p in ("tube", "mats+dual", "scratch") for s in ("0", "1")
    ]
    for r in rows:
        assert 0.0 <= float(r["finetune_top1"]) <= 1.0 and 0.0 <= float(r["probe_top1"]) <= 1.0
        assert float(r["finetune_cpu_s"]) > 0
        if r["preset"] != "scratch":
            assert float(r["pretrain_loss"]) > 0 and float(r["pretrain_cpu_s"]) > 0
            assert int(r["pretrain_clips"]) == 3 * 2  # steps x batch
    by = {r["preset"]: r for r in rows}
    # The profiler's step FLOPs: MATS + dual encodes and reconstructs fewer tokens than tube masking.
    assert float(by["mats+dual"]["train_gflops_per_clip"]) < float(by["tube"]["train_gflops_per_clip"])
    assert float(by["mats+dual"]["score_gmacs_per_clip"]) > 0 == float(by["tube"]["score_gmacs_per_clip"])
    assert float(by["scratch"]["pretrain_tflops"]) == 0
    summary = {s["preset"]: s for s in read_csv(out / "summary.csv")}
    assert float(summary["tube"]["compute_vs_reference"]) == 1.0
    ratio = float(by["mats+dual"]["pretrain_tflops"]) / float(by["tube"]["pretrain_tflops"])
    assert float(summary["mats+dual"]["compute_vs_reference"]) == pytest.approx(ratio)
    seeds = [float(r["finetune_top1"]) for r in rows if r["preset"] == "tube"]
    assert float(summary["tube"]["finetune_top1_mean"]) == pytest.approx(sum(seeds) / 2)
    md = (out / "study.md").read_text()
    assert "| preset |" in md and "## Verdicts" in md
    assert "mats+dual vs from scratch" in md and f"at {ratio:.2f}x its pre-training compute" in md
    assert "mats+dual vs tube: " in md and "target met: " in md


def test_each_run_is_the_launchers_run_of_its_preset_and_seed(finished):
    tmp, _ = finished
    jobs = st.plan(st.load_study(study_path("presets"), SMALLEST), str(tmp / "out"))
    assert len(jobs) == 2 * 2 * 3 + 2 * 2  # (pretrain, finetune, probe) per preset and seed; scratch x 2

    for job in jobs:
        assert st.job_record(job) is not None, job.name
        cfg = (tmp / job.run_dir / "config.yaml").read_text() if job.kind != "probe" else ""
        if job.kind == "pretrain":
            strategy = "tube" if job.preset == "tube" else "mats"
            assert f"strategy: {strategy}" in cfg and f"seed: {job.seed}" in cfg
            assert ("decoder: none" in cfg) == (job.preset == "tube")
        elif job.kind == "finetune" and job.preset != "scratch":
            assert f"pretrain-{job.preset}-s{job.seed}-" in cfg  # finetune.init: its own pre-training


def test_rerun_reuses_finished_runs_and_a_changed_stage_reruns_only_what_depends_on_it(finished):
    tmp, _ = finished
    again = run_study(tmp)
    assert again.returncode == 0, tail(again)
    assert "16 of 16 runs done before; 0 to run" in again.stdout and "started" not in again.stdout
    changed = run_study(tmp, "finetune.train.steps=1", "probe=false", "scratch=false")
    assert changed.returncode == 0, tail(changed)
    # Pre-training unchanged: its 4 runs are reused; the 4 fine-tunings are new runs.
    assert "4 of 8 runs done before; 4 to run" in changed.stdout
    assert changed.stdout.count("started") == 4 and "finetune-" in changed.stdout


def test_bad_study_arguments_are_one_line_and_exit_2(tmp_path):
    for args, expect in (
        (["presets=[tube,videomae]"], "'videomae' is not a masking preset"),
        (["seeds=[0,0]"], "seeds=[0, 0]: expected a list of distinct integers"),
        (["pretrain.train.stepz=3"], "train.stepz: unknown key; did you mean train.steps?"),
        (["--study", "nope"], "--study='nope': no such file, nor a shipped study"),
    ):
        proc = subprocess.run(
            [sys.executable, str(STUDY), "--dry-run", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env(),
        )
        assert proc.returncode == 2 and expect in proc.stderr, tail(proc)
        assert len(proc.stderr.strip().splitlines()) == 1
    empty = subprocess.run(
        [sys.executable, str(STUDY), "report", "--out", "nothing"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env(),
    )
    assert empty.returncode == 1 and "no finished run of this study yet" in empty.stderr, tail(empty)
    assert len(empty.stderr.strip().splitlines()) == 1 and not (tmp_path / "nothing").exists()
    with pytest.raises(ConfigError, match="unknown key"):
        st.load_study(study_path("presets"), ["colour=blue"])


def test_a_failed_run_is_reported_its_dependants_skipped_and_the_exit_status_is_1(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(STUDY), "--out", "out", "presets=[tube]", "seeds=[0]", "probe=false"]
        + ["scratch=false", "pretrain.train.device=cuda", "common.data.dataset=synthetic"]
        + ["common.model.num_frames=4", "common.model.img_size=64"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env(CUDA_VISIBLE_DEVICES=""),
    )
    assert proc.returncode == 1, tail(proc)
    assert "pretrain-tube-s0: FAILED (exit 1)" in proc.stdout
    assert "finetune-tube-s0: skipped (pretrain-tube-s0 did not finish)" in proc.stdout
    assert "2 run(s) did not finish" in proc.stderr and "Warning" not in proc.stderr
    (row,) = read_csv(tmp_path / "out" / "runs.csv")  # the report is still written, without results
    assert row["preset"] == "tube" and row["finetune_top1"] == "" and row["pretrain_loss"] == ""


def dry_run(tmp_path, *args):
    return subprocess.run(
        [sys.executable, str(STUDY), "--dry-run", "--out", "out", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env(),
    )


def test_a_variant_is_its_preset_plus_pretraining_overrides_under_its_own_label(tmp_path):
    proc = dry_run(tmp_path, "--study", "appearance_objects", "seeds=[0]")
    assert proc.returncode == 0, tail(proc)
    runs = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if line.startswith("["))
    names = [name.split("] ", 1)[1].split(" ")[0] for name in runs]
    assert names[:3] == ["pretrain-tube-s0", "pretrain-mats+dual-s0", "pretrain-mats+dual+ctx-s0"]
    assert {"finetune-mats+dual+ctx-s0", "probe-mats+dual+ctx-s0", "finetune-scratch-s0"} <= set(names)
    cmd = {name: runs[key] for name, key in zip(names, runs, strict=True)}
    ours, ctx = cmd["pretrain-mats+dual-s0"].split(), cmd["pretrain-mats+dual+ctx-s0"].split()
    # The variant's pre-training: the preset's command plus its override, in its own run directory.
    assert [a for a in ctx if not a.startswith("train.out_dir=")] == [
        *[a for a in ours if not a.startswith(("train.out_dir=", "train.seed="))],
        "masking.context_ratio=0.25",
        "train.seed=0",
    ]
    assert "masking.context_ratio" not in cmd["finetune-mats+dual+ctx-s0"]
    init = [a for a in cmd["finetune-mats+dual+ctx-s0"].split() if a.startswith("finetune.init=")]
    assert init == [f"finetune.init={[a for a in ctx if a.startswith('train.out_dir=')][0].split('=', 1)[1]}"]
    assert all("data.bundled=objects" in c for c in cmd.values())
    for other, task in (("appearance_scenes", "scenes"), ("motion_context", "motion")):
        shipped = dry_run(tmp_path, "--study", other, "seeds=[0]")
        assert shipped.returncode == 0 and "pretrain-mats+dual+ctx-s0" in shipped.stdout, tail(shipped)
        assert shipped.stdout.count(f"data.bundled={task}") == len(runs)


def test_a_bad_variant_is_one_line_and_exit_2(tmp_path):
    for args, expect in (
        (["variants.v.preset=videomae"], "variants.v: expected a mapping with a 'preset'"),
        (["variants.tube.preset=mats"], "variants.tube: the label is a preset's"),
        (["variants.v.preset=mats", "variants.v.masking.ratioo=0.5"], "masking.ratioo: unknown key"),
    ):
        proc = dry_run(tmp_path, *args)
        assert proc.returncode == 2 and expect in proc.stderr, tail(proc)
        assert len(proc.stderr.strip().splitlines()) == 1


def test_a_variant_of_mats_dual_gets_the_targets_verdict_and_one_against_its_preset():
    from mats_scale.experiments.study_report import summarize, verdicts

    def rows(label, top1, tflops):
        return [
            {"preset": label, "seed": s, "finetune_top1": t, "pretrain_tflops": tflops}
            for s, t in enumerate(top1)
        ]

    table = [
        *rows("tube", [0.30, 0.32, 0.34], 100.0),
        *rows("mats+dual", [0.40, 0.45, 0.50], 54.0),
        *rows("mats+dual+ctx", [0.60, 0.62, 0.64], 55.0),
        *rows("mats+ctx", [0.41, 0.50, 0.59], 55.0),
        *rows(st.SCRATCH, [0.30, 0.31, 0.32], None),
    ]
    lines = verdicts(summarize(table), {"mats+dual+ctx": "mats+dual", "mats+ctx": "mats"})
    assert any(v.startswith("mats+dual+ctx vs tube: top-1 0.620 vs 0.320") for v in lines)
    (vs_base,) = [v for v in lines if v.startswith("mats+dual+ctx vs mats+dual:")]
    assert vs_base.endswith("a difference beyond the seed noise: yes")
    assert not any(v.startswith("mats+ctx vs tube") for v in lines)  # not a mats+dual variant
    assert not [v for v in lines if v.startswith("mats+ctx vs mats:")]  # its preset was not run here
    one_seed = [r for r in table if r["seed"] == 0]
    (line,) = [
        v for v in verdicts(summarize(one_seed), {"mats+dual+ctx": "mats+dual"}) if "ctx vs mats+dual:" in v
    ]
    assert line.endswith("a difference beyond the seed noise: unknown (one seed)")
