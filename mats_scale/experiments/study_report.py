"""The learning study's report: one row per (preset, seed), means and spreads per preset, the verdicts
and the plots.

Pre-training compute comes from the profilers (:func:`mats_scale.experiments.sweep.profile_flops`:
fvcore forward MACs per clip, the MATS score's MACs, FlopCounterMode training-step FLOPs per clip) times
the clips the run saw. :func:`write_report` writes ``runs.csv`` (one row per seed), ``summary.csv``,
``study.md`` (table and the verdicts, computed, not written by hand), ``study.png`` and
``reconstruction.png`` (:mod:`mats_scale.launch.visualize` on the first seed's run of every preset).
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from typing import Any

from mats_scale.experiments.runner import provenance
from mats_scale.experiments.study import SCRATCH, Job, Study, dotlist, job_record, result_path
from mats_scale.experiments.sweep import summarize_metrics

LOSS_WINDOW = 10  # the pre-training loss reported: mean of the last steps
TARGET_COMPUTE = 0.6  # the claim: mats+dual reaches the tube presets' accuracy at <= 0.6x their compute


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def pretrain_compute(jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """Per preset: the profilers' FLOPs per clip of its pre-training config and the clips one run sees."""
    from mats_scale.experiments.sweep import profile_flops
    from mats_scale.optim import total_batch

    out = {}
    for job in jobs:
        if job.kind != "pretrain" or job.preset in out:
            continue
        cfg = job.cfg
        flops = profile_flops(cfg)
        clips = job.steps * total_batch(cfg.data.batch_size, 1, cfg.optim.grad_accum)
        out[job.preset] = {
            "fwd_gmacs_per_clip": flops["fwd_gmacs"] + flops["score_gmacs"],
            "score_gmacs_per_clip": flops["score_gmacs"],
            "train_gflops_per_clip": flops["train_gflops"],
            "tokens_encoder": flops["tokens_encoder"],
            "tokens_decoder": flops["tokens_decoder"],
            "pretrain_clips": clips,
            "pretrain_gmacs": (flops["fwd_gmacs"] + flops["score_gmacs"]) * clips,
            "pretrain_tflops": flops["train_gflops"] * clips / 1e3,
        }
    return out


def collect(study: Study, jobs: list[Job]) -> list[dict[str, Any]]:
    """One row per (preset, seed): pre-training loss and compute, fine-tuning and probe accuracy, times."""
    compute = pretrain_compute(jobs)
    by_key = {(j.kind, j.preset, j.seed): j for j in jobs}
    rows = []
    labels = study.labels + ([SCRATCH] if study.scratch else [])
    for preset in labels:
        for seed in study.seeds:
            row: dict[str, Any] = {"preset": preset, "seed": seed}
            row.update(
                compute.get(preset, {"pretrain_clips": 0, "pretrain_gmacs": 0.0, "pretrain_tflops": 0.0})
            )
            pre = by_key.get(("pretrain", preset, seed))
            rec = job_record(pre) if pre is not None else None
            if rec is not None:
                summary = summarize_metrics(os.path.join(pre.run_dir, "metrics.jsonl"), 0, LOSS_WINDOW)
                row.update(
                    pretrain_loss=summary.get("final_loss"),
                    pretrain_wall_s=rec["wall_s"],
                    pretrain_cpu_s=rec["cpu_s"],
                )
            for kind, extra in (("finetune", ("top5", "wall_s", "cpu_s")), ("probe", ("train_top1",))):
                job = by_key.get((kind, preset, seed))
                rec = job_record(job) if job is not None else None
                if rec is not None:
                    res = {**rec, **(_read_json(result_path(job)) or {})}
                    row.update({f"{kind}_{k}": res.get(k) for k in ("top1", *extra)})
            rows.append(row)
    return rows


def _stats(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per preset: means and spreads over the seeds, and compute relative to the first tube preset."""
    out = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == preset]
        s: dict[str, Any] = {"preset": preset, "seeds": len(mine)}
        for key in ("fwd_gmacs_per_clip", "train_gflops_per_clip", "pretrain_clips", "pretrain_tflops"):
            s[key] = mine[0].get(key)
        for key in ("finetune_top1", "probe_top1", "pretrain_loss", "pretrain_cpu_s", "finetune_cpu_s"):
            s[key] = _stats([r.get(key) for r in mine])
        out.append(s)
    reference = next((s for s in out if s["preset"].startswith("tube")), None)
    for s in out:
        ref = reference["pretrain_tflops"] if reference else None
        s["compute_vs_reference"] = s["pretrain_tflops"] / ref if ref and s["preset"] != SCRATCH else None
    return out


def _beyond_noise(a: dict[str, float], b: dict[str, float], diff: float) -> str:
    """Is a difference of means larger than the larger of the two seed stds?"""
    if min(a["n"], b["n"]) < 2:
        return "a difference beyond the seed noise: unknown (one seed)"
    spread = max(a["std"], b["std"])
    return (
        f"a difference beyond the seed noise: {'yes' if abs(diff) > spread else 'no (within one seed std)'}"
    )


def verdicts(summary: list[dict[str, Any]], bases: dict[str, str] | None = None) -> list[str]:
    """The study's questions answered from the numbers (one sentence each); `bases`: variant label ->
    its preset (a variant of mats+dual is held to mats+dual's target too, and compared with it)."""
    bases = bases or {}

    def top1(s):
        return s["finetune_top1"]

    lines = []
    scratch = next((s for s in summary if s["preset"] == SCRATCH), None)
    trained = [s for s in summary if s["preset"] != SCRATCH and top1(s)]
    if scratch and top1(scratch):
        for s in trained:
            margin = top1(s)["mean"] - top1(scratch)["mean"]
            every = top1(s)["min"] > top1(scratch)["max"]
            lines.append(
                f"{s['preset']} vs from scratch: fine-tuned top-1 {top1(s)['mean']:.3f} vs "
                f"{top1(scratch)['mean']:.3f} ({margin:+.3f}); every seed above the best scratch seed: "
                f"{'yes' if every else 'no'}; {_beyond_noise(top1(s), top1(scratch), margin)}"
            )
    for ours in [s for s in trained if s["preset"] == "mats+dual" or bases.get(s["preset"]) == "mats+dual"]:
        name = ours["preset"]
        for s in trained:
            if not s["preset"].startswith("tube"):
                continue
            diff = top1(ours)["mean"] - top1(s)["mean"]
            spread = max(top1(ours)["std"], top1(s)["std"])
            ratio = ours["pretrain_tflops"] / s["pretrain_tflops"]
            accuracy = "yes" if diff >= 0 else ("within one seed std" if -diff <= spread else "no")
            met = diff >= 0 and ratio <= TARGET_COMPUTE
            lines.append(
                f"{name} vs {s['preset']}: top-1 {top1(ours)['mean']:.3f} vs {top1(s)['mean']:.3f} "
                f"({diff:+.3f}; seed std {top1(ours)['std']:.3f} / {top1(s)['std']:.3f}) at "
                f"{ratio:.2f}x its pre-training compute; at least its accuracy: {accuracy}; compute <= "
                f"{TARGET_COMPUTE}x: {'yes' if ratio <= TARGET_COMPUTE else 'no'}; target met: "
                f"{'yes' if met else 'no'}"
            )
    by_label = {s["preset"]: s for s in trained}
    for label, preset in bases.items():
        if label in by_label and preset in by_label:
            v, b = top1(by_label[label]), top1(by_label[preset])
            diff = v["mean"] - b["mean"]
            lines.append(
                f"{label} vs {preset}: top-1 {v['mean']:.3f} vs {b['mean']:.3f} ({diff:+.3f}; seed std "
                f"{v['std']:.3f} / {b['std']:.3f}); {_beyond_noise(v, b, diff)}"
            )
    return lines


# ---- report -------------------------------------------------------------------------------------

RUN_COLUMNS = (
    "preset",
    "seed",
    "pretrain_loss",
    "finetune_top1",
    "finetune_top5",
    "probe_top1",
    "probe_train_top1",
    "fwd_gmacs_per_clip",
    "score_gmacs_per_clip",
    "train_gflops_per_clip",
    "pretrain_clips",
    "pretrain_gmacs",
    "pretrain_tflops",
    "pretrain_wall_s",
    "pretrain_cpu_s",
    "finetune_wall_s",
    "finetune_cpu_s",
)


def _fmt(st: dict[str, float] | None, digits: int = 3) -> str:
    if not st:
        return "-"
    if st["n"] == 1:
        return f"{st['mean']:.{digits}f} (1 seed)"
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f} ({st['min']:.{digits}f}-{st['max']:.{digits}f})"


def _plot(
    summary: list[dict[str, Any]], rows: list[dict[str, Any]], path: str, chance: float | None, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in (
        (axes[0], "finetune_top1", "fine-tuned top-1 (val)"),
        (axes[1], "probe_top1", "linear probe top-1 (val)"),
    ):
        for i, s in enumerate(summary):
            x = s["pretrain_tflops"] or 0.0
            ys = [r[key] for r in rows if r["preset"] == s["preset"] and r.get(key) is not None]
            if not ys:
                continue
            color = "grey" if s["preset"] == SCRATCH else f"C{i}"
            ax.scatter([x] * len(ys), ys, color=color, alpha=0.35, s=18)
            st = s[key]
            ax.errorbar(x, st["mean"], yerr=st["std"], fmt="o", color=color, capsize=4, label=s["preset"])
        if chance:
            ax.axhline(chance, color="black", lw=0.8, ls="--", label="chance")
        ax.set_xlabel("pre-training compute per run (training TFLOPs, profiler)")
        ax.set_ylabel(title)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # nothing finished: no legend (and no warning)
        axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{title}: accuracy vs pre-training compute (dots: seeds; bars: mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reconstruction_picture(study: Study, jobs: list[Job], path: str) -> bool:
    """:mod:`mats_scale.launch.visualize` on the first seed's pre-training run of every preset (one clip,
    one mask seed): input, visible tokens, targets and reconstruction per preset. False if none is done."""
    from mats_scale.launch import visualize

    runs = [
        j.run_dir
        for j in jobs
        if j.kind == "pretrain" and j.seed == study.seeds[0] and job_record(j) is not None
    ]
    return bool(runs) and visualize.main([*runs, "--out", path, "--seed", "0"]) == 0


def write_report(study: Study, jobs: list[Job], out_dir: str, command: str = "") -> list[str]:
    """runs.csv, summary.csv, study.md, study.png and reconstruction.png in `out_dir`; returns their
    paths."""
    rows = collect(study, jobs)
    summary = summarize(rows)
    paths = [os.path.join(out_dir, n) for n in ("runs.csv", "summary.csv", "study.md", "study.png")]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUN_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    stat_keys = ("finetune_top1", "probe_top1", "pretrain_loss", "pretrain_cpu_s", "finetune_cpu_s")
    with open(paths[1], "w", newline="") as f:
        fields = ["preset", "seeds", "fwd_gmacs_per_clip", "train_gflops_per_clip", "pretrain_clips"]
        fields += ["pretrain_tflops", "compute_vs_reference"]
        fields += [f"{k}_{a}" for k in stat_keys for a in ("mean", "std", "min", "max")]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for s in summary:
            flat = {k: s[k] for k in fields if k in s}
            for k in stat_keys:
                for a in ("mean", "std", "min", "max"):
                    flat[f"{k}_{a}"] = s[k][a] if s[k] else None
            w.writerow(flat)
    ref = next((s["preset"] for s in summary if s["preset"].startswith("tube")), None)
    origin = provenance()
    lines = [
        f"# Study `{study.name}`: accuracy against pre-training compute",
        "",
        f"Seeds {study.seeds}; mean ± sample std (min-max) over the seeds. Pre-training: "
        f"`{study.pretrain.config}` + {dotlist(study.pretrain.overrides)}; fine-tuning: "
        f"`{study.finetune.config}` + {dotlist(study.finetune.overrides)}; every run: "
        f"{dotlist(study.common)}.",
        "Compute from the profilers: forward GMACs per clip (fvcore, with the MATS score), training-step "
        "GFLOPs per clip (FlopCounterMode, forward + backward + score), times the clips a run sees. "
        "CPU s: user + system time of the run's process (comparable across runs with the same "
        "threads per run on a machine with no other load).",
        "",
        f"| preset | fwd GMACs/clip | train GFLOPs/clip | pre-train TFLOPs | x {ref or '-'} | "
        "pre-train loss | fine-tuned top-1 | probe top-1 | CPU s pre-train | CPU s fine-tune |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        scratch = s["preset"] == SCRATCH
        lines.append(
            "| "
            + " | ".join(
                [
                    s["preset"] + (" (random encoder in the probe)" if scratch else ""),
                    "-" if scratch else f"{s['fwd_gmacs_per_clip']:.4f}",
                    "-" if scratch else f"{s['train_gflops_per_clip']:.4f}",
                    "0" if scratch else f"{s['pretrain_tflops']:.3g}",
                    f"{s['compute_vs_reference']:.2f}" if s["compute_vs_reference"] else "-",
                    _fmt(s["pretrain_loss"], 4),
                    _fmt(s["finetune_top1"]),
                    _fmt(s["probe_top1"]),
                    _fmt(s["pretrain_cpu_s"], 0),
                    _fmt(s["finetune_cpu_s"], 0),
                ]
            )
            + " |"
        )
    lines += ["", "## Verdicts (computed from the table)", ""]
    lines += [f"- {v}" for v in verdicts(summary, {k: v.preset for k, v in study.variants.items()})] or [
        "- (not enough finished runs)"
    ]
    lines += [
        "",
        f"Command: `{command or 'python launchers/study.py'}`; report written at commit "
        f"{origin['git_commit']}; {json.dumps(origin['host'])}; {json.dumps(origin['versions'])}.",
        "",
    ]
    with open(paths[2], "w") as f:
        f.write("\n".join(lines))
    results = [_read_json(result_path(j)) for j in jobs if j.kind == "finetune" and job_record(j)]
    classes = next((len(r["per_class_acc"]) for r in results if r and r.get("per_class_acc")), 0)
    _plot(summary, rows, paths[3], 1 / classes if classes else None, f"study {study.name}")
    picture = os.path.join(out_dir, "reconstruction.png")
    if reconstruction_picture(study, jobs, picture):
        paths.append(picture)
    return paths
