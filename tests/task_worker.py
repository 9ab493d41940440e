"""Worker of tests/test_task_seam.py (torchrun, 2 processes): the toy classifier task on the generic
Trainer under ZeRO-3 and FSDP2. Per engine: an uninterrupted run, and a run stopped by SIGTERM after
STOP_AT then resumed from its checkpoint; rank 0 writes what the test compares to OUT/results.pt.

    torchrun --nproc_per_node 2 tests/task_worker.py OUT
"""

from __future__ import annotations

import os
import sys

import torch
from toy_task import ToyClassifierTask

from mats_scale.config import load_config
from mats_scale.parallel.distributed import barrier
from mats_scale.train.loop import Trainer

STEPS, STOP_AT = 6, 3
BASE = [
    "train.device=cpu",
    "train.precision=fp32",
    "data.batch_size=2",
    "optim.grad_accum=2",
    "optim.base_lr=0.05",
    "optim.warmup_steps=1",
    "optim.clip_grad=1.0",
    f"train.steps={STEPS}",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "logging.log_every=1",
    "parallel.checkpoint_encoder_every=1",
]
ENGINES = {
    "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
    "fsdp2": ["parallel.backend=fsdp2"],
}


def run(out_dir: str, overrides: list[str], stop_at: int | None = None) -> dict:
    cfg = load_config(None, BASE + overrides + [f"train.out_dir={out_dir}"])
    if stop_at is not None:
        os.environ["MATS_FAULT_SIGTERM_AT_STEP"] = str(stop_at)
    trainer = Trainer(cfg, ToyClassifierTask(cfg))
    os.environ.pop("MATS_FAULT_SIGTERM_AT_STEP", None)
    try:
        result = trainer.run()
        weights = trainer.engine.state_dict()
    finally:
        trainer.log.close()
    return {
        "step": result.step,
        "stopped": result.stopped_by_signal,
        "weights": weights,
        "resumed_from": str(trainer.resume_path) if trainer.resume_path else None,
        "engine": trainer.engine.name,
    }


def main() -> None:
    out = sys.argv[1]
    results = {}
    for name, overrides in ENGINES.items():
        results[name] = {
            "reference": run(os.path.join(out, name, "reference"), overrides),
            "stopped": run(os.path.join(out, name, "resumed"), overrides, stop_at=STOP_AT),
            "resumed": run(os.path.join(out, name, "resumed"), overrides),
        }
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, os.path.join(out, "results.pt"))
    barrier()


if __name__ == "__main__":
    main()
