"""Watching ``train.compile`` from the loop: graphs compiled so far on this rank (torch._dynamo's own
frame counter, which every recompile advances) and one warning when compiling goes on after warm-up.

The blocks are compiled by the engines (mats_scale/parallel/compile.py). The first step of a session
compiles; token counts are fixed per config, so a later compile means a shape or guard changed.
"""

from __future__ import annotations

import sys


def compiled_frames() -> int:
    """Frames torch._dynamo has compiled in this process (0 when it was never imported)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


class RecompileWatch:
    """Remembers the compiled-frame total (summed over ranks) after the session's first step."""

    def __init__(self) -> None:
        self.after_warmup: int | None = None
        self.warned = False

    def check(self, step: int, frames: int) -> str | None:
        """A warning, once, when `frames` grew after the first step of the session; else None."""
        if self.after_warmup is None:
            self.after_warmup = frames
            return None
        if frames == self.after_warmup or self.warned:
            return None
        self.warned = True
        return (
            f"step {step}: torch.compile compiled {frames - self.after_warmup} more graph(s) after "
            "warm-up (summed over ranks): a shape or guard changed between steps; run with "
            "TORCH_LOGS=recompiles to see why"
        )
