"""mats-memory: activation memory against mask ratio and model size, measured on the meta device
(nothing allocated).

    mats-memory [--sizes S,B,L,H,g] [--ratios ...] [--strategies tube+rc,mats,mats+dual] [--batch 1]
        [--dtype bf16] [--checkpoint none,full] [--target cuda] [--dp 8] [--out DIR]

Also ``python -m mats_scale.launch.memory``, and ``python profiling/memory_per_mask_ratio.py`` in a
checkout. For each configuration: the bytes the autograd graph saves (exact), the peak of live
activation bytes over forward + backward, and the batch itself, for one micro-batch on one GPU; plus,
per size, the ZeRO-3 model states on `--dp` GPUs for scale. Writes DIR/memory.csv, memory.md and
memory.png.
"""

from __future__ import annotations

import os
import sys
import time

from mats_scale.cli import add_sweep_args, command_parser, dtype_arg, policy_list, positive, run


def memory_command(argv=None) -> int:
    """The command; a bad argument raises UsageError / ConfigError (see :func:`main`)."""
    parser = command_parser("mats_scale.launch.memory", __doc__)
    add_sweep_args(parser)
    parser.add_argument("--batch", type=positive(int), default=1, help="micro-batch per GPU (default 1)")
    parser.add_argument("--dtype", type=dtype_arg, default="bf16", help="compute dtype: bf16, fp16, fp32")
    parser.add_argument(
        "--checkpoint",
        type=policy_list,
        default="none",
        help="checkpointing policies, comma-separated: none, half, full; or 'E,D' pairs "
        "separated by ';' (default none)",
    )
    parser.add_argument(
        "--target",
        choices=["cuda", "cpu"],
        default="cuda",
        help="device whose attention kernel and allocator rounding are emulated",
    )
    parser.add_argument(
        "--dp", type=positive(int), default=8, help="data-parallel GPUs for the ZeRO-3 column"
    )
    args = parser.parse_args(argv)

    from tqdm import tqdm

    from mats_scale.config import ModelConfig
    from mats_scale.profiling.memory import measure_activations
    from mats_scale.profiling.report import (
        GIB,
        dtype_name,
        gib,
        markdown_table,
        mib,
        plain,
        plot_lines,
        sweep_panels,
        write_csv,
        write_markdown,
    )
    from mats_scale.profiling.states import model_states, param_stats
    from mats_scale.profiling.workload import Workload, build_model, masking_config, token_counts

    jobs = [
        (s, st, r, p)
        for s in args.sizes
        for st in args.strategies
        for r in args.ratios
        for p in args.checkpoint
    ]
    states = {}
    rows, t0 = [], time.perf_counter()
    for size, strategy, ratio, pname in tqdm(
        jobs, desc="memory", disable=args.no_progress or None, file=sys.stderr
    ):
        model = ModelConfig(size=size, num_frames=args.num_frames, img_size=args.img_size)
        masking = masking_config(strategy, ratio, args.decoder_ratio, args.keep_ratio)
        wl = Workload(model, masking, args.batch, args.dtype, args.checkpoint[pname])
        if size not in states:
            states[size] = model_states(
                param_stats(build_model(wl, "meta")), zero_stage=3, dp=args.dp, dtype=args.dtype
            ).total
        act = measure_activations(wl, target=args.target)
        n_vis, n_tgt = token_counts(wl)
        rows.append(
            dict(
                size=size,
                strategy=strategy,
                ratio=ratio,
                decoder_ratio=args.decoder_ratio,
                checkpoint=pname,
                batch=args.batch,
                dtype=dtype_name(args.dtype),
                target=args.target,
                n_visible=n_vis,
                n_targets=n_tgt,
                saved_bytes=act.saved_bytes,
                peak_bytes=act.peak_bytes,
                input_bytes=act.input_bytes,
                zero3_states_bytes=states[size],
            )
        )
    elapsed = time.perf_counter() - t0

    out = args.out
    write_csv(rows, os.path.join(out, "memory.csv"))
    cols = [
        ("size", "size", plain),
        ("strategy", "strategy", plain),
        ("ratio", "rho", plain),
        ("checkpoint", "ckpt", plain),
        ("n_visible", "enc tokens", plain),
        ("n_targets", "targets", plain),
        ("saved_bytes", "saved GiB", gib),
        ("peak_bytes", "peak GiB", gib),
        ("input_bytes", "batch MiB", mib),
        ("zero3_states_bytes", f"ZeRO-3 states GiB (dp={args.dp})", gib),
    ]
    write_markdown(
        f"# Activation memory per GPU, micro-batch {args.batch}, {args.num_frames}x{args.img_size}, "
        f"{dtype_name(args.dtype)}, {args.target} kernels\n\n" + markdown_table(rows, cols),
        os.path.join(out, "memory.md"),
    )

    def label(st, p):
        return st if len(args.checkpoint) == 1 else f"{st} ckpt={p}"

    series = {
        label(st, p): (lambda r, st=st, p=p: r["strategy"] == st and r["checkpoint"] == p)
        for st in args.strategies
        for p in args.checkpoint
    }
    panels, by_size = sweep_panels(rows, args.sizes, args.ratios, series, lambda r: r["peak_bytes"] / GIB)
    plot_lines(
        os.path.join(out, "memory.png"),
        panels,
        xlabel="encoder mask ratio",
        xlabels={by_size: "model size"},
        ylabel=f"peak activation GiB (batch {args.batch})",
        logy=True,
        title=f"Activation memory per GPU ({dtype_name(args.dtype)}, {args.target} kernels)",
    )
    print(f"{len(rows)} configurations in {elapsed:.1f}s -> {out}/memory.csv, memory.md, memory.png")
    return 0


def main(argv=None) -> int:
    """mats-memory: a bad argument or config value is one ``error:`` line and exit status 2."""
    return run(memory_command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
