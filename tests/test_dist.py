"""Distributed engines on 2 CPU processes (gloo, fp32) against a single-process run.

Each module-scoped fixture launches one torchrun job (or a short sequence of them) and several tests
assert on what it wrote, so process start-up is paid once per scenario.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys

import pytest
import torch
from dist_parity_worker import BF16_CASES, CASES, SAVE
from launch_util import (
    PRETRAIN,
    ROOT,
    TINY,
    env,
    free_port,
    metric_runs,
    pretrain,
    same_float,
    tail,
    torchrun,
)

from mats_scale.parallel.engine import consolidate_checkpoint
from mats_scale.train.export import export

pytestmark = pytest.mark.dist


# ---- parity of every engine with one process -----------------------------------------------------
@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    proc = torchrun(2, [ROOT / "tests" / "dist_parity_worker.py", out])
    assert proc.returncode == 0, tail(proc)
    results = torch.load(out / "results.pt", weights_only=False)
    rank1 = {name: torch.load(out / f"{name}.rank1_scores.pt") for name in CASES}
    return out, results, rank1


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("name", list(CASES))
def test_engine_matches_single_process_run(parity, name):
    _, results, _ = parity
    rec, ref = results[name], results["reference"]
    assert _max_diff(rec["init"], ref["init"]) == 0.0  # same weights from the same seed, sharded or not
    moved = _max_diff(ref["final"], ref["init"])
    assert moved > 1e-3  # the steps changed the weights ...
    assert _max_diff(rec["final"], ref["final"]) < 1e-5  # ... identically up to fp32 reduction order


@pytest.mark.parametrize("name", list(BF16_CASES))
def test_bf16_engines_keep_fp32_masters_close_to_the_fp32_run(parity, name):
    _, results, _ = parity
    rec, ref = results[name], results["reference"]
    assert all(v.dtype == torch.float32 for v in rec["final"].values())
    assert _max_diff(rec["init"], ref["init"]) == 0.0

    def update(r):  # all parameter changes of the run as one vector
        return torch.cat([(r["final"][k] - r["init"][k]).flatten() for k in sorted(r["init"])])

    ours, fp32 = update(rec), update(ref)
    assert (ours - fp32).norm() < 0.1 * fp32.norm()  # bf16 compute: same updates within 10% (fp32: 1e-6)
    assert rec["applied"] == [True, True, True, False, True]


@pytest.mark.parametrize("name", list(CASES))
def test_nonfinite_loss_on_one_rank_skips_the_update_everywhere(parity, name):
    _, results, _ = parity
    rec = results[name]
    assert rec["applied"] == [True, True, True, False, True]
    assert _max_diff(rec["before_nan"], rec["after_nan"]) == 0.0  # parameters untouched by the skipped step
    # ... and the optimizer state too: the step after it still matches the reference (checked above).


@pytest.mark.parametrize("name", list(CASES))
def test_motion_scores_through_the_sharded_patch_embedding(parity, name):
    _, results, rank1 = parity
    ref = results["reference"]
    for key in ("scores_init", "scores_final"):
        scores = torch.cat([results[name][key], rank1[name][key]])
        torch.testing.assert_close(scores, ref[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [*CASES, *BF16_CASES, "reference"])
def test_every_engine_satisfies_the_engine_protocol(parity, name):
    rec = parity[1][name]
    kind = "none" if name == "reference" else "fsdp2" if name.startswith("fsdp2") else "deepspeed"
    assert rec["is_engine"] and rec["kind"] == kind


@pytest.mark.parametrize("name", sorted(SAVE))
def test_sharded_checkpoint_consolidates_to_the_trained_weights(parity, name):
    out, results, _ = parity
    sd = consolidate_checkpoint(results[name]["kind"], str(out / name / "engine"))
    assert _max_diff(sd, results[name]["final"]) == 0.0


# ---- ZeRO-3, MATS + dual masking: SIGKILL, crash during a save, resume -----------------------------
RESUME = TINY + [
    "parallel.backend=deepspeed",
    "parallel.zero_stage=3",
    "model.drop_path=0.1",
    "masking.strategy=mats",
    "masking.ratio=0.75",
    "masking.keep_ratio=0.5",
    "masking.decoder=running_cell",
    "masking.decoder_mode=lean",
    "data.batch_size=1",
    "optim.grad_accum=2",
    "optim.clip_grad=0.05",
    "train.steps=8",
    "train.save_every=2",
    "train.keep_last=2",
    "logging.log_every=1",
]
NAN_STEP = 3


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    a, b = base / "uninterrupted", base / "interrupted"
    nan = {"MATS_FAULT_NAN_STEPS": str(NAN_STEP)}
    runs = {
        "A": pretrain(2, RESUME + [f"train.out_dir={a}"], **nan),
        "B": pretrain(2, RESUME + [f"train.out_dir={b}"], MATS_FAULT_KILL_AFTER_STEP="5", **nan),
    }
    after_b = sorted(p.name for p in (b / "checkpoints").iterdir())
    runs["C"] = pretrain(2, RESUME + [f"train.out_dir={b}"], MATS_FAULT_CRASH_IN_SAVE="6", **nan)
    after_c = sorted(p.name for p in (b / "checkpoints").iterdir())
    pointer_c = (b / "checkpoints" / "latest").read_text()
    runs["D"] = pretrain(2, RESUME + [f"train.out_dir={b}"], **nan)
    after_d = sorted(p.name for p in (b / "checkpoints").iterdir())
    # The newest checkpoint damaged afterwards (a ZeRO optimizer shard cut short): E falls back to step 6.
    shard = b / "checkpoints" / "step_00000008" / "engine" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    damaged_size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(damaged_size // 2)
    runs["E"] = pretrain(
        2, RESUME + [f"train.out_dir={b}", "train.steps=10", "train.allow_changes=[train.steps]"], **nan
    )
    return {
        "a": a,
        "b": b,
        "runs": runs,
        "after_b": after_b,
        "after_c": after_c,
        "pointer_c": pointer_c,
        "after_d": after_d,
        "damaged_size": damaged_size,
    }


def test_uninterrupted_run_keeps_the_last_checkpoints(resumed):
    assert resumed["runs"]["A"].returncode == 0, tail(resumed["runs"]["A"])
    ckpts = resumed["a"] / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000006", "step_00000008"]
    assert (ckpts / "latest").read_text() == "step_00000008"
    meta = json.loads((ckpts / "step_00000008" / "meta.json").read_text())
    assert meta["step"] == 8 and meta["engine"] == "deepspeed-zero3" and meta["world_size"] == 2


def test_nonfinite_step_is_skipped_counted_and_logged(resumed):
    steps = metric_runs(resumed["a"])[0]["steps"]
    assert [s for s, r in steps.items() if not r["applied"]] == [NAN_STEP]
    assert math.isnan(steps[NAN_STEP]["loss"])  # a skipped step logs NaN (rank 0 had it)
    assert steps[8]["skipped_steps"] == 1 and all(math.isfinite(steps[s]["loss"]) for s in (4, 5, 8))
    assert (
        f"step {NAN_STEP}: non-finite loss in 2 of 4 micro-batches; update skipped"
        in (resumed["a"] / "train.log").read_text()
    )


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(resumed):
    runs = resumed["runs"]
    assert runs["B"].returncode != 0 and "step_00000004" in resumed["after_b"]
    assert runs["D"].returncode == 0, tail(runs["D"])
    ref = metric_runs(resumed["a"])[0]["steps"]
    b_run, c_run, d_run, e_run = metric_runs(resumed["b"])
    # B was killed after step 5, whose checkpoint was never written; C crashed while saving step 6.
    # Each resume (from step 4) dropped the records of the steps it runs again: one record per step.
    assert c_run["start"]["resumed_from"].endswith("step_00000004") and c_run["start"]["dropped_steps"] == 1
    assert d_run["start"]["resumed_from"].endswith("step_00000004") and d_run["start"]["dropped_steps"] == 2
    # E fell back from the damaged step 8 to step 6 and dropped D's records of steps 7 and 8.
    assert e_run["start"]["resumed_from"].endswith("step_00000006") and e_run["start"]["dropped_steps"] == 2
    assert [sorted(r["steps"]) for r in (b_run, c_run, d_run, e_run)] == [
        [1, 2, 3, 4],
        [],
        [5, 6],
        [7, 8, 9, 10],
    ]
    for run in (b_run, c_run, d_run):
        for step, rec in run["steps"].items():
            for key in ("loss", "grad_norm", "lr", "tokens_encoder", "tokens_decoder"):
                assert same_float(rec[key], ref[step][key]), (step, key, rec[key], ref[step][key])
    assert sorted(d_run["steps"]) == [5, 6]  # E (after the damage) dropped D's records of steps 7 and 8


def test_crash_during_a_save_leaves_the_previous_checkpoint(resumed):
    assert resumed["runs"]["C"].returncode != 0
    assert resumed["pointer_c"] == "step_00000004"
    assert ".tmp-step_00000006" in resumed["after_c"] and "step_00000006" not in resumed["after_c"]
    # The next save cleaned up the half-written directory.
    assert resumed["after_d"] == ["latest", "step_00000006", "step_00000008"]


def test_exported_weights_of_the_resumed_run_equal_the_uninterrupted_ones(resumed, tmp_path):
    a = export(str(resumed["a"]), str(tmp_path / "a.pt"))
    d = export(str(resumed["b"] / "checkpoints" / "step_00000008"), str(tmp_path / "d.pt"))
    assert a.keys() == d.keys() and all(torch.equal(a[k], d[k]) for k in a)
    assert torch.load(tmp_path / "d.pt").keys() == d.keys()


def test_zero3_resume_falls_back_from_a_damaged_checkpoint_and_keeps_it(resumed):
    proc = resumed["runs"]["E"]
    assert proc.returncode == 0, tail(proc)
    half = resumed["damaged_size"] // 2
    assert (
        f"step_00000008 is damaged: engine/zero_pp_rank_1_mp_rank_00_optim_states.pt has {half} bytes, "
        f"{resumed['damaged_size']} were written; skipped (kept on disk)"
    ) in proc.stdout
    assert "resuming from step_00000006, the newest checkpoint that verifies" in proc.stdout
    e_run = metric_runs(resumed["b"])[-1]
    assert e_run["start"]["resumed_from"].endswith("step_00000006")
    assert sorted(e_run["steps"]) == [7, 8, 9, 10]
    ref = metric_runs(resumed["a"])[0]["steps"]
    for step in (7, 8):  # exactly the uninterrupted run's steps
        assert same_float(e_run["steps"][step]["loss"], ref[step]["loss"]), step
    names = sorted(p.name for p in (resumed["b"] / "checkpoints").iterdir())
    assert names == ["latest", "step_00000008", "step_00000008.damaged-1", "step_00000010"]
    kept = resumed["b"] / "checkpoints" / "step_00000008.damaged-1" / "engine"
    assert (kept / "zero_pp_rank_1_mp_rank_00_optim_states.pt").stat().st_size == half  # untouched


# ---- a rank that dies: the survivor says which, a rerun resumes (FSDP2, past a damaged checkpoint) ----
DEAD = TINY + [
    "parallel.backend=fsdp2",
    "data.batch_size=2",
    "data.num_workers=2",
    "train.save_every=2",
    "logging.log_every=1",
    "parallel.timeout_s=60",
]


def _launch_by_hand(nproc: int, overrides: list[str], timeout: int, **extra_env: str) -> list:
    """Ranks started directly (as srun or a hand-written launcher would): no agent kills the survivor,
    so what it notices by itself is what the test sees."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        e = env(**extra_env)
        e.update(
            RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(PRETRAIN), *overrides],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=e,
            )
        )
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [
        subprocess.CompletedProcess(p.args, p.returncode, out, err)
        for p, (out, err) in zip(procs, outs, strict=True)
    ]


@pytest.fixture(scope="module")
def dead_rank(tmp_path_factory):
    run = tmp_path_factory.mktemp("dead") / "run"
    first = _launch_by_hand(
        2,
        DEAD + ["train.steps=40", f"train.out_dir={run}"],
        timeout=300,
        MATS_FAULT_KILL_AFTER_STEP="5",
        MATS_FAULT_KILL_RANK="1",
    )
    after = sorted(p.name for p in (run / "checkpoints").iterdir())
    killed_steps = metric_runs(run)[0]["steps"]  # the rerun drops the records of the steps it runs again
    (run / "checkpoints" / "step_00000004" / "meta.json").write_text("{garbage")
    rerun = pretrain(2, DEAD + ["train.steps=6", "train.allow_changes=[train.steps]", f"train.out_dir={run}"])
    return {"run": run, "first": first, "after": after, "rerun": rerun, "killed_steps": killed_steps}


def test_survivor_names_the_dead_rank_in_one_line(dead_rank):
    rank0, rank1 = dead_rank["first"]
    assert rank1.returncode == -signal.SIGKILL and rank0.returncode == 1, tail(rank0)
    lines = [ln for ln in rank0.stderr.splitlines() if "[rank 0]" in ln or "Traceback" in ln]
    assert len(lines) == 1, rank0.stderr[-3000:]
    assert re.match(
        r"\[rank 0\] error: rank 1 \(pid \d+\) was killed by SIGKILL; stopping this rank too "
        r"\(communication failed: ",
        lines[0],
    ), lines[0]
    assert dead_rank["after"] == ["latest", "step_00000002", "step_00000004"]


def test_rerun_after_a_dead_rank_resumes_past_a_damaged_checkpoint_fsdp2(dead_rank):
    proc = dead_rank["rerun"]
    assert proc.returncode == 0, tail(proc)
    assert "step_00000004 is damaged: meta.json has 8 bytes" in proc.stdout
    first, rerun = metric_runs(dead_rank["run"])
    assert rerun["start"]["resumed_from"].endswith("step_00000002") and sorted(rerun["steps"]) == [3, 4, 5, 6]
    for step in (3, 4, 5):  # the killed run's steps, reproduced exactly from step 2
        assert rerun["steps"][step]["loss"] == dead_rank["killed_steps"][step]["loss"], step
    names = sorted(p.name for p in (dead_rank["run"] / "checkpoints").iterdir())
    assert names == ["latest", "step_00000004", "step_00000004.damaged-1", "step_00000006"]


# ---- too many bad files on one rank: all ranks stop together, with a checkpoint ------------------------
@pytest.mark.parametrize(
    "engine", [["parallel.backend=fsdp2"], ["parallel.backend=deepspeed", "parallel.zero_stage=2"]]
)
def test_bad_data_stop_on_one_rank_is_agreed_saved_and_reported_once(tmp_path, engine):
    from mats_scale.data import synth
    from mats_scale.data.sampler import _ORDER, make_generator

    params = synth.SynthParams(num_train=8, num_val=0, seed=3, frames=8, height=80, width=80)
    synth.generate(str(tmp_path / "videos"), params, workers=1, verbose=False)
    good = [tmp_path / "videos" / synth.relpath("train", i) for i in range(8)]
    # 16 entries: the ones rank 0 draws first in epoch 0 (even positions of the seeded order) are missing
    # files, rank 1 draws good videos first; rank 0 passes data.max_bad_fraction, rank 1 does not.
    order = torch.randperm(16, generator=make_generator(_ORDER, 0, 0)).tolist()
    entries = [None] * 16
    for pos, item in enumerate(order):
        entries[item] = tmp_path / f"missing_{item}.mp4" if pos % 2 == 0 else good[pos // 2 % 8]
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{p} 0\n" for p in entries))
    run = tmp_path / "run"
    proc = pretrain(
        2,
        TINY
        + engine
        + [
            "data.dataset=list",
            f"data.train_list={listing}",
            "data.batch_size=2",
            "data.max_bad_fraction=0.3",
            "train.steps=40",
            "train.save_every=0",
            "logging.log_every=1",
            f"train.out_dir={run}",
        ],
    )
    assert proc.returncode != 0, tail(proc)
    # No rank prints a traceback (torchrun itself reports any non-zero exit with one of its own).
    assert proc.stderr.count("Traceback") == proc.stderr.count('bin/torchrun", line'), tail(proc)
    assert "gloo" not in proc.stderr, tail(proc)
    assert proc.stderr.count("too many bad videos") == 1, tail(proc)  # printed once, by rank 0
    assert "[rank 0] too many bad videos" in proc.stderr and "missing_" in proc.stderr
    pointer = (run / "checkpoints" / "latest").read_text()
    (only,) = metric_runs(run)
    stop_step = max(only["steps"])
    assert pointer == f"step_{stop_step:08d}" and not only["steps"][stop_step]["applied"]
    assert f"step {stop_step}: stopping on bad training data" in proc.stderr


# ---- FSDP2: SIGTERM saves and exits 0; the resumed run continues exactly ---------------------------
FSDP = TINY + [
    "parallel.backend=fsdp2",
    "model.drop_path=0.1",
    "data.batch_size=2",
    "train.steps=6",
    "train.save_every=0",
    "logging.log_every=1",
]


@pytest.fixture(scope="module")
def sigterm(tmp_path_factory):
    base = tmp_path_factory.mktemp("sigterm")
    a, b = base / "uninterrupted", base / "interrupted"
    runs = {
        "A": pretrain(2, FSDP + [f"train.out_dir={a}"]),
        "B": pretrain(2, FSDP + [f"train.out_dir={b}"], MATS_FAULT_SIGTERM_AT_STEP="3"),
    }
    pointer = b / "checkpoints" / "latest"
    pointer_b = pointer.read_text() if pointer.exists() else None
    runs["C"] = pretrain(2, FSDP + [f"train.out_dir={b}"])
    return {"a": a, "b": b, "runs": runs, "pointer_b": pointer_b}


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(sigterm):
    proc = sigterm["runs"]["B"]
    assert proc.returncode == 0, tail(proc)
    assert sigterm["pointer_b"] == "step_00000003"  # saved right after the step the signal came in
    assert "stopping after step 3 on signal" in proc.stdout
    assert max(metric_runs(sigterm["b"])[0]["steps"]) == 3


def test_fsdp2_resume_after_sigterm_reproduces_the_losses(sigterm):
    assert sigterm["runs"]["C"].returncode == 0, tail(sigterm["runs"]["C"])
    ref = metric_runs(sigterm["a"])[0]["steps"]
    first, second = metric_runs(sigterm["b"])
    assert second["start"]["resumed_from"].endswith("step_00000003") and sorted(second["steps"]) == [4, 5, 6]
    for run in (first, second):
        for step, rec in run["steps"].items():
            assert rec["loss"] == ref[step]["loss"] and rec["grad_norm"] == ref[step]["grad_norm"], step
