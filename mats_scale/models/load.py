"""Initialising the classifier from a checkpoint, with one report and no silent partial load.

Sources (``finetune.init``, read by :func:`mats_scale.train.export.read_weights`):

- this project: an exported ``.pt`` (``python -m mats_scale.train.export``), a run directory or a
  ``step_*`` checkpoint (DeepSpeed ZeRO shards, FSDP2 DCP or ``engine.pt``: consolidated through the
  engine registry); pre-training (``encoder.*``) or fine-tuning (classifier) weights;
- official VideoMAE / VideoMAE V2 (also the distilled ViT-S/B) / EVEREST files: the state dict at the
  top level or under ``model`` / ``module`` / ``state_dict``; keys possibly prefixed ``_orig_mod.``
  (torch.compile) or ``module.`` (DDP / DeepSpeed). Pre-training keys (``encoder.patch_embed...``,
  ``encoder.blocks.N...``) map onto the classifier by dropping ``encoder.`` (as VideoMAE's
  ``run_class_finetuning.py`` does); fine-tuned ones are already the classifier's names
  (``patch_embed``, ``blocks``, ``fc_norm``, ``head``).

Rules: the pre-training decoder (``decoder.*``, ``encoder_to_decoder``, ``mask_token``), the encoder's
final ``norm`` (unused with mean pooling, VideoMAE's ``norm = Identity``) and a fixed sin-cos
``pos_embed`` equal to the table the model rebuilds are set aside, counted in the report. A missing
``fc_norm`` / ``head`` is initialised fresh (a pre-training source; or ``finetune.drop_head``). Anything
else missing or left over, or any shape that differs (another model size), stops with
:class:`InitError` naming the keys and both shapes. A learned ``pos_embed`` (with
``finetune.learned_pos``) is interpolated trilinearly over the (T', H', W') token grid when the frame
count or resolution differs. Since decoders are never used here, EVEREST's ViT-H checkpoints with a
640-wide decoder load like any other for fine-tuning.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mats_scale.models.layers import sincos_table

PREFIXES = ("_orig_mod.", "module.")
DECODER_KEYS = ("decoder.", "encoder_to_decoder.", "mask_token", "decoder_pos_embed")
HEAD_KEYS = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")


class InitError(RuntimeError):
    """The weights of ``finetune.init`` do not fit the model; the message names keys and shapes."""


@dataclass
class InitReport:
    source: str
    loaded: int = 0
    fresh: list[str] = field(default_factory=list)
    set_aside: Counter = field(default_factory=Counter)
    interpolated: str | None = None

    def lines(self) -> str:
        aside = ", ".join(f"{n} {why}" for why, n in self.set_aside.items()) or "none"
        text = (
            f"init from {self.source}: loaded {self.loaded} tensors; missing (initialised fresh): "
            f"{', '.join(self.fresh) or 'none'}; unexpected: none; set aside: {aside}"
        )
        if self.interpolated:
            text += f"; {self.interpolated}"
        return text


def unwrap(obj: Any, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict of a checkpoint object: itself, or under ``model`` / ``module`` / ``state_dict``."""
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise InitError(
            f"{what}: not a state dict (expected tensors at the top level or under "
            "'model', 'module' or 'state_dict')"
        )
    return dict(obj)


def strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def interpolate_pos(
    table: torch.Tensor, src_grid: tuple[int, int, int], dst_grid: tuple[int, int, int]
) -> torch.Tensor:
    """Learned table (1, T*H*W, D) on `src_grid` -> (1, T'*H'*W', D) on `dst_grid` (trilinear)."""
    D = table.shape[-1]
    x = table.reshape(1, *src_grid, D).permute(0, 4, 1, 2, 3).float()  # (1, D, T, H, W)
    x = F.interpolate(x, size=dst_grid, mode="trilinear", align_corners=False)
    return x.permute(0, 2, 3, 4, 1).reshape(1, -1, D).to(table.dtype)


def guess_grid(num_tokens: int, like: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """The checkpoint's (T', H', W') grid of `num_tokens` (a learned table does not record it): the
    model's T' with a square spatial grid (another resolution), else the model's H' x W' (another frame
    count); None when neither fits."""
    t, h, _ = like
    if num_tokens % t == 0 and math.isqrt(num_tokens // t) ** 2 == num_tokens // t:
        s = math.isqrt(num_tokens // t)
        return t, s, s
    if num_tokens % (h * h) == 0:
        return num_tokens // (h * h), h, h
    return None


def map_state(
    sd: dict[str, torch.Tensor],
    model_sd: dict[str, torch.Tensor],
    grid: tuple[int, int, int],
    *,
    source: str,
    drop_head: bool = False,
) -> tuple[dict[str, torch.Tensor], InitReport]:
    """Map a checkpoint onto the classifier's state `model_sd` (names -> tensors or meta tensors of the
    target shapes); see the module doc for the rules. Returns the tensors to copy and the report."""
    report = InitReport(source)
    out: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for raw, value in sd.items():
        key = strip_prefixes(raw)
        for p in ("backbone.", "encoder."):
            if key.startswith(p):
                key = key[len(p) :]
                break
        if raw.startswith(DECODER_KEYS) or strip_prefixes(raw).startswith(DECODER_KEYS):
            report.set_aside["pre-training decoder"] += 1
            continue
        if key in ("norm.weight", "norm.bias"):
            report.set_aside["encoder norm (unused with mean pooling)"] += 1
            continue
        if drop_head and key in ("head.weight", "head.bias"):
            report.set_aside["head (finetune.drop_head)"] += 1
            continue
        if key == "pos_embed":
            table = value.reshape(-1, value.shape[-1])
            if "pos_embed" not in model_sd:
                if torch.allclose(table.float(), sincos_table(*table.shape), atol=1e-4):
                    report.set_aside["fixed sin-cos pos_embed (rebuilt)"] += 1
                    continue
                raise InitError(
                    f"{source}: brings a learned pos_embed {tuple(value.shape)}; the model uses "
                    "the fixed sin-cos table: set finetune.learned_pos=true to load it"
                )
            want = model_sd["pos_embed"].shape
            value = table[None]
            if value.shape != want:
                src = guess_grid(value.shape[1], grid)
                if src is None or value.shape[-1] != want[-1]:
                    mismatched.append(f"pos_embed: checkpoint {tuple(value.shape)} vs model {tuple(want)}")
                    continue
                value = interpolate_pos(value, src, grid)
                report.interpolated = f"pos_embed interpolated from grid {src} to {grid}"
        if key not in model_sd:
            unexpected.append(raw)
            continue
        if tuple(value.shape) != tuple(model_sd[key].shape):
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(model_sd[key].shape)}")
            continue
        out[key] = value
    missing = [k for k in model_sd if k not in out]
    fresh = [k for k in missing if k in HEAD_KEYS]
    missing = [k for k in missing if k not in HEAD_KEYS]
    problems = []
    if mismatched:
        hint = " (another model size or patch size?)"
        if all(m.startswith("head.") for m in mismatched):
            hint = " (another label set: finetune.drop_head=true starts a fresh head)"
        problems.append(f"{len(mismatched)} shape(s) differ{hint}: " + "; ".join(mismatched[:4]))
    if missing:
        problems.append(f"{len(missing)} missing: " + ", ".join(missing[:6]))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: " + ", ".join(unexpected[:6]))
    if problems:
        raise InitError(f"{source}: refusing a partial load: " + "; ".join(problems))
    report.loaded, report.fresh = len(out), fresh
    return out, report


def export_videomae(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """This project's weights (pre-training or classifier) in VideoMAE's fine-tuning key layout,
    ``{"module": {patch_embed..., blocks..., [fc_norm, head]}}``, which VideoMAE's and VideoMAE V2's
    ``run_class_finetuning.py --finetune FILE`` read (encoder norm and decoder are left out: their
    fine-tuning model pools with ``fc_norm`` and has no decoder)."""
    out = {}
    for raw, value in sd.items():
        key = strip_prefixes(raw)
        if key.startswith(DECODER_KEYS):
            continue
        key = key[len("encoder.") :] if key.startswith("encoder.") else key
        if key in ("norm.weight", "norm.bias"):
            continue
        out[key] = value
    return {"module": out}


__all__ = ["InitError", "InitReport", "export_videomae", "interpolate_pos", "map_state", "unwrap"]
