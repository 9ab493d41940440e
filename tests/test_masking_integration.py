"""Selections drive the pre-training model: every setting trains, and MATS ignores dropped tokens."""

import pytest
import torch

from mats_scale.config import MaskingConfig, ModelConfig
from mats_scale.data.inmemory import moving_square_clips, normalize
from mats_scale.masking import TokenGrid, embed_motion_scores, pixel_motion_scores, select_tokens
from mats_scale.masking.common import ids_to_mask
from mats_scale.models.layers import gather_patches, patchify
from mats_scale.models.pretrain import build_pretrain_model

MODEL = ModelConfig(size="debug", num_frames=8, img_size=64)  # 4 x 4 x 4 = 64 tokens
SETTINGS = [
    dict(strategy="tube", ratio=0.75),
    dict(strategy="tube", ratio=0.75, decoder="running_cell", decoder_mode="reference"),
    dict(strategy="tube", ratio=0.75, decoder="running_cell", decoder_mode="lean"),
    dict(strategy="random", ratio=0.75, decoder="running_cell", decoder_mode="lean"),
    dict(strategy="mats", ratio=0.8, keep_ratio=0.5),
    dict(strategy="mats", ratio=0.8, keep_ratio=0.5, decoder="running_cell", decoder_mode="lean"),
]


def _model_and_clip():
    torch.manual_seed(0)
    model = build_pretrain_model(MODEL)
    raw, _ = moving_square_clips(2, MODEL.num_frames, MODEL.img_size, torch.Generator().manual_seed(0))
    return model, normalize(raw)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_every_setting_trains_the_model(setting):
    model, video = _model_and_clip()
    cfg, grid = MaskingConfig(**setting), TokenGrid.from_model(MODEL)
    scores = model.motion_scores(video, cfg.score) if cfg.strategy == "mats" else None
    if cfg.strategy == "mats":
        assert torch.equal(scores, embed_motion_scores(model.encoder.patch_embed, video))
        assert torch.equal(model.motion_scores(video, "pixel"), pixel_motion_scores(video, 2, 16))
    sel = select_tokens(cfg, grid, 2, torch.Generator().manual_seed(0), scores)
    out = model(video, *sel)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.pred.shape[1] == sel.target_ids.shape[1]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mats_dropped_tokens_are_neither_encoded_nor_reconstructed():
    model, video = _model_and_clip()
    grid = TokenGrid.from_model(MODEL)
    cfg = MaskingConfig(strategy="mats", ratio=0.8, keep_ratio=0.5)
    sel = select_tokens(
        cfg, grid, 2, torch.Generator().manual_seed(0), embed_motion_scores(model.encoder.patch_embed, video)
    )
    used = ids_to_mask(sel.visible_ids, grid.num_tokens) | ids_to_mask(sel.target_ids, grid.num_tokens)
    assert (~used).sum() == 2 * 32  # half of the 64 tokens per clip are dropped

    def loss_and_grads(clip):
        model.zero_grad()
        out = model(clip, *sel)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    # Replace the pixels of every dropped token by noise: loss and every gradient stay the same.
    noise = patchify(torch.randn_like(video), MODEL.tubelet_size, MODEL.patch)  # (B, N, C*t*p*p)
    patches = patchify(video, MODEL.tubelet_size, MODEL.patch)
    mixed = torch.where(used[..., None], patches, noise)
    t, h, w = grid.t, grid.h, grid.w
    p, tub = MODEL.patch, MODEL.tubelet_size
    clip = mixed.view(2, t, h, w, 3, tub, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(video.shape)
    assert not torch.equal(clip, video)
    base_loss, base_grads = loss_and_grads(video)
    loss, grads = loss_and_grads(clip)
    torch.testing.assert_close(loss, base_loss)
    for g, g0 in zip(grads, base_grads, strict=False):
        torch.testing.assert_close(g, g0)


@pytest.mark.parametrize("shape,t,p", [((2, 3, 8, 64, 48), 2, 16), ((1, 3, 6, 28, 28), 3, 14)])
def test_gather_patches_equals_patchify_then_gather(shape, t, p):
    video = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    n = (shape[2] // t) * (shape[3] // p) * (shape[4] // p)
    ids = torch.rand(shape[0], n, generator=torch.Generator().manual_seed(1)).argsort(dim=1)[:, : n // 2 + 1]
    expected = torch.gather(patchify(video, t, p), 1, ids[..., None].expand(-1, -1, 3 * t * p * p))
    assert torch.equal(gather_patches(video, ids, t, p), expected)
    clip = video.transpose(3, 4).contiguous().transpose(3, 4)  # same values, non-contiguous layout
    assert torch.equal(gather_patches(clip, ids, t, p), expected)
