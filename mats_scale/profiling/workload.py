"""What the profilers measure: one training micro-batch of a task (:class:`Workload` for pre-training,
:class:`FinetuneWorkload` for fine-tuning), i.e. its model, inputs, loss and no-grad score forward.
Tasks hand theirs to the MFU meter (``Task.workload``); docs/profiling.md says how selections are drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mats_scale.config import Config, MaskingConfig, ModelConfig
from mats_scale.masking import Selection, TokenGrid, finetune_selection, select_tokens, selection_counts
from mats_scale.models.classifier import classifier_spec
from mats_scale.models.pretrain import pretrain_spec
from mats_scale.models.spec import ModelSpec
from mats_scale.models.spec import build_model as build_from_spec
from mats_scale.parallel.checkpointing import apply_activation_checkpointing
from mats_scale.tokens import PRESETS as STRATEGIES
from mats_scale.tokens import finetune_count

# Activation-checkpointing policies: name -> (encoder every N, decoder every N); 0 = off.
CHECKPOINT_POLICIES: dict[str, tuple[int, int]] = {"none": (0, 0), "half": (2, 2), "full": (1, 1)}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def masking_config(
    strategy: str, ratio: float, decoder_ratio: float = 0.5, keep_ratio: float = 0.3, score: str = "embed"
) -> MaskingConfig:
    """MaskingConfig of a named preset (validated by the config's own checks)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: allowed: {', '.join(STRATEGIES)}")
    return MaskingConfig(
        preset=strategy,
        ratio=ratio,
        decoder_ratio=decoder_ratio,
        keep_ratio=keep_ratio,
        score=score,
        **STRATEGIES[strategy],
    )


def parse_policy(name: str) -> tuple[int, int]:
    """A checkpointing policy by name (none / half / full) or as ``E,D`` every-N values."""
    if name in CHECKPOINT_POLICIES:
        return CHECKPOINT_POLICIES[name]
    try:
        enc, dec = (int(v) for v in name.split(","))
    except ValueError:
        raise ValueError(
            f"checkpointing policy {name!r}: allowed: {', '.join(CHECKPOINT_POLICIES)} "
            "or 'E,D' (checkpoint every E-th encoder and D-th decoder block, 0 = off)"
        ) from None
    if enc < 0 or dec < 0:
        raise ValueError(f"checkpointing policy {name!r}: every-N values must be >= 0")
    return enc, dec


class Profiled(Protocol):
    """What the memory and FLOP profilers need of a workload (both workloads below implement it)."""

    model: ModelConfig
    batch: int
    dtype: torch.dtype
    checkpoint: tuple[int, int]
    """Every N-th (encoder, decoder) block checkpointed, 0 = off; a group the model lacks is ignored."""

    @property
    def uses_embed_score(self) -> bool:
        """Whether a step runs the no-grad embedding motion score (``model.motion_scores(video)``)."""

    def with_batch(self, batch: int) -> Any: ...

    def spec(self) -> ModelSpec: ...

    def inputs(self, device: str | torch.device = "meta", seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Positional arguments of the model's forward for one micro-batch; the clip comes first."""

    def loss_fn(self, device: str | torch.device = "meta") -> Callable[[Any], torch.Tensor]:
        """The step's loss of the forward's output (its targets made now, outside any measurement)."""


def _check_batch(batch: int) -> None:
    if batch < 1:
        raise ValueError(f"batch={batch}: must be >= 1")


def _video(wl: Profiled, device: str | torch.device, seed: int) -> torch.Tensor:
    """(B, C, T, H, W) in the workload dtype: empty on meta, Gaussian from `seed` elsewhere."""
    m = wl.model
    shape = (wl.batch, 3, m.num_frames, m.img_size, m.img_size)
    device = torch.device(device)
    if device.type == "meta":
        return torch.empty(shape, device=device, dtype=wl.dtype)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, wl.dtype)


@dataclass(frozen=True)
class Workload:
    """One pre-training micro-batch: model shape, masking, batch size, compute dtype and checkpointing."""

    model: ModelConfig
    masking: MaskingConfig
    batch: int = 1
    dtype: torch.dtype = torch.float32
    checkpoint: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        _check_batch(self.batch)
        Config(model=self.model, masking=self.masking)  # the config's cross-field checks (ConfigError)

    @property
    def grid(self) -> TokenGrid:
        return TokenGrid.from_model(self.model)

    def with_batch(self, batch: int) -> Workload:
        return replace(self, batch=batch)

    @property
    def uses_embed_score(self) -> bool:
        """MATS with the patch-embedding score runs the patch embedding over every token (no grad)."""
        return self.masking.strategy == "mats" and self.masking.score == "embed"

    def spec(self) -> ModelSpec:
        return pretrain_spec(self.model)

    def inputs(self, device: str | torch.device = "meta", seed: int = 0) -> tuple[torch.Tensor, ...]:
        return model_inputs(*make_inputs(self, device, seed))

    def loss_fn(self, device: str | torch.device = "meta") -> Callable[[Any], torch.Tensor]:
        return lambda out: out.loss


@dataclass(frozen=True)
class FinetuneWorkload:
    """One fine-tuning micro-batch: the classifier over all tokens, or over the MATS top `keep_ratio`
    by the embedding motion score, with cross-entropy."""

    model: ModelConfig
    num_classes: int
    keep_ratio: float | None = None  # None: every token
    batch: int = 1
    dtype: torch.dtype = torch.float32
    checkpoint: tuple[int, int] = (0, 0)  # the classifier has encoder blocks only
    learned_pos: bool = False

    def __post_init__(self) -> None:
        _check_batch(self.batch)
        if self.keep_ratio is not None and not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio={self.keep_ratio}: must be in (0, 1]")

    @classmethod
    def of(cls, cfg: Config, num_classes: int) -> FinetuneWorkload:
        """The workload of a fine-tuning config (``finetune.select``: mats or all tokens)."""
        keep = None if cfg.finetune.select == "all" else cfg.masking.finetune_keep_ratio
        return cls(cfg.model, num_classes, keep, learned_pos=cfg.finetune.learned_pos)

    @property
    def num_tokens(self) -> int:
        """Tokens through the encoder per clip."""
        n = self.model.num_tokens
        return n if self.keep_ratio is None else finetune_count(n, self.keep_ratio)

    def with_batch(self, batch: int) -> FinetuneWorkload:
        return replace(self, batch=batch)

    @property
    def uses_embed_score(self) -> bool:
        return self.keep_ratio is not None

    def spec(self) -> ModelSpec:
        return classifier_spec(self.model, self.num_classes, learned_pos=self.learned_pos)

    def inputs(self, device: str | torch.device = "meta", seed: int = 0) -> tuple[torch.Tensor, ...]:
        """(video,) or (video, ids (B, n)); off meta the ids are the top-n of random scores (the counts,
        all that FLOPs and memory depend on, are fixed by `keep_ratio`)."""
        video = _video(self, device, seed)
        if self.keep_ratio is None:
            return (video,)
        if video.device.type == "meta":
            return video, torch.empty(self.batch, self.num_tokens, dtype=torch.int64, device=video.device)
        scores = torch.rand(self.batch, self.model.num_tokens, generator=torch.Generator().manual_seed(seed))
        return video, finetune_selection(scores, self.keep_ratio).to(video.device)

    def loss_fn(self, device: str | torch.device = "meta") -> Callable[[Any], torch.Tensor]:
        label = torch.zeros(self.batch, dtype=torch.int64, device=device)
        return lambda logits: F.cross_entropy(logits.float(), label)


def build_model(wl: Profiled, device: str | torch.device = "meta") -> nn.Module:
    """The workload's model in its dtype, in training mode, with its checkpointing policy applied.

    On ``meta`` nothing is allocated (ViT-g included); on a real device it is initialised.
    """
    spec = wl.spec()
    model = build_from_spec(spec, device)
    model.to(wl.dtype)
    model.train()
    encoder_every, decoder_every = wl.checkpoint
    return apply_activation_checkpointing(model, spec, {"encoder": encoder_every, "decoder": decoder_every})


def token_counts(wl: Workload) -> tuple[int, int]:
    """(visible, target) ids per clip, from the masking suite's own ``selection_counts``."""
    return selection_counts(wl.masking, wl.grid)


def draw_selection(wl: Workload, batch: int | None = None, seed: int = 0) -> Selection:
    """Index tensors for one micro-batch from the masking suite's ``select_tokens`` (on the CPU).

    MATS gets random motion scores: the selection's shapes (all that FLOPs and memory depend on) are
    fixed by the config, whatever the scores.
    """
    batch = wl.batch if batch is None else batch
    gen = torch.Generator().manual_seed(seed)
    scores = None
    if wl.masking.strategy == "mats":
        scores = torch.rand(batch, wl.grid.num_tokens, generator=gen)
    return select_tokens(wl.masking, wl.grid, batch, gen, scores=scores)


def make_inputs(
    wl: Workload, device: str | torch.device = "meta", seed: int = 0
) -> tuple[torch.Tensor, Selection]:
    """video (B, C, T, H, W) in the workload dtype and the selection, on `device`."""
    video = _video(wl, device, seed)
    # Compact copies: a masking output may be a view of a larger (B, N) buffer, which the training
    # loop would hold too, but the figures should not depend on how the masking code slices.
    sel = draw_selection(wl, seed=seed)
    sel = Selection(
        *(
            t.to(video.device).clone(memory_format=torch.contiguous_format) if t is not None else None
            for t in sel
        )
    )
    return video, sel


def model_inputs(video: torch.Tensor, sel: Selection) -> tuple[torch.Tensor, ...]:
    """Positional arguments of ``PretrainVideoMAE.forward`` (target_weights only when present)."""
    args = (video, sel.visible_ids, sel.target_ids)
    return args if sel.target_weights is None else args + (sel.target_weights,)


def state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers: model state, not activations."""
    return [*model.parameters(), *model.buffers()]
