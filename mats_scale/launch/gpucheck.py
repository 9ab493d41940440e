"""mats-gpucheck: the GPU acceptance check, on one CUDA GPU in about 8 minutes.

    mats-gpucheck [--out profiling/results/gpu/DEVICE] [--only steps,memory,loader,stall]
        [--cache DIR] [--budget-s 480]

Also ``python -m mats_scale.launch.gpucheck``. Measures, each run in its own process (docs/gpu.md):
  steps   bf16 training step (median after warm-up), clips/s and MFU of ViT-B 16x224 with tube + running
          cell and with MATS + dual, and of a 4-block ViT-g (full width), eager and with train.compile,
          with the SDPA backend torch dispatched
  memory  max_memory_allocated / reserved against the memory model's prediction (engines none, ZeRO-2,
          ZeRO-3, FSDP2; checkpointing none / every 2nd block; two micro-batches), and the planner's
          constants (CUDA context, fragmentation) fitted to them
  loader  clips/s of the loader on the bundled data and a generated K400-like set, per decoder
          (decord, pyav, nvdec when PyNvVideoCodec is installed, with its pixel difference to decord)
  stall   data_wait of a short ViT-B MATS + dual run on the K400-like set
Writes OUT/results.json and OUT/results.md. Refuses (exit 2) where no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from mats_scale.cli import UsageError, check_out_dir, choices_list, command_parser, positive, run

SECTIONS = ("steps", "memory", "loader", "stall")
PROG = "mats-gpucheck"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = command_parser("mats_scale.launch.gpucheck", __doc__)
    ap.add_argument("--out", default="", help="output folder (default profiling/results/gpu/<device name>)")
    ap.add_argument(
        "--only",
        type=choices_list(SECTIONS, "sections"),
        default=list(SECTIONS),
        help=f"sections to run, comma-separated: {', '.join(SECTIONS)} (default all)",
    )
    ap.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "mats-gpucheck"),
        help="generated datasets and run logs (default $TMPDIR/mats-gpucheck; reused by a rerun)",
    )
    ap.add_argument(
        "--budget-s", type=positive(float), default=480.0, help="stop starting runs after this (default 480)"
    )
    # A dry run of the whole pipeline on the CPU with the debug model (not a measurement; tests).
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    # One measurement in this process (the check runs itself as a subprocess per run).
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        raise UsageError("--device cpu: only with --tiny (a dry run of the pipeline, not a measurement)")
    return args


def cuda_problem(cuda_available: bool, device_count: int) -> str | None:
    """The one line a machine without a usable GPU gets (None: go ahead)."""
    if cuda_available and device_count > 0:
        return None
    return (
        f"{PROG} measures on an NVIDIA GPU and torch sees no CUDA device here "
        "(torch.cuda.is_available() is False); run it on a GPU machine: its CPU parts are unit-tested"
    )


# ---- subprocess runs ------------------------------------------------------------------------------


class Runner:
    """Runs measurements as ``python -m mats_scale.launch.gpucheck --worker JOB`` within a time budget."""

    def __init__(self, logs: str, budget_s: float) -> None:
        self.logs, self.deadline, self.t0 = logs, time.monotonic() + budget_s, time.monotonic()
        self.skipped: list[dict[str, str]] = []
        os.makedirs(logs, exist_ok=True)

    def __call__(self, name: str, job: dict) -> dict | None:
        """Run `job` and return its result; None (and a line in :attr:`skipped`) when it failed."""
        return self.collect(self.start(name, job))

    def start(self, name: str, job: dict) -> tuple | None:
        """Start `job` in a subprocess; :meth:`collect` waits for it."""
        if self.deadline - time.monotonic() < 5:
            self.skipped.append({"name": name, "reason": "time budget (--budget-s) used up"})
            return None
        slug = "".join(c if c.isalnum() else "_" for c in name)
        out, log = os.path.join(self.logs, f"{slug}.json"), os.path.join(self.logs, f"{slug}.log")
        if os.path.exists(out):
            os.remove(out)
        cmd = [sys.executable, "-m", "mats_scale.launch.gpucheck", "--worker", json.dumps(job)]
        print(f"[{time.monotonic() - self.t0:5.0f} s] {name}", file=sys.stderr, flush=True)
        with open(log, "w") as f:
            proc = subprocess.Popen([*cmd, "--worker-out", out], stdout=f, stderr=subprocess.STDOUT)
        return name, proc, out, log

    def collect(self, handle: tuple | None) -> dict | None:
        if handle is None:
            return None
        name, proc, out, log = handle
        try:
            rc = proc.wait(timeout=max(self.deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self.skipped.append({"name": name, "reason": "time budget (--budget-s) ran out during the run"})
            return None
        if rc != 0 or not os.path.exists(out):
            self.skipped.append({"name": name, "reason": f"exit {rc}: {last_line(log)} (log {log})"})
            return None
        with open(out) as f:
            return json.load(f)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0


def last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    return lines[-1][:200] if lines else "no output"


def worker(job: dict, out: str) -> int:
    """One measurement in this process; the result goes to `out` as JSON."""
    import torch

    from mats_scale.profiling import gpucheck_run as gr
    from mats_scale.profiling.gpucheck import Point

    kind = job.pop("kind")
    if kind == "env":
        cuda = torch.cuda.is_available()
        result = {
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "cuda": torch.version.cuda or "none",
            "torch": torch.__version__,
        }
    elif kind == "point":
        run_dir = job.pop("run_dir")
        result = gr.run_point(Point(**{**job, "extra": tuple(job.get("extra", ()))}), run_dir)
    elif kind == "loader":
        result = gr.loader_rate(**job)
    elif kind == "nvdec":
        result = gr.nvdec_rate(**job)
    elif kind == "datasets":
        from mats_scale.profiling.gpucheck_data import prepare_datasets

        result = {k: dataclasses.asdict(v) for k, v in prepare_datasets(**job).items()}
    else:
        raise ValueError(f"worker kind {kind!r}")
    with open(out + ".part", "w") as f:
        json.dump(result, f)
    os.replace(out + ".part", out)
    return 0


# ---- the check ------------------------------------------------------------------------------------


def commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes), or the package version."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        head = None
    if head is None or head.returncode != 0:
        from importlib.metadata import version

        return f"mats_scale {version('mats_scale')}"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"


def check(args: argparse.Namespace) -> int:
    from mats_scale.profiling import gpucheck as gc
    from mats_scale.profiling import gpucheck_data as gd

    runner = Runner(os.path.join(args.cache, "logs"), args.budget_s)
    env = runner("environment", {"kind": "env"})
    if env is None:
        raise RuntimeError(f"the first run failed: {runner.skipped[-1]['reason']}")
    res = gc.Results(
        device=env["device"],
        driver=driver_version() if args.device == "cuda" else "none",
        torch=env["torch"],
        cuda=env["cuda"],
        dtype="fp32" if args.tiny else "bf16",
        commit=commit(),
        date=time.strftime("%Y-%m-%d"),
        dry_run=args.tiny,
    )
    out_dir = args.out or os.path.join("profiling", "results", "gpu", gc.device_dir_name(res.device))
    runs = os.path.join(args.cache, "runs")

    def point(p: gc.Point) -> dict | None:
        run_dir = os.path.join(runs, p.name.replace(" ", "_"))
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run (train.resume=none), no old checkpoints
        try:
            return runner(p.name, {"kind": "point", "run_dir": run_dir, **gc.asdict_point(p)})
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoint: GBs, not a result

    data = None
    if "loader" in args.only or "stall" in args.only:  # CPU work: generated while the GPU runs
        data = runner.start("datasets", {"kind": "datasets", "cache": args.cache, "tiny": args.tiny})
    measured: list[tuple[gc.Point, dict]] = []
    if "steps" in args.only:
        for p in gc.step_points(args.tiny):
            m = point(p)
            if m is not None:
                res.results.append(gc.result_row(p, m))
                measured.append((p, m))
    if "memory" in args.only:
        for p in gc.memory_points(args.tiny):
            m = point(p)
            if m is not None:
                measured.append((p, m))
        if not args.tiny:
            res.memory = [
                gc.memory_row(p, m, gc.predict_memory(p))
                for p, m in measured
                if not p.compile and p.depth is None and p.preset == "tube+rc" and "max_allocated_gib" in m
            ]
            if res.memory:
                res.fit = gc.fit_allowance(res.memory)
    sets = runner.collect(data)
    if sets is not None:
        sets = {k: gd.FileSet(**{**v, "shape": tuple(v["shape"])}) for k, v in sets.items()}
        if "loader" in args.only:
            res.loader += gd.measure_loaders(runner, sets, tiny=args.tiny)
        if "stall" in args.only:
            p = gd.stall_point(sets["k400-like"], tiny=args.tiny)
            m = point(p)
            if m is not None:
                res.loader.append(gd.stall_row(p, m))
    res.skipped, res.elapsed_s = runner.skipped, runner.elapsed
    json_path, md_path = gc.write_results(res, out_dir)
    print(f"{res.elapsed_s:.0f} s -> {json_path}, {md_path}", file=sys.stderr)
    return 0


def gpucheck_command(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        return worker(json.loads(args.worker), args.worker_out)
    if args.device == "cuda":
        import torch

        problem = cuda_problem(torch.cuda.is_available(), torch.cuda.device_count())
        if problem is not None:
            raise UsageError(problem)
    if args.out:
        check_out_dir(args.out)
    return check(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run(gpucheck_command, argv)


if __name__ == "__main__":
    sys.exit(main())
