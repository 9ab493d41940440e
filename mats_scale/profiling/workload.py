"""What the profilers measure: one pre-training micro-batch of a model size, input and masking config.

FLOPs and memory depend only on the shapes the masking produces (numbers of visible and target ids per
clip, and whether loss weights exist), never on which tokens were picked. The selection is therefore
drawn with the project's own masking code (``mats_scale.masking.select_tokens``) on the CPU and then
moved, as index tensors, to the device being profiled (usually ``meta``). MATS gets random scores:
only their shape matters here; the cost of computing the real embedding score is accounted for
separately (see ``flops.py`` / ``memory.py``).

The CLIs name masking by the project's presets (``mats_scale.tokens.PRESETS``: tube, tube+rc,
tube+rc-lean, mats, mats+dual); decoder ratio rho_d and MATS keep ratio come from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from mats_scale.config import Config, MaskingConfig, ModelConfig
from mats_scale.masking import Selection, TokenGrid, select_tokens, selection_counts
from mats_scale.models.pretrain import PretrainVideoMAE, build_pretrain_model, pretrain_spec
from mats_scale.parallel.checkpointing import apply_activation_checkpointing
from mats_scale.tokens import PRESETS as STRATEGIES

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


@dataclass(frozen=True)
class Workload:
    """One micro-batch: model shape, masking, batch size, compute dtype and checkpointing policy."""

    model: ModelConfig
    masking: MaskingConfig
    batch: int = 1
    dtype: torch.dtype = torch.float32
    checkpoint: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch={self.batch}: must be >= 1")
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


def build_model(wl: Workload, device: str | torch.device = "meta") -> PretrainVideoMAE:
    """The pre-training model in the workload's dtype with its checkpointing policy applied.

    On ``meta`` nothing is allocated (ViT-g included); on a real device it is initialised.
    """
    model = build_pretrain_model(wl.model, device=device)
    model.to(wl.dtype)
    model.train()
    encoder_every, decoder_every = wl.checkpoint
    return apply_activation_checkpointing(
        model, pretrain_spec(wl.model), {"encoder": encoder_every, "decoder": decoder_every}
    )


def make_inputs(
    wl: Workload, device: str | torch.device = "meta", seed: int = 0
) -> tuple[torch.Tensor, Selection]:
    """video (B, C, T, H, W) in the workload dtype and the selection, on `device`."""
    m = wl.model
    shape = (wl.batch, 3, m.num_frames, m.img_size, m.img_size)
    device = torch.device(device)
    if device.type == "meta":
        video = torch.empty(shape, device=device, dtype=wl.dtype)
    else:
        video = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, wl.dtype)
    # Compact copies: a masking output may be a view of a larger (B, N) buffer, which the training
    # loop would hold too, but the figures should not depend on how the masking code slices.
    sel = draw_selection(wl, seed=seed)
    sel = Selection(
        *(t.to(device).clone(memory_format=torch.contiguous_format) if t is not None else None for t in sel)
    )
    return video, sel


def model_inputs(video: torch.Tensor, sel: Selection) -> tuple[torch.Tensor, ...]:
    """Positional arguments of ``PretrainVideoMAE.forward`` (target_weights only when present)."""
    args = (video, sel.visible_ids, sel.target_ids)
    return args if sel.target_weights is None else args + (sel.target_weights,)


def state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers: model state, not activations."""
    return [*model.parameters(), *model.buffers()]
