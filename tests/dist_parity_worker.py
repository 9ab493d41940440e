"""Worker of tests/test_dist.py (run under torchrun with 2 processes, gloo, fp32).

For each engine configuration: build it (same seed), run STEPS optimizer steps on this rank's share
of a global batch, one step whose loss is made non-finite on rank 0 only (must be skipped on every
rank), and one more step; a single-process LocalEngine does the same on the whole global batch.
Rank 0 writes every consolidated state dict to OUT/results.pt; some engines also save a checkpoint
under OUT/<name>/engine for the export test.

    torchrun --nproc_per_node 2 tests/dist_parity_worker.py OUT
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch

from mats_scale.config import load_config
from mats_scale.data.inmemory import moving_square_clips, normalize
from mats_scale.masking import Selection, TokenGrid, tube_masking
from mats_scale.models.pretrain import pretrain_spec
from mats_scale.parallel.base import Engine
from mats_scale.parallel.distributed import barrier, detect_env, init_distributed
from mats_scale.parallel.engine import build_engine

STEPS, GLOBAL_BATCH, LR = 3, 4, 1e-3
BASE = [
    "model.size=debug",
    "model.num_frames=4",
    "model.img_size=64",
    "model.drop_path=0.0",
    "optim.clip_grad=0.02",
    "train.device=cpu",
    "train.precision=fp32",
]
ZERO3_ALL_PARTITIONED = {  # a user template: partition every parameter of the tiny model
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
}

# name -> overrides (micro-batch and accumulation give the global batch of 4 on 2 processes)
CASES = {
    "zero0": ["parallel.backend=deepspeed", "parallel.zero_stage=0"],
    "zero1": ["parallel.backend=deepspeed", "parallel.zero_stage=1"],
    "zero2_accum": [
        "parallel.backend=deepspeed",
        "parallel.zero_stage=2",
        "data.batch_size=1",
        "optim.grad_accum=2",
    ],
    "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "parallel.ds_config={zero3_json}"],
    "zero3_ac": [
        "parallel.backend=deepspeed",
        "parallel.zero_stage=3",
        "parallel.ds_config={zero3_json}",
        "parallel.checkpoint_encoder_every=1",
        "parallel.checkpoint_decoder_every=1",
    ],
    "zero3_offload": [
        "parallel.backend=deepspeed",
        "parallel.zero_stage=3",
        "parallel.offload_optimizer=true",
    ],
    "fsdp2": ["parallel.backend=fsdp2"],
    "fsdp2_ac_accum": [
        "parallel.backend=fsdp2",
        "parallel.checkpoint_encoder_every=2",
        "data.batch_size=1",
        "optim.grad_accum=2",
    ],
}
# bf16 (DeepSpeed torch_autocast, FSDP2 mixed precision) on tiny shapes: close to fp32, not equal.
BF16_CASES = {
    "zero3_bf16": ["parallel.backend=deepspeed", "parallel.zero_stage=3", "train.precision=bf16"],
    "fsdp2_bf16": ["parallel.backend=fsdp2", "train.precision=bf16"],
}
SAVE = {"zero3", "zero1", "fsdp2"}


def global_batches(cfg, n: int) -> list[tuple[torch.Tensor, Selection]]:
    g = torch.Generator().manual_seed(1234)
    grid = TokenGrid.from_model(cfg.model)
    out = []
    for _ in range(n):
        video, _ = moving_square_clips(GLOBAL_BATCH, cfg.model.num_frames, cfg.model.img_size, g)
        out.append((normalize(video), tube_masking(grid, 0.75, GLOBAL_BATCH, g)))
    return out


def run_case(cfg, env, batches, shard: bool, out_dir: str | None) -> dict:
    """Steps on this rank's share (shard=True) or on the whole batch; returns what rank 0 records."""
    engine = build_engine(cfg, env, pretrain_spec(cfg.model))
    rec = {
        "init": engine.state_dict(),
        "applied": [],
        "is_engine": isinstance(engine, Engine),
        "kind": engine.kind,
    }
    micro, accum = cfg.data.batch_size, cfg.optim.grad_accum
    mine = slice(env.rank * micro * accum, (env.rank + 1) * micro * accum) if shard else slice(None)

    def motion_scores():  # MATS scores through the (sharded) model, outside forward
        with engine.autocast():
            return engine.module.motion_scores(batches[0][0][mine])

    rec["scores_init"] = motion_scores()
    for i, (video, sel) in enumerate(batches):
        nan_step = i == STEPS
        if nan_step:
            rec["before_nan"] = engine.state_dict()
        for m in range(accum):
            lo = (env.rank * accum + m) * micro if shard else m * micro
            part = slice(lo, lo + micro)
            out = engine.forward(video[part], sel.visible_ids[part], sel.target_ids[part])
            loss = out.loss * float("nan") if nan_step and (env.rank == 0 or not shard) else out.loss
            engine.backward(loss)
        rec["applied"].append(engine.step(LR, skip=nan_step).applied)
        if nan_step:
            rec["after_nan"] = engine.state_dict()
    rec["final"] = engine.state_dict()
    rec["scores_final"] = motion_scores()
    if out_dir is not None:
        engine.save(os.path.join(out_dir, "engine"))
    return rec


def main() -> None:
    out = sys.argv[1]
    zero3_json = os.path.join(out, "zero3_all_partitioned.json")
    env = None
    results = {}
    for name, overrides in {**CASES, **BF16_CASES}.items():
        overrides = [o.format(zero3_json=zero3_json) for o in overrides]
        cfg = load_config(None, BASE + ["data.batch_size=2"] + overrides)
        if env is None:
            env = init_distributed(cfg.train, cfg.parallel)
            if env.is_writer:
                with open(zero3_json, "w") as f:
                    json.dump(ZERO3_ALL_PARTITIONED, f)
            barrier()
        case_env = detect_env(cfg.train, cfg.parallel)  # precision of this case
        batches = global_batches(cfg, STEPS + 2)
        results[name] = run_case(
            cfg, case_env, batches, shard=True, out_dir=os.path.join(out, name) if name in SAVE else None
        )
        gc.collect()  # the case's engine is gone: free its memory before the next one
        if env.rank == 1 and name in CASES:  # rank 1's scores of its share, compared with the reference
            torch.save(
                {k: results[name][k] for k in ("scores_init", "scores_final")},
                os.path.join(out, f"{name}.rank1_scores.pt"),
            )
    ref_cfg = load_config(None, BASE + [f"data.batch_size={GLOBAL_BATCH}", "parallel.backend=none"])
    results["reference"] = run_case(
        ref_cfg, env, global_batches(ref_cfg, STEPS + 2), shard=False, out_dir=None
    )
    if env.is_writer:
        torch.save(results, os.path.join(out, "results.pt"))
    barrier()


if __name__ == "__main__":
    main()
