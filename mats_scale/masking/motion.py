"""Motion scores per token (MATS / EVEREST): how much a patch changes between consecutive tubelets.

Both scores are (B, N) in the flat token order (t * H' + h) * W' + w. Tubelet 0 has no predecessor and
copies tubelet 1's score (the reference's rule). A clip of a single tubelet has no temporal change to
measure: every score is 0, so MATS then picks uniformly at random (its ties are broken at random).
"""

from __future__ import annotations

import torch
from torch import nn


def _consecutive_l2(x: torch.Tensor) -> torch.Tensor:
    """x: (B, T', S, F) per-tubelet features -> (B, T' * S) L2 distance to the previous tubelet."""
    B, T, S, _ = x.shape
    if T == 1:
        return x.new_zeros(B, S, dtype=torch.float32)
    d = torch.linalg.vector_norm(x[:, 1:] - x[:, :-1], dim=-1)  # (B, T'-1, S)
    return torch.cat([d[:, :1], d], dim=1).flatten(1).float()


def pixel_motion_scores(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """L2 distance between the raw pixels of the same patch in consecutive tubelets: (B, N) float32.

    video: (B, C, T, H, W), float or uint8 (scores then in the input's units; only their order
    matters). No model, no gradient: cheap enough for a data-loader worker.
    """
    if video.dim() != 5:
        raise ValueError(f"pixel_motion_scores expects (B, C, T, H, W), got shape {tuple(video.shape)}")
    B, C, T, H, W = video.shape
    if T % tubelet or H % patch or W % patch:
        raise ValueError(f"video of {T}x{H}x{W} (T x H x W) is not divisible into tubelets of "
                         f"{tubelet}x{patch}x{patch}")
    nt, nh, nw = T // tubelet, H // patch, W // patch
    with torch.no_grad():
        v = video.float().reshape(B, C, nt, tubelet, nh, patch, nw, patch)
        if nt == 1:
            return v.new_zeros(B, nh * nw)
        d2 = (v[:, :, 1:] - v[:, :, :-1]).square().sum(dim=(1, 3, 5, 7))  # (B, T'-1, H', W')
        d = d2.sqrt().flatten(2)  # (B, T'-1, H'W')
        return torch.cat([d[:, :1], d], dim=1).flatten(1)


def embed_motion_scores(patch_embed: nn.Module, video: torch.Tensor, *, affine: bool = True) -> torch.Tensor:
    """MATS score: L2 distance between the detached patch embeddings (before position embedding) of
    the same spatial patch in consecutive tubelets: (B, N) float32.

    Runs under no_grad and calls `patch_embed` as a module (so ZeRO-3 / FSDP parameter-gathering hooks
    fire): scoring needs every token's embedding, the gradient only the encoder's visible tokens.
    `patch_embed` maps (B, C, T, H, W) to (B, N, D) and has ``tubelet_size`` and ``patch_size``
    (PatchEmbed3D).

    ``affine=True`` (PatchEmbed3D is a Conv3d, so e(x) = Wx + b): e(x_t) - e(x_{t-1}) = e(x_t - x_{t-1})
    - e(0), so the module embeds the T'-1 pixel differences of consecutive tubelets plus one zero
    tubelet-patch: (T'-1)/T' of the GEMM work of embedding the clip, and no cancellation between two
    large embeddings. ``affine=False`` embeds the clip and differences the embeddings (any module).
    """
    B, _, T, H, W = video.shape
    t = patch_embed.tubelet_size
    num_tubelets = T // t
    with torch.no_grad():
        if not affine or num_tubelets == 1:
            emb = patch_embed(video)  # (B, N, D)
            return _consecutive_l2(emb.view(B, num_tubelets, -1, emb.shape[-1]))
        diff = video[:, :, t:] - video[:, :, :-t]  # (B, C, T - t, H, W): tubelet i+1 minus tubelet i
        delta = patch_embed(diff)  # (B, (T'-1) H'W', D) = W d + b
        p = patch_embed.patch_size
        zero = patch_embed(video.new_zeros(1, video.shape[1], t, p, p))  # (1, 1, D) = b
        d = torch.linalg.vector_norm(delta - zero, dim=-1).view(B, num_tubelets - 1, -1)  # (B, T'-1, H'W')
        return torch.cat([d[:, :1], d], dim=1).flatten(1).float()
