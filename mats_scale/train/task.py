"""The Task seam: what one kind of training job adds to the generic Trainer (torchtitan ``TrainSpec``):
its model spec, its loader, one micro-batch step and that step's metric sums; the Trainer owns the rest
(docs/design.md, "One trainer, many tasks")."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import torch

from mats_scale.models.spec import ModelSpec
from mats_scale.parallel.base import Engine

if TYPE_CHECKING:
    from mats_scale.profiling.workload import Profiled


class Finished(Protocol):
    """What :meth:`Task.finish` may use of the Trainer that ran it (the loop is not imported here)."""

    engine: Engine

    @property
    def log(self) -> Any:
        """The run's logger (``.info(message)`` writes to the console and train.log)."""


class StepOutput(NamedTuple):
    loss: torch.Tensor
    """Scalar loss of the micro-batch (the Trainer back-propagates it)."""
    metrics: Mapping[str, float | torch.Tensor]
    """Sums over the micro-batch, e.g. tokens seen or correct predictions."""


class Loader(Protocol):
    """A resumable data loader: iterating yields the rest of the current epoch as batch dicts, then the
    loader moves itself to the next epoch; ``state_dict`` is its exact position."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Task(Protocol):
    name: str
    """Recorded with every checkpoint; a checkpoint of another task is refused on resume."""
    log_format: str
    """``str.format`` template over the summarized metrics for the log line (may be empty)."""
    tb_tags: Mapping[str, str]
    """TensorBoard tag of each summarized metric (unlisted ones go under ``task/``)."""

    @classmethod
    def for_checkpoint(cls, config_text: str, meta: Mapping[str, Any]) -> Task:
        """The task that wrote a checkpoint, rebuilt from its recorded config and ``meta.json`` alone:
        it reads nothing outside the run directory (no data lists, no init weights), so it only
        describes the model (``mats-export``, tools)."""

    def model_spec(self) -> ModelSpec: ...

    def build_loader(self, rank: int, world_size: int) -> Loader: ...

    def step(self, engine: Engine, batch: dict[str, Any], generator: torch.Generator) -> StepOutput: ...

    def summarize(self, totals: Mapping[str, float], micro_batches: int) -> dict[str, Any]:
        """Per-step log metrics from the metric totals over every micro-batch of every rank."""

    def checkpoint_key(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this task (e.g. the model arguments)."""

    def workload(self) -> Profiled | None:
        """One clip of this task as the profilers count it (the MFU meter's model FLOPs); None when
        they cannot (no MFU is logged)."""

    def finish(self, trainer: Finished) -> None:
        """After :meth:`Trainer.run` unless a signal stopped it (fine-tuning evaluates here)."""


TASKS: dict[str, str] = {
    "pretrain": "mats_scale.train.pretrain:PretrainTask",
    "finetune": "mats_scale.train.finetune:FinetuneTask",
}
"""Task name -> class, for launchers and for tools that rebuild a run's model from its checkpoint."""


def task_class(name: str) -> type:
    import importlib

    if name not in TASKS:
        raise ValueError(f"task {name!r}: allowed: {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)
