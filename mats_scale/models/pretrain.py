"""Video MAE pre-training model: encoder over the selected tokens, decoder over kept + mask tokens, loss on
per-patch normalised pixel targets. It gathers by the index tensors a masking strategy produced and never
decides which tokens to use; built in ``__init__``, filled by ``init_weights`` (``meta`` / ``zero.Init``)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mats_scale.masking.motion import embed_motion_scores
from mats_scale.masking.scores import loader_motion_scores
from mats_scale.models.args import IMAGENET_MEAN, IMAGENET_STD, ModelArgs
from mats_scale.models.layers import (
    Block,
    PatchEmbed3D,
    drop_path_rates,
    gather_patches,
    init_vit_module,
    sincos_table,
)
from mats_scale.models.spec import InitMixin, ModelSpec, build_model

NORM_EPS = 1e-6


class PretrainOutput(NamedTuple):
    loss: torch.Tensor  # scalar, fp32
    pred: torch.Tensor  # (B, Nt, t*p*p*C)
    target: torch.Tensor  # (B, Nt, t*p*p*C), fp32


def pixel_targets(patches: torch.Tensor, in_chans: int, normalize: bool) -> torch.Tensor:
    """Reconstruction targets from raw-pixel patches.

    patches: (B, n, C*t*p*p) in (c t p q) order, pixels in [0, 1] (ImageNet normalisation undone).
    Returns (B, n, t*p*p*C) in (t p q c) order; with ``normalize`` each patch and channel is
    standardised: (x - mean) / (unbiased std + 1e-6), as VideoMAE does.
    """
    B, n, _ = patches.shape
    x = patches.float().view(B, n, in_chans, -1)  # (B, n, C, t*p*p)
    if normalize:
        x = (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return x.transpose(-1, -2).flatten(2)


def encoder_blocks(cfg: ModelArgs) -> nn.ModuleList:
    """The ViT encoder's blocks of `cfg` (pre-training encoder and fine-tuning classifier alike), with
    stochastic depth rising linearly to ``cfg.drop_path``."""
    arch = cfg.arch
    return nn.ModuleList(
        Block(
            dim=arch.embed_dim,
            num_heads=arch.num_heads,
            mlp_dim=arch.mlp_dim,
            drop_path=dpr,
            fused_attn=cfg.attn_impl == "sdpa",
            norm_eps=NORM_EPS,
        )
        for dpr in drop_path_rates(cfg.drop_path, arch.depth)
    )


class VideoEncoder(nn.Module):
    def __init__(self, cfg: ModelArgs, in_chans: int = 3) -> None:
        super().__init__()
        arch = cfg.arch
        self.embed_dim = arch.embed_dim
        self.patch_embed = PatchEmbed3D(
            in_chans=in_chans, embed_dim=arch.embed_dim, tubelet_size=cfg.tubelet_size, patch_size=cfg.patch
        )
        self.blocks = encoder_blocks(cfg)
        self.norm = nn.LayerNorm(arch.embed_dim, eps=NORM_EPS)
        # Fixed sin-cos table (N, D): a non-persistent buffer, filled by reset_buffers().
        self.register_buffer("pos_embed", torch.empty(cfg.num_tokens, arch.embed_dim), persistent=False)

    def reset_buffers(self) -> None:
        self.pos_embed.copy_(sincos_table(*self.pos_embed.shape, device=self.pos_embed.device))

    def forward(self, patches: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """patches: (B, n, C*t*p*p) pixel patches of the tokens `ids` (B, n) -> (B, n, D)."""
        x = self.patch_embed(patches) + F.embedding(ids, self.pos_embed).to(patches.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class VideoDecoder(nn.Module):
    def __init__(self, cfg: ModelArgs, out_dim: int) -> None:
        super().__init__()
        arch = cfg.arch
        self.blocks = nn.ModuleList(
            Block(
                dim=arch.decoder_dim,
                num_heads=arch.decoder_heads,
                mlp_dim=arch.decoder_mlp_dim,
                fused_attn=cfg.attn_impl == "sdpa",
                norm_eps=NORM_EPS,
            )
            for _ in range(cfg.decoder_blocks)
        )
        self.norm = nn.LayerNorm(arch.decoder_dim, eps=NORM_EPS)
        self.head = nn.Linear(arch.decoder_dim, out_dim)

    def forward(self, x: torch.Tensor, num_pred: int) -> torch.Tensor:
        """x: (B, Nv + Nt, Dd) with the Nt mask tokens last -> predictions (B, Nt, out_dim)."""
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, -num_pred:]))


class PretrainVideoMAE(InitMixin, nn.Module):
    def __init__(self, cfg: ModelArgs, in_chans: int = 3) -> None:
        super().__init__()
        arch = cfg.arch
        self.in_chans = in_chans
        self.tubelet_size, self.patch_size = cfg.tubelet_size, cfg.patch
        self.norm_pix_loss = cfg.norm_pix_loss
        self.out_dim = in_chans * cfg.tubelet_size * cfg.patch**2

        self.encoder = VideoEncoder(cfg, in_chans)
        self.encoder_to_decoder = nn.Linear(arch.embed_dim, arch.decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.empty(1, 1, arch.decoder_dim))
        self.decoder = VideoDecoder(cfg, self.out_dim)
        self.register_buffer(
            "decoder_pos_embed", torch.empty(cfg.num_tokens, arch.decoder_dim), persistent=False
        )
        # Per-channel input statistics, shaped to broadcast over (B, n, C, t*p*p) patches.
        self.register_buffer("pixel_mean", torch.empty(in_chans, 1), persistent=False)
        self.register_buffer("pixel_std", torch.empty(in_chans, 1), persistent=False)

    # ---- initialisation -------------------------------------------------------------------
    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the non-persistent buffers, e.g. after ``to_empty`` from ``meta``."""
        self.encoder.reset_buffers()
        self.decoder_pos_embed.copy_(
            sincos_table(*self.decoder_pos_embed.shape, device=self.decoder_pos_embed.device)
        )
        self.pixel_mean.copy_(torch.tensor(IMAGENET_MEAN[: self.in_chans])[:, None])
        self.pixel_std.copy_(torch.tensor(IMAGENET_STD[: self.in_chans])[:, None])

    @torch.no_grad()
    def init_module(self, m: nn.Module) -> None:
        """Initialise one module's own parameters (children excluded)."""
        init_vit_module(m)
        if m is self:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    # ---- forward --------------------------------------------------------------------------
    def motion_scores(
        self, video: torch.Tensor, score: str = "embed", cuts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """MATS motion scores (B, N) of `video` (B, C, T, H, W), no gradient; no difference across the
        (B, T-1) shot cuts / loop seams `cuts` is counted.

        ``embed``: L2 between the patch embeddings of consecutive tubelets (the paper), run through this
        model's own patch embedding; ``pixel`` / ``compensated``: the scores the data loader normally computes
        (raw pixel differences, without / with camera-motion compensation). A method of the root module, so
        sharded engines gather the patch embedding as in any forward (FSDP2 registers it as a forward method,
        ZeRO-3 fetches through the module hooks).
        """
        if score == "embed":
            return embed_motion_scores(self.encoder.patch_embed, video, cuts)
        return loader_motion_scores(score, video, self.tubelet_size, self.patch_size, cuts)

    def forward(
        self,
        video: torch.Tensor,
        visible_ids: torch.Tensor,
        target_ids: torch.Tensor,
        target_weights: torch.Tensor | None = None,
    ) -> PretrainOutput:
        """video (B, C, T, H, W) ImageNet-normalised pixels; visible_ids (B, Nv) int64, the tokens the
        encoder sees; target_ids (B, Nt) int64, where the decoder places mask tokens and predicts;
        target_weights (B, Nt), an optional loss weight per target (0 = predicted, not scored).

        Loss = sum(w * mse_per_token) / sum(w), as VideoMAE V2's dual-masking loss
        ``(loss * mask).sum() / mask.sum()``.
        """
        B = video.shape[0]
        t, p = self.tubelet_size, self.patch_size

        # Encoder: embeds and back-propagates through the visible tokens only (B, Nv, C*t*p*p).
        x_vis = self.encoder(gather_patches(video, visible_ids, t, p), visible_ids)  # (B, Nv, D)
        x_vis = self.encoder_to_decoder(x_vis)  # (B, Nv, Dd)

        # Decoder input: [visible tokens + pos, mask token + pos at each target], mask tokens last.
        pos = self.decoder_pos_embed.to(x_vis.dtype)
        x_mask = self.mask_token.to(x_vis.dtype).expand(B, target_ids.shape[1], -1)
        x = torch.cat([x_vis + F.embedding(visible_ids, pos), x_mask + F.embedding(target_ids, pos)], dim=1)
        pred = self.decoder(x, target_ids.shape[1])  # (B, Nt, t*p*p*C)

        with torch.no_grad():
            raw = gather_patches(video, target_ids, t, p).float()  # (B, Nt, C*t*p*p)
            raw = (raw.view(B, raw.shape[1], self.in_chans, -1) * self.pixel_std + self.pixel_mean).flatten(2)
            target = pixel_targets(raw, self.in_chans, self.norm_pix_loss)

        per_token = (pred.float() - target).pow(2).mean(dim=-1)  # (B, Nt)
        if target_weights is None:
            loss = per_token.mean()
        else:
            w = target_weights.to(per_token.dtype)
            loss = (per_token * w).sum() / w.sum()
        return PretrainOutput(loss, pred, target)


def pretrain_spec(cfg: ModelArgs) -> ModelSpec:
    """The pre-training model as the engines see it: blocks of the encoder and the decoder; the patch
    embedding is a unit of its own (motion scores call it alone)."""
    return ModelSpec(
        name=f"pretrain-{cfg.size}",
        build=lambda: PretrainVideoMAE(cfg),
        block_types=(Block,),
        block_groups=lambda m: {"encoder": m.encoder.blocks, "decoder": m.decoder.blocks},
        extra_units=lambda m: [m.encoder.patch_embed],
        forward_methods=("motion_scores",),
    )


def build_pretrain_model(
    cfg: ModelArgs, *, device: torch.device | str | None = None, init: bool = True
) -> PretrainVideoMAE:
    """:func:`~mats_scale.models.spec.build_model` of :func:`pretrain_spec` (meta, then `device`)."""
    return build_model(pretrain_spec(cfg), device, init=init)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
