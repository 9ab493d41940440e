"""The GPU acceptance check (``mats-gpucheck``, docs/gpu.md): what is measured (:class:`Point`), how a run's
metrics become a result row, the memory model's prediction for a point, the fit of the planner's GPU
constants, and ``results.json`` / ``results.md``. Torch-free apart from the prediction; the measuring
itself (one subprocess per point) is :mod:`mats_scale.profiling.gpucheck_run`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mats_scale.profiling.report import markdown_table, write_markdown

GIB = 1024**3
G_DEPTH = 4
"""Encoder blocks of the depth-reduced ViT-g (full width); the row names its full depth for scaling."""


@dataclass(frozen=True)
class Point:
    """One training run of the check: a model, a masking preset, an engine, a batch, a few steps."""

    name: str
    size: str = "B"
    preset: str = "tube+rc"
    compile: bool = False
    backend: str = "none"  # parallel.backend
    zero_stage: int = 0
    checkpoint_every: int = 0  # encoder and decoder blocks
    batch: int = 32
    steps: int = 8
    warmup: int = 3  # steps left out of the medians (allocation, autotuning, compilation)
    depth: int | None = None  # encoder blocks of a depth-reduced model (None: the size's own)
    dataset: str = "synthetic"  # synthetic: in-memory clips, the step without decoding
    workers: int = 6
    extra: tuple[str, ...] = ()  # further key=value overrides (tiny mode, data paths)

    @property
    def model_size(self) -> str:
        """The size registry name of the run's model (``g-4blk``: ViT-g with 4 encoder blocks, registered
        by the run, :func:`mats_scale.profiling.gpucheck_run.register_reduced_size`)."""
        return self.size if self.depth is None else f"{self.size}-{self.depth}blk"

    @property
    def engine(self) -> str:
        """none, zero0-3 or fsdp2: the run's engine, named as the planner names them."""
        return f"zero{self.zero_stage}" if self.backend == "deepspeed" else self.backend

    @property
    def planner_engine(self) -> str:
        """The planner's engine label (profiling.feasibility.ENGINE_CHOICES) whose model states this
        run holds: one process with plain AdamW holds what ZeRO-0 does."""
        return "zero0" if self.engine == "none" else self.engine

    def overrides(self, out_dir: str) -> list[str]:
        """The run's config as ``key=value`` overrides of the config defaults (mats_scale/config.py)."""
        every = self.checkpoint_every
        return [
            f"model.size={self.model_size}",
            f"masking.preset={self.preset}",
            f"train.compile={str(self.compile).lower()}",
            f"parallel.backend={self.backend}",
            f"parallel.zero_stage={self.zero_stage}",
            f"parallel.checkpoint_encoder_every={every}",
            f"parallel.checkpoint_decoder_every={every}",
            f"data.batch_size={self.batch}",
            f"data.dataset={self.dataset}",
            f"data.num_workers={self.workers}",
            f"train.steps={self.steps}",
            f"train.out_dir={out_dir}",
            "train.resume=none",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
            *self.extra,
        ]


def step_points(tiny: bool = False) -> list[Point]:
    """Throughput: ViT-B with tube + running cell (VideoMAE V2) and MATS + dual, and the depth-reduced
    ViT-g with both, each eager and with ``train.compile``."""
    models = [("B", None, 32), ("g", G_DEPTH, 16)]
    points = [
        Point(f"{size}{'' if depth is None else f'-{depth}blk'} {preset}{' compile' if c else ''}", size,
              preset, c, batch=batch, depth=depth)
        for size, depth, batch in models
        for preset in ("tube+rc", "mats+dual")
        for c in (False, True)
    ]  # fmt: skip
    # The dry run: one eager run (the stall run trains MATS + dual; compiling on a CPU takes minutes).
    return [tiny_point(points[0])] if tiny else points


def memory_points(tiny: bool = False) -> list[Point]:
    """Peak memory next to the prediction: every engine, checkpointing none / every 2nd block, two
    micro-batches (ViT-B, tube + running cell; the eager step run of that setting is one more point)."""
    base = Point("mem", steps=2, warmup=1)
    points = [
        replace(base, name="mem none b16", batch=16),
        replace(base, name="mem none ckpt2 b32", checkpoint_every=2),
        replace(base, name="mem zero2 b32", backend="deepspeed", zero_stage=2),
        replace(base, name="mem zero3 b32", backend="deepspeed", zero_stage=3),
        replace(base, name="mem fsdp2 b32", backend="fsdp2"),
        replace(base, name="mem fsdp2 ckpt2 b16", backend="fsdp2", checkpoint_every=2, batch=16),
    ]
    return [tiny_point(points[1])] if tiny else points


TINY = ("model.num_frames=4", "model.img_size=64", "train.device=cpu", "train.precision=fp32")


def tiny_point(p: Point) -> Point:
    """The CPU dry run's point: the debug model on 4 x 64 x 64 clips, fp32 (not a measurement)."""
    return replace(
        p, size="debug", depth=None, batch=2, steps=3, warmup=1, workers=0, extra=(*p.extra, *TINY)
    )


# ---- a run's metrics -> a row ---------------------------------------------------------------------


def asdict_point(p: Point) -> dict[str, Any]:
    """A point as JSON (the subprocess rebuilds it with ``Point(**d)``)."""
    return {**asdict(p), "extra": list(p.extra)}


def result_row(p: Point, measured: dict[str, Any]) -> dict[str, Any]:
    """A row of ``results``: what ran and what it measured; a depth-reduced model also names its full
    depth, so the planner can scale the encoder's share."""
    from mats_scale.models.sizes import SIZES

    row = {"name": p.name, "model": p.model_size, "preset": p.preset, "compile": p.compile,
           "engine": p.engine, "batch": p.batch, **measured}  # fmt: skip
    if p.depth is not None:
        row |= {"depth": p.depth, "full_depth": SIZES[p.size].depth}
    return row


def step_records(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The per-step records of a metrics.jsonl (those with a ``step`` and a ``step_time_s``)."""
    records = []
    for line in lines:
        line = line.strip()
        if line:
            rec = json.loads(line)
            if "step" in rec and "step_time_s" in rec:
                records.append(rec)
    return records


def summarize_steps(records: Sequence[dict[str, Any]], batch: int, warmup: int) -> dict[str, Any]:
    """Medians over the steps after `warmup`: the device step (wall step minus the time spent waiting
    for the batch), clips/s of that step, MFU scaled to it, the wall step and ``data_wait``."""
    timed = list(records[warmup:])
    if not timed:
        raise ValueError(f"no step after the {warmup} warm-up steps (got {len(records)} steps)")
    wall = statistics.median(r["step_time_s"] for r in timed)
    step = statistics.median(r["step_time_s"] - r.get("data_time_s", 0.0) for r in timed)
    row: dict[str, Any] = {
        "step_s": step,
        "clips_per_s": batch / step,
        "wall_step_s": wall,
        "steps_timed": len(timed),
        # The Trainer's own fraction of the step spent waiting for data (metrics key data_wait).
        "data_wait": _median_key(timed, "data_wait"),
    }
    mfus = [r["mfu"] * r["step_time_s"] / max(r["step_time_s"] - r.get("data_time_s", 0.0), 1e-12)
            for r in timed if "mfu" in r]  # fmt: skip
    row["mfu"] = statistics.median(mfus) if mfus else math.nan
    return row


def _median_key(records: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return statistics.median(values) if values else None


# ---- SDPA backend ---------------------------------------------------------------------------------

SDPA_OPS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_flash_attention_for_cpu": "cpu_flash",
    "_scaled_dot_product_attention_math": "math",
    "_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
"""The aten ops behind ``F.scaled_dot_product_attention`` -> the backend name (torch's SDPBackend)."""


def sdpa_backend(op_names: Iterable[str], calls: int = 0) -> str:
    """The SDPA backend(s) that ran, from the aten op names dispatched (``aten::x``, ``aten.x.default``
    or ``x``) and the number of ``F.scaled_dot_product_attention`` calls: a call whose fused op did not
    show ran the math path (it decomposes into matmul and softmax before dispatch). Several backends
    are joined with '+' in a fixed order; "none" when no attention ran."""
    seen, fused = set(), 0
    for name in op_names:
        base = name.replace("aten::", "").replace("aten.", "").split(".")[0]
        if base in SDPA_OPS:
            seen.add(SDPA_OPS[base])
            fused += 1
    if calls > fused:
        seen.add("math")
    order = list(dict.fromkeys(SDPA_OPS.values()))
    return "+".join(b for b in order if b in seen) or "none"


# ---- memory: the prediction and the fit ----------------------------------------------------------


def predict_memory(point: Point, *, dtype=None) -> dict[str, float]:
    """The memory model's ``max_memory_allocated`` for `point` on one GPU, in GiB: the planner's model
    states of its engine (dp = 1) and the meta-device activation peak for the CUDA kernels."""
    import torch

    from mats_scale.config import ModelConfig
    from mats_scale.profiling.feasibility import Node, engine_states
    from mats_scale.profiling.memory import activation_model, peak_allocated
    from mats_scale.profiling.states import param_stats
    from mats_scale.profiling.workload import Workload, build_model, masking_config

    dtype = torch.bfloat16 if dtype is None else dtype
    every = point.checkpoint_every
    wl = Workload(ModelConfig(size=point.size), masking_config(point.preset, 0.9), 1, dtype, (every, every))
    node = Node(1, 80.0, 989.0)  # one GPU: dp = 1 (memory and peak do not enter the states)
    states = engine_states(param_stats(build_model(wl, "meta")), point.planner_engine, node, dtype)
    act = activation_model(wl)
    return {
        "predicted_gib": peak_allocated(states, act, point.batch) / GIB,
        "predicted_states_gib": states.total / GIB,
        "predicted_activations_gib": (act.peak(point.batch) + act.inputs(point.batch)) / GIB,
    }


def memory_row(point: Point, measured: dict[str, Any], predicted: dict[str, float]) -> dict[str, Any]:
    """One row of the memory table: measured peaks (allocated, reserved), the prediction, their ratio,
    and the bytes outside the allocator (CUDA context, library workspaces) seen at the end of the run."""
    allocated = measured["max_allocated_gib"]
    return {
        "name": point.name,
        "engine": point.engine,
        "checkpoint_every": point.checkpoint_every,
        "batch": point.batch,
        "model": point.size,
        "preset": point.preset,
        "max_allocated_gib": allocated,
        "max_reserved_gib": measured["max_reserved_gib"],
        "outside_allocator_gib": measured["outside_allocator_gib"],
        **predicted,
        "ratio": allocated / predicted["predicted_gib"] if predicted["predicted_gib"] else math.nan,
    }


def fit_allowance(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The planner's GPU-side constants (profiling.memory.Allowance) from measured memory rows:
    cuda_context_gib = the largest memory seen outside the caching allocator (context, cuBLAS/NCCL
    workspaces); fragmentation = the largest reserved-but-unallocated share of the allocated peak.
    Largest, not mean: the planner must not promise a batch that one of the measured runs would not fit.
    """
    usable = [r for r in rows if r.get("max_allocated_gib")]
    if not usable:
        raise ValueError("no memory measurement to fit the constants to")
    frag = max(r["max_reserved_gib"] / r["max_allocated_gib"] - 1.0 for r in usable)
    return {
        "cuda_context_gib": round(max(r["outside_allocator_gib"] for r in usable), 3),
        "fragmentation": round(max(frag, 0.0), 4),
        "points": len(usable),
        "ratio_min": min(r["ratio"] for r in usable),
        "ratio_max": max(r["ratio"] for r in usable),
    }


# ---- results -------------------------------------------------------------------------------------


@dataclass
class Results:
    """What ``results.json`` holds (the planner reads ``fit`` and ``results``)."""

    device: str
    driver: str
    torch: str
    cuda: str
    dtype: str
    commit: str
    date: str = ""
    dry_run: bool = False  # the CPU dry run (--device cpu --tiny): not a measurement
    results: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)
    loader: list[dict[str, Any]] = field(default_factory=list)
    fit: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    elapsed_s: float = 0.0


def _num(digits: int):
    def fmt(x: Any) -> str:
        if x is None or (isinstance(x, float) and math.isnan(x)):
            return "-"
        return f"{x:.{digits}f}" if isinstance(x, float) else str(x)

    return fmt


def _pct(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _text(x: Any) -> str:
    return "-" if x is None else str(x)


def _table(rows: Sequence[dict[str, Any]], columns: list) -> str:
    return markdown_table(fill(rows, [key for key, _, _ in columns]), columns)


def markdown(res: Results) -> str:
    """``results.md``: the environment, then one table per section."""
    head = (
        f"# mats-gpucheck on {res.device}\n\n"
        + ("**Dry run on CPU (debug model): not a measurement.**\n\n" if res.dry_run else "")
        + f"driver {res.driver}, torch {res.torch}, CUDA {res.cuda}, dtype {res.dtype}, commit {res.commit}"
        + (f", {res.date}" if res.date else "")
        + f", {res.elapsed_s:.0f} s\n\n"
    )
    parts = [head, "## Training step\n\n"]
    parts.append(_table(res.results, [
        ("name", "run", _text), ("model", "model", _text), ("preset", "preset", _text),
        ("compile", "compile", _text), ("sdpa_backend", "SDPA", _text), ("batch", "batch", _text),
        ("step_s", "step s", _num(3)), ("clips_per_s", "clips/s", _num(1)), ("mfu", "MFU", _pct),
        ("max_allocated_gib", "alloc GiB", _num(2)), ("max_reserved_gib", "reserved GiB", _num(2)),
    ]))  # fmt: skip
    parts.append("\n## Peak memory against the memory model\n\n")
    parts.append(_table(res.memory, [
        ("name", "run", _text), ("engine", "engine", _text), ("checkpoint_every", "ckpt every", _text),
        ("batch", "batch", _text), ("max_allocated_gib", "allocated GiB", _num(2)),
        ("max_reserved_gib", "reserved GiB", _num(2)), ("predicted_gib", "predicted GiB", _num(2)),
        ("ratio", "measured / predicted", _num(3)), ("outside_allocator_gib", "outside GiB", _num(2)),
    ]))  # fmt: skip
    if res.fit:
        f = res.fit
        parts.append(
            f"\nFitted planner constants: cuda_context_gib {f['cuda_context_gib']}, fragmentation "
            f"{f['fragmentation']} (from {f['points']} runs; measured / predicted "
            f"{f['ratio_min']:.3f} to {f['ratio_max']:.3f}).\n"
        )
    parts.append("\n## Loader\n\n")
    parts.append(_table(res.loader, [
        ("name", "measurement", _text), ("dataset", "dataset", _text), ("decoder", "decoder", _text),
        ("workers", "workers", _text), ("clips_per_s", "clips/s", _num(1)), ("data_wait", "data wait", _pct),
        ("max_abs_diff", "max |diff| vs CPU", _num(1)),
    ]))  # fmt: skip
    if res.skipped:
        parts.append("\n## Not measured\n\n")
        parts.append(_table(res.skipped, [("name", "what", _text), ("reason", "why", _text)]))
    return "".join(parts)


def fill(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Rows with every key of the table present (None where a measurement did not give it)."""
    return [{**r, **{k: None for k in keys if k not in r}} for r in rows]


TABLE_KEYS = {
    "results": ("compile", "sdpa_backend", "batch", "step_s", "clips_per_s", "mfu", "max_allocated_gib",
                "max_reserved_gib", "model", "preset"),
    "memory": ("outside_allocator_gib", "predicted_gib", "ratio", "max_reserved_gib", "max_allocated_gib"),
    "loader": ("dataset", "decoder", "workers", "clips_per_s", "data_wait", "max_abs_diff"),
}  # fmt: skip


def write_results(res: Results, out_dir: str) -> tuple[str, str]:
    """Write ``results.json`` and ``results.md`` into `out_dir`; returns their paths."""
    for key, keys in TABLE_KEYS.items():
        setattr(res, key, fill(getattr(res, key), keys))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path + ".part", "w") as f:
        json.dump(asdict(res), f, indent=2, allow_nan=True)
        f.write("\n")
    os.replace(path + ".part", path)
    md = write_markdown(markdown(res), os.path.join(out_dir, "results.md"))
    return path, md


def device_dir_name(device: str) -> str:
    """A folder name for a device name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    out = "".join(c.lower() if c.isalnum() else "-" for c in device)
    return "-".join(p for p in out.split("-") if p) or "device"


__all__ = [
    "G_DEPTH",
    "asdict_point",
    "result_row",
    "Point",
    "Results",
    "SDPA_OPS",
    "device_dir_name",
    "fit_allowance",
    "markdown",
    "memory_points",
    "memory_row",
    "predict_memory",
    "sdpa_backend",
    "step_points",
    "step_records",
    "summarize_steps",
    "write_results",
]
