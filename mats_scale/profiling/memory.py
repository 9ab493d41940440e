"""Per-GPU memory of a training step: activation bytes measured on ``meta`` (saved by autograd, and the
live peak over forward + backward with the target's attention kernel), and the peak on top of the model
states (:mod:`mats_scale.profiling.states`); docs/profiling.md says what is counted.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from mats_scale.profiling.states import ModelStates
from mats_scale.profiling.workload import Profiled, build_model, state_tensors

CUDA_BLOCK = 512  # bytes: the CUDA caching allocator rounds every allocation up to this
GIB = 1024**3


def storage_key(t: torch.Tensor) -> int:
    """Identity of the tensor's storage (the StorageImpl address; works on ``meta`` too)."""
    return t.untyped_storage()._cdata


# ---- SDPA kernel of the target device -------------------------------------------------------------

SDPA_KERNELS = ("flash", "efficient", "cpu_flash", "math")


def default_sdpa_kernel(target: str, dtype: torch.dtype) -> str:
    """The kernel PyTorch picks on `target` for our shapes (no mask, head dim <= 256, multiple of 8)."""
    if target == "cpu":
        return "cpu_flash"
    if target == "cuda":
        return "flash" if dtype in (torch.bfloat16, torch.float16) else "efficient"
    raise ValueError(f"target={target!r}: allowed: cuda, cpu")


class SdpaKernel:
    """Context manager: ``F.scaled_dot_product_attention`` calls one kernel's aten op, whose autograd
    formula (and so what it saves) is the real one.

    The function is swapped on the ``torch.nn.functional`` module for the duration (and restored), not
    intercepted by a TorchFunctionMode: a mode is inactive inside the ``backward()`` call it handles,
    so the recomputation of checkpointed blocks would silently fall back to the math kernel.
    """

    def __init__(self, kernel: str) -> None:
        if kernel not in SDPA_KERNELS:
            raise ValueError(f"sdpa kernel={kernel!r}: allowed: {', '.join(SDPA_KERNELS)}")
        self.kernel = kernel
        self._original = None

    def attention(
        self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        if attn_mask is not None or is_causal or enable_gqa:
            raise NotImplementedError("profiling masked, causal or grouped-query attention is not supported")
        if self.kernel == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, False, scale=scale)[
                0
            ]
        if self.kernel == "efficient":
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, dropout_p, scale=scale
            )[0]
        if self.kernel == "cpu_flash":
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout_p, False, scale=scale
            )[0]
        return torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, None, dropout_p, False, scale=scale
        )[0]

    def __enter__(self) -> SdpaKernel:
        self._original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self.attention
        return self

    def __exit__(self, *exc) -> bool:
        F.scaled_dot_product_attention = self._original
        return False


# ---- live-bytes tracker ---------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages created inside the mode, and their peak.

    A storage is added when an op first returns it and removed when it is freed (a weakref finalizer
    on the storage object, which PyTorch keeps alive exactly as long as the storage). Storages that
    exist before (parameters, buffers, the batch) are registered with :meth:`ignore` and never count.
    """

    def __init__(self, block: int = 1) -> None:
        super().__init__()
        self.block = block
        self.live = 0
        self.peak = 0
        self._known = WeakIdKeyDictionary()

    def ignore(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self._known[t.untyped_storage()] = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                if st in self._known:
                    continue
                nbytes = math.ceil(st.nbytes() / self.block) * self.block
                self._known[st] = nbytes
                weakref.finalize(st, self._free, nbytes)
                self.live += nbytes
        self.peak = max(self.peak, self.live)
        return out


# ---- activations ----------------------------------------------------------------------------------


@dataclass
class ActivationMemory:
    """Bytes for one micro-batch of ``batch`` clips on one GPU."""

    batch: int
    saved_bytes: int  # autograd-saved activations at the end of the forward (exact)
    peak_bytes: int  # peak live activation bytes over forward + backward (saved + temporaries)
    input_bytes: int  # the batch: clips and index tensors


def measure_activations(
    wl: Profiled,
    *,
    device: str = "meta",
    target: str = "cuda",
    track_peak: bool = True,
    sdpa_kernel: str | None = None,
) -> ActivationMemory:
    """Run one forward + backward of `wl` on `device` and measure its activation memory.

    ``device="meta"`` emulates `target`'s attention kernel and allocator rounding; on a real device the
    native kernels run and no rounding is applied (used to validate the meta figures).
    """
    model = build_model(wl, device)
    args = wl.inputs(device)
    return measure_step(
        model,
        args,
        wl.loss_fn(device),
        batch=wl.batch,
        dtype=wl.dtype,
        device=device,
        target=target,
        track_peak=track_peak,
        sdpa_kernel=sdpa_kernel,
        # the no-grad embedding score (MATS) runs first, then is dropped: args[0] is the clip
        before=(lambda: model.motion_scores(args[0])) if wl.uses_embed_score else None,
    )


def measure_step(
    model: nn.Module,
    args: tuple,
    loss_of,
    *,
    batch: int,
    dtype: torch.dtype,
    device: str = "meta",
    target: str = "cuda",
    track_peak: bool = True,
    sdpa_kernel: str | None = None,
    before=None,
) -> ActivationMemory:
    """Activation memory of ``loss_of(model(*args)).backward()`` for any model; `before` runs first
    inside the tracker (a no-grad score forward). docs/profiling.md says what is counted."""
    inputs = [t for t in args if isinstance(t, torch.Tensor)]
    excluded = {storage_key(t) for t in [*state_tensors(model), *inputs]}
    input_bytes = sum(t.untyped_storage().nbytes() for t in inputs)

    saved: dict[int, int] = {}
    keep_alive: list[torch.Tensor] = []  # storage addresses must not be reused while we count

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in excluded and key not in saved:
            saved[key] = t.untyped_storage().nbytes()
            keep_alive.append(t)
        return t

    # Parameter gradients leave the activation budget as soon as they exist: they are model states.
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        for p in model.parameters()
        if p.requires_grad
    ]
    on_meta = torch.device(device).type == "meta"
    kernel = sdpa_kernel or default_sdpa_kernel(target, dtype)
    tracker = LiveBytes(CUDA_BLOCK if on_meta and target == "cuda" else 1)
    tracker.ignore([*state_tensors(model), *inputs])
    sdpa = SdpaKernel(kernel) if on_meta else contextlib.nullcontext()
    try:
        with sdpa, tracker if track_peak else contextlib.nullcontext():
            if before is not None:
                before()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(*args)  # the training loop keeps `out` (pred, target) through backward
            saved_bytes = sum(saved.values())
            keep_alive.clear()
            loss_of(out).backward()
            del out
    finally:
        for h in hooks:
            h.remove()
    return ActivationMemory(batch, saved_bytes, tracker.peak if track_peak else 0, input_bytes)


@dataclass
class ActivationModel:
    """Activation bytes as an affine function of the micro-batch (every activation is per clip,
    apart from a few batch-independent temporaries such as the cast position tables)."""

    saved_per_clip: int
    saved_const: int
    peak_per_clip: int
    peak_const: int
    input_per_clip: int

    def saved(self, batch: int) -> int:
        return self.saved_const + self.saved_per_clip * batch

    def peak(self, batch: int) -> int:
        return self.peak_const + self.peak_per_clip * batch

    def inputs(self, batch: int) -> int:
        return self.input_per_clip * batch


def activation_model(wl: Profiled, *, target: str = "cuda") -> ActivationModel:
    """Measure on ``meta`` at batch 1 and 2 (tests check a third batch lands on the line)."""
    return affine_activations(*(measure_activations(wl.with_batch(n), target=target) for n in (1, 2)))


def affine_activations(a: ActivationMemory, b: ActivationMemory) -> ActivationModel:
    """The line through two measurements at batch 1 (`a`) and 2 (`b`)."""
    return ActivationModel(
        saved_per_clip=b.saved_bytes - a.saved_bytes,
        saved_const=2 * a.saved_bytes - b.saved_bytes,
        peak_per_clip=b.peak_bytes - a.peak_bytes,
        peak_const=2 * a.peak_bytes - b.peak_bytes,
        input_per_clip=b.input_bytes - a.input_bytes,
    )


# ---- the per-GPU peak ----------------------------------------------------------------------------


def peak_allocated(states: ModelStates, act: ActivationModel, batch: int) -> int:
    """Predicted ``torch.cuda.max_memory_allocated`` of a training step at micro-batch `batch`."""
    return max(states.total + act.peak(batch) + act.inputs(batch), states.step + act.inputs(batch))


# ---- allowance ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allowance:
    """What ``max_memory_allocated`` does not show but the GPU must still hold."""

    cuda_context_gib: float = 1.0  # CUDA context + cuBLAS/cuDNN/NCCL workspaces (outside the allocator)
    fragmentation: float = 0.10  # reserved-but-unallocated share of the caching allocator's peak

    def total(self, allocated: int) -> int:
        return int(self.cuda_context_gib * GIB + self.fragmentation * allocated)


__all__ = [
    "ActivationMemory",
    "ActivationModel",
    "Allowance",
    "LiveBytes",
    "SdpaKernel",
    "activation_model",
    "affine_activations",
    "measure_activations",
    "measure_step",
    "peak_allocated",
]
