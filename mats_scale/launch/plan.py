"""mats-plan: single-node feasibility. The largest micro-batch per GPU that fits, the per-GPU memory
breakdown, and the step time and days for a number of epochs, per strategy x engine x checkpointing
policy.

    mats-plan [--config FILE] [key=value ...]
        [--node a100-80|a100-40|h100-80|h200-141|b200-192|custom] [--gpus 8] [--gpu-mem-gib G]
        [--peak-tflops T] [--strategies tube+rc,mats,mats+dual]
        [--engines zero0,zero1,zero2,zero3,zero3-offload,fsdp2] [--checkpoint none,half,full]
        [--dtype bf16] [--mfu 0.35 | --mfu-from RUN_DIR|metrics.jsonl|gpucheck.json]
        [--epochs 800] [--train-videos 240000] [--ds-config ds.json] [--context-gib 1.0]
        [--fragmentation 0.1] [--out DIR] [--data-rate CLIPS_PER_S_OR_JSON] [--host-cores 64]

Also ``python -m mats_scale.launch.plan``, and ``python profiling/feasibility.py`` in a checkout. Model
shape and ratios come from the project config (defaults, --config FILE, key=value overrides); without
--config and without a model.size override the model is ViT-g. With --config the configured job itself
(its strategy, parallel.* engine and checkpointing, data.batch_size, schedule) is checked too: memory,
s/step and days at its own micro-batch, and its train.steps as the trainer derives them. Writes
DIR/feasibility.csv, feasibility.md and feasibility.png; prints the headline. The planner itself is
:mod:`mats_scale.profiling.feasibility`.

Epochs: one epoch visits every training video once, each visit yielding data.num_sample clips (the
trainer's train.epochs and VideoMAE V2's --epochs); steps per epoch = videos / GPUs / (micro-batch /
num_sample) / grad_accum, rounded down as the trainer does.

MFU: assumed (--mfu, default 0.35) or measured (--mfu-from): a run directory or its metrics.jsonl (the
median of its step records' mfu after the first 2), or a mats-gpucheck results file, a JSON object
{"device": str, "results": [{"name": str, "mfu": float, ...}, ...]}: the median over the entries of the
planned model (a "model" field, g or a depth-reduced g-8blk, else a name starting with ViT-g, vit_g or
g), narrowed to the masking preset (a "preset" field or a word of the name) when some give it; with no
entry of the model, the median of all entries. A run's MFU counts model FLOPs, without recomputation;
the planner applies it to the step's FLOPs with recomputation, so a checkpointed plan comes out slower,
never faster, than such a run.

Data side: each GPU consumes peak x MFU / training FLOPs per clip clips per second; with --data-rate
(clips/s one CPU core delivers on your files: a number, or the JSON of
``benchmarks/bench_data.py --list FILE --out rate.json``) and --host-cores, the verdict says whether the
job is decode-bound (and how many cores / loader workers it needs) or compute-bound. --mfu-from RUN
also lists the run's measured data wait and clips/s delivered vs consumed there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from mats_scale.cli import (
    UsageError,
    bounded,
    check_out_dir,
    choices_list,
    command_parser,
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


def _parser():
    from mats_scale.tokens import PRESETS as STRATEGIES

    parser = command_parser("mats_scale.launch.plan", __doc__)
    parser.add_argument(
        "--config", help="project YAML config (model, masking ratios, parallel, data.batch_size, schedule)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. model.size=L")
    parser.add_argument(
        "--node",
        type=_node_choice,
        default="a100-80",
        help="target node of 8 GPUs, one of the usage above (dense bf16 peak and memory from NVIDIA's "
        "datasheets); custom takes --gpu-mem-gib and --peak-tflops (default a100-80)",
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
        help="checkpointing policies: none, half (every 2nd encoder AND decoder block), full; or 'E,D' "
        "pairs split by ';' (every E-th encoder, D-th decoder block, 0 = none)",
    )
    parser.add_argument(
        "--dtype", type=dtype_arg, default="bf16", help="compute dtype: fp32, bf16, fp16 (default bf16)"
    )
    parser.add_argument(
        "--mfu", type=positive(float), default=None, help="assumed model FLOP utilisation (default 0.35)"
    )
    parser.add_argument(
        "--mfu-from",
        metavar="PATH",
        help="use a measured MFU instead: a run directory, its metrics.jsonl, or a mats-gpucheck JSON "
        "(see MFU above)",
    )
    parser.add_argument(
        "--epochs",
        type=positive(float),
        default=None,
        help="epochs of the table's days, each a visit of every video (num_sample clips each), as the "
        "trainer counts (default: the config's train.epochs, else 800)",
    )
    parser.add_argument(
        "--train-videos",
        type=positive(int),
        default=None,
        help="training videos (default: K400's ~240000; data.dataset=synthetic: its clip count)",
    )
    parser.add_argument("--train-clips", help=argparse.SUPPRESS)  # renamed: refused with a pointer
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
    return parser


def _mfu(args, size: str, preset: str | None):
    """(MFU, how it was obtained, the run's measured data side or "") from --mfu / --mfu-from."""
    if args.mfu_from is not None and args.mfu is not None:
        raise UsageError("--mfu and --mfu-from: give one of the two")
    if args.mfu_from is None:
        return (0.35 if args.mfu is None else args.mfu), "assumed", ""  # --mfu checked in plan_command
    from mats_scale.profiling.measured import measured_mfu

    try:
        got = measured_mfu(args.mfu_from, size, preset)
    except ValueError as e:
        raise UsageError(f"--mfu-from={args.mfu_from!r}: {e}") from None
    return got.mfu, f"measured: {got.source}", got.data


def plan_command(argv=None) -> int:
    """The command; a bad argument raises UsageError / ConfigError (see :func:`main`)."""
    args = _parser().parse_args(argv)
    if args.train_clips is not None:
        raise UsageError(
            "--train-clips: renamed --train-videos (an epoch visits every video once, data.num_sample "
            "clips each)"
        )
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise UsageError(f"--mfu={args.mfu}: must be in (0, 1]")
    data_rate = _data_rate(args.data_rate)

    from tqdm import tqdm

    from mats_scale.config import load_config
    from mats_scale.profiling.feasibility import (
        ENGINE_CHOICES,
        K400_TRAIN_VIDEOS,
        data_verdict,
        gpu_clips_per_s,
        plan,
    )
    from mats_scale.profiling.memory import Allowance
    from mats_scale.profiling.report import (
        markdown_table,
        plain,
        plot_bars,
        policy_text,
        write_csv,
        write_markdown,
    )
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
    m, d = cfg.masking, cfg.data
    from mats_scale.tokens import PRESETS

    preset = m.preset or next(
        (n for n, keys in PRESETS.items() if all(getattr(m, k) == v for k, v in keys.items())), None
    )
    mfu, mfu_how, measured_data = _mfu(args, cfg.model.size, preset if args.config else None)
    wls = {
        st: Workload(
            cfg.model, masking_config(st, m.ratio, m.decoder_ratio, m.keep_ratio, m.score), 1, args.dtype
        )
        for st in args.strategies
    }
    if args.train_videos:
        videos, videos_how = args.train_videos, "--train-videos"
    elif d.dataset == "synthetic":
        from mats_scale.data.loader import SYNTHETIC_CLIPS

        videos, videos_how = SYNTHETIC_CLIPS, "data.dataset=synthetic"
    else:
        videos, videos_how = K400_TRAIN_VIDEOS, "K400's ~240k; --train-videos for your copy"
    epochs = args.epochs or cfg.train.epochs or 800
    if args.config:
        from mats_scale.profiling.feasibility import config_schedule

        config_schedule(cfg, node.gpus, videos)  # a schedule without a whole step: refused before planning
    check_out_dir(args.out)  # before the planning, not after it

    t0 = time.perf_counter()
    with tqdm(
        total=len(wls) * len(args.checkpoint),
        desc="feasibility",
        disable=args.no_progress or None,
        file=sys.stderr,
    ) as bar:
        plans = plan(
            wls,
            engines,
            args.checkpoint,
            node,
            mfu=mfu,
            epochs=epochs,
            videos=videos,
            num_sample=d.num_sample,
            grad_accum=cfg.optim.grad_accum,
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

    def policy(name):
        e, dd = args.checkpoint[name]
        return name if "," in name else f"{name} ({e},{dd})"

    cols = [
        ("strategy", "strategy", plain),
        ("engine", "engine", plain),
        ("checkpoint", "ckpt (enc,dec)", policy),
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
        ("step_s", "s/step", f2),
        ("steps", "steps", plain),
        ("days", f"days / {epochs:g} ep", f1),
    ]
    size = cfg.model.size
    per_visit = f"{d.num_sample} clips per visit" if d.num_sample > 1 else "1 clip per visit"
    head = (
        f"# Feasibility: ViT-{size}, {cfg.model.num_frames}x{cfg.model.img_size}, rho={m.ratio}, "
        f"rho_d={m.decoder_ratio}, on {node.gpus} x {node.mem_gib:g} GiB ({node.name})\n\n"
        f"Per-GPU memory at the largest micro-batch that fits (GiB); step time at MFU {mfu:.3g} "
        f"({mfu_how}) of {node.peak_tflops:g} TFLOPS; steps and days for {epochs:g} epochs, each a visit "
        f"of every one of {videos} videos ({videos_how}; {per_visit}), grad_accum "
        f"{cfg.optim.grad_accum}. Checkpointing (E,D): every E-th encoder and D-th decoder block, 0 = none. "
        f"Allowance = {args.context_gib} GiB CUDA context + {args.fragmentation:.0%} fragmentation.\n\n"
    )
    text = head + markdown_table(rows, cols)

    lines = ["", f"## Headline: ViT-{size} on {node.gpus} x {node.mem_gib:g} GiB, ZeRO-3", ""]
    for st in ("mats+dual", "tube+rc"):
        for pname in args.checkpoint:
            hit = [p for p in plans if p.strategy == st and p.engine == "zero3" and p.checkpoint == pname]
            if hit:
                p = hit[0]
                lines.append(
                    f"- {st}, checkpointing {pname} ({policy_text(*args.checkpoint[pname])}): max "
                    f"micro-batch {p.max_batch} per GPU ({p.max_batch * node.gpus} clips per step), "
                    f"{f2(p.step_s)} s/step, {f1(p.days)} days for {epochs:g} epochs"
                )
    lines += ["", f"## Data side: {node.gpus} GPUs at MFU {mfu:.3g}, {args.host_cores}-core host", ""]
    lines += [f"- {measured_data}"] if measured_data else []
    for st in ("mats+dual", "tube+rc"):
        for pname in args.checkpoint:
            hit = [p for p in plans if p.strategy == st and p.checkpoint == pname]
            if not hit:
                continue
            tf = hit[0].train_flops_per_clip
            if data_rate:
                v = data_verdict(tf, node, mfu, data_rate, args.host_cores)
                lines.append(f"- {st}, checkpointing {pname}: {v.text()}")
            else:
                lines.append(
                    f"- {st}, checkpointing {pname}: each GPU consumes "
                    f"{gpu_clips_per_s(tf, node, mfu):.0f} clips/s "
                    "(pass --data-rate for the verdict)"
                )
    if args.config:
        lines += _config_section(args, cfg, node, allowance, ds_config, mfu, mfu_how, videos, data_rate)
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


def _config_section(args, cfg, node, allowance, ds_config, mfu, mfu_how, videos, data_rate) -> list[str]:
    """The printout's "Your config" lines: memory, schedule, s/step and days at the configured batch."""
    from mats_scale.profiling.feasibility import (
        check_config,
        config_schedule,
        data_verdict,
        engine_of,
        step_seconds,
    )
    from mats_scale.profiling.flops import step_flops
    from mats_scale.profiling.report import policy_text
    from mats_scale.profiling.workload import Workload

    d, o, par = cfg.data, cfg.optim, cfg.parallel
    ckpt = (par.checkpoint_encoder_every, par.checkpoint_decoder_every)
    wl = Workload(cfg.model, cfg.masking, d.batch_size, args.dtype, ckpt)
    r = check_config(wl, engine_of(par), node, allowance=allowance, ds_config=ds_config)
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    same = [n for n, pol in args.checkpoint.items() if tuple(pol) == ckpt]
    table = ", ".join(f"{n} = ({e},{dd})" for n, (e, dd) in args.checkpoint.items() if "," not in n)
    note = f"the table's '{same[0]}'" if same else f"not a policy of the table: {table}"
    lines = [
        "",
        f"## Your config ({args.config}): {verdict}",
        "",
        f"- {r['engine']}, micro-batch {r['batch']}, checkpointing (E,D) = ({ckpt[0]},{ckpt[1]}): "
        f"{policy_text(*ckpt)} ({note}): "
        f"{r['total_gib']:.2f} GiB of {r['capacity_gib']:g} GiB (states {r['states_gib']:.2f}, "
        f"activations {r['activations_gib']:.2f}); largest micro-batch that fits: {r['max_batch']}",
    ]
    s = config_schedule(cfg, node.gpus, videos)
    per = (
        f"{s.steps_per_epoch} steps per epoch = {videos} videos / {node.gpus} GPUs / "
        f"({d.batch_size} clips / {d.num_sample} per video) / grad_accum {o.grad_accum}"
    )
    if s.from_epochs:
        lines.append(
            f"- schedule: train.epochs={cfg.train.epochs:g} -> train.steps={s.steps}, warm-up "
            f"{s.warmup_steps} steps ({per}; the trainer derives the same at start from {videos} videos "
            f"on {node.gpus} processes)"
        )
    else:
        lines.append(
            f"- schedule: train.steps={s.steps}, warm-up {s.warmup_steps} steps: {s.epochs:.2f} epochs "
            f"({per})"
        )
    tf = step_flops(wl)  # one clip's step: forward, backward, recomputation and the score
    step_s = o.grad_accum * step_seconds(tf, d.batch_size, node, mfu)
    lines.append(
        f"- time at the configured micro-batch {d.batch_size}: {step_s:.2f} s/step, "
        f"{s.steps * step_s / 86400:.1f} days for {s.steps} steps (MFU {mfu:.3g}, {mfu_how})"
    )
    if data_rate:
        lines.append(f"- data: {data_verdict(tf, node, mfu, data_rate, args.host_cores).text()}")
    return lines


def main(argv=None) -> int:
    """mats-plan: a bad argument or config value is one ``error:`` line and exit status 2."""
    return run(plan_command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
