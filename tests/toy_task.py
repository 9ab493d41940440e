"""A second, test-only task on the generic Trainer: a tiny transformer classifier with cross-entropy.

It shares nothing with pre-training but the seams (ModelSpec, Task, Engine, Trainer): if it trains,
checkpoints and resumes on every engine, fine-tuning and evaluation can be built the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mats_scale.models.layers import Block, init_vit_module
from mats_scale.models.spec import InitMixin, ModelSpec

NUM_CLASSES, TOKENS, IN_DIM, DIM = 4, 6, 8, 32
DATASET_SIZE = 48


class TinyClassifier(InitMixin, nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN_DIM, DIM)
        self.blocks = nn.ModuleList(Block(dim=DIM, num_heads=2, mlp_dim=2 * DIM) for _ in range(2))
        self.norm = nn.LayerNorm(DIM, eps=1e-6)
        self.head = nn.Linear(DIM, NUM_CLASSES)

    def init_module(self, m: nn.Module) -> None:
        init_vit_module(m)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, TOKENS, IN_DIM) -> (loss, logits (B, NUM_CLASSES))."""
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h)
        logits = self.head(self.norm(h).mean(dim=1))
        return F.cross_entropy(logits.float(), labels), logits


def toy_dataset(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable classes: each class adds its own pattern to Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(DATASET_SIZE) % NUM_CLASSES
    patterns = torch.randn(NUM_CLASSES, 1, IN_DIM, generator=g)
    x = torch.randn(DATASET_SIZE, TOKENS, IN_DIM, generator=g) * 0.5 + patterns[labels]
    return x, labels


class ToyLoader:
    """Rank-sharded, reshuffled per epoch from the seed, resumable: the Task's Loader protocol."""

    def __init__(self, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.x, self.y = toy_dataset()
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch = self.pos = 0

    def __len__(self) -> int:
        return DATASET_SIZE // (self.batch_size * self.world_size)

    def __iter__(self):
        order = torch.randperm(DATASET_SIZE, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[self.rank :: self.world_size]
        while self.pos < len(self):
            ids = mine[self.pos * self.batch_size : (self.pos + 1) * self.batch_size]
            self.pos += 1
            yield {"x": self.x[ids], "label": self.y[ids]}
        self.epoch, self.pos = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]


class ToyClassifierTask:
    name = "toy-classifier"
    log_format = "acc {accuracy:.3f}"
    tb_tags = {"accuracy": "train/accuracy"}

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    @classmethod
    def for_checkpoint(cls, config_text: str, meta) -> ToyClassifierTask:
        from mats_scale.config import load_config_text

        return cls(load_config_text(config_text))

    def model_spec(self) -> ModelSpec:
        return ModelSpec(
            name="toy",
            build=TinyClassifier,
            block_types=(Block,),
            block_groups=lambda m: {"encoder": m.blocks},
        )

    def build_loader(self, rank: int, world_size: int) -> ToyLoader:
        return ToyLoader(self.cfg.data.batch_size, rank, world_size, self.cfg.train.seed)

    def step(self, engine, batch: dict[str, Any], generator: torch.Generator):
        from mats_scale.train.task import StepOutput

        dev = engine.env.device
        labels = batch["label"].to(dev)
        loss, logits = engine.forward(batch["x"].to(dev), labels)
        return StepOutput(loss, {"correct": (logits.argmax(-1) == labels).sum(), "count": labels.numel()})

    def summarize(self, totals: Mapping[str, float], micro_batches: int) -> dict[str, Any]:
        return {"accuracy": totals["correct"] / totals["count"]}

    def checkpoint_key(self) -> dict[str, Any]:
        return {"model": "toy"}

    def workload(self) -> None:
        return None  # the profilers do not know this model: no MFU

    def finish(self, trainer) -> None:
        pass
