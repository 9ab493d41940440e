"""DeepSpeed engine: ZeRO stage 0-3 (and 3 with optimizer offload) behind the Engine protocol.

Stage 3 builds the model under ``deepspeed.zero.Init`` with the resolved config dict (on CPU,
DeepSpeed 0.19 ignores ``zero.Init(dtype=...)`` and would hold bf16 parameters; the config keeps
them fp32), so no rank ever holds the full model. Each module's own parameters are then gathered
with ``GatheredParameters(modifier_rank=0)`` and initialised on rank 0 exactly as
``init_weights`` does on one process, in the same order, so every stage starts from the weights of
a single-process run with the same seed. Stages 0-2 build the full model (DeepSpeed broadcasts
rank 0's copy).

The optimizer is a client ``torch.optim.AdamW`` with mats-scale's parameter groups
(DeepSpeedCPUAdam for optimizer offload on CUDA); the learning rate is set on its groups before
each step, so no DeepSpeed scheduler is involved.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from mats_scale.config import Config, ParallelConfig
from mats_scale.models.spec import ModelSpec, build_model
from mats_scale.optim import build_adamw, optimizer_groups, peak_lr, set_lr, total_batch
from mats_scale.parallel.base import StepResult, clip_and_norm, strip_wrapper_prefix
from mats_scale.parallel.checkpointing import apply_checkpoint_policy
from mats_scale.parallel.compile import apply_compile
from mats_scale.parallel.distributed import DistEnv
from mats_scale.parallel.ds_config import resolve_ds_config
from mats_scale.safe_load import torch_load, weights_only_loads


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger

    if not os.environ.get("MATS_DS_VERBOSE"):
        logger.setLevel(logging.WARNING)


def mark_zero3_leaf_modules(model: nn.Module, block_types: tuple[type[nn.Module], ...]) -> None:
    """ZeRO-3 fetches each transformer block's parameters at once (DeepSpeed "leaf" modules) instead
    of one module at a time: 4 fetches fewer per ViT block, each a synchronisation point between the
    ranks (ZeRO-3 / ZeRO-0 step time 1.61x -> 1.46x for ViT-S on 2 CPU processes,
    benchmarks/bench_engines.py). The gathered window grows to one block (modelled by the profiler)."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, list(block_types))


@torch.no_grad()
def build_zero3_model(spec: ModelSpec, env: DistEnv, ds_config: dict) -> nn.Module:
    """Partitioned build + module-by-module init on rank 0 (see the module docstring)."""
    import deepspeed

    # Module constructors run reset_parameters() on the real (partitioned) tensors and draw from the
    # generator; restore its state so the init below draws the same numbers as init_weights().
    rng = torch.get_rng_state()
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = spec.build()
    torch.set_rng_state(rng)
    for m in model.modules():  # non-persistent buffers are not partitioned: put them on the device
        for name, buf in m._buffers.items():
            if buf is not None:
                m._buffers[name] = buf.to(env.device)
    model.reset_buffers()
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
            if env.rank == 0:
                model.init_module(m)
    return model


def resolved_ds_config(cfg: Config, env: DistEnv) -> dict:
    ds, _ = resolve_ds_config(
        cfg, env.world_size, bf16=env.amp_dtype is not None, cuda=env.device.type == "cuda"
    )
    return ds


class DeepSpeedEngine:
    kind = "deepspeed"

    @classmethod
    def states_label(cls, parallel: ParallelConfig) -> str:
        return f"zero{parallel.zero_stage}" + ("-offload" if parallel.offload_optimizer else "")

    @classmethod
    def describe(cls, cfg: Config) -> str:
        return f"deepspeed-{cls.states_label(cfg.parallel)}"

    @classmethod
    def run_files(cls, cfg: Config, env: DistEnv) -> dict[str, dict]:
        return {"ds_config.json": resolved_ds_config(cfg, env)}

    @classmethod
    def build(cls, cfg: Config, env: DistEnv, spec: ModelSpec) -> DeepSpeedEngine:
        return cls(cfg, env, spec)

    def __init__(self, cfg: Config, env: DistEnv, spec: ModelSpec) -> None:
        import deepspeed

        _quiet_deepspeed()
        self.cfg, self.env = cfg, env
        self.stage = cfg.parallel.zero_stage
        self.name = self.describe(cfg)
        ds_config = resolved_ds_config(cfg, env)
        model = build_zero3_model(spec, env, ds_config) if self.stage == 3 else build_model(spec, env.device)
        apply_checkpoint_policy(model, spec, cfg.parallel)
        # ZeRO-3's fetch hooks sit on the blocks (leaf modules below): compile inside them.
        apply_compile(model, spec, cfg.train.compile, inside_wrapper=self.stage == 3)
        if self.stage == 3:
            mark_zero3_leaf_modules(model, spec.block_types)
        batch = total_batch(cfg.data.batch_size, env.world_size, cfg.optim.grad_accum)
        if cfg.parallel.offload_optimizer and env.device.type == "cuda":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            self.optimizer = DeepSpeedCPUAdam(
                optimizer_groups(model, cfg.optim),
                lr=peak_lr(cfg.optim, batch),
                betas=tuple(cfg.optim.betas),
                adamw_mode=True,
            )
        else:
            self.optimizer = build_adamw(model, cfg.optim, batch)
        self.ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=ds_config, dist_init_required=False
        )
        self.module: nn.Module = self.ds.module
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self._drop_update = False
        if self.stage == 0:
            self.optimizer.register_step_pre_hook(self._drop_grads_if_skipped)

    def _drop_grads_if_skipped(self, optimizer, args, kwargs) -> None:
        # Runs after DeepSpeed's stage-0 clipping, right before AdamW updates.
        if self._drop_update:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def autocast(self) -> AbstractContextManager:
        # Same context DeepSpeed's forward uses (torch_autocast section of the resolved config).
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        return autocast_if_enabled(self.ds)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
        if not self.ds.is_gradient_accumulation_boundary():
            # DeepSpeed counts micro-batches in step(); off the boundary it only advances that count.
            self.ds.step()

    def step(self, lr: float, skip: bool = False) -> StepResult:
        assert self.ds.is_gradient_accumulation_boundary(), "step() after a micro-batch short of grad_accum"
        set_lr(self.optimizer, lr)
        norm = None
        if self.stage == 0:
            # Without ZeRO, DeepSpeed clips and applies the client optimizer to whatever gradients
            # exist, NaN included: measure here, and let the pre-step hook drop the gradients of a
            # skipped step (AdamW leaves parameters without a gradient untouched, state included).
            norm = clip_and_norm(self.params, None)
            self._drop_update = skip or not math.isfinite(norm)
        self.ds.step()
        if self.stage == 0:
            return StepResult(norm, not self._drop_update)
        # ZeRO 1-3 compute the global norm and skip the update themselves when it is not finite.
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        applied = self.ds.was_step_applied()
        if skip and applied:
            raise RuntimeError(
                f"DeepSpeed ZeRO-{self.stage} applied an update although the loss was "
                "non-finite "
                f"(grad norm {norm}); refusing to continue with possibly corrupted weights"
            )
        return StepResult(norm, applied)

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.stage == 3:
            import deepspeed

            for prefix, m in self.module.named_modules():
                own = dict(m.named_parameters(recurse=False))
                if not own:
                    continue
                with deepspeed.zero.GatheredParameters(list(own.values())):
                    if self.env.is_writer:
                        for n, p in own.items():
                            out[f"{prefix}.{n}" if prefix else n] = p.detach().float().cpu().clone()
        elif self.env.is_writer:
            out = {n: p.detach().float().cpu().clone() for n, p in self.module.named_parameters()}
        return strip_wrapper_prefix(out)

    def save(self, path: str) -> None:
        parent, tag = os.path.split(os.path.normpath(path))
        self.ds.save_checkpoint(parent, tag=tag, save_latest=False)

    def load(self, path: str) -> None:
        parent, tag = os.path.split(os.path.normpath(path))
        with weights_only_loads():  # DeepSpeed's checkpoint engine loads with weights_only=False
            loaded, _ = self.ds.load_checkpoint(
                parent, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if loaded is None:
            raise FileNotFoundError(f"{path}: DeepSpeed found no checkpoint to load")

    @staticmethod
    def consolidate(path: str) -> dict[str, torch.Tensor]:
        """Full fp32 weights: DeepSpeed's zero_to_fp32 for ZeRO 1-3 shards, the module file for stage 0."""
        if glob.glob(os.path.join(path, "*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            parent, tag = os.path.split(os.path.normpath(path))
            with weights_only_loads():  # zero_to_fp32 loads with weights_only=False
                sd = get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag)
        else:
            sd = torch_load(os.path.join(path, "mp_rank_00_model_states.pt"))["module"]
        return {k: v.float() for k, v in strip_wrapper_prefix(sd).items()}
