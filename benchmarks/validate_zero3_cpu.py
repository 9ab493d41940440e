"""Validate the ZeRO-3 model-state model against a real 2-process DeepSpeed ZeRO-3 run on the CPU.

    TORCH_EXTENSIONS_DIR=... PYTHONPATH=$PWD python benchmarks/validate_zero3_cpu.py [--size S]
        [--steps 2] [--reduce-bucket 2e6] [--out DIR]

Spawns 2 gloo processes; each builds the model under ``deepspeed.zero.Init(config_dict_or_path=...)``
(fp32: on the CPU ``zero.Init(dtype=...)`` is ignored, the config decides), wraps it with
``deepspeed.initialize`` and the project's AdamW, trains a few steps on small clips, then measures the
bytes of every live tensor storage of the process (a walk over ``gc.get_objects()``, each storage
counted once): after the step no activation is alive, so this is the model states plus the model's
non-persistent buffers. Writes DIR/zero3_cpu.json and prints predicted vs measured per rank, with
DeepSpeed's own estimate for reference (it assumes 16-bit parameters, so it is not a target in fp32).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue as queue_mod
import socket
import sys
import warnings


def _live_tensors() -> list:
    """Every tensor object the garbage collector knows of (parameters, optimizer state, buffers...)."""
    import torch

    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated torch.distributed aliases warns
        warnings.simplefilter("ignore")
        return [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and obj.device.type == "cpu"]


def _live_tensor_bytes() -> int:
    """Bytes of the live tensor storages, each storage counted once."""
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in _live_tensors()}.values())


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    import deepspeed
    import torch

    from mats_scale.config import ModelConfig, OptimConfig
    from mats_scale.models.layers import Block
    from mats_scale.models.pretrain import PretrainVideoMAE
    from mats_scale.optim import build_adamw
    from mats_scale.parallel.deepspeed_engine import mark_zero3_leaf_modules
    from mats_scale.profiling.memory import LiveBytes
    from mats_scale.profiling.workload import Workload, draw_selection, masking_config

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": int(args.reduce_bucket)},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
    }
    cfg = ModelConfig(size=args.size, num_frames=args.num_frames, img_size=args.img_size)
    base = _live_tensor_bytes()
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = PretrainVideoMAE(cfg)
    # Values do not matter for memory; give the never-initialised tensors finite ones.
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if rank == 0:
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0.0, 0.02)
    model.reset_buffers()
    opt = build_adamw(model, OptimConfig(fused=not args.unfused_adam), total_batch=world)
    mark_zero3_leaf_modules(model, (Block,))  # as the project's DeepSpeed engine does
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    wl = Workload(cfg, masking_config("tube", 0.9), batch=1)

    def train_step(step: int, tracker=None) -> dict:
        gen = torch.Generator().manual_seed(step * world + rank)
        video = torch.randn(1, 3, cfg.num_frames, cfg.img_size, cfg.img_size, generator=gen)
        sel = draw_selection(wl, seed=step * world + rank)
        out = engine(video, sel.visible_ids, sel.target_ids)
        engine.backward(out.loss)
        del out
        peaks = {"fwd_bwd": tracker.peak if tracker else 0}
        if tracker:
            tracker.peak = tracker.live
        engine.step()
        peaks["step"] = tracker.peak if tracker else 0
        return peaks

    for step in range(args.steps - 1):
        train_step(step)
    # The last step under the live-bytes tracker: the peak of the storages it creates, in forward +
    # backward (gathered parameters, activations, temporaries, gradients on their way to the buckets)
    # and in the optimizer step.
    tracker = LiveBytes()
    tracker.ignore(_live_tensors())
    with tracker:
        peaks = train_step(args.steps - 1, tracker)
    buffers = sum(b.untyped_storage().nbytes() for b in model.buffers())
    measured = _live_tensor_bytes() - base
    queue.put(
        dict(
            rank=rank,
            measured=measured,
            buffers=buffers,
            ds_config=ds_config,
            peaks=peaks,
            dtype=str(next(iter(engine.optimizer.fp32_partitioned_groups_flat)).dtype),
        )
    )
    deepspeed.comm.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="S")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument(
        "--reduce-bucket", type=float, default=2e6, help="zero_optimization.reduce_bucket_size"
    )
    parser.add_argument(
        "--unfused-adam", action="store_true", help="optim.fused=false (torch's unfused AdamW)"
    )
    parser.add_argument("--out", default="profiling/out")
    args = parser.parse_args(argv)

    import torch
    import torch.multiprocessing as mp

    from mats_scale.config import ModelConfig
    from mats_scale.profiling.memory import measure_activations
    from mats_scale.profiling.states import deepspeed_zero3_estimate, model_states, param_stats
    from mats_scale.profiling.workload import Workload, build_model, masking_config

    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = []
    while len(results) < world:  # a worker that dies never reports: stop instead of waiting
        try:
            results.append(queue.get(timeout=5))
        except queue_mod.Empty:
            if any(p.exitcode for p in procs):
                break
    for p in procs:
        p.join(timeout=60)
    if len(results) < world or any(p.exitcode for p in procs):
        print(f"error: a worker failed (exit codes {[p.exitcode for p in procs]})", file=sys.stderr)
        return 1
    results.sort(key=lambda r: r["rank"])

    cfg = ModelConfig(size=args.size, num_frames=args.num_frames, img_size=args.img_size)
    wl = Workload(cfg, masking_config("tube", 0.9), batch=1)
    stats = param_stats(build_model(wl, "meta"))
    states = model_states(
        stats,
        zero_stage=3,
        dp=world,
        dtype=torch.float32,
        ds_config=results[0]["ds_config"],
        fused_adam=not args.unfused_adam,
    )
    act = measure_activations(wl, target="cpu")  # meta device, CPU attention kernel, fp32
    # Between steps: the resident states. On top during forward + backward: the gathered working set
    # and the activation peak; during the optimizer step: the step temporaries.
    predicted = dict(
        resident=states.resident, fwd_bwd=states.gathered + act.peak_bytes, step=states.step_temp
    )
    report = dict(
        size=args.size,
        world=world,
        params=stats.total,
        predicted=predicted,
        predicted_breakdown=states.as_dict(),
        activation_peak=act.peak_bytes,
        deepspeed_estimate_16bit=deepspeed_zero3_estimate(stats, world),
        ranks=[],
    )
    for r in results:
        measured = dict(resident=r["measured"] - r["buffers"], **r["peaks"])
        errors = {k: measured[k] / predicted[k] - 1 for k in predicted}
        report["ranks"].append(
            dict(rank=r["rank"], module_buffers=r["buffers"], measured=measured, errors=errors)
        )
        for k in predicted:
            print(
                f"rank {r['rank']} {k:9s}: measured {measured[k] / 2**20:8.2f} MiB, predicted "
                f"{predicted[k] / 2**20:8.2f} MiB, error {100 * errors[k]:+.2f}%"
            )
    ds = report["deepspeed_estimate_16bit"]
    print(f"DeepSpeed's estimate (assumes 16-bit params): {ds / 2**20:.2f} MiB per GPU")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "zero3_cpu.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
