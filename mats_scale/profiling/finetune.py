"""Fine-tuning compute and memory: FLOPs per view, activation memory, and what fits on a node.

    python -m mats_scale.profiling.finetune [--size B] [--frames 16] [--img 224] [--keep 0.6] [--classes 400]
                                            [--plan] [--node a100-80] [--dtype bf16] [--mfu 0.35]
                                            [--epochs 75] [--train-clips 240000]

FLOPs per view (always): the classifier over all tokens and over the MATS top rho_post.
``--plan``: for all tokens (VideoMAE) and the top rho_post (EVEREST), with and without activation
checkpointing of every block, and every engine: the activation memory of one training clip (measured
on ``meta`` like the pre-training profiler: the real forward + backward of the classifier with the
target's attention kernel and allocator rounding, :func:`mats_scale.profiling.memory.measure_step`),
the model states per GPU (the pre-training planner's DeepSpeed / FSDP2 model with the classifier's
parameters), the largest micro-batch per GPU, and the step time and days at a stated MFU. Published
for comparison: VideoMAE V2 fine-tunes ViT-g at 6 clips per A100-80G without ZeRO.

Counts are fvcore's (one multiply-add = one "flop", the convention of the VideoMAE and EVEREST papers'
GFLOPs), the same handles as :mod:`mats_scale.profiling.flops` (SDPA counted as Q K^T + A V); the motion
score (one patch embedding of the clip) is counted separately. Published for ViT-B 16x224: ~180 G all
tokens, ~98 G at rho_post = 0.6 (EVEREST paper).
"""

from __future__ import annotations

import argparse

import torch

from mats_scale.masking.mats import finetune_selection
from mats_scale.models.args import ModelArgs
from mats_scale.models.classifier import build_classifier, classifier_spec
from mats_scale.parallel.checkpointing import apply_activation_checkpointing
from mats_scale.profiling.flops import _analysis


@torch.no_grad()
def classifier_flops(args: ModelArgs, num_classes: int, keep_ratio: float | None) -> dict[str, int]:
    """fvcore counts for one clip: ``encoder`` (classifier forward over the kept tokens; all with
    `keep_ratio` None) and ``score`` (the motion score's patch embedding, 0 without selection)."""
    torch.manual_seed(0)
    model = build_classifier(args, num_classes, device="cpu").eval()
    video = torch.randn(1, 3, args.num_frames, args.img_size, args.img_size)
    if keep_ratio is None:
        ids = torch.arange(args.num_tokens)[None]
        score = 0
    else:
        ids = finetune_selection(model.motion_scores(video), keep_ratio)
        score = int(_analysis(model.patch_embed, (video,)).total())
    return {"encoder": int(_analysis(model, (video, ids)).total()), "score": score, "tokens": ids.shape[1]}


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_meta_classifier(args: ModelArgs, num_classes: int, dtype: torch.dtype, every: int):
    """The classifier on ``meta`` (nothing allocated) in `dtype`, every `every`-th block checkpointed."""
    model = build_classifier(args, num_classes, device="meta").to(dtype).train()
    return apply_activation_checkpointing(model, classifier_spec(args, num_classes), {"encoder": every})


def training_inputs(args: ModelArgs, keep_ratio: float | None, batch: int, dtype: torch.dtype) -> tuple:
    """(video, ids) of one micro-batch on meta; ids is None for all tokens."""
    video = torch.empty(batch, 3, args.num_frames, args.img_size, args.img_size, device="meta", dtype=dtype)
    if keep_ratio is None:
        return (video,)
    n = len(finetune_selection(torch.zeros(1, args.num_tokens), keep_ratio)[0])
    return video, torch.empty(batch, n, dtype=torch.int64, device="meta")


def classifier_activations(
    args: ModelArgs,
    num_classes: int,
    keep_ratio: float | None,
    *,
    dtype=torch.bfloat16,
    every: int = 0,
    target: str = "cuda",
):
    """Activation memory of one fine-tuning step as a line in the micro-batch (:class:`ActivationModel`):
    classifier forward (+ the no-grad motion score with a selection) and cross-entropy backward."""
    from mats_scale.profiling.memory import affine_activations, measure_step

    points = []
    for batch in (1, 2):
        model = build_meta_classifier(args, num_classes, dtype, every)
        inputs = training_inputs(args, keep_ratio, batch, dtype)
        label = torch.zeros(batch, dtype=torch.int64, device="meta")
        points.append(
            measure_step(
                model,
                inputs,
                lambda logits, label=label: torch.nn.functional.cross_entropy(logits.float(), label),
                batch=batch,
                dtype=dtype,
                target=target,
                before=(lambda m=model, v=inputs[0]: m.motion_scores(v)) if keep_ratio is not None else None,
            )
        )
    return affine_activations(*points)


def classifier_train_flops(args: ModelArgs, num_classes: int, keep_ratio: float | None, every: int) -> int:
    """FLOPs (2 per MAC) of one clip's forward + backward (+ recomputation), FlopCounterMode on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_meta_classifier(args, num_classes, torch.float32, every)
    inputs = training_inputs(args, keep_ratio, 1, torch.float32)
    with FlopCounterMode(display=False) as counter:
        if keep_ratio is not None:
            model.motion_scores(inputs[0])
        model(*inputs).float().sum().backward()
    return counter.get_total_flops()


def plan_rows(args: ModelArgs, num_classes: int, keep_ratio: float, node, *, dtype, mfu, epochs, train_clips):
    """One :class:`~mats_scale.profiling.feasibility.Plan` per (tokens, checkpointing, engine); `strategy`
    names the tokens (all / top rho_post)."""
    from mats_scale.profiling.feasibility import ENGINE_CHOICES, engine_states, plan_point
    from mats_scale.profiling.memory import param_stats

    stats = param_stats(build_classifier(args, num_classes, device="meta"))
    states = {label: engine_states(stats, label, node, dtype) for label in ENGINE_CHOICES}
    plans = []
    for tokens, keep in (("all", None), (f"top {keep_ratio}", keep_ratio)):
        for ckpt, every in (("none", 0), ("every 1", 1)):
            act = classifier_activations(args, num_classes, keep, dtype=dtype, every=every)
            tf = classifier_train_flops(args, num_classes, keep, every)
            for label in ENGINE_CHOICES:
                plans.append(
                    plan_point(
                        tokens,
                        label,
                        ckpt,
                        states[label],
                        act,
                        tf,
                        node,
                        mfu=mfu,
                        epochs=epochs,
                        train_clips=train_clips,
                    )
                )
    return plans


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="B")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--classes", type=int, default=400)
    p.add_argument("--plan", action="store_true", help="activation memory, max micro-batch per engine, days")
    p.add_argument("--node", default="a100-80", help="a100-80, a100-40 or h100-80 (8 GPUs each)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation (an input)")
    p.add_argument("--epochs", type=float, default=75, help="fine-tuning epochs (VideoMAE ViT-B K400: 75)")
    p.add_argument("--train-clips", type=int, default=240_000, help="training videos (K400: ~240k)")
    a = p.parse_args(argv)
    from mats_scale.profiling.feasibility import NODES

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
            f"{a.train_clips} clips; activations measured on meta, states modelled (see --help):"
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
