"""Per-GPU memory of pre-training: activations measured exactly on ``meta``, model states modelled.

Activations (:func:`measure_activations`) are not estimated: the real forward and backward run on the
``meta`` device (shapes and dtypes only, nothing allocated, ViT-g in about two seconds) and we record

* ``saved_bytes``: what the autograd graph holds at the end of the forward, i.e. every tensor packed
  by ``torch.autograd.graph.saved_tensors_hooks``, counted once per storage (q, k and v are views of
  one qkv buffer; a layer norm's input is often also the previous residual add's output) with the
  storage's full size (a saved view keeps its whole base alive). Parameters, buffers and the batch
  itself are NOT activations: they are saved by linear layers, embeddings and the gathers, but they
  exist without the graph (parameters are counted in the model states, where ZeRO-3 also frees the
  gathered copy that a linear layer saves; the batch is reported as ``input_bytes``). Activation
  checkpointing's saved block inputs go through the same hook and are counted.
* ``peak_bytes``: the peak of live tensor bytes over forward AND backward (saved activations plus
  temporaries and activation gradients), from a ``TorchDispatchMode`` that adds each new output
  storage and removes it when it is freed. Parameter gradients are handed off as soon as they are
  accumulated (they live in the model states: full in ZeRO-0/1, in buckets/partitions in ZeRO-2/3
  and FSDP2). For a CUDA target every storage is rounded up to the caching allocator's 512-byte
  blocks, as ``torch.cuda.max_memory_allocated`` sees them.

``F.scaled_dot_product_attention`` picks its kernel from the device; on ``meta`` it would take the
math path, which saves the (B, h, N, N) attention matrix that no real run keeps. The kernel of the
target device is therefore called explicitly (:class:`SdpaKernel`): CUDA flash attention for bf16 /
fp16 (the memory-efficient kernel for fp32), or the CPU flash kernel. Each saves exactly what the real
kernel saves (q, k, v, out, logsumexp, RNG state), because the autograd formula is the real one.

Model states (:func:`model_states`) are a model, per engine, of what DeepSpeed 0.19 / FSDP2 keep per
GPU (see the field docs and profiling/VALIDATION.md for the accounting and its validation).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from mats_scale.models.layers import Block
from mats_scale.optim import param_groups
from mats_scale.parallel.engine import SHARDED_KINDS
from mats_scale.profiling.workload import Workload, build_model, make_inputs, model_inputs, state_tensors

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


def _score_forward(model: nn.Module, video: torch.Tensor) -> None:
    """MATS embedding score: the patch embedding of every token under no_grad, then dropped."""
    model.motion_scores(video)  # the model's own (embedding) score


def measure_activations(
    wl: Workload,
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
    video, sel = make_inputs(wl, device)
    return measure_step(
        model,
        model_inputs(video, sel),
        lambda out: out.loss,
        batch=wl.batch,
        dtype=wl.dtype,
        device=device,
        target=target,
        track_peak=track_peak,
        sdpa_kernel=sdpa_kernel,
        before=(lambda: _score_forward(model, video)) if wl.uses_embed_score else None,
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
    """Activation memory of ``loss_of(model(*args)).backward()`` for any model (the pre-training model
    above, the fine-tuning classifier in :mod:`mats_scale.profiling.finetune`); `before` runs first
    inside the tracker (a no-grad score forward). See the module doc for what is counted."""
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

    # Parameter gradients leave the activation budget as soon as they exist (see module doc).
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


def activation_model(wl: Workload, *, target: str = "cuda") -> ActivationModel:
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


# ---- parameters -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamStats:
    numels: tuple[int, ...]  # every parameter tensor
    largest_layer: int  # most parameters owned directly by one module (DeepSpeed's "largest layer")
    largest_block: int  # most parameters in one transformer block (one FSDP2 unit / ZeRO-3 fetch)
    groups: tuple[tuple[int, ...], ...] = ()  # numels per AdamW param group (decay, no decay)

    @property
    def total(self) -> int:
        return sum(self.numels)


def param_stats(model: nn.Module) -> ParamStats:
    """Counts from a (meta) model; the largest layer is DeepSpeed's ``model_to_params`` rule and the
    groups are the project's AdamW groups (``mats_scale.optim.param_groups``)."""
    numels = tuple(p.numel() for p in model.parameters())
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    blocks = [sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, Block)]
    groups = tuple(tuple(p.numel() for p in g["params"]) for g in param_groups(model, weight_decay=0.05))
    return ParamStats(numels, largest_layer, max(blocks, default=0), groups)


def largest_sub_group(stats: ParamStats, dp: int, sub_group_size: int) -> int:
    """Elements of the largest optimizer sub-group partition: DeepSpeed sizes its fp32 gradient buffer
    (ZeRO-3) by it and steps one sub-group at a time (stage3 ``_create_fp16_sub_groups``)."""
    best = 0
    for group in stats.groups or (stats.numels,):
        acc = 0
        for n in group:
            acc += math.ceil(n / dp)
            if acc >= sub_group_size:
                best, acc = max(best, acc), 0
        best = max(best, acc)
    return best


# ---- model states ---------------------------------------------------------------------------------

ENGINES = SHARDED_KINDS  # the engine registry's kinds that shard model states


@dataclass
class ModelStates:
    """Bytes per GPU held outside the activations (DeepSpeed / FSDP2, AdamW).

    Three moments matter: ``resident`` is what stays between steps; during forward and backward the
    ``gathered`` working set comes on top (with the activations); during the optimizer step the fp32
    gradients of one optimizer sub-group come on top instead (the activations are gone by then).
    """

    params: int  # low-precision (compute) parameters resident: full copy, or partition + persistent
    grads: int  # gradients resident: full (ZeRO-0/1), partition buffer (ZeRO-2/3), fp32 shards (FSDP2)
    master: int  # fp32 master weights (the sharded fp32 params for FSDP2)
    optimizer: int  # AdamW exp_avg + exp_avg_sq, fp32
    comm_buffers: int  # DeepSpeed gradient bucket buffers (reduce_bucket_size), from the ds_config
    gathered: int  # forward/backward transient: un-sharded parameters in use or prefetched (+ their grads)
    step_temp: int  # optimizer-step transient: fp32 grads (fused AdamW: 1 x 4 B/elt; unfused: 3 x 4 B/elt)
    cpu_bytes: int = 0  # what optimizer offload keeps in host memory instead (per GPU process)

    @property
    def resident(self) -> int:
        return self.params + self.grads + self.master + self.optimizer + self.comm_buffers

    @property
    def total(self) -> int:
        """Model-state bytes during forward and backward (what the activations come on top of)."""
        return self.resident + self.gathered

    @property
    def step(self) -> int:
        """Model-state bytes during the optimizer step."""
        return self.resident + self.step_temp

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "resident": self.resident, "total": self.total, "step": self.step}


def peak_allocated(states: ModelStates, act: ActivationModel, batch: int) -> int:
    """Predicted ``torch.cuda.max_memory_allocated`` of a training step at micro-batch `batch`."""
    return max(states.total + act.peak(batch) + act.inputs(batch), states.step + act.inputs(batch))


def zero_config(ds_config: dict | None):
    """``zero_optimization`` of a ds_config parsed by DeepSpeed itself (its defaults fill the gaps)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return DeepSpeedZeroConfig(**((ds_config or {}).get("zero_optimization") or {}))


def _bytes_of(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def model_states(
    stats: ParamStats,
    *,
    engine: str = "deepspeed",
    zero_stage: int = 3,
    dp: int = 8,
    dtype: torch.dtype = torch.bfloat16,
    offload_optimizer: bool = False,
    ds_config: dict | None = None,
    grad_accum_dtype: torch.dtype | None = None,
    fused_adam: bool = True,
) -> ModelStates:
    """Per-GPU model states with AdamW, data parallel over `dp` GPUs.

    DeepSpeed (mixed precision: `dtype` params and grads, fp32 master + Adam; in fp32 DeepSpeed still
    clones an fp32 master at ZeRO-1..3) allocates, per its 0.19 sources:

    ===== =========== ===== =========== ===== ========================== ======================
    stage params      grads fp32 master Adam  step temporaries (fp32) buffers / working set
    ===== =========== ===== =========== ===== ========================== ======================
    0     P           P     P           P     P                          --
    1     P           P     P/N         P/N   largest sub-group / N      reduce bucket (x2 overlap)
    2     P           P/N   P/N         P/N   largest sub-group / N      reduce bucket (x2 overlap)
    3     P/N + pers. P/N   P/N         P/N   largest sub-group / N      reduce bucket; gathered
    ===== =========== ===== =========== ===== ========================== ======================

    ZeRO-3 "gathered" = twice (all-gather flat buffer + per-parameter copy) the window of prefetch
    bucket + one fetch unit (a transformer block: the engine marks blocks as DeepSpeed leaf modules;
    capped by max_live_parameters and by P) in the compute dtype, plus the
    largest layer's gradient before it is bucketed; persistent parameters
    (numel <= param_persistence_threshold) stay gathered in full on every GPU. With
    ``offload_optimizer`` (ZeRO-3) master, Adam, fp32 grads and the gradient partitions live in host
    memory (``cpu_bytes``).

    Step temporaries: with the fused AdamW kernel (``optim.fused``, the default) only the fp32
    gradients of the stepped elements (1 x 4 B/elt); torch's unfused AdamW also makes the flat copy
    and the denominator (3 x 4 B/elt). Both measured on the 2-process CPU ZeRO-3 run
    (``profiling/validate_zero3_cpu.py [--unfused-adam]``).

    FSDP2 (``fully_shard`` with MixedPrecisionPolicy(param_dtype=`dtype`, reduce_dtype=fp32)): sharded
    fp32 params (they are the master), fp32 sharded grads, Adam; un-sharded: the current and the
    prefetched block in `dtype` plus the current block's gradient (`dtype`, then fp32 for the
    reduce-scatter).
    """
    if dp < 1:
        raise ValueError(f"dp={dp}: must be >= 1")
    P = stats.total
    pb = _bytes_of(dtype)
    fp32 = 4
    temps = 1 if fused_adam else 3  # fp32 elements of step temporaries per stepped element

    if engine == "fsdp2":
        shard = sum(math.ceil(n / dp) for n in stats.numels)
        blk = stats.largest_block
        return ModelStates(
            params=0,
            grads=fp32 * shard,
            master=fp32 * shard,
            optimizer=2 * fp32 * shard,
            comm_buffers=0,
            gathered=2 * blk * pb + blk * (pb + fp32),
            step_temp=0,
        )
    if engine != "deepspeed":
        raise ValueError(f"engine={engine!r}: allowed: {', '.join(ENGINES)}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage}: allowed: 0, 1, 2, 3")
    if offload_optimizer and zero_stage != 3:
        raise ValueError("offload_optimizer needs zero_stage=3")

    zc = zero_config(ds_config)
    gb = _bytes_of(grad_accum_dtype) if grad_accum_dtype is not None else pb
    overlap = bool(zc.overlap_comm) if zc.overlap_comm is not None else zero_stage == 3
    if zero_stage == 0:
        mixed = pb != fp32  # fp32 without ZeRO: the optimizer updates the params directly
        return ModelStates(
            params=pb * P,
            grads=gb * P,
            master=fp32 * P if mixed else 0,
            optimizer=2 * fp32 * P,
            comm_buffers=0,
            gathered=0,
            step_temp=temps * fp32 * P,
        )
    part = sum(math.ceil(n / dp) for n in stats.numels)  # DeepSpeed pads each tensor to a multiple of N
    sub = largest_sub_group(stats, dp, zc.sub_group_size)  # elements the optimizer steps at once
    if zero_stage in (1, 2):
        bucket_dtype_bytes = fp32 if zero_stage == 1 else gb  # stage 1 stages an fp32 accumulator
        buckets = (
            zc.reduce_bucket_size * bucket_dtype_bytes * (2 if overlap else 1)
            if zc.contiguous_gradients
            else 0
        )
        return ModelStates(
            params=pb * P,
            grads=gb * (P if zero_stage == 1 else part),
            master=fp32 * part,
            optimizer=2 * fp32 * part,
            comm_buffers=buckets,
            gathered=0,
            step_temp=temps * fp32 * sub,
        )

    persistent = sum(n for n in stats.numels if n <= zc.param_persistence_threshold)
    # The coalesced all-gather fills a flat buffer, then copies each parameter out of the N rank slices
    # (partition_parameters.py, AllGatherCoalescedHandle.wait: torch.cat): the window is held twice.
    # The project's ZeRO-3 engine fetches a whole transformer block at once (DeepSpeed leaf modules,
    # parallel/deepspeed_engine.mark_zero3_leaf_modules): the fetch unit is a block, not a layer.
    unit = max(stats.largest_block, stats.largest_layer)
    live = min(zc.max_live_parameters, zc.prefetch_bucket_size + unit, P)
    gathered = 2 * live * pb + stats.largest_layer * pb
    buckets = zc.reduce_bucket_size * gb if zc.contiguous_gradients else 0
    params = pb * (part + persistent)
    if offload_optimizer:
        cpu = fp32 * part * 3 + gb * part + temps * fp32 * sub
        return ModelStates(
            params=params,
            grads=0,
            master=0,
            optimizer=0,
            comm_buffers=buckets,
            gathered=gathered,
            step_temp=0,
            cpu_bytes=cpu,
        )
    return ModelStates(
        params=params,
        grads=gb * part,
        master=fp32 * part,
        optimizer=2 * fp32 * part,
        comm_buffers=buckets,
        gathered=gathered,
        step_temp=temps * fp32 * sub,
    )


def deepspeed_zero3_estimate(stats: ParamStats, dp: int) -> int:
    """DeepSpeed's own per-GPU ZeRO-3 estimate (no offload), the function behind
    ``estimate_zero3_model_states_mem_needs_all_live``: 4 x largest layer + 18 bytes x P / N."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        stats.total,
        stats.largest_layer,
        num_gpus_per_node=dp,
        num_nodes=1,
        cpu_offload=False,
        cpu_offload_params=False,
    )
    return gpu


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
    "ModelStates",
    "ParamStats",
    "SdpaKernel",
    "activation_model",
    "deepspeed_zero3_estimate",
    "largest_sub_group",
    "measure_activations",
    "model_states",
    "param_stats",
    "peak_allocated",
]
