"""Markdown tables and PNG plots of a sweep, from its ``results.jsonl`` alone.

Which plots are drawn follows from what varies across the records: the encoder mask ratio (throughput
and memory vs rho, one line per preset and any other varied key), the model size (FLOPs, memory and
throughput vs size), the engine (ZeRO stage / FSDP2: throughput and memory side by side) and, for every
real run, measured against predicted memory. Axes are linear and carry units; the keys that are the same
for every point go into the caption under the figure (and into the Markdown).

One row per grid point, its newest record (older rows counted and named by commit; a "commit" column
when the rows shown span commits). Throughput: median over the point's runs with their min-max (error
bars), the device it was timed on next to the FLOPs, and notes on CPU timings, single runs and pairs
of points that differ by less than their spread.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from mats_scale.experiments.sweep import OK_STATUS, flatten, load_results, point_id, short_commit
from mats_scale.models.sizes import SIZES
from mats_scale.profiling.report import markdown_table, pyplot

# Keys shown in captions when they are the same for every point (the configuration of the figure).
CAPTION_KEYS = (
    "model.size",
    "model.num_frames",
    "model.img_size",
    "masking.preset",
    "masking.ratio",
    "masking.decoder_ratio",
    "masking.keep_ratio",
    "data.batch_size",
    "optim.grad_accum",
    "train.steps",
    "train.precision",
    "parallel.backend",
    "parallel.zero_stage",
    "parallel.checkpoint_encoder_every",
    "parallel.checkpoint_decoder_every",
    "run.launcher",
    "run.nproc",
)
IGNORED_KEYS = ("train.out_dir",)


class Row:
    """One record with its flattened config (``run.*`` included) and convenient numbers."""

    def __init__(self, rec: dict[str, Any]) -> None:
        self.rec = rec
        self.cfg = flatten(rec.get("config") or {})
        self.cfg.update({f"run.{k}": v for k, v in (rec.get("run") or {}).items()})
        self.cfg.update({k: v for k, v in (rec.get("point") or {}).items() if k not in self.cfg})
        m = rec.get("measured") or {}
        self.measured = m if m.get("steps") else {}
        self.pred = rec.get("predicted") or {}
        self.flops = rec.get("flops") or {}
        self.feas = rec.get("feasibility") or {}
        self.status = rec.get("status", "?")

    @property
    def ran(self) -> bool:
        return self.status == "ok" and bool(self.measured)

    @property
    def engine(self) -> str:
        return self.pred.get("engine") or self.feas.get("engine") or str(self.cfg.get("parallel.backend"))

    def get(self, key: str, default: Any = None) -> Any:
        return self.cfg.get(key, default)

    @property
    def cpu(self) -> bool:
        """Timed on a CPU (a real run whose device is not CUDA)."""
        return self.ran and not str(self.measured.get("device", "cpu")).startswith("cuda")

    @property
    def timed_on(self) -> str:
        host = self.rec.get("host") or {}
        if not self.ran:
            return "-"
        return f"CPU ({host.get('cpus', '?')} cores)" if self.cpu else str(host.get("gpu") or "GPU")

    @property
    def spread(self) -> tuple[float, float] | None:
        """(min, max) of clips/s over the point's runs; None for a single run."""
        m = self.measured
        return (m["clips_per_s_min"], m["clips_per_s_max"]) if m.get("repeats", 1) > 1 else None

    def throughput(self) -> tuple[float, float, float, float]:
        """(median clips/s, median, min, max): a bar's height, or a line's point, and its error bar."""
        c = self.measured["clips_per_s"]
        return (c, c, *(self.spread or (c, c)))


def latest(records: Sequence[dict[str, Any]]) -> list[Row]:
    """The newest record of every grid point, in first-seen order (a retried or re-run point replaces
    its older rows)."""
    by_point: dict[str, dict[str, Any]] = {}
    for rec in records:
        by_point[point_id(rec)] = rec
    return [Row(r) for r in by_point.values()]


def throughput_label(rows: Sequence[Row]) -> str:
    """The throughput axis: median over runs, min-max bars, and CPU when it was timed on one."""
    bars = "median; bars: min-max of runs" if any(r.spread for r in rows) else "one run each"
    return f"clips/s{' on CPU' if any(r.cpu for r in rows) else ''} ({bars})"


def timing_notes(rows: Sequence[Row]) -> list[str]:
    """What the throughput numbers can and cannot say: CPU timings, points without spread, and the
    pairs of points whose difference is inside their runs' spread."""
    ran = [r for r in rows if r.ran]
    notes = []
    cpu = [r for r in ran if r.cpu]
    if cpu:
        notes.append(
            f"**CPU timings.** {len(cpu)} of {len(ran)} timed points ran on a CPU: their clips/s, step "
            "time and MFU move with the machine's load and clock more than with the work and need not "
            "follow the FLOPs per clip (FLOPs, tokens and memory are deterministic). Compare cost by "
            "FLOPs; time speed on a GPU."
        )
    single = [r for r in ran if r.spread is None]
    if single:
        notes.append(
            f"**No spread** for {len(single)} of {len(ran)} timed points: one run each (run.repeats=1, "
            "or recorded before repeats), so their differences in clips/s may be noise."
        )
    spread = [r for r in ran if r.spread is not None]
    pairs = list(itertools.combinations(spread, 2))
    if pairs:
        inside = sum(a.spread[0] <= b.spread[1] and b.spread[0] <= a.spread[1] for a, b in pairs)
        widest = max((r.spread[1] - r.spread[0]) / r.measured["clips_per_s"] for r in spread)
        verdict = "their order is not resolved by these timings" if inside else "every order is resolved"
        notes.append(
            f"**Spread.** {inside} of {len(pairs)} pairs of timed points differ by less than their runs' "
            f"spread (overlapping min-max of clips/s): {verdict}; the widest spread is "
            f"{100 * widest:.0f}% of its median."
        )
    return notes


def varying(rows: Sequence[Row]) -> list[str]:
    """The grid's axes (and run settings) that take more than one value, in the grid's order."""
    keys = list(dict.fromkeys(k for r in rows for k in (r.rec.get("point") or {})))
    keys += sorted({k for r in rows for k in r.cfg if k.startswith("run.")} - set(keys))
    return [k for k in keys if k not in IGNORED_KEYS and len({repr(r.get(k)) for r in rows}) > 1]


def caption(rows: Sequence[Row], exclude: Sequence[str] = ()) -> str:
    """The CAPTION_KEYS that are the same for every row, plus where the numbers come from."""
    rows = [r for r in rows if r.rec.get("config")] or list(rows)  # a config error has no resolved config
    fixed = []
    for k in CAPTION_KEYS:
        values = {repr(r.get(k)) for r in rows}
        if k not in exclude and len(values) == 1 and rows[0].get(k) is not None:
            fixed.append(f"{k}={rows[0].get(k)}")
    prov = {(r.rec.get("git_commit", "?")[:12], r.rec.get("versions", {}).get("torch", "?")) for r in rows}
    hosts = {
        f"{r.rec.get('host', {}).get('gpu') or str(r.rec.get('host', {}).get('cpus')) + '-core CPU'}"
        for r in rows
    }
    commits = ", ".join(sorted(f"commit {c}, torch {t}" for c, t in prov))
    return f"{'; '.join(fixed)}. Ran on {', '.join(sorted(hosts))}; {commits}."


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _series_label(row: Row, keys: Sequence[str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={row.get(k)}" for k in keys) or "all"


def _size_order(size: Any) -> int:
    names = list(SIZES)
    return names.index(size) if size in names else len(names)


# ---- plots ----------------------------------------------------------------------------------------


def _figure(npanels: int):
    plt = pyplot()
    fig, axes = plt.subplots(1, npanels, figsize=(5.2 * npanels, 4.2), squeeze=False)
    return fig, list(axes.flat)


def _finish(fig, title: str, text: str, path: str) -> str:
    import textwrap

    fig.suptitle(title)
    wrapped = "\n".join(textwrap.wrap(text, 60 + 55 * (len(fig.axes) - 1)))
    lines = wrapped.count("\n") + 1
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + 0.14 * lines)  # room for the caption under the axes
    fig.tight_layout(rect=(0, (0.14 * lines + 0.1) / (height + 0.14 * lines), 1, 1))
    fig.text(0.01, 0.01, wrapped, fontsize=7, va="bottom", ha="left")
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def _lines(ax, groups: dict[str, list[tuple[float, ...]]], xlabel: str, ylabel: str, title: str) -> None:
    """A line per group of (x, y) or (x, y, low, high) points; the latter with error bars."""
    for label, pts in groups.items():
        pts = sorted(pts)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        bars = len(pts[0]) == 4 and any(p[2] != p[3] for p in pts)  # no bars without a spread
        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]] if bars else None
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)  # linear from zero: a 20-30% difference looks like one
    ax.grid(alpha=0.3)
    if len(groups) > 1 or next(iter(groups), "all") != "all":
        ax.legend(fontsize=7)


def plot_mask_ratio(rows: list[Row], var: list[str], path: str) -> str | None:
    """Throughput and peak memory vs the encoder mask ratio, a line per preset (and other varied keys)."""
    ran = [r for r in rows if r.ran]
    if len({r.get("masking.ratio") for r in ran}) < 2:
        return None
    series = [k for k in var if k != "masking.ratio"]
    thr, mem = defaultdict(list), defaultdict(list)
    for r in ran:
        label = _series_label(r, series)
        thr[label].append((r.get("masking.ratio"), *r.throughput()[1:]))
        mem[label].append((r.get("masking.ratio"), r.measured["peak_mem_gib"]))
    fig, (a, b) = _figure(2)
    _lines(a, thr, "encoder mask ratio rho", throughput_label(ran), "Throughput")
    kind = ran[0].measured.get("peak_mem_kind", "peak memory")
    _lines(b, mem, "encoder mask ratio rho", f"peak memory (GiB, {kind})", "Peak memory")
    text = caption(rows, ["masking.ratio", *series])
    return _finish(fig, "Throughput and memory vs mask ratio", text, path)


def plot_model_size(rows: list[Row], var: list[str], path: str) -> str | None:
    """Training FLOPs per clip and predicted memory per GPU vs model size (+ measured clips/s)."""
    rows = [r for r in rows if r.flops or r.pred or r.feas]  # config errors have no numbers
    if len({r.get("model.size") for r in rows}) < 2:
        return None
    series = [k for k in var if k != "model.size"]
    sizes = sorted({r.get("model.size") for r in rows}, key=_size_order)
    xpos = {s: i for i, s in enumerate(sizes)}
    flops, mem, thr = defaultdict(list), defaultdict(list), defaultdict(list)
    for r in rows:
        label, x = _series_label(r, series), xpos[r.get("model.size")]
        if r.flops:
            flops[label].append((x, r.flops["train_gflops"] / 1e3))
        if r.feas:
            mem[label].append((x, r.feas["total_gib"]))
        elif r.pred:
            mem[label].append((x, r.pred["per_rank_gib"]))
        if r.ran:
            thr[label].append((x, *r.throughput()[1:]))
    panels = [
        (flops, "training TFLOPs per clip (fwd + bwd)", "FLOPs per clip"),
        (
            mem,
            "predicted memory per GPU (GiB)"
            if any(r.feas for r in rows)
            else "predicted memory per rank (GiB)",
            "Memory (profiler)",
        ),
    ]
    if thr:
        panels.append((thr, throughput_label([r for r in rows if r.ran]), "Throughput (real runs)"))
    panels = [p for p in panels if p[0]]
    fig, axes = _figure(len(panels))
    for ax, (groups, ylabel, title) in zip(axes, panels, strict=True):
        _lines(ax, groups, "model size", ylabel, title)
        ax.set_xticks(range(len(sizes)), sizes)
    feas = next((r.feas for r in rows if r.feas), None)
    text = caption(rows, ["model.size", *series]) + (
        f" Memory per GPU planned for {feas['node']} under {feas['engine']} at micro-batch {feas['batch']}"
        " (bf16)."
        if feas
        else ""
    )
    return _finish(fig, "Cost vs model size", text, path)


def plot_engines(rows: list[Row], var: list[str], path: str) -> str | None:
    """Bars per engine (ZeRO stage / FSDP2): measured clips/s, measured and predicted peak memory."""
    ran = [r for r in rows if r.ran]
    engines = sorted({r.engine for r in ran}, key=lambda e: (not e.startswith("zero"), e))  # zero0..3, fsdp2
    if len(engines) < 2:
        return None
    fig, (a, b) = _figure(2)
    groups = defaultdict(dict)
    for r in ran:
        groups[r.engine] = r
    xs = range(len(engines))
    thr = [groups[e].throughput() for e in engines]
    err = [[t[0] - t[2] for t in thr], [t[3] - t[0] for t in thr]] if any(t[2] != t[3] for t in thr) else None
    bars = a.bar(xs, [t[0] for t in thr], 0.6, yerr=err, capsize=3)
    a.bar_label(bars, fmt="%.2f", fontsize=7)
    a.set_xticks(xs, engines)
    a.set_ylabel(throughput_label(ran))
    a.set_title("Throughput", fontsize=10)
    w = 0.38
    m = b.bar(
        [x - w / 2 for x in xs], [groups[e].measured["peak_mem_gib"] for e in engines], w, label="measured"
    )
    p = b.bar(
        [x + w / 2 for x in xs],
        [groups[e].pred.get("total_gib", float("nan")) for e in engines],
        w,
        label="predicted (model states + activations)",
    )
    b.bar_label(m, fmt="%.2f", fontsize=7)
    b.bar_label(p, fmt="%.2f", fontsize=7)
    b.set_xticks(xs, engines)
    b.set_ylabel(f"peak memory (GiB, {ran[0].measured.get('peak_mem_kind', '')})")
    b.set_title("Peak memory", fontsize=10)
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.set_xlabel("engine")
        ax.grid(alpha=0.3, axis="y")
    return _finish(
        fig, "Engines (ZeRO stage / FSDP2)", caption(rows, ["parallel.backend", "parallel.zero_stage"]), path
    )


def plot_categories(rows: list[Row], var: list[str], path: str) -> str | None:
    """Grouped bars over the first varied key (e.g. the masking preset), a bar per combination of the
    other varied keys: measured clips/s and training FLOPs per clip (recomputation included)."""
    ran = [r for r in rows if r.ran]
    keys = [k for k in var if not k.startswith("run.")]
    if not ran or not keys:
        return None
    first, rest = keys[0], keys[1:]
    cats = list(dict.fromkeys(str(r.get(first)) for r in ran))
    series = list(dict.fromkeys(_series_label(r, rest) for r in ran))
    fig, (a, b) = _figure(2)
    w = 0.8 / len(series)
    for ax, value, ylabel in (
        (a, Row.throughput, throughput_label(ran)),
        (
            b,
            lambda r: (r.flops.get("train_gflops", float("nan")),) * 4,
            "training GFLOPs per clip (incl. recomputation)",
        ),
    ):
        for i, label in enumerate(series):
            got = {str(r.get(first)): value(r) for r in ran if _series_label(r, rest) == label}
            xs = [j + (i - (len(series) - 1) / 2) * w for j in range(len(cats))]
            vals = [got.get(c, (float("nan"),) * 4) for c in cats]
            spread = ax is a and any(r.spread for r in ran)  # no error bars on FLOPs, nor without spread
            err = [[v[0] - v[2] for v in vals], [v[3] - v[0] for v in vals]] if spread else None
            bars = ax.bar(xs, [v[0] for v in vals], w, yerr=err, capsize=2, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.set_xticks(range(len(cats)), cats, fontsize=8)
        ax.set_xlabel(first)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        if len(series) > 1:
            ax.legend(fontsize=7)
    a.set_title("Throughput", fontsize=10)
    b.set_title("FLOPs per clip", fontsize=10)
    return _finish(fig, f"Throughput and FLOPs per {first}", caption(rows, keys), path)


def plot_memory_check(rows: list[Row], path: str) -> str | None:
    """Measured against predicted peak memory of every real run (the y = x line is a perfect model)."""
    ran = [r for r in rows if r.ran and r.pred]
    if not ran:
        return None
    fig, (ax,) = _figure(1)
    xs = [r.pred["total_gib"] for r in ran]
    ys = [r.measured["peak_mem_gib"] for r in ran]
    ax.scatter(xs, ys)
    top = max(xs + ys) * 1.1
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="measured = predicted")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel(f"predicted peak (GiB, profiler, x processes, {ran[0].pred['target']})")
    ax.set_ylabel(f"measured peak (GiB, {ran[0].measured.get('peak_mem_kind', '')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    text = caption(rows) + (
        " On CPU the measured RSS also holds the interpreter, libraries and allocator "
        "caches of every process, which the profiler (tensors only) does not model."
    )
    return _finish(fig, "Measured vs predicted memory", text, path)


# ---- tables ---------------------------------------------------------------------------------------


def table_rows(rows: Sequence[Row], var: Sequence[str], commit: bool = False) -> list[dict[str, str]]:
    """The table: the varied keys, then per point its status, throughput (median of runs, min-max, the
    number of runs and the device it was timed on, next to the FLOPs), memory, loss and tokens."""
    out = []
    for r in rows:
        m, p, f = r.measured, r.pred, r.flops
        row = {k: _fmt(r.get(k)) for k in var}
        if commit:
            row["commit"] = short_commit(r.rec.get("git_commit"))
        row.update(
            {
                "status": r.status,
                "clips/s": _fmt(m.get("clips_per_s")),
                "min-max (runs)": (
                    (f"{r.spread[0]:.2f}-{r.spread[1]:.2f}" if r.spread else "-")
                    + f" ({m.get('repeats', 1)} run{'s' if m.get('repeats', 1) > 1 else ''})"
                    if r.ran
                    else "-"
                ),
                "timed on": r.timed_on,
                "train GFLOPs/clip": f"{f['train_gflops']:.4g}" if f else "-",
                "step (s)": _fmt(m.get("step_time_s"), 3),
                "MFU (%)": _fmt(100 * m["mfu"] if "mfu" in m else None, 1),
                "peak TFLOP/s": _fmt(m.get("mfu_peak_tflops"), 3),  # per device, MFU's denominator
                "peak (GiB)": _fmt(m.get("peak_mem_gib")),
                "predicted (GiB)": _fmt(p.get("total_gib")),  # this point's processes on its own device
                "final loss": _fmt(m.get("final_loss"), 4),
                "tokens enc/dec": (
                    f"{m['tokens_encoder_per_clip']:.0f}/{m['tokens_decoder_per_clip']:.0f}"
                    if m
                    else (f"{f['tokens_encoder']}/{f['tokens_decoder']}" if f else "-")
                ),
            }
        )
        if any(x.feas for x in rows):
            row["planned GiB/GPU"] = _fmt(r.feas.get("total_gib"))
            row["max micro-batch"] = (
                f"{r.feas['max_batch']} ({r.feas['engine']}, {r.feas['node']})" if r.feas else "-"
            )
        row["note"] = (r.rec.get("error") or "").replace("|", "/")[:160]
        out.append(row)
    return out


def render(results: str, out_dir: str | None = None) -> list[str]:
    """Write report.md and the PNGs next to `results` (or into `out_dir`); returns the written paths."""
    records = load_results(results)
    if not records:
        raise ValueError(f"{results}: no records (run a sweep first: launchers/ablate.py --grid FILE)")
    out_dir = out_dir or os.path.dirname(os.path.abspath(results))
    os.makedirs(out_dir, exist_ok=True)
    rows = latest(records)
    shown = {id(r.rec) for r in rows}
    older = sorted({short_commit(r.get("git_commit")) for r in records if id(r) not in shown})
    n_older = len(records) - len(rows)
    var = varying(rows)
    var_shown = [k for k in var if k not in ("run.time_limit_s",)]
    name = rows[0].rec.get("grid", "sweep")
    stems = ("mask_ratio", "model_size", "engines", "bars", "memory_check")
    path = {stem: os.path.join(out_dir, f"{name}_{stem}.png") for stem in stems}
    plots = ((plot_mask_ratio, "mask_ratio"), (plot_model_size, "model_size"), (plot_engines, "engines"))
    written = [got for fn, stem in plots if (got := fn(rows, var_shown, path[stem]))]
    if not written:  # none of the standard axes varies: bars over the grid's own keys
        written += [got for got in [plot_categories(rows, var_shown, path["bars"])] if got]
    written += [got for got in [plot_memory_check(rows, path["memory_check"])] if got]
    commit_column = len({short_commit(r.rec.get("git_commit")) for r in rows}) > 1
    table = table_rows(rows, var_shown, commit=commit_column)
    n_ok = sum(r.status in OK_STATUS for r in rows)
    left_out = (
        f"; {n_older} older row{'s' * (n_older > 1)} of these points left out, made at commit "
        + ", ".join(older)
    )
    text = [
        f"# Ablation: {name}",
        "",
        f"{len(rows)} points ({n_ok} finished, {len(rows) - n_ok} failed), the newest row of each from "
        f"`{os.path.basename(results)}`{left_out if n_older else ''}. "
        "clips/s, step time and MFU are medians over the steps after warm-up, then over the point's "
        "runs (min-max and the number of runs beside them); peak memory is the process tree's peak RSS "
        "on CPU (summed over ranks) or the CUDA allocator's peak on GPU; "
        "predicted is the memory profiler for the same configuration (x processes); FLOPs per clip are "
        "the profiler's (forward + backward, recomputation included); MFU = model FLOPs per clip x "
        "clips/s / (peak TFLOP/s per device x devices), the peak from the GPU table, a CPU GEMM sample "
        "taken at the run's start, or logging.peak_tflops.",
        "",
        f"Configuration: {caption(rows, var)}",
        "",
        *[line for note in timing_notes(rows) for line in (note, "")],
        markdown_table(table, [(k, k, str) for k in table[0]]),
    ]
    text += [f"![{os.path.basename(p)}]({os.path.basename(p)})\n" for p in written]
    md = os.path.join(out_dir, f"{name}_report.md")
    with open(md, "w") as f:
        f.write("\n".join(text))
    return [md, *written]
