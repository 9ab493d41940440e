"""FSDP2 engine: ``torch.distributed.fsdp.fully_shard`` applied from outside, meta-device init, DCP.

Order (torchtitan ``parallelize``): activation checkpointing, compile (``train.compile``), then
``fully_shard`` on the spec's units (extra units such as the patch embedding, then every transformer
block), then on the root, whose extra forward methods (``motion_scores``) are registered with
``register_fsdp_forward_method`` so they unshard parameters like ``forward``; ``to_empty``
materialises the shards and :func:`init_sharded` fills them. bf16 runs use FSDP2's mixed precision
(no autocast): bf16 parameter all-gathers and compute, fp32 gradient reduce-scatter and fp32 master
shards.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from mats_scale.config import Config, ParallelConfig
from mats_scale.models.spec import ModelSpec, build_model
from mats_scale.parallel.base import strip_wrapper_prefix
from mats_scale.parallel.checkpointing import apply_checkpoint_policy
from mats_scale.parallel.compile import apply_compile
from mats_scale.parallel.distributed import DistEnv
from mats_scale.parallel.local import LocalEngine
from mats_scale.safe_load import check_dcp_metadata, torch_load


@torch.no_grad()
def init_sharded(model: nn.Module, device: torch.device) -> None:
    """Initialise a sharded model exactly as ``model.init_weights()`` initialises an unsharded one.

    Random init applied to DTensor shards draws each shard from the local generator: on CPU (no
    distributed RNG tracker) every rank would fill its shard with the same numbers. Instead each
    module's own parameters are drawn at full size (every rank holds the same seeded generator,
    so the draws agree) and each rank keeps its slice. Peak extra memory: one module's parameters.
    """
    model.reset_buffers()
    for m in model.modules():
        own = dict(m.named_parameters(recurse=False))
        if not own:
            continue
        full = {n: torch.empty(p.shape, dtype=p.dtype, device=device) for n, p in own.items()}
        for n, t in full.items():  # init_module reads the module's attributes: point them at full tensors
            m._parameters[n] = nn.Parameter(t, requires_grad=False)
        try:
            model.init_module(m)
        finally:
            for n, p in own.items():
                m._parameters[n] = p
        for n, p in own.items():
            if isinstance(p, DTensor):
                p.copy_(distribute_tensor(full[n], p.device_mesh, p.placements, src_data_rank=None))
            else:
                p.copy_(full[n])


class FSDP2Engine(LocalEngine):
    kind = "fsdp2"

    @classmethod
    def states_label(cls, parallel: ParallelConfig) -> str:
        return "fsdp2"

    @classmethod
    def build(cls, cfg: Config, env: DistEnv, spec: ModelSpec) -> FSDP2Engine:
        model = apply_checkpoint_policy(build_model(spec, "meta"), spec, cfg.parallel)
        apply_compile(model, spec, cfg.train.compile)  # compiled lazily, at the first call
        mesh = init_device_mesh(env.device.type, (env.world_size,))
        root_mp = unit_mp = MixedPrecisionPolicy()
        if env.amp_dtype is not None:
            # bf16 all-gathers and compute, fp32 gradient reduction and master shards. Each unit casts
            # its own inputs; the root does not, so pixel targets come from the fp32 clip.
            unit_mp = MixedPrecisionPolicy(param_dtype=env.amp_dtype, reduce_dtype=torch.float32)
            root_mp = MixedPrecisionPolicy(
                param_dtype=env.amp_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
            )
        for unit in spec.shard_units(model):
            fully_shard(unit, mesh=mesh, mp_policy=unit_mp)
        fully_shard(model, mesh=mesh, mp_policy=root_mp)
        for method in spec.forward_methods:
            register_fsdp_forward_method(model, method)
        model.to_empty(device=env.device)
        init_sharded(model, env.device)
        return cls(model, cfg, env)

    def __init__(self, model: nn.Module, cfg: Config, env: DistEnv) -> None:
        super().__init__(model, cfg, env)
        self._micro = 0

    def autocast(self) -> AbstractContextManager:
        return contextlib.nullcontext()  # the mixed-precision policy casts, see build()

    def backward(self, loss: torch.Tensor) -> None:
        # Reduce-scatter gradients only after the last micro-batch of the step.
        self._micro += 1
        self.module.set_requires_gradient_sync(self._micro >= self.grad_accum)
        super().backward(loss)

    def zero_grad(self) -> None:
        self._micro = 0
        super().zero_grad()

    def state_dict(self) -> dict[str, torch.Tensor]:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(self.module, options=opts)
        return {k: v.float() for k, v in strip_wrapper_prefix(sd).items()} if self.env.is_writer else {}

    def save(self, path: str) -> None:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_sd}, checkpoint_id=os.path.join(path, "model"))
        dcp.save({"optimizer": optim_sd}, checkpoint_id=os.path.join(path, "optimizer"))

    def load(self, path: str) -> None:
        check_dcp_metadata(path)  # DCP unpickles .metadata with plain pickle
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd}
        dcp.load(state, checkpoint_id=os.path.join(path, "model"))
        ostate = {"optimizer": optim_sd}
        dcp.load(ostate, checkpoint_id=os.path.join(path, "optimizer"))
        set_state_dict(
            self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=ostate["optimizer"]
        )

    @staticmethod
    def consolidate(path: str) -> dict[str, torch.Tensor]:
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        check_dcp_metadata(path)  # DCP unpickles .metadata with plain pickle
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "model.pt")
            dcp_to_torch_save(os.path.join(path, "model"), out)
            sd = torch_load(out)["model"]
        return {k: v.float() for k, v in strip_wrapper_prefix(sd).items()}
