"""Token grid, token counts per masking strategy, and the named masking presets: torch-free.

The one source of "how many tokens does the encoder see and the decoder predict" for config
validation, the profilers, the benchmarks and the sweeps; the masking suite (``mats_scale.masking``)
draws selections whose shapes always equal :func:`selection_counts`. Nothing here imports torch, so
the job config can validate counts before any heavy import.

Named presets (``masking.preset``; DESIGN.md "The methods"):

    tube           VideoMAE: tube masking, the decoder predicts every masked token
    tube+rc        VideoMAE V2: tube + running-cell decoder masking, reference mode
    tube+rc-lean   tube + running cell, mask tokens only at loss positions
    mats           MATS / EVEREST: motion-aware token selection
    mats+dual      MATS + running-cell dual masking (lean; the only mode defined for MATS): ours
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

CELL = 4  # positions of the running cell's 2x2 block, and its period in temporal slices

PRESETS: dict[str, dict[str, str]] = {
    "tube": dict(strategy="tube", decoder="none"),
    "tube+rc": dict(strategy="tube", decoder="running_cell", decoder_mode="reference"),
    "tube+rc-lean": dict(strategy="tube", decoder="running_cell", decoder_mode="lean"),
    "mats": dict(strategy="mats", decoder="none"),
    "mats+dual": dict(strategy="mats", decoder="running_cell", decoder_mode="lean"),
}
"""Preset name -> the ``masking.*`` fields it fixes (ratios stay separate keys)."""

PRESET_FIELDS = ("strategy", "decoder", "decoder_mode")


@dataclass(frozen=True)
class TokenGrid:
    """Token grid (T', H', W') of a clip; token (t, h, w) has flat id (t * H' + h) * W' + w."""

    t: int
    h: int
    w: int

    @property
    def spatial(self) -> int:
        return self.h * self.w

    @property
    def num_tokens(self) -> int:
        return self.t * self.h * self.w

    @classmethod
    def from_model(cls, model_args) -> TokenGrid:
        """From anything with a ``grid`` (T', H', W') property
        (:class:`~mats_scale.models.args.ModelArgs`)."""
        return cls(*model_args.grid)


class MaskingSpec(Protocol):
    """The fields of ``masking.*`` that fix the counts (MaskingConfig satisfies it)."""

    strategy: str
    ratio: float
    decoder: str
    decoder_ratio: float
    decoder_mode: str
    keep_ratio: float
    context_ratio: float


def preset_fields(name: str) -> dict[str, str]:
    """The ``masking.*`` fields of preset `name`; ValueError naming the allowed presets."""
    if name not in PRESETS:
        raise ValueError(f"masking preset {name!r}: allowed: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def preset_of(m: Any) -> str | None:
    """The preset name whose fields `m` has, or None."""
    for name, fields in PRESETS.items():
        if all(getattr(m, k, None) == v for k, v in fields.items()):
            return name
    return None


# ---- running cell --------------------------------------------------------------------------------
def cell_drop_count(ratio: float) -> int:
    """k = int(4 * rho_d): positions dropped per 2x2 cell; only 1..3 are meaningful."""
    k = int(CELL * ratio)
    if not 1 <= k <= CELL - 1:
        raise ValueError(
            f"running-cell decoder ratio={ratio!r}: k = int(4 * ratio) = {k} must be in 1..3, "
            "i.e. a ratio in [0.25, 1)"
        )
    return k


def check_even_grid(grid: TokenGrid) -> None:
    if grid.h % 2 or grid.w % 2:
        raise ValueError(
            f"running-cell decoder masking needs an even token grid, got {grid.h}x{grid.w} "
            "patches (odd grids are refused, not padded)"
        )


def decoder_kept_count(grid: TokenGrid, ratio: float) -> int:
    """K: decoder-kept tokens per clip (fixed: every slice keeps (4-k)/4 of an even grid)."""
    check_even_grid(grid)
    return grid.t * grid.spatial * (CELL - cell_drop_count(ratio)) // CELL


def kept_slices_per_position(grid: TokenGrid, ratio: float, phase: int) -> list[int]:
    """For one phase: in how many temporal slices each spatial position (raster order) is decoder-kept.

    Token (t, h, w) is dropped iff q[(j + phase + t + 1) % 4] = 1 with j = 2 (h % 2) + (w % 2) and
    q = [1]*k + [0]*(4-k) (DESIGN.md), i.e. iff (j + phase + t + 1) % 4 < k.
    """
    k = cell_drop_count(ratio)
    out = []
    for h in range(grid.h):
        for w in range(grid.w):
            j = 2 * (h % 2) + (w % 2)
            out.append(sum((j + phase + t + 1) % CELL >= k for t in range(grid.t)))
    return out


def lean_target_range(grid: TokenGrid, ratio: float, decoder_ratio: float, strategy: str) -> tuple[int, int]:
    """(min, max) number of loss positions (encoder-masked AND decoder-kept) per clip.

    loss = K - |visible AND kept|. Tube: the visible set is n_vis spatial positions in every slice, so
    |visible AND kept| is the sum of their per-position kept counts; the extremes take the n_vis
    smallest / largest counts over the 4 phases (equal when T' % 4 == 0). Random: any n_vis tokens.
    """
    K = decoder_kept_count(grid, decoder_ratio)
    if strategy == "tube":
        n_vis = grid.spatial - int(ratio * grid.spatial)
        per_phase = [sorted(kept_slices_per_position(grid, decoder_ratio, p)) for p in range(CELL)]
        low = min(sum(c[:n_vis]) for c in per_phase)
        high = max(sum(c[grid.spatial - n_vis :]) for c in per_phase)
        return K - high, K - low
    if strategy == "random":
        n = grid.num_tokens
        n_vis = n - int(ratio * n)
        return K - min(n_vis, K), K - max(0, n_vis - (n - K))
    raise ValueError(f"lean running-cell targets are defined for tube and random, not {strategy!r}")


# ---- MATS ----------------------------------------------------------------------------------------
def mats_counts(num_tokens: int, ratio: float, keep_ratio: float) -> tuple[int, int]:
    """(n_vis, n_targets) per clip of MATS pre-training selection."""
    n_keep = int(keep_ratio * num_tokens)
    n_vis = int((1.0 - ratio) * num_tokens)
    if not 1 <= n_vis < n_keep:
        raise ValueError(
            f"MATS must keep more tokens than the encoder sees: int(keep_ratio * N) = {n_keep} "
            f"vs int((1 - ratio) * N) = {n_vis} visible (N={num_tokens}), and at least 1 visible"
        )
    return n_vis, n_keep - n_vis


def mats_context_count(num_kept: int, context_ratio: float) -> int:
    """How many of MATS's `num_kept` tokens are context tokens drawn from outside the motion top set."""
    return int(context_ratio * num_kept)


def mats_dual_target_count(num_targets: int, decoder_ratio: float) -> int:
    """M = n_t - floor(n_t * k / 4): the running cell drops k of every 4 positions, so MATS + dual
    masking keeps the same fraction of the MATS targets (157 of 314 at rho_d = 0.5)."""
    return num_targets - num_targets * cell_drop_count(decoder_ratio) // CELL


def finetune_count(num_tokens: int, keep_ratio: float) -> int:
    """Tokens the encoder sees in MATS fine-tuning: the top int(rho_post * N), at least 1."""
    return max(1, int(keep_ratio * num_tokens))


# ---- every strategy ------------------------------------------------------------------------------
def encoder_mask_count(m: MaskingSpec, grid: TokenGrid) -> int:
    """Tokens hidden from the encoder by tube / random masking (MATS: see :func:`mats_counts`)."""
    if m.strategy == "tube":
        return grid.t * int(m.ratio * grid.spatial)
    if m.strategy == "random":
        return int(m.ratio * grid.num_tokens)
    raise ValueError(f"masking.strategy={m.strategy!r}: allowed: tube, random, mats")


def check_combination(m: MaskingSpec) -> None:
    if m.strategy == "mats" and m.decoder == "running_cell" and m.decoder_mode != "lean":
        raise ValueError(
            "masking.decoder_mode='reference' is not defined with masking.strategy=mats: "
            "MATS + running cell needs masking.decoder_mode=lean"
        )


def selection_counts(m: MaskingSpec, grid: TokenGrid) -> tuple[int, int]:
    """(visible ids, target ids) per clip for masking `m` on `grid`; ValueError when undefined."""
    check_combination(m)
    n = grid.num_tokens
    if m.strategy == "mats":
        n_vis, n_tgt = mats_counts(n, m.ratio, m.keep_ratio)
        if m.decoder == "running_cell":
            n_tgt = mats_dual_target_count(n_tgt, m.decoder_ratio)
        return n_vis, n_tgt
    n_mask = encoder_mask_count(m, grid)
    if not 1 <= n_mask < n:
        raise ValueError(f"masks {n_mask} of N={n} tokens; needs at least 1 masked and 1 visible")
    if m.decoder == "none":
        return n - n_mask, n_mask
    if m.decoder_mode == "reference":
        return n - n_mask, decoder_kept_count(grid, m.decoder_ratio)
    return n - n_mask, lean_target_range(grid, m.ratio, m.decoder_ratio, m.strategy)[1]
