"""mats-plan-finetune: FLOPs per view of a fine-tuning classifier (all tokens and EVEREST's top-k by
motion) and, with --plan, what fits on a node per engine and the days it takes. Also ``python -m
mats_scale.launch.plan_finetune``; the profiling is :mod:`mats_scale.profiling.finetune`."""

from __future__ import annotations

from mats_scale.cli import command_parser, run

DTYPE_NAMES = ("bf16", "fp16", "fp32")  # mats_scale.profiling.workload.DTYPES (imports torch)


def main(argv=None) -> int:
    return run(_main, argv)


def _main(argv) -> int:
    p = command_parser("mats_scale.launch.plan_finetune", __doc__, summary=True)
    p.add_argument("--size", default="B")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--classes", type=int, default=400)
    p.add_argument("--plan", action="store_true", help="activation memory, max micro-batch per engine, days")
    p.add_argument(
        "--node", default="a100-80", help="a100-80, a100-40, h100-80, h200-141 or b200-192 (8 GPUs each)"
    )
    p.add_argument("--dtype", default="bf16", choices=DTYPE_NAMES)
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation (an input)")
    p.add_argument(
        "--epochs",
        type=float,
        default=75,
        help="fine-tuning epochs, each a visit of every video (VideoMAE ViT-B K400: 75)",
    )
    p.add_argument("--train-clips", type=int, default=240_000, help="training videos (K400: ~240k)")
    a = p.parse_args(argv)
    from mats_scale.models.args import ModelArgs
    from mats_scale.profiling.feasibility import NODES
    from mats_scale.profiling.finetune import classifier_flops, plan_rows
    from mats_scale.profiling.workload import DTYPES

    if a.node not in NODES:
        p.error(f"--node {a.node}: allowed {', '.join(NODES)}")
    if not 0 < a.keep <= 1:
        p.error(f"--keep {a.keep}: must be in (0, 1]")
    args = ModelArgs(size=a.size, num_frames=a.frames, img_size=a.img)
    full = classifier_flops(args, a.classes, None)
    mats = classifier_flops(args, a.classes, a.keep)
    print(f"ViT-{a.size} {a.frames}x{a.img}, {a.classes} classes, per view (fvcore GFLOPs = GMACs):")
    print(f"  all {full['tokens']} tokens:        {full['encoder'] / 1e9:7.1f}")
    print(
        f"  top {a.keep} ({mats['tokens']} tokens): {mats['encoder'] / 1e9:7.1f} + motion score "
        f"{mats['score'] / 1e9:.1f} = {(mats['encoder'] + mats['score']) / 1e9:.1f} "
        f"({(mats['encoder'] + mats['score']) / full['encoder']:.2f}x)"
    )
    if a.plan:
        from mats_scale.profiling.memory import GIB

        node = NODES[a.node]
        rows = plan_rows(
            args,
            a.classes,
            a.keep,
            node,
            dtype=DTYPES[a.dtype],
            mfu=a.mfu,
            epochs=a.epochs,
            train_clips=a.train_clips,
        )
        print(
            f"\nfine-tuning on {node.name}, {a.dtype}, MFU {a.mfu} (assumed), {a.epochs:g} epochs of "
            f"{a.train_clips} videos (one clip each); activations measured on meta, states modelled "
            "(see --help):"
        )
        head = f"{'tokens':<9} {'ckpt':<8} {'engine':<13} {'states':>7} {'act/clip':>9} {'max b':>6} "
        print(head + f"{'GiB at b':>9} {'step s':>7} {'days':>6}")
        for plan in rows:
            r = plan.row()
            print(
                f"{r['strategy']:<9} {r['checkpoint']:<8} {r['engine']:<13} {plan.states.total / GIB:7.1f} "
                f"{plan.act.peak_per_clip / GIB:9.2f} {r['max_batch']:6d} {r['total_gib']:9.1f} "
                f"{r['step_s']:7.2f} {r['days']:6.1f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
