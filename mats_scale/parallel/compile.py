"""``torch.compile`` per transformer block, applied from outside the model (torchtitan ``apply_compile``).

Each block's ``forward`` is compiled in place, after activation checkpointing and before sharding: the
checkpoint wrapper's ``forward`` when the block has one, so the checkpointed region is inside the graph
and the compiler plans the recomputation. Only ``forward``, not the module call: hooks on the module
(FSDP2's unshard) stay eager. ZeRO-3 fetches parameters in hooks on the block itself (inside the
wrapper), so there the block's own ``forward`` is compiled (``inside_wrapper``) and the fetch stays
eager too (compiling the whole call traced DeepSpeed's hooks and kept recompiling for steps).

The module tree and state-dict keys stay those of the eager model, so checkpoints, export and resume do
not care whether a run compiled. Shapes are static (``dynamic=False``): MATS and running-cell token
counts are fixed per config, so each block shape compiles in the first step and never again.
"""

from __future__ import annotations

from torch import nn

from mats_scale.models.spec import ModelSpec

# Blocks of one class share one code object (their ``forward``): one graph per shape and block variant
# (encoder / decoder width, with or without drop path, train / eval), so the per-code recompile limit
# must not cut a deep model's variants short.
_LIMIT_PER_BLOCK = 2


def block_module(block: nn.Module) -> nn.Module:
    """The transformer block inside a checkpoint wrapper (or the block itself)."""
    return getattr(block, "_checkpoint_wrapped_module", block)


def compile_blocks(model: nn.Module, spec: ModelSpec, *, inside_wrapper: bool = False) -> int:
    """Compile the ``forward`` of every entry of every block group of `model` in place (with
    `inside_wrapper`, of the block inside a checkpoint wrapper); returns how many."""
    import torch._dynamo

    blocks = [b for group in spec.block_groups(model).values() for b in group]
    for block in blocks:
        target = block_module(block) if inside_wrapper else block
        target.forward = torch.compile(target.forward, dynamic=False)
    limit = _LIMIT_PER_BLOCK * len(blocks)
    if torch._dynamo.config.recompile_limit < limit:
        torch._dynamo.config.recompile_limit = limit
    return len(blocks)


def apply_compile(
    model: nn.Module, spec: ModelSpec, enabled: bool, *, inside_wrapper: bool = False
) -> nn.Module:
    """``train.compile``: compile the blocks when `enabled`, else leave the model eager."""
    if enabled:
        compile_blocks(model, spec, inside_wrapper=inside_wrapper)
    return model
