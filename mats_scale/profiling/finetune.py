"""Fine-tuning compute and memory: FLOPs per view, activation memory, and what fits on a node, from the
profilers run on a :class:`FinetuneWorkload` (command: ``mats-plan-finetune``); docs/profiling.md,
"Fine-tuning", says what is counted.
"""

from __future__ import annotations

import torch

from mats_scale.models.args import ModelArgs
from mats_scale.profiling.flops import forward_macs, fvcore_analysis
from mats_scale.profiling.workload import FinetuneWorkload, build_model


def classifier_flops(args: ModelArgs, num_classes: int, keep_ratio: float | None) -> dict[str, int]:
    """fvcore counts for one clip: ``encoder`` (classifier forward over the kept tokens; all with
    `keep_ratio` None), ``score`` (the motion score as one patch embedding of the clip, 0 without
    selection) and ``tokens`` (through the encoder)."""
    wl = FinetuneWorkload(args, num_classes, keep_ratio)
    score = 0
    if wl.uses_embed_score:
        with torch.no_grad():
            score = int(fvcore_analysis(build_model(wl, "meta").patch_embed, wl.inputs("meta")[:1]).total())
    return {"encoder": forward_macs(wl), "score": score, "tokens": wl.num_tokens}


def plan_rows(args: ModelArgs, num_classes: int, keep_ratio: float, node, *, dtype, mfu, epochs, train_clips):
    """One :class:`~mats_scale.profiling.feasibility.Plan` per (tokens, checkpointing, engine): the
    pre-training planner on the classifier over all tokens and over the top `keep_ratio`; days for
    `epochs` visits of each of `train_clips` videos (one clip per visit)."""
    from mats_scale.profiling.feasibility import ENGINE_CHOICES, plan

    workloads = {
        tokens: FinetuneWorkload(args, num_classes, keep, dtype=dtype)
        for tokens, keep in (("all", None), (f"top {keep_ratio}", keep_ratio))
    }
    policies = {"none": (0, 0), "every 1": (1, 0)}
    return plan(workloads, list(ENGINE_CHOICES), policies, node, mfu=mfu, epochs=epochs, videos=train_clips)
