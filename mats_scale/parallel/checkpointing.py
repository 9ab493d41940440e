"""Activation checkpointing put around blocks from outside the model (torchtitan style).

Non-reentrant ``torch.utils.checkpoint`` through PyTorch's own ``checkpoint_wrapper``, whose
state-dict hooks strip the wrapper prefix, so checkpoints load with or without it. The policy is
every-N-th block per named block group of the model's spec (``encoder``, ``decoder``): N=1
checkpoints every block, N=2 every other block (blocks 0, 2, 4, ...), 0 none.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from mats_scale.config import ParallelConfig
from mats_scale.models.spec import ModelSpec


def wrap_every_nth(blocks: nn.ModuleList, every: int) -> int:
    """Wrap blocks i with i % every == 0 in place; returns how many were wrapped (0 when every=0)."""
    if every < 0:
        raise ValueError(f"checkpoint every={every}: must be >= 0")
    if every == 0:
        return 0
    wrapped = 0
    for i in range(0, len(blocks), every):
        blocks[i] = checkpoint_wrapper(blocks[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        wrapped += 1
    return wrapped


def checkpoint_policy(parallel: ParallelConfig) -> dict[str, int]:
    """Block group -> every N (``parallel.checkpoint_encoder_every`` / ``checkpoint_decoder_every``)."""
    return {"encoder": parallel.checkpoint_encoder_every, "decoder": parallel.checkpoint_decoder_every}


def apply_activation_checkpointing(model: nn.Module, spec: ModelSpec, policy: dict[str, int]) -> nn.Module:
    """Checkpoint every N-th block of each of the spec's block groups that `policy` names; a group the
    model does not have (a classifier has no decoder) is ignored."""
    groups = spec.block_groups(model)
    for name, every in policy.items():
        if name in groups:
            wrap_every_nth(groups[name], every)
    return model


def apply_checkpoint_policy(model: nn.Module, spec: ModelSpec, parallel: ParallelConfig) -> nn.Module:
    return apply_activation_checkpointing(model, spec, checkpoint_policy(parallel))
