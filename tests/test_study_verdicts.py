"""The learning study's summary and verdicts, computed from a synthetic table of runs (no training):
means and spreads over seeds, compute relative to the first tube preset, and each verdict's decision."""

from __future__ import annotations

import pytest

from mats_scale.experiments.study import SCRATCH
from mats_scale.experiments.study_report import TARGET_COMPUTE, summarize, verdicts


def rows(preset: str, top1: list[float], tflops: float | None) -> list[dict]:
    return [
        {"preset": preset, "seed": s, "finetune_top1": t, "pretrain_tflops": tflops}
        for s, t in enumerate(top1)
    ]


def table(ours: list[float], ours_tflops: float = 54.0) -> list[dict]:
    return [
        *rows("tube", [0.10, 0.12, 0.14], 100.0),
        *rows("tube+rc", [0.60, 0.70, 0.80], 60.0),
        *rows("mats+dual", ours, ours_tflops),
        *rows(SCRATCH, [0.08, 0.10, 0.12], None),
    ]


def verdict(lines: list[str], start: str) -> dict[str, str]:
    """The 'question: answer' parts of the one verdict line that starts with `start`."""
    (line,) = [v for v in lines if v.startswith(start)]
    return dict(part.rsplit(": ", 1) for part in line.split("; ")[1:] if ": " in part)


def test_summary_means_spreads_and_compute_relative_to_the_first_tube_preset():
    summary = {s["preset"]: s for s in summarize(table([0.60, 0.65, 0.70]))}
    assert summary["tube+rc"]["finetune_top1"]["mean"] == pytest.approx(0.70)
    assert summary["tube+rc"]["finetune_top1"]["std"] == pytest.approx(0.10)
    assert summary["mats+dual"]["finetune_top1"]["min"] == 0.60 and summary["mats+dual"]["seeds"] == 3
    assert summary["mats+dual"]["compute_vs_reference"] == pytest.approx(0.54)
    assert summary[SCRATCH]["compute_vs_reference"] is None


def test_verdicts_decide_from_mean_spread_and_compute():
    lines = verdicts(summarize(table([0.60, 0.65, 0.70])))
    vs_tube = verdict(lines, "mats+dual vs tube:")
    assert vs_tube["at least its accuracy"] == "yes" and vs_tube["target met"] == "yes"
    assert vs_tube[f"compute <= {TARGET_COMPUTE}x"] == "yes"
    # 0.65 vs 0.70 at 0.9x: below, but within one seed std (0.1); too much compute either way
    vs_rc = verdict(lines, "mats+dual vs tube+rc:")
    assert vs_rc["at least its accuracy"] == "within one seed std" and vs_rc["target met"] == "no"
    assert vs_rc[f"compute <= {TARGET_COMPUTE}x"] == "no"
    scratch = verdict(lines, "mats+dual vs from scratch:")
    assert scratch["every seed above the best scratch seed"] == "yes"
    assert verdict(lines, "tube vs from scratch:")["every seed above the best scratch seed"] == "no"


def test_a_clear_loss_is_no_and_cheap_compute_does_not_rescue_it():
    lines = verdicts(summarize(table([0.20, 0.21, 0.22], ours_tflops=30.0)))
    vs_rc = verdict(lines, "mats+dual vs tube+rc:")
    assert vs_rc["at least its accuracy"] == "no" and vs_rc["target met"] == "no"
    assert vs_rc[f"compute <= {TARGET_COMPUTE}x"] == "yes"


def test_no_verdict_without_the_runs_it_compares():
    assert verdicts(summarize(rows("tube", [0.1, 0.2], 100.0))) == []


def test_pretraining_against_scratch_says_whether_it_is_beyond_the_seed_noise():
    # the study's "does pre-training matter" question: a margin over the larger seed std, or not
    lines = verdicts(summarize(table([0.60, 0.65, 0.70])))
    assert verdict(lines, "mats+dual vs from scratch:")["a difference beyond the seed noise"] == "yes"
    # tube 0.12 vs scratch 0.10: +0.02 against a seed std of 0.02
    tube = verdict(lines, "tube vs from scratch:")
    assert tube["a difference beyond the seed noise"] == "no (within one seed std)"
    one_seed = [*rows("tube", [0.5], 100.0), *rows(SCRATCH, [0.1], None)]
    (line,) = verdicts(summarize(one_seed))
    assert (
        verdict([line], "tube vs from scratch:")["a difference beyond the seed noise"] == "unknown (one seed)"
    )
