"""Step time of every distributed engine on 2 CPU processes: ZeRO-0/1/2/3, FSDP2, and activation
checkpointing, for MATS + dual masking pre-training.

    flock /tmp/mats-bench.lock python benchmarks/bench_engines.py            # S, 2 clips/rank, 16x224
    flock /tmp/mats-bench.lock python benchmarks/bench_engines.py --size debug --frames 8 --img 128 --rounds 2

The script re-launches itself under ``torchrun --standalone --nproc_per_node 2`` (gloo, fp32, one
thread per process). Every engine is built once from the same config the training loop uses, then
the engines take turns: each round runs ``--steps`` timed steps of every engine after ``--warmup``
untimed ones in round 0, so machine load hits all of them alike. A step is exactly the loop's: MATS
embed scores through the engine's (sharded) patch embedding, select_tokens (MATS + running cell 0.5,
lean), forward, backward, engine.step; clips are generated in memory beforehand (no data loading).
Step time = slowest rank (barrier before and after). Ratios (ZeRO-3 / ZeRO-0, checkpointed /
plain) are taken within a round, then the median over rounds. Prints one JSON object and writes it
to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> parallel.* overrides; "zero0" is the baseline.
ENGINES = {
    "zero0": ["parallel.backend=deepspeed", "parallel.zero_stage=0"],
    "zero1": ["parallel.backend=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
    "fsdp2": ["parallel.backend=fsdp2"],
    "zero0_ac": [
        "parallel.backend=deepspeed",
        "parallel.zero_stage=0",
        "parallel.checkpoint_encoder_every=1",
        "parallel.checkpoint_decoder_every=1",
    ],
    "zero3_ac": [
        "parallel.backend=deepspeed",
        "parallel.zero_stage=3",
        "parallel.checkpoint_encoder_every=1",
        "parallel.checkpoint_decoder_every=1",
    ],
}
RATIOS = {
    "zero3_over_zero0": ("zero3", "zero0"),
    "zero1_over_zero0": ("zero1", "zero0"),
    "zero2_over_zero0": ("zero2", "zero0"),
    "fsdp2_over_zero0": ("fsdp2", "zero0"),
    "ac_over_plain_zero0": ("zero0_ac", "zero0"),
    "ac_over_plain_zero3": ("zero3_ac", "zero3"),
}
TARGETS = {"zero3_over_zero0": 1.5, "ac_over_plain_zero0": 1.4, "ac_over_plain_zero3": 1.4}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="S")
    p.add_argument("--batch", type=int, default=2, help="clips per process")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per engine per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated subset of " + ",".join(ENGINES)
    )
    p.add_argument("--out", default=str(ROOT / "profiling" / "out" / "bench_engines.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def overrides(args, engine: str) -> list[str]:
    return [
        f"model.size={args.size}",
        f"model.num_frames={args.frames}",
        f"model.img_size={args.img}",
        "masking.preset=mats+dual",
        "masking.score=embed",
        f"data.batch_size={args.batch}",
        "data.dataset=synthetic",
        "train.device=cpu",
        "train.precision=fp32",
        *ENGINES[engine],
    ]


def worker(args) -> None:
    import torch

    from mats_scale.config import load_config
    from mats_scale.data.inmemory import moving_square_clips, normalize
    from mats_scale.parallel.distributed import barrier, detect_env, init_distributed
    from mats_scale.parallel.engine import build_engine
    from mats_scale.train.loop import seed_rank_streams
    from mats_scale.train.pretrain import PretrainTask

    names = args.engines.split(",")
    first = load_config(None, overrides(args, names[0]))
    env = init_distributed(first.train, first.parallel)
    g = torch.Generator().manual_seed(100 + env.rank)
    clips = [normalize(moving_square_clips(args.batch, args.frames, args.img, g)[0]) for _ in range(2)]
    benches = {}
    for name in names:
        cfg = load_config(None, overrides(args, name))
        case_env = detect_env(cfg.train, cfg.parallel)
        task = PretrainTask(cfg)
        engine = build_engine(cfg, case_env, task.model_spec())
        benches[name] = (engine, task, seed_rank_streams(cfg.train.seed, env.rank, env.device))

    def step(name: str, i: int) -> float:
        engine, task, gen = benches[name]
        video = clips[i % len(clips)]
        barrier()
        t0 = time.perf_counter()
        out = task.step(
            engine, {"video": video}, gen
        )  # the Trainer's micro-batch: scores, selection, forward
        engine.backward(out.loss)
        engine.step(1e-4)
        barrier()
        return time.perf_counter() - t0

    times: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            if r == 0:
                for i in range(args.warmup):
                    step(name, i)
            times[name].append([step(name, i) for i in range(args.steps)])
    if env.is_writer:
        print("BENCH_RESULT " + json.dumps(times), flush=True)


def summarise(args, times: dict[str, list[list[float]]], wall: float) -> dict:
    import deepspeed
    import torch

    total = 2 * args.batch
    res = {
        name: {
            "step_s_median": statistics.median(s for rnd in rounds for s in rnd),
            "step_s_rounds": [statistics.median(rnd) for rnd in rounds],
        }
        for name, rounds in times.items()
    }
    for r in res.values():
        r["clips_per_s"] = total / r["step_s_median"]
    ratios = {}
    for key, (a, b) in RATIOS.items():
        if a in res and b in res:
            per_round = [
                x / y for x, y in zip(res[a]["step_s_rounds"], res[b]["step_s_rounds"], strict=False)
            ]
            ratios[key] = {
                "median": statistics.median(per_round),
                "rounds": per_round,
                **({"target_max": TARGETS[key]} if key in TARGETS else {}),
            }
    return {
        "bench": "engines",
        "processes": 2,
        "threads_per_process": 1,
        "precision": "fp32",
        "model": args.size,
        "clips_per_process": args.batch,
        "frames": args.frames,
        "img": args.img,
        "masking": "mats embed (rho_pre 0.3, rho 0.9) + running cell 0.5 lean",
        "warmup": args.warmup,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
        },
        "results": res,
        "ratios": ratios,
        "wall_s": wall,
    }


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    unknown = set(args.engines.split(",")) - set(ENGINES)
    if unknown:
        print(f"--engines: unknown {sorted(unknown)}; allowed: {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    from mats_scale.config import ConfigError, load_config

    try:  # refuse a bad size / shape here, with one line, not in two worker tracebacks
        for name in args.engines.split(","):
            load_config(None, overrides(args, name))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        "--worker",
        *(argv if argv is not None else sys.argv[1:]),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:] + proc.stderr[-5000:], file=sys.stderr)
        return 1
    summary = summarise(args, json.loads(lines[-1][len("BENCH_RESULT ") :]), time.perf_counter() - t0)
    text = json.dumps(summary, indent=2)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
