"""Writing profiler results: CSV, a Markdown table and PNG plots (matplotlib, no display needed)."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from typing import Any

GIB = 1024**3


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, Callable[[Any], str]]]
) -> str:
    """columns: (key, header, formatter) triples."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row[key]) for key, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(text: str, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def giga(x: float) -> str:
    return f"{x / 1e9:.2f}"


def gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def plain(x: Any) -> str:
    return str(x)


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def policy_text(enc: int, dec: int) -> str:
    """What an (encoder, decoder) checkpointing policy checkpoints, in words."""

    def part(n: int, what: str) -> str:
        if n == 0:
            return f"no {what} block"
        return f"every {what} block" if n == 1 else f"every {_ordinal(n)} {what} block"

    return f"{part(enc, 'encoder')}, {part(dec, 'decoder')}"


def sweep_panels(
    rows: Sequence[dict[str, Any]],
    sizes: Sequence[str],
    ratios: Sequence[float],
    series: dict[str, Callable[[dict], bool]],
    value: Callable[[dict], float],
) -> tuple[dict, str]:
    """Panels for :func:`plot_lines` from a size x ratio sweep: one panel per size (value against mask
    ratio, one line per series), and one panel against size at the ratio closest to 0.9. `series`
    maps a line label to a row filter. Returns (panels, name of the by-size panel)."""
    panels: dict[str, dict] = {}
    for size in sizes:
        panels[f"ViT-{size}"] = {}
        for label, keep in series.items():
            sel = [r for r in rows if r["size"] == size and keep(r)]
            panels[f"ViT-{size}"][label] = ([r["ratio"] for r in sel], [value(r) for r in sel])
    ref = min(ratios, key=lambda r: abs(r - 0.9))
    by_size = f"all sizes at rho={ref}"
    panels[by_size] = {
        label: (
            list(sizes),
            [next(value(r) for r in rows if r["size"] == s and r["ratio"] == ref and keep(r)) for s in sizes],
        )
        for label, keep in series.items()
    }
    return panels, by_size


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, title: str, path: str) -> str:
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_lines(
    path: str,
    panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
    ncols: int | None = None,
    xlabels: dict[str, str] | None = None,
) -> str:
    """One subplot per panel; in each, one line per series: {panel: {series: (xs, ys)}}. xs may be
    strings (categories, e.g. model sizes); `xlabels` overrides the x label of some panels."""
    plt = pyplot()
    n = len(panels)
    ncols = ncols or min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels.items(), strict=False):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(name)
        ax.set_xlabel((xlabels or {}).get(name, xlabel))
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _save(fig, title, path)


def plot_bars(path: str, panels: dict[str, dict[str, dict[str, float]]], *, ylabel: str, title: str) -> str:
    """Grouped bars, one subplot per panel: {panel: {series: {category: value}}}."""
    plt = pyplot()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 3.8), squeeze=False)
    for ax, (name, series) in zip(axes.flat, panels.items(), strict=False):
        categories = list(next(iter(series.values())))
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))]
            bars = ax.bar(xs, [values[c] for c in categories], width, label=label)
            ax.bar_label(bars, fontsize=6)
        ax.set_xticks(range(len(categories)), categories, rotation=20, fontsize=8)
        ax.set_title(name)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    return _save(fig, title, path)
