"""Activation checkpointing put around blocks from outside the model (torchtitan style).

Non-reentrant ``torch.utils.checkpoint`` through PyTorch's own ``checkpoint_wrapper``, whose
state-dict hooks strip the wrapper prefix, so checkpoints load with or without it. The policy is
every-N-th block, separately for encoder and decoder: N=1 checkpoints every block, N=2 every other
block (blocks 0, 2, 4, ...), 0 none.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper


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


def apply_activation_checkpointing(model: nn.Module, encoder_every: int, decoder_every: int) -> nn.Module:
    """Checkpoint every N-th block of ``model.encoder.blocks`` and ``model.decoder.blocks``."""
    wrap_every_nth(model.encoder.blocks, encoder_every)
    wrap_every_nth(model.decoder.blocks, decoder_every)
    return model
