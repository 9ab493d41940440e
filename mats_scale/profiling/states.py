"""Model states per GPU: parameters, gradients, fp32 master and AdamW moments, buckets and the ZeRO-3
gathered window, as DeepSpeed 0.19 (stages 0-3, optimizer offload) and FSDP2 allocate them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mats_scale.models.layers import Block
from mats_scale.optim import param_groups
from mats_scale.parallel.engine import SHARDED_KINDS

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


__all__ = [
    "ENGINES",
    "ModelStates",
    "ParamStats",
    "deepspeed_zero3_estimate",
    "largest_sub_group",
    "model_states",
    "param_stats",
    "zero_config",
]
