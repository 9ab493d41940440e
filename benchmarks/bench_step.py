"""Time one pre-training step (selection, forward, backward, optimizer) per masking setting.

    python benchmarks/bench_step.py                       # ViT-B, batch 2, 16x224, fp32
    python benchmarks/bench_step.py --size S --runs 3 --setting mats+dual --setting tube

Default settings, measured in the same run with their steps interleaved (so machine load hits both):
  tube+rc     tube 0.9 + running cell 0.5, reference mode (the VideoMAE V2 setting; baseline)
  mats+dual   MATS embed scores (rho_pre 0.3, rho 0.9) + running cell 0.5, lean decoder
Also available: the other presets (tube, tube+rc-lean, mats) and mats+dual-pixel.

Prints one JSON object: per setting the median step seconds (after warm-up), clips/s, the phase split
(selection / forward+backward / optimizer), model FLOPs of the step (torch.utils.flop_counter, which
counts SDPA; selection + forward + backward), model FLOP/s and its ratio to the fp32 GEMM peak (2048^3
matmuls sampled before every round), and the step ratio of every setting against the baseline. Ratios
are taken within a round (same load), then the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mats_scale.config import MaskingConfig, ModelConfig, OptimConfig
from mats_scale.data.inmemory import moving_square_clips, normalize
from mats_scale.masking import TokenGrid, select_tokens, selection_counts
from mats_scale.models.pretrain import build_pretrain_model
from mats_scale.optim import build_adamw
from mats_scale.profiling.bench import BASELINE, SETTINGS, shape_problem


@dataclass
class Bench:
    name: str
    masking: MaskingConfig
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    grid: TokenGrid
    generator: torch.Generator

    def select(self, video: torch.Tensor, raw: torch.Tensor):
        """The selection phase of a step: motion scores (if any), then the index tensors."""
        scores = None
        if self.masking.strategy == "mats":
            if self.masking.score == "embed":
                scores = self.model.motion_scores(video)
            else:  # in training this runs in the data loader; timed here as part of the step
                scores = self.model.motion_scores(raw, "pixel")
        return select_tokens(self.masking, self.grid, video.shape[0], self.generator, scores)

    def step(self, video: torch.Tensor, raw: torch.Tensor) -> tuple[float, float, float]:
        """One step; returns seconds of (selection, forward + backward, optimizer)."""
        t0 = time.perf_counter()
        sel = self.select(video, raw)
        t1 = time.perf_counter()
        out = self.model(video, *sel)
        out.loss.backward()
        t2 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    def count_flops(self, video: torch.Tensor, raw: torch.Tensor) -> tuple[int, int]:
        """(selection FLOPs, forward + backward FLOPs) of one step (no optimizer update)."""
        with FlopCounterMode(display=False) as sel_counter:
            sel = self.select(video, raw)
        with FlopCounterMode(display=False) as model_counter:
            self.model(video, *sel).loss.backward()
        self.opt.zero_grad(set_to_none=True)
        return sel_counter.get_total_flops(), model_counter.get_total_flops()


class GemmPeak:
    """fp32 matmul FLOP/s of n x n x n products: the machine's practical peak, sampled between steps."""

    def __init__(self, n: int = 2048) -> None:
        self.n = n
        self.a, self.b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(self.a, self.b)  # warm-up

    def sample(self, repeats: int = 3) -> float:
        """Median FLOP/s of `repeats` products."""
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(self.a, self.b)
            times.append(time.perf_counter() - t)
        return 2 * self.n**3 / statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="B")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--setting",
        action="append",
        choices=sorted(SETTINGS),
        help=f"repeatable; default: {BASELINE} and mats+dual",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--unfused-adamw",
        action="store_true",
        help="optim.fused=false: torch's per-parameter AdamW loop instead of the fused kernel",
    )
    args = ap.parse_args(argv)
    names = args.setting or [BASELINE, "mats+dual"]
    if args.runs < 1 or args.warmup < 0 or args.batch < 1:
        ap.error("--runs and --batch must be >= 1, --warmup >= 0")

    problem = shape_problem(args.size, args.frames, args.img, names)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    model_cfg = ModelConfig(size=args.size, num_frames=args.frames, img_size=args.img)
    grid = TokenGrid.from_model(model_cfg)
    benches = []
    for name in names:
        torch.manual_seed(args.seed)
        model = build_pretrain_model(model_cfg, device="cpu")
        masking = MaskingConfig(**SETTINGS[name])
        opt = build_adamw(model, OptimConfig(fused=not args.unfused_adamw), args.batch)
        benches.append(Bench(name, masking, model, opt, grid, torch.Generator().manual_seed(args.seed)))
    raw, _ = moving_square_clips(args.batch, args.frames, args.img, torch.Generator().manual_seed(args.seed))
    video = normalize(raw)

    gemm = GemmPeak()
    flops = {b.name: b.count_flops(video, raw) for b in benches}
    for _ in range(args.warmup):
        for b in benches:
            b.step(video, raw)
    phases = {b.name: [] for b in benches}
    peaks = []
    # Rounds interleave a GEMM-peak sample and one step of every setting, so load from other
    # processes hits all of them alike; ratios are taken within a round, then the median over rounds.
    for _ in range(args.runs):
        peaks.append(gemm.sample())
        for b in benches:
            phases[b.name].append(b.step(video, raw))
    peak = statistics.median(peaks)

    result = {
        "note": "indicative timings; fp32 on CPU",
        "optimizer": f"optim.build_adamw(fused={not args.unfused_adamw})",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
        },
        "shape": {
            "size": args.size,
            "batch": args.batch,
            "frames": args.frames,
            "img": args.img,
            "tokens": grid.num_tokens,
            "warmup": args.warmup,
            "runs": args.runs,
        },
        "gemm_peak_gflops": round(peak / 1e9, 1),
        "gemm_peak_gflops_all": [round(p / 1e9, 1) for p in peaks],
        "settings": {},
    }
    for b in benches:
        steps = [sum(p) for p in phases[b.name]]
        step = statistics.median(steps)
        sel_s, fb_s, opt_s = (statistics.median(p[i] for p in phases[b.name]) for i in range(3))
        sel_flops, model_flops = flops[b.name]
        n_vis, n_tgt = selection_counts(b.masking, grid)
        result["settings"][b.name] = {
            "masking": SETTINGS[b.name],
            "visible": n_vis,
            "targets": n_tgt,
            "step_s": round(step, 4),
            "step_s_min": round(min(steps), 4),
            "step_s_all": [round(s, 4) for s in steps],
            "clips_per_s": round(args.batch / step, 3),
            "selection_s": round(sel_s, 4),
            "selection_frac": round(statistics.median(p[0] / sum(p) for p in phases[b.name]), 4),
            "fwd_bwd_s": round(fb_s, 4),
            "optimizer_s": round(opt_s, 4),
            "step_gflop": round((sel_flops + model_flops) / 1e9, 2),
            "selection_gflop": round(sel_flops / 1e9, 2),
            "model_gflops": round((sel_flops + model_flops) / step / 1e9, 1),
            # per round: (step FLOPs / step time) / GEMM peak sampled just before, median over rounds
            "model_flops_over_gemm_peak": round(
                statistics.median(
                    (sel_flops + model_flops) / s / p for s, p in zip(steps, peaks, strict=False)
                ),
                3,
            ),
        }
    if BASELINE in phases:
        # Median over rounds of step / baseline step of the same round: the two ran back to back, so
        # this ratio is the one least disturbed by load from other processes.
        base = [sum(p) for p in phases[BASELINE]]
        result["step_ratio_vs_" + BASELINE] = {
            n: round(statistics.median(sum(p) / b for p, b in zip(phases[n], base, strict=False)), 3)
            for n in phases
        }
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
