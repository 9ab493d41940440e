"""Multi-view evaluation of a classifier on the val split, every video exactly once over all ranks, and the
results it writes (``eval/results.json``, ``eval/confusion.png``); docs/finetuning.md, "Evaluation"."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from mats_scale.config import Config
from mats_scale.data.errors import DataError
from mats_scale.parallel.base import Engine


class Classifying(Protocol):
    """What evaluation and the probe use of a classification task (FinetuneTask)."""

    cfg: Config
    num_classes: int
    init_report: str

    def select(self, engine: Engine, video: torch.Tensor, keep_all: bool) -> torch.Tensor | None: ...

    def keep_all_at_eval(self) -> bool: ...

    def tokens_label(self) -> str: ...


log = logging.getLogger("mats_scale.finetune")


def is_writer() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@torch.no_grad()
def view_sums(
    engine: Engine, cfg: Config, split: str, per_view: Callable[[torch.Tensor], torch.Tensor], width: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Every readable video of `split` exactly once over all ranks: `per_view(clips)` -> (n, width)
    for its views, averaged over the views, all-reduced on every rank. Returns the sums (n_read,
    width) float64 and labels (n_read,) on the CPU in list order, and (path, reason) of the videos
    left out as unreadable (DataError when more than data.max_bad_fraction of them were)."""
    import torch.distributed as dist

    from mats_scale.data.finetune import build_eval_loader
    from mats_scale.data.workers import close_workers, track
    from mats_scale.parallel.distributed import all_gather_object, all_reduce

    env, d = engine.env, cfg.data
    V = d.eval_clips * d.eval_crops
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    loader = build_eval_loader(cfg, rank=rank, world_size=world, split=split)
    items = loader.dataset.dataset.items  # the whole split (the Subset holds this rank's share)
    num_videos = len(items)
    # Sharded engines gather parameters in every forward: all ranks run the same number of forwards.
    n_local = torch.tensor([float(len(loader))], dtype=torch.float64, device=env.device)
    n_max = int(all_reduce(n_local.clone(), op="max").item())
    sums = torch.zeros(num_videos, width, dtype=torch.float64, device=env.device)
    counts = torch.zeros(num_videos, dtype=torch.float64, device=env.device)
    skipped: list[tuple[str, str]] = []
    module = engine.module
    was_training = module.training
    module.eval()
    dummy = (1, 3, cfg.model.num_frames, cfg.model.img_size, cfg.model.img_size)
    batches = track(iter(loader))  # its workers end with the loop, whatever ends it
    try:
        for _ in range(n_max):
            batch = next(batches, None)
            for path, reason in batch["skipped"] if batch is not None else ():
                log.warning("%s video %s left out: %s", split, path, reason)
                skipped.append((path, reason))
            if batch is None or batch["views"] is None:  # a dummy forward keeps collectives matched
                per_view(torch.zeros(dummy, device=env.device))
                continue
            views = batch["views"].to(env.device, non_blocking=True)  # (B, V, C, T, S, S)
            out = per_view(views.flatten(0, 1)).double().view(views.shape[0], V, width).mean(1)
            index = batch["index"].to(env.device)
            sums.index_add_(0, index, out)
            counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    finally:
        close_workers(batches)
        module.train(was_training)
    all_reduce(sums)
    all_reduce(counts)
    skipped = [s for part in all_gather_object(skipped) for s in part]
    if int((counts == 0).sum()) != len(skipped) or bool((counts > 1).any()):
        raise RuntimeError(
            f"{split}: scored {int((counts == 0).sum()) - len(skipped)} videos never and "
            f"{int((counts > 1).sum())} more than once"
        )
    if skipped and len(skipped) > d.max_bad_fraction * num_videos:
        listed = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise DataError(
            f"{split}: {len(skipped)} of {num_videos} videos cannot be read, more than "
            f"data.max_bad_fraction={d.max_bad_fraction} ({listed})"
        )
    kept = counts == 1
    labels = torch.tensor([it.label for it in items])
    return sums[kept], labels[kept.cpu()], skipped


@torch.no_grad()
def evaluate(task: Classifying, engine: Engine, out_dir: str | None = None) -> dict[str, Any]:
    """The classifier's softmax averaged over the views of every val video; rank 0 writes
    ``eval/results.json`` and ``eval/confusion.png`` under `out_dir`; every rank returns the results."""
    cfg, keep_all = task.cfg, task.keep_all_at_eval()

    def probs(clips: torch.Tensor) -> torch.Tensor:
        return engine.forward(clips, task.select(engine, clips, keep_all)).float().softmax(-1)

    sums, labels, skipped = view_sums(engine, cfg, "val", probs, task.num_classes)  # mean softmax
    results = score_results(sums.cpu(), labels, task.num_classes)
    results.update(
        {
            "views": f"{cfg.data.eval_clips}x{cfg.data.eval_crops}",
            "videos": len(labels),
            **left_out(skipped, cfg.data.eval_clips * cfg.data.eval_crops),
            "tokens": task.tokens_label(),
            "init": task.init_report,
            "classes": class_names(cfg, task.num_classes),
        }
    )
    if out_dir and is_writer():
        write_results(results, os.path.join(out_dir, "eval"))
    return results


def class_names(cfg: Config, num_classes: int) -> list[str] | None:
    """The classes' names for the results and the confusion plot, where the data names them."""
    from mats_scale.data.sources import class_names as names_of

    names = names_of(cfg)
    if not names:
        return None
    return [names.get(i, str(i)) for i in range(num_classes)]


def left_out(skipped: list[tuple[str, str]], views: int) -> dict[str, Any]:
    """The results' record of unreadable videos: how many, the views lost, and which (path, reason)."""
    return {"skipped_videos": len(skipped), "views_lost": len(skipped) * views, "skipped": skipped}


def lost_note(r: Mapping[str, Any]) -> str:
    n = r.get("skipped_videos", 0)
    return f" ({n} unreadable left out, {r['views_lost']} views lost)" if n else ""


def accuracy_note(r: Mapping[str, Any]) -> str:
    """``top-1 0.8125 top-5 0.9750``; top-5 only where it says something (more than five classes)."""
    top5 = f" top-5 {r['top5']:.4f}" if r.get("top5") is not None else ""
    return f"top-1 {r['top1']:.4f}{top5}"


def score_results(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Top-1 / top-5 / per-class accuracy and the confusion matrix (rows: true, columns: predicted).
    Top-5 is None with five classes or fewer (it would be 1.0 whatever the model does)."""
    k = min(5, num_classes)
    top = scores.topk(k, dim=1).indices
    pred = top[:, 0]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = [
        (confusion[c, c] / confusion[c].sum()).item() if confusion[c].sum() else None
        for c in range(num_classes)
    ]
    return {
        "top1": (pred == labels).double().mean().item(),
        "top5": (top == labels[:, None]).any(1).double().mean().item() if num_classes > 5 else None,
        "per_class_acc": per_class,
        "confusion": confusion.tolist(),
    }


def write_results(results: dict[str, Any], out: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    fig = confusion_figure(results, title)
    fig.savefig(os.path.join(out, "confusion.png"), dpi=100)
    plt.close(fig)


MAX_NAMED_TICKS = 40
"""Up to this many classes, every row and column of the confusion plot is labelled."""


def confusion_figure(results: Mapping[str, Any], title: str = ""):
    """The row-normalised confusion matrix: one tick per class (its name from ``results["classes"]``
    where known, else its index), every class up to :data:`MAX_NAMED_TICKS`, whole numbers beyond."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    conf = torch.tensor(results["confusion"], dtype=torch.float64)
    n = conf.shape[0]
    norm = conf / conf.sum(1, keepdim=True).clamp(min=1)
    side = min(12.0, 5.0 + 0.15 * n)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(norm.numpy(), vmin=0, vmax=1, cmap="Blues")
    names = results.get("classes") or [str(i) for i in range(n)]
    if n <= MAX_NAMED_TICKS:
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
    else:
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
    head = f"{title}: " if title else ""
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title=f"{head}top-1 {results['top1']:.3f} ({results['views']} views)",
    )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig
