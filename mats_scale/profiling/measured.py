"""Measured figures for the planner (``mats-plan --mfu-from``): the MFU and the data stall of a real run
(its ``metrics.jsonl``) or the MFU of a ``mats-gpucheck`` result, instead of assumed ones."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median

MFU_WARMUP_STEPS = 2  # step records of a run left out of its median MFU (as the sweeps' run.warmup_steps)


@dataclass(frozen=True)
class MeasuredMfu:
    mfu: float
    source: str  # where it was measured, as a phrase for the printout
    data: str = ""  # a run's measured data side (its data wait, clips/s delivered vs consumed), or ""


def _data_note(end: dict, waits: list[float], path: str) -> str:
    """The data side a run measured: its end record's rates and wait, else the median step wait."""
    if isinstance(end.get("clips_per_s_delivered"), (int, float)) and end["clips_per_s_delivered"] > 0:
        delivered, consumed = end["clips_per_s_delivered"], end.get("clips_per_s_consumed", 0.0)
        return (
            f"measured in {path}: data wait {end.get('data_wait', 0.0):.0%} of the steps' time, "
            f"{delivered:.1f} clips/s delivered vs {consumed:.1f} consumed (slowest rank)"
        )
    if waits:
        return f"measured in {path}: data wait {median(waits):.0%} of the step time (median over steps)"
    return ""


def _run_mfu(path: str) -> MeasuredMfu:
    """Median MFU of a run's metrics.jsonl (its last session, after MFU_WARMUP_STEPS step records)."""
    import json

    start, steps, waits, end = {}, [], [], {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed run
            if rec.get("event") == "start":
                start, steps, waits, end = rec, [], [], {}
            elif rec.get("event") == "end":
                end = rec
            elif (
                "event" not in rec and isinstance(rec.get("mfu"), (int, float)) and math.isfinite(rec["mfu"])
            ):
                steps.append(rec["mfu"])
                if isinstance(rec.get("data_wait"), (int, float)):
                    waits.append(rec["data_wait"])
    if not steps:
        raise ValueError(
            "no step record with an mfu (a run logs it on CUDA and on CPU; not on an unknown GPU)"
        )
    timed = steps[MFU_WARMUP_STEPS:] or steps
    where = f"{start.get('world_size', '?')} x {start.get('mfu_peak_source') or start.get('device', '?')}"
    note = _data_note(end, waits[MFU_WARMUP_STEPS:] or waits, path)
    return MeasuredMfu(median(timed), f"median of {len(timed)} steps of {path} ({where})", note)


def _gpucheck_mfu(data: dict, path: str, size: str, preset: str | None) -> MeasuredMfu:
    """MFU of a mats-gpucheck result: the median over the entries of ViT-`size` (their "model" field,
    ``g`` or a depth-reduced ``g-8blk``, else a name that starts with ``ViT-g`` / ``g``), narrowed to the
    preset (a "preset" field or a word of the name) when some name it; else over all entries."""
    import re

    results = data.get("results")
    if not isinstance(results, list) or not all(isinstance(r, dict) and "name" in r for r in results):
        raise ValueError('expected "results": [{"name": ..., "mfu": number, ...}, ...]')
    rows = [r for r in results if isinstance(r.get("mfu"), (int, float)) and math.isfinite(r["mfu"])]
    if not rows:
        raise ValueError('no entry of "results" has a finite "mfu"')

    def of_model(r: dict) -> bool:
        if isinstance(r.get("model"), str):
            return re.fullmatch(rf"{re.escape(size)}(-\d+blk)?", r["model"], re.I) is not None
        return re.match(rf"(vit[-_ /]?)?{re.escape(size)}(?![a-z])", str(r["name"]), re.I) is not None

    def of_preset(r: dict) -> bool:
        if isinstance(r.get("preset"), str):
            return r["preset"] == preset
        return re.search(rf"(?<![\w+]){re.escape(preset)}(?![\w+])", str(r["name"])) is not None

    model = [r for r in rows if of_model(r)]
    chosen = [r for r in model if preset and of_preset(r)] or model or rows
    names = ", ".join(repr(r["name"]) for r in chosen)
    what = f"entry {names}" if len(chosen) == 1 else f"median of {names}"
    if not model:
        what = f"no entry is ViT-{size}: median of all {len(rows)}"
    mfu = median([float(r["mfu"]) for r in chosen])
    return MeasuredMfu(mfu, f"mats-gpucheck {path} on {data.get('device', '?')}, {what}")


def measured_mfu(path: str, size: str, preset: str | None = None) -> MeasuredMfu:
    """The MFU measured by a run (its directory or its metrics.jsonl) or by mats-gpucheck (a JSON file
    ``{"device": str, "results": [{"name": str, "mfu": float, ...}, ...]}``). ValueError (one line) on
    anything else."""
    import json
    import os

    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError("no such file (a run directory, its metrics.jsonl, or a mats-gpucheck JSON)")
    if path.endswith(".jsonl"):
        got = _run_mfu(path)
    else:
        try:
            with open(path) as f:
                data = json.load(f)
        except ValueError as e:
            raise ValueError(f"not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError('expected a JSON object with "device" and "results"')
        got = _gpucheck_mfu(data, path, size, preset)
    if not 0 < got.mfu <= 1:
        raise ValueError(f"MFU {got.mfu:g} ({got.source}): must be in (0, 1]")
    return got
