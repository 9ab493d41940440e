"""FLOP counts of a workload on ``meta``: fvcore forward MACs (the papers' "FLOPs", with an SDPA handle)
and FlopCounterMode training-step FLOPs (2 per MAC); docs/profiling.md gives the conventions.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace
from math import prod
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mats_scale.models.layers import patchify
from mats_scale.profiling.workload import Profiled, Workload, build_model, make_inputs, model_inputs

if TYPE_CHECKING:
    from fvcore.nn import FlopCountAnalysis

# Ops fvcore skips that only move or index data (no arithmetic): not counted even as elementwise.
DATA_MOVEMENT_OPS = ("aten::embedding",)
# Reductions: one op per input element; every other skipped op: one per output element.
REDUCTION_OPS = (
    "aten::mean",
    "aten::var",
    "aten::sum",
    "aten::std",
    "aten::norm",
    "aten::linalg_vector_norm",
)
MAC_OPS = (
    "linear",
    "addmm",
    "matmul",
    "mm",
    "bmm",
    "_convolution",
    "einsum",
    "scaled_dot_product_attention",
    "layer_norm",
)


def _fvcore():
    """fvcore, imported on first use (seconds; the MFU meter counts with FlopCounterMode only)."""
    with warnings.catch_warnings():  # fvcore imports torch.jit.script, deprecated in recent PyTorch
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis
        from fvcore.nn.jit_handles import get_shape
    return FlopCountAnalysis, get_shape


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: MACs of Q K^T plus A V.

    q: (..., Nq, d), k: (..., Nk, d), v: (..., Nk, dv) -> prod(...) * Nq * Nk * (d + dv).
    """
    get_shape = _fvcore()[1]
    q, k, v = (get_shape(x) for x in inputs[:3])
    *batch, nq, d = q
    nk, dv = k[-2], v[-1]
    return prod(batch) * nq * nk * (d + dv)


def _numel_handle(use_input: bool):
    get_shape = _fvcore()[1]

    def handle(inputs: list[Any], outputs: list[Any]) -> int:
        shape = get_shape(inputs[0] if use_input else outputs[0])
        return prod(shape) if shape is not None else 0

    return handle


def fvcore_analysis(model: torch.nn.Module, args: tuple) -> FlopCountAnalysis:
    """fvcore's count of ``model(*args)`` with the SDPA handle; data movement and unsupported ops silent."""
    fa = _fvcore()[0](model, args)
    fa.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    for op in DATA_MOVEMENT_OPS:
        fa.set_op_handle(op, None)
    fa.unsupported_ops_warnings(False)
    fa.uncalled_modules_warnings(False)
    return fa


@dataclass
class FlopReport:
    """Counts for ONE clip (batch 1)."""

    n_visible: int
    n_targets: int
    fwd_macs: int  # model forward as this code runs it (fvcore + SDPA handle)
    ref_macs: int  # papers' convention: patch embedding over all N tokens
    score_macs: int  # MATS embedding score (forward, no grad); 0 otherwise
    layer_norm_macs: int  # part of fwd_macs that is layer norm (fvcore: 5 per element)
    train_flops: int  # forward + backward (+ recompute) FLOPs of one step, incl. the score forward
    elementwise_ops: int  # ops fvcore skips, counted one per element; never part of the MACs
    by_module: dict[str, int] = field(default_factory=dict)  # fwd MACs per top-level part
    skipped_ops: dict[str, int] = field(default_factory=dict)  # op -> calls, counted as elementwise

    @property
    def decoder_tokens(self) -> int:
        return self.n_visible + self.n_targets

    @property
    def fwd_flops(self) -> int:
        return 2 * self.fwd_macs

    @property
    def step_macs(self) -> int:
        """This code's forward cost of a step: model forward plus the MATS score."""
        return self.fwd_macs + self.score_macs

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("by_module")
        row.pop("skipped_ops")
        row.update({f"macs_{k}": v for k, v in self.by_module.items()})
        row["decoder_tokens"] = self.decoder_tokens
        row["step_macs"] = self.step_macs
        return row


MODULE_PARTS = {
    "patch_embed": "encoder.patch_embed",
    "encoder_blocks": "encoder.blocks",
    "encoder_to_decoder": "encoder_to_decoder",
    "decoder_blocks": "decoder.blocks",
    "head": "decoder.head",
}


def count_flops(wl: Workload, *, with_train: bool = True, with_elementwise: bool = True) -> FlopReport:
    """FLOP counts per clip of `wl` (its batch size is ignored: counted at batch 1)."""
    wl = wl.with_batch(1)
    # fvcore traces the plain model: checkpointing changes no forward MAC, only the step (train_flops).
    model = build_model(replace(wl, checkpoint=(0, 0)), "meta")
    video, sel = make_inputs(wl, "meta")
    args = model_inputs(video, sel)

    fa = fvcore_analysis(model, args)
    fwd = fa.total()
    by_op = fa.by_operator()
    by_module = {name: fa.total(path) for name, path in MODULE_PARTS.items()}

    elementwise, skipped = 0, {}
    if with_elementwise:
        skipped = dict(fa.unsupported_ops())
        fa_all = fvcore_analysis(model, args)
        for op in skipped:
            fa_all.set_op_handle(op, _numel_handle(op in REDUCTION_OPS))
        elementwise = fa_all.total() - fwd

    # The papers' convention embeds the whole clip. The tubelet Conv3d (kernel = stride) is exactly the
    # GEMM over all N patches, which is what we trace (jit tracing of a 5-D conv fails on meta); the
    # MACs are N * C*t*p*p * D either way.
    all_patches = patchify(video, wl.model.tubelet_size, wl.model.patch)  # (1, N, C*t*p*p)
    embed_full = fvcore_analysis(model.encoder.patch_embed, (all_patches,)).total()
    ref = fwd - by_module["patch_embed"] + embed_full
    score = score_macs(model, video) if wl.uses_embed_score else 0

    train = train_flops(wl) + 2 * score if with_train else 0
    return FlopReport(
        n_visible=sel.visible_ids.shape[1],
        n_targets=sel.target_ids.shape[1],
        fwd_macs=fwd,
        ref_macs=ref,
        score_macs=score,
        layer_norm_macs=by_op.get("layer_norm", 0),
        train_flops=train,
        elementwise_ops=elementwise,
        by_module=by_module,
        skipped_ops=skipped,
    )


def score_macs(model: torch.nn.Module, video: torch.Tensor) -> int:
    """MACs of the MATS embedding score as the masking suite computes it (FlopCounterMode, 2 per MAC)."""
    with FlopCounterMode(display=False) as counter:
        model.motion_scores(video)
    return counter.get_total_flops() // 2


def train_flops(wl: Profiled, *, backward: bool = True) -> int:
    """FLOPs (2 per MAC) of the model's forward (+ backward and recomputation) for one clip, counted
    by PyTorch's FlopCounterMode on ``meta`` with the workload's checkpointing policy applied."""
    wl = wl.with_batch(1)
    model = build_model(wl, "meta")
    args, loss_of = wl.inputs("meta"), wl.loss_fn("meta")
    with FlopCounterMode(display=False) as counter:
        out = model(*args)
        if backward:
            loss_of(out).backward()
    return counter.get_total_flops()


def score_flops(wl: Profiled) -> int:
    """FLOPs (2 per MAC) of one clip's no-grad embedding score forward; 0 when the step has none."""
    if not wl.uses_embed_score:
        return 0
    wl = replace(wl.with_batch(1), checkpoint=(0, 0))
    return 2 * score_macs(build_model(wl, "meta"), wl.inputs("meta")[0])


def step_flops(wl: Profiled) -> int:
    """FLOPs of one clip's training step as it runs: forward, backward, the recomputation of
    checkpointed blocks and the score forward (the planner's step time)."""
    return train_flops(wl) + score_flops(wl)


def model_flops(wl: Profiled) -> int:
    """Model FLOPs of one clip (the MFU numerator): the step without recomputation (PaLM / nanoGPT)."""
    return step_flops(replace(wl, checkpoint=(0, 0)))


def forward_macs(wl: Profiled) -> int:
    """fvcore MACs of the model's forward over one clip (the papers' "FLOPs" of a view)."""
    wl = replace(wl.with_batch(1), checkpoint=(0, 0))
    with torch.no_grad():
        return int(fvcore_analysis(build_model(wl, "meta"), wl.inputs("meta")).total())


def skipped_op_names(report: FlopReport) -> list[str]:
    return sorted(report.skipped_ops, key=lambda op: -report.skipped_ops[op])


__all__ = [
    "FlopReport",
    "count_flops",
    "forward_macs",
    "fvcore_analysis",
    "model_flops",
    "score_flops",
    "score_macs",
    "sdpa_flop_jit",
    "skipped_op_names",
    "step_flops",
    "train_flops",
]
