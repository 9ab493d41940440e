"""Time one pre-training step with eager vs compiled transformer blocks (``train.compile``).

    PYTHONPATH=. python benchmarks/bench_compile.py                     # ViT-S, batch 2, 16x224, MATS + dual
    PYTHONPATH=. python benchmarks/bench_compile.py --size B --checkpoint --runs 7

Both models are built by the one-process engine (``parallel.backend=none``, the trainer's path: blocks
compiled after activation checkpointing) from the same seed. A step is motion scores, selection, forward,
backward and AdamW. The first compiled step (compilation) is timed on its own; after the warm-up, rounds
interleave one eager and one compiled step so machine load hits both, and the ratio compiled / eager is
taken per round, then the median over rounds; on a shared machine the ratio of the two fastest steps
is printed as well. fp32 on CPU; on CUDA the run's precision (bf16 autocast)
and synchronised timings. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mats_scale.config import load_config
from mats_scale.data.inmemory import moving_square_clips, normalize
from mats_scale.masking import TokenGrid, select_tokens
from mats_scale.models.pretrain import pretrain_spec
from mats_scale.parallel.distributed import detect_env
from mats_scale.parallel.engine import build_engine
from mats_scale.train.compile import compiled_frames


class Stepper:
    """One engine (eager or compiled) and its mask generator, stepping on a fixed clip batch."""

    def __init__(self, overrides: list[str], compile_: bool, seed: int) -> None:
        self.cfg = load_config(None, [*overrides, f"train.compile={str(compile_).lower()}"])
        self.env = detect_env(self.cfg.train, self.cfg.parallel)
        self.engine = build_engine(self.cfg, self.env, pretrain_spec(self.cfg.model))
        self.grid = TokenGrid.from_model(self.cfg.model)
        self.generator = torch.Generator(device=self.env.device).manual_seed(seed)

    def step(self, video: torch.Tensor) -> tuple[float, float]:
        """(seconds, loss) of one optimizer step."""
        sync = torch.cuda.synchronize if self.env.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        e, m = self.engine, self.cfg.masking
        with e.autocast():
            scores = e.module.motion_scores(video, m.score)
        sel = select_tokens(m, self.grid, video.shape[0], self.generator, scores)
        out = e.forward(video, *sel)
        e.backward(out.loss)
        e.step(1e-4)
        sync()
        return time.perf_counter() - t, out.loss.item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="S")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--preset", default="mats+dual", help="masking.preset (default mats+dual)")
    ap.add_argument("--checkpoint", action="store_true", help="activation checkpointing of every block")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.batch < 1:
        ap.error("--runs and --batch must be >= 1, --warmup >= 0")

    overrides = [
        f"model.size={args.size}",
        f"model.num_frames={args.frames}",
        f"model.img_size={args.img}",
        f"masking.preset={args.preset}",
        f"data.batch_size={args.batch}",
        "parallel.backend=none",
        f"train.device={args.device}",
        f"train.seed={args.seed}",
    ]
    if args.checkpoint:
        overrides += ["parallel.checkpoint_encoder_every=1", "parallel.checkpoint_decoder_every=1"]
    eager = Stepper(overrides, False, args.seed)
    compiled = Stepper(overrides, True, args.seed)
    raw, _ = moving_square_clips(args.batch, args.frames, args.img, torch.Generator().manual_seed(args.seed))
    video = normalize(raw).to(eager.env.device)

    compile_s, first_loss = compiled.step(video)
    eager_first = eager.step(video)[1]
    for _ in range(args.warmup):
        eager.step(video)
        compiled.step(video)
    frames_after_warmup = compiled_frames()
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    ratios = []
    for _ in range(args.runs):  # interleaved: the same load hits both
        e, _ = eager.step(video)
        c, _ = compiled.step(video)
        times["eager"].append(e)
        times["compiled"].append(c)
        ratios.append(c / e)
    result = {
        "note": "indicative timings; ratio = compiled / eager step time per round, median over rounds",
        "machine": {
            "device": str(eager.env.device),
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if eager.env.device.type == "cuda" else None,
        },
        "shape": {
            "size": args.size,
            "batch": args.batch,
            "frames": args.frames,
            "img": args.img,
            "preset": args.preset,
            "checkpoint": args.checkpoint,
            "precision": eager.env.precision,
            "warmup": args.warmup,
            "runs": args.runs,
        },
        "first_compiled_step_s": round(compile_s, 2),
        "first_step_loss": {"eager": eager_first, "compiled": first_loss},
        "recompiles_after_warmup": compiled_frames() - frames_after_warmup,
        "eager_step_s": round(statistics.median(times["eager"]), 4),
        "compiled_step_s": round(statistics.median(times["compiled"]), 4),
        "step_s_all": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "ratio_compiled_to_eager": round(statistics.median(ratios), 3),
        "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        # the fastest step of each: least touched by other processes on a shared machine
        "ratio_of_fastest_steps": round(min(times["compiled"]) / min(times["eager"]), 3),
        "speedup": round(1 / statistics.median(ratios), 3),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
