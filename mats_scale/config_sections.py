"""The sections of the config tree (``masking``, ``data``, ``optim``, ``train``, ``parallel``,
``logging``, ``finetune``): typed fields with a one-line docstring each, validated in ``__post_init__``.
The ``model`` section is :class:`mats_scale.models.args.ModelArgs`; the tree and its loading are in
:mod:`mats_scale.config`."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from mats_scale import tokens
from mats_scale.errors import check_choice, check_open_unit, check_positive, fail


@dataclass
class MaskingConfig:
    preset: str = ""
    """Named preset that sets strategy, decoder and decoder_mode: tube (VideoMAE), tube+rc (VideoMAE V2),
    tube+rc-lean, mats (EVEREST), mats+dual (ours); empty: set those keys yourself."""
    strategy: str = "tube"
    """Encoder token selection: tube (VideoMAE), random, or mats (motion-aware, EVEREST)."""
    ratio: float = 0.9
    """Encoder mask ratio rho: int((1 - rho) * N) tokens are visible."""
    decoder: str = "none"
    """Decoder masking: none, or running_cell (VideoMAE V2 dual masking)."""
    decoder_ratio: float = 0.5
    """Decoder mask ratio rho_d of the running cell (k = int(4 * rho_d) of every 4 dropped)."""
    decoder_mode: str = "reference"
    """reference: mask tokens at every decoder-kept position (VideoMAE V2); lean: only at loss positions."""
    keep_ratio: float = 0.3
    """MATS rho_pre: fraction of tokens (highest motion) that are encoded or reconstructed."""
    context_ratio: float = 0.0
    """MATS context tokens: this share of the kept tokens (encoder-visible and targets alike) is drawn at
    random from outside the motion top set, so static appearance is encoded and reconstructed too; 0 is
    MATS exactly (docs/masking.md, "Context tokens")."""
    score: str = "embed"
    """MATS motion score: embed (patch-embedding L2, the paper), pixel (cheap, in the loader),
    compensated (pixel residual after the camera's global translation, in the loader) or
    compensated_zoom (and after its zoom: costlier, docs/masking.md)."""
    finetune_keep_ratio: float = 0.6
    """MATS rho_post for fine-tuning: deterministic top tokens by motion."""
    finetune_eval_keep_all: bool = False
    """Fine-tuning evaluation on every token (True) or on the same top rho_post as training (False)."""
    frame_selection: bool = False
    """Adaptive frame selection in the loader (decode 2*alpha*tau candidates, keep tau pairs)."""
    frame_alpha: float = 1.5
    """Candidate over-sampling factor alpha of adaptive frame selection."""
    frame_keep_ratio: float = 0.3
    """Frame selection: high-motion tokens = this top fraction of all candidate tokens by pixel score."""

    def __post_init__(self) -> None:
        if self.preset:
            check_choice("masking.preset", self.preset, list(tokens.PRESETS))
            for key, value in tokens.PRESETS[self.preset].items():
                if getattr(self, key) != value:
                    fail(
                        f"masking.{key}",
                        getattr(self, key),
                        f"masking.preset={self.preset} sets {key}={value}; drop one of the two",
                    )
        check_choice("masking.strategy", self.strategy, ["tube", "random", "mats"])
        check_choice("masking.decoder", self.decoder, ["none", "running_cell"])
        check_choice("masking.decoder_mode", self.decoder_mode, ["reference", "lean"])
        check_choice("masking.score", self.score, ["embed", "pixel", "compensated", "compensated_zoom"])
        for key in ("ratio", "decoder_ratio", "keep_ratio", "finetune_keep_ratio", "frame_keep_ratio"):
            check_open_unit(f"masking.{key}", getattr(self, key))
        if self.strategy == "mats" and self.decoder == "running_cell" and self.decoder_mode != "lean":
            fail(
                "masking.decoder_mode",
                self.decoder_mode,
                "masking.strategy=mats with masking.decoder=running_cell needs lean (the reference mode "
                "places mask tokens over a full-grid decoder mask that MATS does not keep)",
            )
        if self.decoder == "running_cell" and not 1 <= int(4 * self.decoder_ratio) <= 3:
            fail(
                "masking.decoder_ratio",
                self.decoder_ratio,
                "the running cell needs k = int(4 * ratio) in 1..3, i.e. a ratio in [0.25, 1)",
            )
        if self.frame_alpha < 1.0:
            fail("masking.frame_alpha", self.frame_alpha, "must be >= 1")
        if not 0.0 <= self.context_ratio < 1.0:
            fail("masking.context_ratio", self.context_ratio, "must be in [0, 1)")
        if self.context_ratio and self.strategy != "mats":
            fail("masking.context_ratio", self.context_ratio, "applies to masking.strategy=mats only")


@dataclass
class DataConfig:
    dataset: str = "bundled"
    """bundled (generated sample videos, created on first use), list (VideoMAE list file), folder
    (scan a directory) or synthetic (clips rendered in memory, no files)."""
    bundled: str = "motion"
    """data.dataset=bundled: which generated task: motion (the class is a drawn shape's motion), objects
    (which photographed object moves over a shared texture) or scenes (which photographed scene, with a
    moving distractor); docs/data.md."""
    root: str = ""
    """bundled: the dataset directory (empty: data/bundled, or data/bundled-<task> for objects and scenes,
    under the working directory); list: prefix
    joined to every relative path; folder: the directory to scan."""
    train_list: str = ""
    """List file for training: one `path label` per line (labels ignored in pre-training)."""
    val_list: str = ""
    """List file for validation."""
    sampling_rate: int = 4
    """Frame stride of a clip (VideoMAE); ignored with segment sampling."""
    segment_sampling: bool = False
    """SSv2-style uniform segments instead of a strided clip (also turns horizontal flip off)."""
    flip: bool = True
    """Random horizontal flip in training augmentation (never with segment_sampling)."""
    min_frames: int = 4
    """Videos with fewer frames are skipped as bad; longer ones too short for the clip are looped."""
    shot_cuts: str = "limit"
    """Hard shot cuts in a clip window: limit (re-draw the window inside one shot) or ignore."""
    num_sample: int = 1
    """Repeated sampling: clips drawn per decoded video (VideoMAE V2); divides batch_size."""
    batch_size: int = 2
    """Clips per micro-batch per process (GPU); total batch = batch_size * world size * grad_accum."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    max_bad_fraction: float = 0.1
    """Stop with an error when more than this fraction of the video reads so far failed."""
    eval_clips: int = 1
    """Evaluation: temporal views per video, spread evenly over it (VideoMAE's test_num_segment)."""
    eval_crops: int = 1
    """Evaluation: spatial views per clip, 1 (centre) or 3 (along the long side; test_num_crop)."""
    decoder: str = "decord"
    """Video decoder: decord (default) or pyav (the same frames; decord falls back to PyAV per file
    for videos it cannot read), or nvdec (NVIDIA GPU decoding into device memory, PyNvVideoCodec;
    docs/gpu.md: in the training process, data.num_workers=0)."""
    cache_gib: float = 0.0
    """Keep whole decoded videos in memory, up to this many GiB per loader process (each worker has
    its own): for small datasets read for many epochs (the bundled one is ~1 GiB decoded); 0: off."""
    normalize_on_device: bool = True
    """Workers send uint8 clips (4x fewer bytes than float32) and the training device converts and
    normalises them (mats_scale.data.device.to_model_input); false: workers send normalised float32."""

    def __post_init__(self) -> None:
        check_choice("data.dataset", self.dataset, ["bundled", "list", "folder", "synthetic"])
        check_choice("data.bundled", self.bundled, ["motion", "objects", "scenes"])
        for key in (
            "sampling_rate",
            "num_sample",
            "batch_size",
            "min_frames",
            "prefetch_factor",
            "eval_clips",
        ):
            check_positive(f"data.{key}", getattr(self, key))
        check_positive("data.num_workers", self.num_workers, allow_zero=True)
        check_choice("data.eval_crops", self.eval_crops, [1, 3])
        check_choice("data.shot_cuts", self.shot_cuts, ["limit", "ignore"])
        check_choice("data.decoder", self.decoder, ["decord", "pyav", "nvdec"])
        if self.decoder == "nvdec" and (self.num_workers or self.cache_gib):
            fail(
                "data.decoder",
                self.decoder,
                "decodes on the training GPU in the training process: needs data.num_workers=0 and "
                f"data.cache_gib=0 (got {self.num_workers} and {self.cache_gib})",
            )
        if not (self.cache_gib >= 0 and math.isfinite(self.cache_gib)):
            fail("data.cache_gib", self.cache_gib, "must be a number of GiB >= 0 (0: no cache)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            fail("data.max_bad_fraction", self.max_bad_fraction, "must be in [0, 1]")
        if self.batch_size % self.num_sample:
            fail(
                "data.batch_size",
                self.batch_size,
                f"must be divisible by data.num_sample={self.num_sample} (clips per decoded video)",
            )
        if self.dataset == "list" and not self.train_list:
            fail("data.train_list", self.train_list, "data.dataset=list needs a list file")
        if self.dataset == "folder" and not self.root:
            fail("data.root", self.root, "data.dataset=folder needs the directory to scan")


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4
    """Learning rate per 256 clips; the applied peak lr is base_lr * total_batch / 256."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine schedule."""
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up (replaced by optim.warmup_epochs when that is set)."""
    warmup_epochs: float | None = None
    """Warm-up in epochs (VideoMAE's --warmup_epochs); the steps follow from the dataset size and batch."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to norms, biases, position and mask tokens)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    clip_grad: float | None = None
    """Gradient-norm clipping threshold; None disables clipping."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    fused: bool = True
    """Fused AdamW kernel (torch's fused=True, CPU and CUDA); false uses the per-parameter loop."""
    layer_decay: float = 1.0
    """Layer-wise lr decay (fine-tuning; VideoMAE: 0.75): block i of L gets lr * decay^(L + 1 - (i + 1)),
    the patch embedding decay^(L + 1), the head 1. 1.0: off (one lr for every parameter)."""

    def __post_init__(self) -> None:
        check_positive("optim.base_lr", self.base_lr)
        check_positive("optim.min_lr", self.min_lr, allow_zero=True)
        check_positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        if self.warmup_epochs is not None:
            check_positive("optim.warmup_epochs", self.warmup_epochs, allow_zero=True)
        check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        check_positive("optim.grad_accum", self.grad_accum)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            fail("optim.betas", list(self.betas), "must be two numbers in [0, 1)")
        if self.clip_grad is not None:
            check_positive("optim.clip_grad", self.clip_grad)
        if not 0.0 < self.layer_decay <= 1.0:
            fail("optim.layer_decay", self.layer_decay, "must be in (0, 1] (1: no layer-wise decay)")


@dataclass
class TrainConfig:
    steps: int = 60
    """Optimizer steps of the run (a skipped non-finite step counts as a step); replaced by train.epochs
    when that is set. The lr schedule is a function of it, so a resume refuses a change."""
    epochs: float | None = None
    """Run length in epochs (VideoMAE's --epochs): train.steps = epochs x optimizer steps per epoch
    (videos // (data.batch_size / data.num_sample) // world size // optim.grad_accum)."""
    seed: int = 0
    """Seed of every random stream (model init, masking, data, drop path); each rank derives its own."""
    out_dir: str = "runs/default"
    """Run directory: train.log, metrics.jsonl, tb/, config.yaml, ds_config.json, checkpoints/."""
    device: str = "auto"
    """auto (cuda when present), cpu or cuda."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16 (autocast with fp32 master weights)."""
    save_every: int = 0
    """Save a checkpoint every N optimizer steps (0: only at the end and on SIGTERM/SIGINT)."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted after a newer one is complete)."""
    resume: str = "auto"
    """auto (newest checkpoint in out_dir/checkpoints that verifies, else start fresh), none (start fresh;
    refused over existing checkpoints), restart (start fresh and move the existing checkpoints to
    checkpoints.before-restart-<time>/, never deleted), or a checkpoint directory."""
    nan_policy: str = "skip"
    """On a non-finite loss or gradient norm: skip (drop the update, count it) or stop at once."""
    max_nan_steps: int = 3
    """With nan_policy=skip: consecutive skipped steps after which the run stops with an error."""
    allow_changes: list[str] = field(default_factory=list)
    """Keys a resume may change from the checkpoint's config, e.g. [train.steps,optim.clip_grad]
    (a section name allows all its keys); any other difference is refused."""
    compile: bool = False
    """torch.compile each transformer block (after activation checkpointing, before sharding); the first
    steps compile, later ones reuse the graphs (token counts are fixed per config)."""

    def __post_init__(self) -> None:
        check_positive("train.steps", self.steps)
        if self.epochs is not None:
            check_positive("train.epochs", self.epochs)
        check_choice("train.device", self.device, ["auto", "cpu", "cuda"])
        check_choice("train.precision", self.precision, ["auto", "fp32", "bf16"])
        check_choice("train.nan_policy", self.nan_policy, ["skip", "stop"])
        check_positive("train.save_every", self.save_every, allow_zero=True)
        check_positive("train.keep_last", self.keep_last)
        check_positive("train.max_nan_steps", self.max_nan_steps)
        if not self.out_dir:
            fail("train.out_dir", self.out_dir, "must be a directory path")
        if not self.resume:
            fail("train.resume", self.resume, "allowed: auto, none, restart, or a checkpoint directory")


@dataclass
class ParallelConfig:
    backend: str = "deepspeed"
    """deepspeed (ZeRO stage 0-3), fsdp2 (torch fully_shard, always fully sharded) or none (one process)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3 (ignored by fsdp2 and none)."""
    offload_optimizer: bool = False
    """ZeRO-3 optimizer states (and step) in CPU memory (shipped template zero3_offload.json)."""
    ds_config: str = ""
    """DeepSpeed JSON template; empty picks the shipped ds_configs/zero{stage}.json
    (zero3_offload.json with offload)."""
    checkpoint_encoder_every: int = 0
    """Activation checkpointing of every N-th encoder block (0: off, 1: all)."""
    checkpoint_decoder_every: int = 0
    """Activation checkpointing of every N-th decoder block (0: off, 1: all)."""
    timeout_s: int = 0
    """Collective timeout in seconds: a rank that does not answer for this long is reported and the run
    stops (0: 300 on CPU/gloo, 1800 on CUDA/NCCL). It also bounds a checkpoint save's wait."""

    def __post_init__(self) -> None:
        check_choice("parallel.backend", self.backend, ["none", "deepspeed", "fsdp2"])
        check_choice("parallel.zero_stage", self.zero_stage, [0, 1, 2, 3])
        for key in ("checkpoint_encoder_every", "checkpoint_decoder_every", "timeout_s"):
            check_positive(f"parallel.{key}", getattr(self, key), allow_zero=True)
        if self.offload_optimizer and self.zero_stage != 3:
            fail("parallel.offload_optimizer", True, "needs parallel.zero_stage=3")
        if self.ds_config and not os.path.isfile(self.ds_config):
            fail("parallel.ds_config", self.ds_config, "no such file (a DeepSpeed JSON template)")


@dataclass
class LoggingConfig:
    log_every: int = 10
    """Print a line to stdout and train.log every N steps (TensorBoard and metrics.jsonl get every step)."""
    tensorboard: bool = True
    """Write TensorBoard scalars under out_dir/tb."""
    progress_bar: bool = True
    """tqdm progress bar with ETA on rank 0, only when stderr is a terminal (piped output: log lines only)."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s per device for the logged MFU; 0: the known-GPU table on CUDA, a GEMM sample on CPU."""

    def __post_init__(self) -> None:
        check_positive("logging.log_every", self.log_every)
        check_positive("logging.peak_tflops", self.peak_tflops, allow_zero=True)


RAND_AUG = re.compile(r"rand(-(m\d+|n\d+|mstd[\d.]+|mmax\d+|inc[01]|p[\d.]+|t\w+))*")
"""The timm RandAugment strings finetune.rand_aug accepts (timm's rand_augment_transform grammar)."""


@dataclass
class FinetuneConfig:
    init: str = ""
    """Weights to start from: a .pt file (this project's export, or an official VideoMAE / VideoMAE V2 /
    EVEREST checkpoint), a run directory or a step_* checkpoint of this project; empty: from scratch;
    auto: the bundled default pre-training run (runs/default) if it has a checkpoint, else from scratch."""
    num_classes: int = 0
    """Classifier outputs; 0: from the data (bundled: its 10 classes; list/folder: largest label + 1)."""
    select: str = "mats"
    """Training tokens: mats (the top masking.finetune_keep_ratio by motion, EVEREST) or all (VideoMAE)."""
    head_drop: float = 0.0
    """Dropout before the head (VideoMAE's fc_drop_rate)."""
    learned_pos: bool = False
    """A learned position table (for checkpoints that bring one) instead of the fixed sin-cos table."""
    drop_head: bool = False
    """Initialise a fresh head even when `init` brings one (another label set)."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy (and of the Mixup targets)."""
    mixup: float = 0.0
    """timm Mixup alpha (VideoMAE: 0.8); 0 with cutmix 0 turns mixing off."""
    cutmix: float = 0.0
    """timm CutMix alpha (VideoMAE: 1.0); boxes are cut from every frame at the same place."""
    rand_aug: str = ""
    """timm RandAugment config string (VideoMAE: rand-m7-n4-mstd0.5-inc1), one draw per clip applied to
    every frame alike, on the workers' frames before the crop; empty: off."""
    reprob: float = 0.0
    """timm RandomErasing probability (VideoMAE: 0.25), per frame as VideoMAE applies it (each frame
    its own box), on the device after normalisation; 0: off."""
    remode: str = "pixel"
    """RandomErasing fill: pixel (per-pixel normal noise, VideoMAE), rand (one colour per box) or const."""
    recount: int = 1
    """RandomErasing boxes per frame: 1 to this many (VideoMAE: 1)."""
    eval_only: bool = False
    """Only evaluate (`init`, or the newest checkpoint of train.out_dir) on the val split; no training."""
    linear_probe: bool = False
    """Only a linear probe of the encoder of `init` (empty: a random encoder, as a baseline): pooled
    features of every train and val video computed once (views as in evaluation), a logistic regression
    on the train features, scored on val; results in train.out_dir/probe. No training."""
    eval_at_end: bool = True
    """Evaluate on the val split after training (data.eval_clips x data.eval_crops views)."""

    def __post_init__(self) -> None:
        check_choice("finetune.select", self.select, ["mats", "all"])
        if self.linear_probe and self.eval_only:
            fail(
                "finetune.linear_probe",
                True,
                "cannot be combined with finetune.eval_only (--eval); choose one",
            )
        check_positive("finetune.num_classes", self.num_classes, allow_zero=True)
        for key in ("head_drop", "label_smoothing"):
            if not 0.0 <= getattr(self, key) < 1.0:
                fail(f"finetune.{key}", getattr(self, key), "must be in [0, 1)")
        for key in ("mixup", "cutmix"):
            check_positive(f"finetune.{key}", getattr(self, key), allow_zero=True)
        if self.rand_aug and not RAND_AUG.fullmatch(self.rand_aug):
            fail(
                "finetune.rand_aug",
                self.rand_aug,
                "must be a timm RandAugment string: rand followed by -m<int>, -n<int>, -mstd<float>, "
                "-mmax<int>, -inc<0|1>, -p<float> or -t<name> parts, e.g. rand-m7-n4-mstd0.5-inc1",
            )
        if not 0.0 <= self.reprob <= 1.0:
            fail("finetune.reprob", self.reprob, "must be in [0, 1]")
        check_choice("finetune.remode", self.remode, ["pixel", "rand", "const"])
        check_positive("finetune.recount", self.recount)
