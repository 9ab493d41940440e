"""Fine-tuning compute per view: fvcore counts of the classifier over all tokens or the MATS top rho_post.

    python -m mats_scale.profiling.finetune [--size B] [--frames 16] [--img 224] [--keep 0.6] [--classes 400]

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
from mats_scale.models.classifier import build_classifier
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="B")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--classes", type=int, default=400)
    a = p.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
