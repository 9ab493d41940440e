"""Fine-tuning and evaluation as a task of the generic Trainer (the second task next to pre-training).

Per micro-batch: clip and label to the device -> optional timm RandomErasing per frame -> optional
timm Mixup/CutMix (the same box on every frame) -> MATS fine-tuning selection (``finetune.select=mats``:
the deterministic top ``masking.finetune_keep_ratio`` tokens by the model's embedding motion score)
-> classifier forward over the selected tokens only -> cross-entropy with label smoothing (soft-target
cross-entropy with Mixup). Metrics: correct predictions (batches without mixing) and tokens through
the encoder.

Evaluation (:meth:`FinetuneTask.evaluate`, after training or alone with ``finetune.eval_only`` /
``--eval``): every video of the val split exactly once over all ranks, ``data.eval_clips x
data.eval_crops`` views, softmax averaged over the views; each rank adds its videos' averages into a
(num_videos, K) sum that one all-reduce combines (a count per video checks each was scored once);
top-1, top-5, per-class accuracy, ``eval/results.json`` and ``eval/confusion.png`` in train.out_dir.
Views see the selected tokens, or all tokens with ``masking.finetune_eval_keep_all``.
Linear probe (:meth:`FinetuneTask.linear_probe`, ``finetune.linear_probe`` / ``--probe``): the same
views of the train and val splits give pooled features once; a logistic regression on them.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mats_scale.config import Config, ConfigError, load_config
from mats_scale.data.device import to_model_input
from mats_scale.data.errors import DataError
from mats_scale.masking.mats import finetune_selection
from mats_scale.models.classifier import classifier_spec
from mats_scale.models.spec import ModelSpec, build_model
from mats_scale.parallel.base import Engine
from mats_scale.train.checkpoint import resumable_checkpoint
from mats_scale.train.task import Loader, StepOutput

log = logging.getLogger("mats_scale.finetune")


def dataset_num_classes(cfg: Config) -> int:
    """finetune.num_classes, or from the data: bundled -> its classes, list/folder -> largest label + 1."""
    if cfg.finetune.num_classes:
        return cfg.finetune.num_classes
    if cfg.data.dataset in ("bundled", "synthetic"):
        from mats_scale.data.synth import CLASSES

        if cfg.data.dataset == "bundled":
            return len(CLASSES)
        raise ConfigError(
            "finetune.num_classes: 0 (from the data) needs labelled files; set it for data.dataset=synthetic"
        )
    from mats_scale.data.loader import resolve_items

    return 1 + max(it.label for it in resolve_items(cfg, "train"))


def is_writer() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def auto_init() -> tuple[str, str]:
    """``finetune.init=auto`` (the bundled fine-tuning default): the bundled default pre-training run
    (train.out_dir of the shipped ``default`` config, relative to the working directory) when it holds
    a checkpoint that verifies, else from scratch. Returns (path or "", the report line for scratch)."""
    from mats_scale.resources import config_path
    from mats_scale.train.checkpoint import CheckpointError
    from mats_scale.train.export import find_checkpoint

    run = load_config(config_path("default")).train.out_dir
    try:
        find_checkpoint(run)
    except (CheckpointError, FileNotFoundError) as e:
        return "", (
            f"finetune.init=auto: no usable pre-training run in {run} ({e}); training from scratch "
            "(random initialisation). From scratch the bundled default does not learn the motion "
            "classes in its budget: run `deepspeed launchers/pretrain.py` first (README 'Fine-tuning')"
        )
    return run, ""


class VideoMixup:
    """timm ``Mixup`` on clips: frames are folded into channels, (B, C, T, H, W) -> (B, C*T, H, W), so a
    CutMix box covers the same pixels in every frame (timm indexes the last two dims as H, W)."""

    def __init__(self, cfg: Config, num_classes: int) -> None:
        from timm.data import Mixup

        f = cfg.finetune
        self.mixup = Mixup(
            mixup_alpha=f.mixup,
            cutmix_alpha=f.cutmix,
            label_smoothing=f.label_smoothing,
            num_classes=num_classes,
        )

    def __call__(self, video: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, T, H, W = video.shape
        x, target = self.mixup(video.reshape(B, C * T, H, W), label)
        return x.reshape(B, C, T, H, W), target


class ClipErasing:
    """timm ``RandomErasing`` on normalised clips as VideoMAE applies it: on (T, C, H, W), so every
    frame is erased with probability ``finetune.reprob`` in a box of its own. timm draws from Python's
    ``random`` and the device's global torch generator: both are seeded from the step's generator and
    restored after, so a resumed run erases the same boxes."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        from timm.data.random_erasing import RandomErasing

        f = cfg.finetune
        self.device = device
        self.erase = RandomErasing(
            f.reprob, mode=f.remode, max_count=f.recount, num_splits=f.recount, device=str(device)
        )

    def __call__(self, video: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, C, T, H, W) normalised float -> the same tensor, erased in place."""
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device))
        saved = random.getstate()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices, device_type=self.device.type):
                random.seed(seed)
                torch.manual_seed(seed)
                for clip in video:
                    self.erase(clip.transpose(0, 1))  # (T, C, H, W) view: frames erased in place
        finally:
            random.setstate(saved)
        return video


class FinetuneTask:
    name = "finetune"
    log_format = "acc {train_acc:.3f} tokens/clip {tokens_per_clip}"
    tb_tags = {"train_acc": "finetune/train_acc", "tokens_per_clip": "tokens/encoder_per_clip"}

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        f = cfg.finetune
        if cfg.data.batch_size % 2 and (f.mixup or f.cutmix):
            raise ConfigError(
                f"data.batch_size: {cfg.data.batch_size}: timm Mixup/CutMix pairs clips "
                "(finetune.mixup/cutmix > 0), so it must be even"
            )
        self.num_classes = dataset_num_classes(cfg)
        self.init_state: dict[str, torch.Tensor] | None = None
        self.init_report = "no finetune.init: training from scratch (random initialisation)"
        init = f.init
        resuming = None if f.eval_only or f.linear_probe else resumable_checkpoint(cfg.train)
        if resuming is not None and init:  # its weights replace finetune.init's: no need to read them
            self.init_report = f"finetune.init={init} not read: resuming {resuming}, whose weights replace it"
            init = ""
        if init == "auto":
            init, self.init_report = auto_init()
        if init:
            self.init_state, self.init_report = self._load_init(init)
        elif f.eval_only:
            raise ConfigError(
                "finetune.eval_only: needs finetune.init (a fine-tuned run directory, step_* "
                "checkpoint or .pt file) to evaluate"
            )
        if is_writer():
            print(self.init_report, flush=True)
        self.mix = VideoMixup(cfg, self.num_classes) if (f.mixup or f.cutmix) else None
        self.erasing: ClipErasing | None = None  # built on the first step (needs the device)

    def _load_init(self, path: str) -> tuple[dict[str, torch.Tensor], str]:
        from mats_scale.models.load import InitError, map_state
        from mats_scale.train.export import read_weights

        f = self.cfg.finetune
        target = build_model(self._spec(None), "meta").state_dict()
        try:
            sd, source = read_weights(path)
            state, report = map_state(sd, target, self.cfg.model.grid, source=source, drop_head=f.drop_head)
        except InitError as e:  # its message starts with "finetune.init=PATH: ..."
            raise ConfigError(
                str(e) if str(e).startswith("finetune.init") else f"finetune.init: {e}"
            ) from None
        if f.eval_only and report.fresh:
            raise ConfigError(
                f"finetune.init: {path} has no trained {', '.join(report.fresh)}; "
                "evaluation needs a fine-tuned classifier"
            )
        return state, report.lines()

    def _spec(self, init_state) -> ModelSpec:
        return classifier_spec(
            self.cfg.model,
            self.num_classes,
            head_drop=self.cfg.finetune.head_drop,
            learned_pos=self.cfg.finetune.learned_pos,
            init_state=init_state,
        )

    def model_spec(self) -> ModelSpec:
        return self._spec(self.init_state)

    def build_loader(self, rank: int, world_size: int) -> Loader:
        from mats_scale.data.finetune import build_finetune_loader

        return build_finetune_loader(self.cfg, rank=rank, world_size=world_size)

    # ---- one micro-batch --------------------------------------------------------------------
    def select(self, engine: Engine, video: torch.Tensor, keep_all: bool) -> torch.Tensor | None:
        """Token ids (B, n) the encoder sees, or None for all tokens."""
        if keep_all:
            return None
        with torch.no_grad(), engine.autocast():
            scores = engine.module.motion_scores(video, "embed")
        return finetune_selection(scores, self.cfg.masking.finetune_keep_ratio)

    def step(self, engine: Engine, batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        video = to_model_input(batch, engine.env.device)  # uint8 from the workers -> normalised float32
        label = batch["label"].to(engine.env.device, non_blocking=True)
        target = None
        if self.cfg.finetune.reprob > 0:  # VideoMAE's order: dataset augmentations, then Mixup
            if self.erasing is None:
                self.erasing = ClipErasing(self.cfg, engine.env.device)
            video = self.erasing(video, generator)
        if self.mix is not None:
            video, target = self.mix(video, label)
        ids = self.select(engine, video, keep_all=self.cfg.finetune.select == "all")
        logits = engine.forward(video, ids).float()
        if target is None:
            loss = F.cross_entropy(logits, label, label_smoothing=self.cfg.finetune.label_smoothing)
            correct, scored = (logits.argmax(-1) == label).sum(), label.numel()
        else:  # soft targets: timm's SoftTargetCrossEntropy
            loss = torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
            correct, scored = 0, 0
        n = ids.shape[1] if ids is not None else self.cfg.model.num_tokens
        return StepOutput(
            loss,
            {
                "correct": correct.detach() if torch.is_tensor(correct) else correct,
                "scored": scored,
                "tokens": n * video.shape[0],
                "clips": video.shape[0],
            },
        )

    def summarize(self, totals: Mapping[str, float], micro_batches: int) -> dict[str, Any]:
        acc = totals["correct"] / totals["scored"] if totals["scored"] else float("nan")
        return {"train_acc": acc, "tokens_per_clip": int(totals["tokens"] / max(totals["clips"], 1))}

    def checkpoint_key(self) -> dict[str, Any]:
        return {"model": asdict(self.cfg.model), "num_classes": self.num_classes}

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def view_sums(
        self, engine: Engine, split: str, per_view, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
        """Every readable video of `split` exactly once over all ranks: `per_view(clips)` -> (n, width)
        for its views, averaged over the views, all-reduced on every rank. Returns the sums (n_read,
        width) float64 and labels (n_read,) on the CPU in list order, and (path, reason) of the videos
        left out as unreadable (DataError when more than data.max_bad_fraction of them were)."""
        import torch.distributed as dist

        from mats_scale.data.finetune import build_eval_loader
        from mats_scale.data.workers import close_workers, track
        from mats_scale.parallel.distributed import all_gather_object, all_reduce

        env, d = engine.env, self.cfg.data
        V = d.eval_clips * d.eval_crops
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        loader = build_eval_loader(self.cfg, rank=rank, world_size=world, split=split)
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
        dummy = (1, 3, self.cfg.model.num_frames, self.cfg.model.img_size, self.cfg.model.img_size)
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

    def keep_all_at_eval(self) -> bool:
        return self.cfg.masking.finetune_eval_keep_all or self.cfg.finetune.select == "all"

    def tokens_label(self) -> str:
        return "all" if self.keep_all_at_eval() else f"top {self.cfg.masking.finetune_keep_ratio} by motion"

    @torch.no_grad()
    def evaluate(self, engine: Engine, out_dir: str | None = None) -> dict[str, Any]:
        """Multi-view evaluation of the val split on every rank (see the module doc); rank 0 writes
        ``eval/results.json`` and ``eval/confusion.png`` under `out_dir`; every rank returns the results."""
        cfg, keep_all = self.cfg, self.keep_all_at_eval()

        def probs(clips: torch.Tensor) -> torch.Tensor:
            return engine.forward(clips, self.select(engine, clips, keep_all)).float().softmax(-1)

        sums, labels, skipped = self.view_sums(engine, "val", probs, self.num_classes)  # mean softmax
        results = score_results(sums.cpu(), labels, self.num_classes)
        results.update(
            {
                "views": f"{cfg.data.eval_clips}x{cfg.data.eval_crops}",
                "videos": len(labels),
                **left_out(skipped, cfg.data.eval_clips * cfg.data.eval_crops),
                "tokens": self.tokens_label(),
                "init": self.init_report,
            }
        )
        if out_dir and is_writer():
            write_results(results, os.path.join(out_dir, "eval"))
        return results

    @torch.no_grad()
    def linear_probe(self, engine: Engine, out_dir: str | None = None) -> dict[str, Any]:
        """Linear probe of the (frozen) encoder: the classifier's pooled ``features`` of every train and
        val video (views as in evaluation, features averaged over them), computed once; then a linear
        classifier on the standardised train features (see :func:`fit_linear_probe`), scored on val.
        rank 0 writes ``probe/results.json`` and ``probe/confusion.png`` under `out_dir`."""
        cfg, keep_all = self.cfg, self.keep_all_at_eval()
        dim = engine.module.embed_dim

        def feats(clips: torch.Tensor) -> torch.Tensor:
            return engine.forward(clips, self.select(engine, clips, keep_all), pooled=True).float()

        x, y, skipped = {}, {}, []
        for split in ("train", "val"):
            sums, y[split], lost = self.view_sums(engine, split, feats, dim)
            x[split] = sums.float().cpu()
            skipped += lost
        head = fit_linear_probe(x["train"], y["train"], self.num_classes, seed=cfg.train.seed)
        results = score_results(head(x["val"]), y["val"], self.num_classes)
        results.update(
            {
                "views": f"{cfg.data.eval_clips}x{cfg.data.eval_crops}",
                "videos": len(y["val"]),
                "train_videos": len(y["train"]),
                "train_top1": (head(x["train"]).argmax(-1) == y["train"]).double().mean().item(),
                **left_out(skipped, cfg.data.eval_clips * cfg.data.eval_crops),
                "tokens": self.tokens_label(),
                "init": self.init_report,
            }
        )
        if out_dir and is_writer():
            write_results(results, os.path.join(out_dir, "probe"), title="linear probe")
        return results

    def finish(self, trainer) -> None:
        """After training (loop.train): the evaluation, unless finetune.eval_at_end is off."""
        if not self.cfg.finetune.eval_at_end:
            return
        r = self.evaluate(trainer.engine, self.cfg.train.out_dir)
        trainer.log.info(
            f"eval {r['views']} views, {r['videos']} videos{lost_note(r)}: top-1 {r['top1']:.4f} "
            f"top-5 {r['top5']:.4f} -> {os.path.join(self.cfg.train.out_dir, 'eval')}"
        )


def left_out(skipped: list[tuple[str, str]], views: int) -> dict[str, Any]:
    """The results' record of unreadable videos: how many, the views lost, and which (path, reason)."""
    return {"skipped_videos": len(skipped), "views_lost": len(skipped) * views, "skipped": skipped}


def lost_note(r: Mapping[str, Any]) -> str:
    n = r.get("skipped_videos", 0)
    return f" ({n} unreadable left out, {r['views_lost']} views lost)" if n else ""


def score_results(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Top-1 / top-5 / per-class accuracy and the confusion matrix (rows: true, columns: predicted)."""
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
        "top5": (top == labels[:, None]).any(1).double().mean().item(),
        "per_class_acc": per_class,
        "confusion": confusion.tolist(),
    }


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


def write_results(results: dict[str, Any], out: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    conf = torch.tensor(results["confusion"], dtype=torch.float64)
    norm = conf / conf.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(norm.numpy(), vmin=0, vmax=1, cmap="Blues")
    head = f"{title}: " if title else ""
    ax.set(
        xlabel="predicted",
        ylabel="true",
        title=f"{head}top-1 {results['top1']:.3f} ({results['views']} views)",
    )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "confusion.png"), dpi=100)
    plt.close(fig)


def evaluate_only(cfg: Config) -> dict[str, Any]:
    """``finetune.eval_only`` (the classifier of finetune.init, evaluated) or ``finetune.linear_probe``
    (a linear probe of its encoder), on every rank; no training."""
    from mats_scale.parallel.distributed import init_distributed
    from mats_scale.parallel.engine import build_engine

    task = FinetuneTask(cfg)
    env = init_distributed(cfg.train, cfg.parallel)
    engine = build_engine(cfg, env, task.model_spec())
    if cfg.finetune.linear_probe:
        r, what, sub = task.linear_probe(engine, cfg.train.out_dir), "linear probe", "probe"
    else:
        r, what, sub = task.evaluate(engine, cfg.train.out_dir), "eval", "eval"
    if env.is_writer:
        print(
            f"{what} {r['views']} views, {r['videos']} videos{lost_note(r)}: top-1 {r['top1']:.4f} "
            f"top-5 {r['top5']:.4f} "
            f"-> {os.path.join(cfg.train.out_dir, sub)}",
            flush=True,
        )
    return r
