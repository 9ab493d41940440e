import contextlib
import csv
import io
import math
import re
from dataclasses import replace

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from mats_scale.config import ModelConfig
from mats_scale.launch import memory as memory_cli
from mats_scale.profiling.memory import (
    LiveBytes,
    SdpaKernel,
    activation_model,
    measure_activations,
    storage_key,
)
from mats_scale.profiling.states import deepspeed_zero3_estimate, model_states, param_stats
from mats_scale.profiling.workload import (
    Workload,
    build_model,
    make_inputs,
    masking_config,
    model_inputs,
    state_tensors,
    token_counts,
)


@pytest.mark.integration
@pytest.mark.parametrize(
    "size,frames,img,strategy,batch",
    [
        ("S", 16, 224, "mats+dual", 1),
        ("S", 16, 224, "mats+dual", 2),
        ("B", 16, 128, "tube+rc", 1),
        ("B", 16, 128, "tube+rc", 2),
    ],
)
def test_meta_figures_equal_a_real_cpu_run(size, frames, img, strategy, batch):
    """Nothing is estimated: the meta-device run saves (and peaks at) exactly the bytes a real CPU
    forward + backward does, when it uses the CPU attention kernel."""
    wl = Workload(
        ModelConfig(size=size, num_frames=frames, img_size=img), masking_config(strategy, 0.9), batch
    )
    meta = measure_activations(wl, device="meta", target="cpu")
    real = measure_activations(wl, device="cpu")
    assert meta == real
    assert meta.saved_bytes > 0 and meta.peak_bytes > meta.saved_bytes


@pytest.mark.integration
def test_activations_are_affine_in_the_micro_batch():
    wl = Workload(ModelConfig(size="B"), masking_config("mats+dual", 0.9), dtype=torch.bfloat16)
    model = activation_model(wl)  # from batch 1 and 2
    at5 = measure_activations(wl.with_batch(5))
    assert model.saved(5) == at5.saved_bytes
    assert model.inputs(5) == at5.input_bytes
    # The peak is affine up to the allocator's rounding of each tensor to 512 B (not linear in b).
    assert model.peak(5) == pytest.approx(at5.peak_bytes, rel=1e-3)
    exact = activation_model(wl, target="cpu")  # no rounding
    assert exact.peak(5) == measure_activations(wl.with_batch(5), target="cpu").peak_bytes


def _block_saved_bytes(wl: Workload) -> tuple[int, int]:
    """Bytes one encoder block saves (its input included) and the bytes of that input."""
    model = build_model(wl, "meta")
    _, sel = make_inputs(wl, "meta")
    x = torch.empty(
        wl.batch, sel.visible_ids.shape[1], wl.model.arch.embed_dim, device="meta", requires_grad=True
    )
    params = {storage_key(t) for t in state_tensors(model)}
    saved = {}

    def pack(t):
        if storage_key(t) not in params:
            saved[storage_key(t)] = t.untyped_storage().nbytes()
        return t

    with SdpaKernel("cpu_flash"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.encoder.blocks[0](x)
    return sum(saved.values()), x.untyped_storage().nbytes()


def test_checkpointing_keeps_only_block_inputs():
    wl = Workload(ModelConfig(size="B", num_frames=16, img_size=128), masking_config("tube+rc", 0.9), batch=2)
    none, every, half = (
        measure_activations(replace(wl, checkpoint=c), target="cpu").saved_bytes
        for c in [(0, 0), (1, 0), (2, 0)]
    )
    block, block_input = _block_saved_bytes(wl)
    depth = wl.model.arch.depth
    # A checkpointed block keeps its input instead of everything it would have saved.
    assert none - every == depth * (block - block_input)
    assert none - half == depth // 2 * (block - block_input)


@pytest.mark.integration
def test_live_bytes_peak_equals_torch_mem_tracker():
    wl = Workload(ModelConfig(size="S", num_frames=8, img_size=128), masking_config("tube+rc", 0.9), batch=2)

    def fresh():
        model = build_model(wl, "meta")
        video, sel = make_inputs(wl, "meta")
        return model, model_inputs(video, sel)

    model, args = fresh()
    ours = LiveBytes()
    ours.ignore([*state_tensors(model), *args])
    with SdpaKernel("cpu_flash"), ours:
        model(*args).loss.backward()

    model, args = fresh()
    tracker = MemTracker()
    tracker.track_external(model, *args)
    with SdpaKernel("cpu_flash"), tracker:
        model(*args).loss.backward()
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    outside = sum(
        v for k, v in peak.items() if str(k) in ("_MemRefType.PARAM", "_MemRefType.BUFFER", "_MemRefType.OTH")
    )
    assert ours.peak == peak["Total"] - outside


def test_cuda_target_uses_flash_attention_and_rounds_to_allocator_blocks():
    wl = Workload(ModelConfig(size="S"), masking_config("tube+rc", 0.9), dtype=torch.bfloat16)
    cuda = measure_activations(wl, target="cuda")
    math_kernel = measure_activations(wl, target="cuda", sdpa_kernel="math")
    # The math kernel keeps the (B, h, N, N) attention matrix of every decoder block; flash does not.
    n_dec = sum(token_counts(wl))  # 160 visible + 784 mask tokens
    heads, blocks = wl.model.arch.decoder_heads, wl.model.arch.decoder_depth
    assert math_kernel.saved_bytes - cuda.saved_bytes >= blocks * heads * n_dec * n_dec * 2
    assert cuda.peak_bytes % 512 == 0


def _ds_printed_gpu_gib(model, dp: int) -> float:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=dp)
    row = next(
        line
        for line in buf.getvalue().splitlines()
        if "offload_param=none, offload_optimizer=none, zero_init=1" in line
    )
    return float(re.findall(r"([\d.]+)GB", row)[1])


def test_zero3_states_agree_with_deepspeed_estimators():
    from deepspeed.runtime.zero.stage3 import model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = ModelConfig(size="B")
    real = build_model(Workload(cfg, masking_config("tube", 0.9)), "cpu")
    stats = param_stats(build_model(Workload(cfg, masking_config("tube", 0.9)), "meta"))
    # DeepSpeed's own counting on the real model = ours on meta.
    assert model_to_params(real) == (stats.total, stats.largest_layer)
    dp = 8
    assert _ds_printed_gpu_gib(real, dp) == pytest.approx(
        deepspeed_zero3_estimate(stats, dp) / 2**30, abs=0.006
    )

    pad = len(stats.numels) * 18  # per-tensor padding to a multiple of dp, at most 18 B per tensor
    part = sum(math.ceil(n / dp) for n in stats.numels)
    # ZeRO-3: the estimator's 18 B/param = 16-bit partition + fp32 master + Adam + fp32 grads; ours adds
    # the 16-bit gradient partitions, the persistent params, the buckets and the gathered window.
    s3 = model_states(
        stats,
        zero_stage=3,
        dp=dp,
        dtype=torch.bfloat16,
        ds_config={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    )
    ours18 = s3.params + s3.master + s3.optimizer + 4 * part
    assert abs(ours18 - (deepspeed_zero3_estimate(stats, dp) - 4 * stats.largest_layer)) <= pad
    # ZeRO-2: the estimator's 2 P + 18 P / N = 16-bit params + (16-bit grads, fp32 grads, master, Adam) / N.
    s2 = model_states(stats, zero_stage=2, dp=dp, dtype=torch.bfloat16)
    _, ds2 = estimate_zero2_model_states_mem_needs(stats.total, num_gpus_per_node=dp, cpu_offload=False)
    assert abs(s2.resident - s2.comm_buffers + 4 * part - ds2) <= pad


def test_states_follow_the_ds_config_and_offload():
    stats = param_stats(build_model(Workload(ModelConfig(size="L"), masking_config("tube", 0.9)), "meta"))
    base = model_states(stats, zero_stage=3, dp=8)
    small = model_states(
        stats,
        zero_stage=3,
        dp=8,
        ds_config={"zero_optimization": {"reduce_bucket_size": 2.5e8, "stage3_prefetch_bucket_size": 1e7}},
    )
    assert base.comm_buffers == 5e8 * 2 and small.comm_buffers == 2.5e8 * 2  # DeepSpeed's default, halved
    # The window: prefetch bucket + one fetch unit (a whole block: the engine's leaf modules), held
    # twice, plus the largest layer's gradient, all in bf16.
    assert stats.largest_block > stats.largest_layer
    assert small.gathered == 2 * (1e7 + stats.largest_block) * 2 + stats.largest_layer * 2
    off = model_states(stats, zero_stage=3, dp=8, offload_optimizer=True)
    assert off.master == off.optimizer == off.grads == 0 and off.cpu_bytes > base.master + base.optimizer
    assert (
        model_states(stats, zero_stage=1, dp=8).resident
        > model_states(stats, zero_stage=2, dp=8).resident
        > base.resident
    )
    with pytest.raises(ValueError, match="offload_optimizer needs zero_stage=3"):
        model_states(stats, zero_stage=2, offload_optimizer=True)


@pytest.mark.integration
@pytest.mark.dist
def test_zero3_cpu_run_matches_prediction(tmp_path):
    """2-process DeepSpeed ZeRO-3 of ViT-S on the CPU (~30 s): resident states, the
    forward/backward transient and the optimizer-step transient within 10% of the prediction."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "validate_zero3_cpu.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "zero3_cpu.json").read_text())
    for rank in report["ranks"]:
        for phase, err in rank["errors"].items():
            assert abs(err) <= 0.10, (phase, err)


def test_cli_sweep_writes_outputs(tmp_path):
    argv = [
        "--sizes",
        "debug",
        "--ratios",
        "0.75,0.9",
        "--strategies",
        "tube+rc,mats",
        "--num-frames",
        "8",
        "--img-size",
        "64",
        "--checkpoint",
        "none,full",
        "--batch",
        "2",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert memory_cli.main(argv) == 0
    with open(tmp_path / "memory.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    for r in rows:
        if r["checkpoint"] == "full":
            twin = next(
                x
                for x in rows
                if x["checkpoint"] == "none" and x["strategy"] == r["strategy"] and x["ratio"] == r["ratio"]
            )
            assert int(r["saved_bytes"]) < int(twin["saved_bytes"])
    assert (tmp_path / "memory.png").stat().st_size > 0
