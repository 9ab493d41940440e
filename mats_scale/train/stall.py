"""Data-stall accounting: the fraction of each step's wall time a rank waited for its batches.

Every rank puts its wait (seconds in ``BatchStream.next``) into its own slot of a world-size vector that
rides on the step's one sum all-reduce, so rank 0 learns every rank's wait without another collective.
The step is as slow as its slowest rank (the all-reduce waits for it), so ``data_wait`` is the maximum
over ranks; ``data_wait_mean`` and ``data_wait_ranks`` show whether one rank's loader lags.
"""

from __future__ import annotations

from typing import Any


class StallMeter:
    """Per-step data-wait fractions and the session's delivered vs consumed clip rates."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.clips = 0.0  # clips trained this session (all ranks)
        self.wall_s = 0.0  # summed step wall time
        self.wait_s = 0.0  # summed wait of the slowest rank of each step

    def slots(self, wait_s: float) -> list[float]:
        """This rank's contribution to the all-reduce: its wait in its own slot, zero elsewhere."""
        out = [0.0] * self.world_size
        out[self.rank] = wait_s
        return out

    def step(self, reduced: list[float], step_s: float, clips: int) -> dict[str, Any]:
        """Metrics of one step from the reduced slots (each rank's wait in seconds), the step's wall
        time and the clips it trained on all ranks."""
        fractions = [min(w / step_s, 1.0) if step_s > 0 else 0.0 for w in reduced]
        self.clips += clips
        self.wall_s += step_s
        self.wait_s += min(max(reduced), step_s)
        return {
            "data_wait": max(fractions),
            "data_wait_mean": sum(fractions) / len(fractions),
            "data_wait_ranks": [round(f, 4) for f in fractions],
        }

    def summary(self) -> dict[str, float]:
        """For the run's end record: clips/s the loaders delivered (clips over the steps' wall time)
        and clips/s the model consumed (clips over the wall time less the data wait: the rate with
        free data). Delivered < consumed means the run was data-bound by the ratio between them."""
        busy = self.wall_s - self.wait_s
        return {
            "clips_per_s_delivered": self.clips / self.wall_s if self.wall_s > 0 else 0.0,
            "clips_per_s_consumed": self.clips / busy if busy > 0 else 0.0,
            "data_wait": self.wait_s / self.wall_s if self.wall_s > 0 else 0.0,
        }
