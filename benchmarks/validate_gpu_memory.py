"""Predicted vs measured activation memory on a CUDA GPU (fills the GPU rows of benchmarks/README.md).

    PYTHONPATH=$PWD python benchmarks/validate_gpu_memory.py [--sizes B,L] [--batches 4,8,16]
        [--strategies tube+rc,mats+dual] [--checkpoint none,full] [--out DIR]

For each configuration: the bf16 model on the GPU, one warm-up step (cuBLAS / attention workspaces
are created once), then ``torch.cuda.reset_peak_memory_stats`` and one forward + backward with the
parameter gradients handed off as they are produced (as memory.measure_activations does). Measured =
``max_memory_allocated`` minus what was allocated before the step (parameters, buffers, the batch);
predicted = the meta-device activation peak for the CUDA kernels. Writes DIR/gpu_memory.json and
gpu_memory.md; exits 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mats_scale.cli import UsageError, choices_list, policy_list, run


def measure_on_gpu(wl) -> int:
    import torch

    from mats_scale.profiling.workload import build_model, make_inputs, model_inputs

    model = build_model(wl, "cuda")
    video, sel = make_inputs(wl, "cuda")
    args = model_inputs(video, sel)
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in model.parameters()
    ]

    def step():
        if wl.uses_embed_score:
            model.motion_scores(video)
        out = model(*args)
        out.loss.backward()

    step()  # warm-up: library workspaces
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    for h in hooks:
        h.remove()
    return peak


def main(argv=None) -> int:
    from mats_scale.models.sizes import SIZES
    from mats_scale.profiling.workload import STRATEGIES

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=choices_list(list(SIZES), "sizes"),
        default=["B", "L"],
        help="model sizes (default B,L)",
    )
    parser.add_argument("--batches", default="4,8,16", help="micro-batches, comma-separated")
    parser.add_argument(
        "--strategies",
        type=choices_list(list(STRATEGIES), "strategies"),
        default=["tube+rc", "mats+dual"],
        help=f"masking presets: {', '.join(STRATEGIES)} (default tube+rc,mats+dual)",
    )
    parser.add_argument(
        "--checkpoint",
        type=policy_list,
        default=policy_list("none,full"),
        help="checkpointing policies: none, half, full or 'E,D' pairs split by ';' (default none,full)",
    )
    parser.add_argument("--out", default="profiling/out", help="output folder (default profiling/out)")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise UsageError(f"--batches={args.batches!r}: comma-separated integers >= 1")

    import torch

    if not torch.cuda.is_available():
        raise UsageError("no CUDA device: this validation needs a GPU (the CPU checks are in the tests)")

    from mats_scale.config import ModelConfig
    from mats_scale.profiling.memory import measure_activations
    from mats_scale.profiling.report import markdown_table, plain, write_markdown
    from mats_scale.profiling.workload import Workload, masking_config

    rows = []
    for size in args.sizes:
        for st in args.strategies:
            for pname, policy in args.checkpoint.items():
                for b in batches:
                    wl = Workload(ModelConfig(size=size), masking_config(st, 0.9), b, torch.bfloat16, policy)
                    predicted = measure_activations(wl, target="cuda").peak_bytes
                    try:
                        measured = measure_on_gpu(wl)
                        torch.cuda.empty_cache()
                    except torch.cuda.OutOfMemoryError:
                        measured = None
                        torch.cuda.empty_cache()
                    err = None if measured is None else measured / predicted - 1
                    rows.append(
                        dict(
                            size=size,
                            strategy=st,
                            checkpoint=pname,
                            batch=b,
                            predicted=predicted,
                            measured=measured,
                            error=err,
                        )
                    )
                    print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_memory.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=2)

    def mib(x):
        return "OOM" if x is None else f"{x / 2**20:.0f}"

    def pct(x):
        return "-" if x is None else f"{100 * x:+.1f}%"

    cols = [
        ("size", "size", plain),
        ("strategy", "strategy", plain),
        ("checkpoint", "ckpt", plain),
        ("batch", "batch", plain),
        ("predicted", "predicted MiB", mib),
        ("measured", "measured MiB", mib),
        ("error", "error", pct),
    ]
    write_markdown(
        f"# Activation peak on {torch.cuda.get_device_name()}\n\n" + markdown_table(rows, cols),
        os.path.join(args.out, "gpu_memory.md"),
    )
    worst = max((abs(r["error"]) for r in rows if r["error"] is not None), default=0.0)
    print(f"worst error {100 * worst:.1f}% -> {args.out}/gpu_memory.json, gpu_memory.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
