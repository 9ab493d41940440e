"""Video MAE pre-training as a task of the generic Trainer: per micro-batch, motion scores (MATS only:
the loader's pixel scores, else the model's embedding score), ``select_tokens`` with this rank's mask
generator, then the model's loss; the encoder and decoder token counts are its metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import torch

from mats_scale.config import Config, load_config_text
from mats_scale.data.device import to_model_input
from mats_scale.masking import TokenGrid, select_tokens
from mats_scale.models.pretrain import pretrain_spec
from mats_scale.models.spec import ModelSpec
from mats_scale.parallel.base import Engine
from mats_scale.profiling.workload import Workload
from mats_scale.train.task import Finished, Loader, StepOutput


class PretrainTask:
    name = "pretrain"
    log_format = "tokens enc/dec {tokens_encoder}/{tokens_decoder}"
    tb_tags = {"tokens_encoder": "tokens/encoder_per_step", "tokens_decoder": "tokens/decoder_per_step"}

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.grid = TokenGrid.from_model(cfg.model)

    @classmethod
    def for_checkpoint(cls, config_text: str, meta: Mapping[str, Any]) -> PretrainTask:
        return cls(load_config_text(config_text))

    def model_spec(self) -> ModelSpec:
        return pretrain_spec(self.cfg.model)

    def build_loader(self, rank: int, world_size: int) -> Loader:
        from mats_scale.data.loader import build_pretrain_loader

        return build_pretrain_loader(self.cfg, rank=rank, world_size=world_size)

    def motion_scores(
        self, engine: Engine, video: torch.Tensor, batch: dict[str, Any]
    ) -> torch.Tensor | None:
        m = self.cfg.masking
        if m.strategy != "mats":
            return None
        scores = batch.get("scores")  # pixel scores computed by the loader, when it did
        if scores is not None:
            return scores.to(video.device, non_blocking=True)
        cuts = batch.get("cuts")  # shot cuts and loop seams of each clip, from the loader
        with engine.autocast():
            return engine.module.motion_scores(video, m.score, cuts)

    def step(self, engine: Engine, batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        video = to_model_input(batch, engine.env.device)  # uint8 from the workers -> normalised float32
        scores = self.motion_scores(engine, video, batch)
        sel = select_tokens(self.cfg.masking, self.grid, video.shape[0], generator, scores)
        out = engine.forward(video, *sel)
        n_vis, n_tgt = sel.visible_ids.numel(), sel.target_ids.numel()
        return StepOutput(out.loss, {"tokens_encoder": n_vis, "tokens_decoder": n_vis + n_tgt})

    def summarize(self, totals: Mapping[str, float], micro_batches: int) -> dict[str, Any]:
        return {
            "tokens_encoder": int(totals["tokens_encoder"]),
            "tokens_decoder": int(totals["tokens_decoder"]),
        }

    def checkpoint_key(self) -> dict[str, Any]:
        return {"model": asdict(self.cfg.model)}

    def workload(self) -> Workload:
        """One clip as the profilers count it: the model, its masking and motion score."""
        return Workload(self.cfg.model, self.cfg.masking)

    def finish(self, trainer: Finished) -> None:
        """Nothing after pre-training."""
