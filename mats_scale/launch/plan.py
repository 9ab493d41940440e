"""mats-plan: single-node feasibility. The largest micro-batch per GPU that fits, the per-GPU memory
breakdown, and the step time and days for a number of epochs, per strategy x engine x checkpointing
policy.

    mats-plan [--config FILE] [key=value ...]
        [--node a100-80|a100-40|h100-80|custom] [--gpus 8] [--gpu-mem-gib G] [--peak-tflops T]
        [--strategies tube+rc,mats,mats+dual] [--engines zero0,zero1,zero2,zero3,zero3-offload,fsdp2]
        [--checkpoint none,half,full] [--dtype bf16] [--mfu 0.35] [--epochs 800] [--train-clips 240000]
        [--ds-config ds.json] [--context-gib 1.0] [--fragmentation 0.1] [--out DIR]
        [--data-rate CLIPS_PER_S_OR_JSON] [--host-cores 64]

Also ``python -m mats_scale.launch.plan``, and ``python profiling/feasibility.py`` in a checkout. Model
shape and ratios come from the project config (defaults, --config FILE, key=value overrides); without
--config and without a model.size override the model is ViT-g. With --config the configured job itself
(its strategy, parallel.* engine and checkpointing, data.batch_size) is checked too. Writes
DIR/feasibility.csv, feasibility.md and feasibility.png; prints the headline. The planner itself is
:mod:`mats_scale.profiling.feasibility`.

Data side: each GPU consumes peak x MFU / training FLOPs per clip clips per second; with --data-rate
(clips/s one CPU core delivers on your files: a number, or the JSON of
``benchmarks/bench_data.py --list FILE --out rate.json``) and --host-cores, the verdict says whether the
job is decode-bound (and how many cores / loader workers it needs) or compute-bound.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from mats_scale.cli import (
    ArgumentParser,
    UsageError,
    bounded,
    check_out_dir,
    choices_list,
    dtype_arg,
    policy_list,
    positive,
    run,
)


def _node(args):
    from mats_scale.profiling.feasibility import NODES, Node

    if args.node == "custom":
        if args.gpu_mem_gib is None or args.peak_tflops is None:
            raise UsageError("--node custom needs --gpu-mem-gib and --peak-tflops")
        return Node(args.gpus or 8, args.gpu_mem_gib, args.peak_tflops)
    base = NODES[args.node]
    return Node(
        args.gpus or base.gpus,
        args.gpu_mem_gib or base.mem_gib,
        args.peak_tflops or base.peak_tflops,
        base.name if not (args.gpus or args.gpu_mem_gib or args.peak_tflops) else "custom",
    )


def _ds_config(path):
    if not path:
        return None
    if not os.path.isfile(path):
        raise UsageError(f"--ds-config={path!r}: no such file")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"--ds-config={path!r}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _data_rate(text):
    """--data-rate: clips/s per core, as a number or the JSON of benchmarks/bench_data.py --list."""
    if text is None:
        return None
    try:
        rate = float(text)
    except ValueError:
        if not os.path.isfile(text):
            raise UsageError(f"--data-rate={text!r}: neither a number nor a file") from None
        try:
            with open(text) as f:
                rate = float(json.load(f)["clips_per_s_per_core"])
        except (ValueError, KeyError, TypeError):
            raise UsageError(
                f"--data-rate={text!r}: not the JSON of benchmarks/bench_data.py --list "
                "(no clips_per_s_per_core)"
            ) from None
    if not (rate > 0 and math.isfinite(rate)):
        raise UsageError(f"--data-rate={text!r}: must be a finite number > 0 clips/s")
    return rate


def _node_choice(text: str) -> str:
    """--node: a planner node or custom. Checked when parsing, so that --help imports no torch."""
    from mats_scale.profiling.feasibility import NODES

    allowed = [*NODES, "custom"]
    if text not in allowed:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(map(repr, allowed))})"
        )
    return text


def _engine_list(text: str) -> list[str]:
    """--engines: planner engine labels, comma-separated (checked when parsing, as --node)."""
    from mats_scale.profiling.feasibility import ENGINE_CHOICES

    return choices_list(list(ENGINE_CHOICES), "engines")(text)


def plan_command(argv=None) -> int:
    """The command; a bad argument raises UsageError / ConfigError (see :func:`main`)."""
    from mats_scale.tokens import PRESETS as STRATEGIES

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", help="project YAML config (model, masking ratios, parallel, data.batch_size)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.size=L")
    parser.add_argument(
        "--node",
        type=_node_choice,
        default="a100-80",
        help="target node, one of the usage above; custom takes --gpu-mem-gib and --peak-tflops "
        "(default a100-80)",
    )
    parser.add_argument("--gpus", type=positive(int), help="GPUs in the node (data-parallel degree)")
    parser.add_argument(
        "--gpu-mem-gib", type=bounded(float, 0, high=1e6), help="memory per GPU in GiB (below 1e6)"
    )
    parser.add_argument("--peak-tflops", type=positive(float), help="dense bf16 peak per GPU in TFLOPS")
    parser.add_argument(
        "--strategies",
        type=choices_list(list(STRATEGIES), "strategies"),
        default=["tube+rc", "mats", "mats+dual"],
        help=f"masking presets, comma-separated: {', '.join(STRATEGIES)} (default tube+rc,mats,mats+dual)",
    )
    parser.add_argument(
        "--engines",
        type=_engine_list,
        default=None,
        help="engines, comma-separated, of the usage above (default all)",
    )
    parser.add_argument(
        "--checkpoint",
        type=policy_list,
        default="none,half,full",
        help="checkpointing policies: none, half (every 2nd block), full; or 'E,D' pairs split by ';'",
    )
    parser.add_argument(
        "--dtype", type=dtype_arg, default="bf16", help="compute dtype: fp32, bf16, fp16 (default bf16)"
    )
    parser.add_argument(
        "--mfu", type=positive(float), default=0.35, help="assumed model FLOP utilisation (0.35)"
    )
    parser.add_argument(
        "--epochs", type=positive(float), default=800, help="epochs over the training set (800)"
    )
    parser.add_argument(
        "--train-clips", type=positive(int), default=None, help="training clips (K400: 240000)"
    )
    parser.add_argument(
        "--ds-config",
        help="DeepSpeed JSON whose zero_optimization buckets to use (else the config's parallel.ds_config, "
        "else the shipped ds_configs/zero{stage}.json)",
    )
    parser.add_argument(
        "--context-gib",
        type=bounded(float, 0, low_ok=True),
        default=1.0,
        help="CUDA context allowance per GPU (1.0 GiB)",
    )
    parser.add_argument(
        "--fragmentation",
        type=bounded(float, 0, low_ok=True, high=1),
        default=0.10,
        help="allocator fragmentation share (0.10)",
    )
    parser.add_argument(
        "--data-rate",
        help="clips/s one CPU core (loader worker) delivers on your files, or the JSON written by "
        "benchmarks/bench_data.py --list FILE --out FILE.json; gives the decode-bound verdict",
    )
    parser.add_argument("--host-cores", type=positive(int), default=64, help="CPU cores of the node (64)")
    parser.add_argument("--out", default="profiling/out", help="output folder (default profiling/out)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not 0 < args.mfu <= 1:
        raise UsageError(f"--mfu={args.mfu}: must be in (0, 1]")
    data_rate = _data_rate(args.data_rate)

    from tqdm import tqdm

    from mats_scale.config import load_config
    from mats_scale.profiling.feasibility import (
        ENGINE_CHOICES,
        K400_TRAIN_CLIPS,
        check_config,
        data_verdict,
        engine_of,
        gpu_clips_per_s,
        plan,
    )
    from mats_scale.profiling.memory import Allowance
    from mats_scale.profiling.report import markdown_table, plain, plot_bars, write_csv, write_markdown
    from mats_scale.profiling.workload import Workload, masking_config

    engines = args.engines or list(ENGINE_CHOICES)
    overrides = list(args.overrides)
    if not args.config and not any(o.startswith("model.size=") for o in overrides):
        overrides.insert(0, "model.size=g")
    cfg = load_config(args.config, overrides)
    node, ds_config = _node(args), _ds_config(args.ds_config)
    if ds_config is None and cfg.parallel.ds_config:  # the config's own template, as the launcher uses
        ds_config = _ds_config(cfg.parallel.ds_config)
    allowance = Allowance(args.context_gib, args.fragmentation)
    m = cfg.masking
    wls = {
        st: Workload(
            cfg.model, masking_config(st, m.ratio, m.decoder_ratio, m.keep_ratio, m.score), 1, args.dtype
        )
        for st in args.strategies
    }
    clips = args.train_clips or K400_TRAIN_CLIPS
    check_out_dir(args.out)  # before the planning, not after it

    t0 = time.perf_counter()
    with tqdm(
        total=len(wls) * len(args.checkpoint), desc="feasibility", disable=args.no_progress, file=sys.stderr
    ) as bar:
        plans = plan(
            wls,
            engines,
            args.checkpoint,
            node,
            mfu=args.mfu,
            epochs=args.epochs,
            train_clips=clips,
            allowance=allowance,
            ds_config=ds_config,
            progress=bar,
        )
    elapsed = time.perf_counter() - t0

    rows = [p.row() for p in plans]
    out = args.out
    write_csv(rows, os.path.join(out, "feasibility.csv"))

    def f2(x):
        return "-" if isinstance(x, float) and math.isnan(x) else f"{x:.2f}"

    def f1(x):
        return "-" if isinstance(x, float) and math.isnan(x) else f"{x:.1f}"

    cols = [
        ("strategy", "strategy", plain),
        ("engine", "engine", plain),
        ("checkpoint", "ckpt", plain),
        ("max_batch", "max micro-batch", plain),
        ("params_gib", "params", f2),
        ("grads_gib", "grads", f2),
        ("master_adam_gib", "master+Adam", f2),
        ("step_temp_gib", "step temp", f2),
        ("gathered_gib", "gathered", f2),
        ("buffers_gib", "buckets", f2),
        ("activations_gib", "activations", f2),
        ("allowance_gib", "allowance", f2),
        ("total_gib", "total GiB", f2),
        ("step_s", "step s", f2),
        ("days", f"days / {args.epochs:g} ep", f1),
    ]
    size = cfg.model.size
    head = (
        f"# Feasibility: ViT-{size}, {cfg.model.num_frames}x{cfg.model.img_size}, rho={m.ratio}, "
        f"rho_d={m.decoder_ratio}, on {node.gpus} x {node.mem_gib:g} GiB ({node.name})\n\n"
        f"Per-GPU memory at the largest micro-batch that fits (GiB); step time at MFU {args.mfu} of "
        f"{node.peak_tflops:g} TFLOPS; days for {args.epochs:g} epochs of {clips} clips. Allowance = "
        f"{args.context_gib} GiB CUDA context + {args.fragmentation:.0%} fragmentation.\n\n"
    )
    text = head + markdown_table(rows, cols)

    lines = ["", f"## Headline: ViT-{size} on {node.gpus} x {node.mem_gib:g} GiB, ZeRO-3", ""]
    for st in ("mats+dual", "tube+rc"):
        for pname in args.checkpoint:
            hit = [p for p in plans if p.strategy == st and p.engine == "zero3" and p.checkpoint == pname]
            if hit:
                p = hit[0]
                lines.append(
                    f"- {st}, checkpointing {pname}: max micro-batch {p.max_batch} per GPU "
                    f"({p.max_batch * node.gpus} clips per step), {f2(p.step_s)} s/step, {f1(p.days)} days"
                )
    lines += ["", f"## Data side: {node.gpus} GPUs at MFU {args.mfu}, {args.host_cores}-core host", ""]
    for st in ("mats+dual", "tube+rc"):
        for pname in args.checkpoint:
            hit = [p for p in plans if p.strategy == st and p.checkpoint == pname]
            if not hit:
                continue
            tf = hit[0].train_flops_per_clip
            if data_rate:
                v = data_verdict(tf, node, args.mfu, data_rate, args.host_cores)
                lines.append(f"- {st}, checkpointing {pname}: {v.text()}")
            else:
                lines.append(
                    f"- {st}, checkpointing {pname}: each GPU consumes "
                    f"{gpu_clips_per_s(tf, node, args.mfu):.0f} clips/s "
                    "(pass --data-rate for the verdict)"
                )
    if args.config:
        wl = Workload(
            cfg.model,
            cfg.masking,
            cfg.data.batch_size,
            args.dtype,
            (cfg.parallel.checkpoint_encoder_every, cfg.parallel.checkpoint_decoder_every),
        )
        r = check_config(wl, engine_of(cfg.parallel), node, allowance=allowance, ds_config=ds_config)
        verdict = "FITS" if r["fits"] else "DOES NOT FIT"
        lines += [
            "",
            f"## Your config ({args.config}): {verdict}",
            "",
            f"- {r['engine']}, micro-batch {r['batch']}: {r['total_gib']:.2f} GiB of "
            f"{r['capacity_gib']:g} GiB (states {r['states_gib']:.2f}, "
            f"activations {r['activations_gib']:.2f}); "
            f"largest micro-batch that fits: {r['max_batch']}",
        ]
        if data_rate:
            from mats_scale.profiling.flops import step_flops

            tf = step_flops(wl)  # one clip's step: forward, backward, recomputation and the score
            lines.append(f"- data: {data_verdict(tf, node, args.mfu, data_rate, args.host_cores).text()}")
    text += "\n".join(lines) + "\n"
    write_markdown(text, os.path.join(out, "feasibility.md"))

    panels = {
        f"checkpointing {pname}": {
            st: {
                e: next(
                    p.max_batch for p in plans if p.strategy == st and p.engine == e and p.checkpoint == pname
                )
                for e in engines
            }
            for st in args.strategies
        }
        for pname in args.checkpoint
    }
    plot_bars(
        os.path.join(out, "feasibility.png"),
        panels,
        ylabel="max micro-batch per GPU",
        title=f"ViT-{size} on {node.gpus} x {node.mem_gib:g} GiB",
    )
    print("\n".join(lines))
    print(f"\n{len(rows)} rows in {elapsed:.1f}s -> {out}/feasibility.csv, feasibility.md, feasibility.png")
    return 0


def main(argv=None) -> int:
    """mats-plan: a bad argument or config value is one ``error:`` line and exit status 2."""
    return run(plan_command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
