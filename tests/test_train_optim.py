"""AdamW parameter groups and the learning-rate schedule (mats_scale/optim.py)."""

from __future__ import annotations

import math

import pytest
import torch

from mats_scale.config import ModelConfig, OptimConfig
from mats_scale.models.pretrain import build_pretrain_model
from mats_scale.optim import build_adamw, lr_at, no_weight_decay, param_groups, peak_lr, total_batch


def test_no_decay_on_norms_biases_position_and_mask_tokens():
    model = build_pretrain_model(ModelConfig(size="debug", num_frames=4, img_size=32), device="meta")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = sorted(names[id(p)] for p in no_decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "mask_token" in skipped and "encoder.blocks.0.attn.q_bias" in skipped
    assert "encoder.blocks.0.norm1.weight" in skipped and "decoder.head.bias" in skipped
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_partitioned_parameters_are_classified_by_their_real_shape():
    weight = torch.nn.Parameter(torch.empty(0))  # what a ZeRO-3 partition looks like outside forward
    weight.ds_shape = torch.Size([64, 64])
    assert not no_weight_decay("blocks.0.mlp.fc1.weight", weight)


def test_lr_scaled_by_batch_warmed_up_then_cosine_to_min():
    cfg = OptimConfig(base_lr=1e-3, min_lr=1e-5, warmup_steps=10)
    batch = total_batch(micro_batch=8, world_size=4, grad_accum=2)
    assert batch == 64 and peak_lr(cfg, batch) == pytest.approx(2.5e-4)
    lrs = [lr_at(s, 110, cfg, batch) for s in range(110)]
    assert lrs[0] == pytest.approx(2.5e-5) and lrs[9] == pytest.approx(2.5e-4)  # linear warm-up, per step
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then strictly decreasing
    assert lrs[60] == pytest.approx(1e-5 + 0.5 * (2.5e-4 - 1e-5))  # cosine midpoint
    assert lrs[-1] == pytest.approx(1e-5 + 0.5 * (2.5e-4 - 1e-5) * (1 + math.cos(math.pi * 99 / 100)))


def test_adamw_uses_the_configured_betas():
    model = build_pretrain_model(ModelConfig(size="debug", num_frames=4, img_size=32))
    opt = build_adamw(model, OptimConfig(betas=[0.9, 0.95]), total_batch=256)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
