"""Fine-tuning as a task of the generic Trainer: per micro-batch, optional RandomErasing and Mixup/CutMix,
the MATS selection of the tokens the classifier sees, cross-entropy; evaluation (train/evaluate.py) after
training, or alone with the linear probe (train/probe.py) from :func:`evaluate_only` (docs/finetuning.md)."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F

from mats_scale.config import Config, ConfigError, load_config, load_config_text
from mats_scale.data.device import to_model_input
from mats_scale.masking.mats import finetune_selection
from mats_scale.models.classifier import classifier_spec
from mats_scale.models.spec import ModelSpec, build_model
from mats_scale.parallel.base import Engine
from mats_scale.profiling.workload import FinetuneWorkload
from mats_scale.run.checkpoint import resumable_checkpoint
from mats_scale.train.evaluate import accuracy_note, evaluate, is_writer, lost_note
from mats_scale.train.probe import linear_probe
from mats_scale.train.task import Finished, Loader, StepOutput


def dataset_num_classes(cfg: Config) -> int:
    """finetune.num_classes, or from the data: bundled -> its classes, list/folder -> largest label + 1."""
    if cfg.finetune.num_classes:
        return cfg.finetune.num_classes
    if cfg.data.dataset in ("bundled", "synthetic"):
        from mats_scale.data.sources import class_names

        if cfg.data.dataset == "bundled":
            return len(class_names(cfg))  # the task's classes (data.bundled), generated or not
        raise ConfigError(
            "finetune.num_classes: 0 (from the data) needs labelled files; set it for data.dataset=synthetic"
        )
    from mats_scale.data.loader import resolve_items

    return 1 + max(it.label for it in resolve_items(cfg, "train"))


def auto_init() -> tuple[str, str]:
    """``finetune.init=auto`` (the bundled fine-tuning default): the bundled default pre-training run
    (train.out_dir of the shipped ``default`` config, relative to the working directory) when it holds
    a checkpoint that verifies, else from scratch. Returns (path or "", the report line for scratch)."""
    from mats_scale.resources import config_path
    from mats_scale.run.checkpoint import CheckpointError
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
            self.init_report = (
                f"finetune.init={init} not read: resuming from {resuming.parent}, whose weights replace it"
            )
            init = ""
        if init == "auto":
            init, self.init_report = auto_init()
        self.init_path = init
        """The weights this task starts from (finetune.init, ``auto`` resolved; "" for none)."""
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

    @classmethod
    def for_checkpoint(cls, config_text: str, meta: Mapping[str, Any]) -> FinetuneTask:
        """Without reading ``finetune.init`` (the checkpoint holds the trained weights; the file may have
        moved) or the data lists (the class count is recorded in the metadata)."""
        cfg = load_config_text(config_text)
        cfg.finetune.init = ""
        cfg.finetune.eval_only = cfg.finetune.linear_probe = False
        cfg.finetune.num_classes = int(meta["num_classes"])
        return cls(cfg)

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

    def workload(self) -> FinetuneWorkload:
        """One clip as the profilers count it: the classifier over the tokens ``finetune.select`` keeps."""
        return FinetuneWorkload.of(self.cfg, self.num_classes)

    # ---- evaluation (train/evaluate.py, train/probe.py) ---------------------------------------
    def keep_all_at_eval(self) -> bool:
        return self.cfg.masking.finetune_eval_keep_all or self.cfg.finetune.select == "all"

    def tokens_label(self) -> str:
        return "all" if self.keep_all_at_eval() else f"top {self.cfg.masking.finetune_keep_ratio} by motion"

    def finish(self, trainer: Finished) -> None:
        """After training (loop.train): the evaluation, unless finetune.eval_at_end is off."""
        if not self.cfg.finetune.eval_at_end:
            return
        r = evaluate(self, trainer.engine, self.cfg.train.out_dir)
        trainer.log.info(
            f"eval {r['views']} views, {r['videos']} videos{lost_note(r)}: {accuracy_note(r)} "
            f"-> {os.path.join(self.cfg.train.out_dir, 'eval')}"
        )


def results_home(init: str, default: str) -> str:
    """Where evaluating or probing `init` writes its ``eval/`` or ``probe/`` folder: next to the weights
    (a run directory itself; a step_* checkpoint's run directory; for a file ``NAME.pt``, the folder
    ``NAME`` beside it), or `default` (train.out_dir) without init weights."""
    if not init:
        return default
    path = os.path.normpath(init)
    if os.path.isdir(path):
        if (
            os.path.basename(path).startswith("step_")
            and os.path.basename(os.path.dirname(path)) == "checkpoints"
        ):
            return os.path.dirname(os.path.dirname(path))
        return path
    return os.path.splitext(path)[0]


def evaluate_only(cfg: Config, out_dir: str | None = None) -> dict[str, Any]:
    """``finetune.eval_only`` (the classifier of finetune.init, evaluated) or ``finetune.linear_probe``
    (a linear probe of its encoder), on every rank; no training. The results go under `out_dir`, by
    default next to the evaluated weights (:func:`results_home`)."""
    from mats_scale.parallel.distributed import init_distributed
    from mats_scale.parallel.engine import build_engine

    task = FinetuneTask(cfg)
    out = out_dir or results_home(task.init_path, cfg.train.out_dir)
    env = init_distributed(cfg.train, cfg.parallel)
    engine = build_engine(cfg, env, task.model_spec())
    if cfg.finetune.linear_probe:
        r, what, sub = linear_probe(task, engine, out), "linear probe", "probe"
    else:
        r, what, sub = evaluate(task, engine, out), "eval", "eval"
    if env.is_writer:
        print(
            f"{what} {r['views']} views, {r['videos']} videos{lost_note(r)}: {accuracy_note(r)} "
            f"-> {os.path.join(out, sub)}",
            flush=True,
        )
    return r
