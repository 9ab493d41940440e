"""Linear probe of a frozen encoder (MAE's ``main_linprobe``): pooled features of every train and val
video, then a logistic regression on the standardised train features, scored on val; docs/finetuning.md,
"Linear probe"."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mats_scale.parallel.base import Engine
from mats_scale.train.evaluate import (
    Classifying,
    class_names,
    is_writer,
    left_out,
    score_results,
    view_sums,
    write_results,
)


@torch.no_grad()
def linear_probe(task: Classifying, engine: Engine, out_dir: str | None = None) -> dict[str, Any]:
    """The classifier's pooled ``features`` of every train and val video (views as in evaluation,
    averaged over them), computed once; a linear classifier (:func:`fit_linear_probe`) fitted on train,
    scored on val. rank 0 writes ``probe/results.json`` and ``probe/confusion.png`` under `out_dir`."""
    cfg, keep_all = task.cfg, task.keep_all_at_eval()
    dim = engine.module.embed_dim

    def feats(clips: torch.Tensor) -> torch.Tensor:
        return engine.forward(clips, task.select(engine, clips, keep_all), pooled=True).float()

    x, y, skipped = {}, {}, []
    for split in ("train", "val"):
        sums, y[split], lost = view_sums(engine, cfg, split, feats, dim)
        x[split] = sums.float().cpu()
        skipped += lost
    head = fit_linear_probe(x["train"], y["train"], task.num_classes, seed=cfg.train.seed)
    results = score_results(head(x["val"]), y["val"], task.num_classes)
    results.update(
        {
            "views": f"{cfg.data.eval_clips}x{cfg.data.eval_crops}",
            "videos": len(y["val"]),
            "train_videos": len(y["train"]),
            "train_top1": (head(x["train"]).argmax(-1) == y["train"]).double().mean().item(),
            **left_out(skipped, cfg.data.eval_clips * cfg.data.eval_crops),
            "tokens": task.tokens_label(),
            "init": task.init_report,
            "classes": class_names(cfg, task.num_classes),
        }
    )
    if out_dir and is_writer():
        write_results(results, os.path.join(out_dir, "probe"), title="linear probe")
    return results


def fit_linear_probe(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, *, weight_decay: float = 1e-4, seed: int = 0
) -> nn.Module:
    """Multinomial logistic regression on fixed features (N, D): features standardised with the train
    mean and std (the MAE probe's BatchNorm without affine, at its inference statistics), then a
    linear layer fitted by full-batch L-BFGS on cross-entropy + `weight_decay` * ||W||^2 / 2. Returns
    the probe as a module mapping raw features to logits."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    linear = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    z = (x - mean) / std
    opt = torch.optim.LBFGS(
        linear.parameters(), lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(z), y) + 0.5 * weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    probe = nn.Sequential(Standardize(mean, std), linear)
    return probe.requires_grad_(False)


class Standardize(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
