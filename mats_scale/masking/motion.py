"""Motion scores per token (MATS / EVEREST): how much a patch changes between consecutive tubelets.

Both scores are (B, N) in the flat token order (t * H' + h) * W' + w. Tubelet 0 has no predecessor and
copies tubelet 1's score (the reference's rule). A clip of a single tubelet has no temporal change to
measure: every score is 0, so MATS then picks uniformly at random (its ties are broken at random).

Shot cuts (``cuts``, from the data loader's :mod:`mats_scale.data.cuts`): a difference across a cut
measures the edit, not motion, so it is never counted. A tubelet whose predecessor lies in another
shot (or that itself holds a cut) has no predecessor, as tubelet 0: it takes the score of the next
tubelet's difference when that one is within one shot (the reference's rule), else 0.
"""

from __future__ import annotations

import torch
from torch import nn


def valid_transitions(cuts: torch.Tensor, tubelet: int) -> torch.Tensor:
    """(B, T-1) bool frame-step cuts (True: frame j+1 starts a new shot) -> (B, T') bool: tubelet t
    has a predecessor in its own shot (t >= 1, and no cut from the first frame of tubelet t-1 to the
    last frame of tubelet t)."""
    B, steps = cuts.shape
    if (steps + 1) % tubelet:
        raise ValueError(f"cuts of {steps} frame steps do not fit tubelets of {tubelet} frames")
    shot = torch.cat([cuts.new_zeros(B, 1, dtype=torch.long), cuts.long().cumsum(1)], dim=1)  # (B, T)
    shot = shot.view(B, -1, tubelet)  # (B, T', t): shot id of every frame
    same = shot[:, 1:, -1] == shot[:, :-1, 0]  # (B, T'-1): tubelets t-1 and t lie in one shot
    return torch.cat([same.new_zeros(B, 1), same], dim=1)


def fill_from_transitions(d: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Per-tubelet scores from the differences of consecutive tubelets.

    d: (B, T'-1, S) difference of tubelet t+1 to tubelet t; valid: (B, T') from
    :func:`valid_transitions`, or None (one shot: tubelet 0 copies tubelet 1). -> (B, T' * S):
    tubelet t takes d[t-1] when valid[t], else d[t] when valid[t+1] (its successor's difference),
    else 0.
    """
    B, _, S = d.shape
    if valid is None:
        return torch.cat([d[:, :1], d], dim=1).flatten(1)
    zero = d.new_zeros(B, 1, S)
    own = torch.cat([zero, d], dim=1)  # (B, T', S): difference to the predecessor
    succ = torch.cat([d, zero], dim=1)  # (B, T', S): the successor's difference
    valid_next = torch.cat([valid[:, 1:], valid.new_zeros(B, 1)], dim=1)
    out = torch.where(valid[..., None], own, torch.where(valid_next[..., None], succ, zero))
    return out.flatten(1)


def tubelet_grid(video: torch.Tensor, tubelet: int, patch: int, name: str) -> tuple[int, int, int, int]:
    """(B, T', H', W') of a clip (B, C, T, H, W) cut into tubelets, or ValueError naming `name`."""
    if video.dim() != 5:
        raise ValueError(f"{name} expects (B, C, T, H, W), got shape {tuple(video.shape)}")
    B, C, T, H, W = video.shape
    if T % tubelet or H % patch or W % patch:
        raise ValueError(
            f"video of {T}x{H}x{W} (T x H x W) is not divisible into tubelets of {tubelet}x{patch}x{patch}"
        )
    return B, T // tubelet, H // patch, W // patch


def pixel_motion_scores(
    video: torch.Tensor, tubelet: int, patch: int, cuts: torch.Tensor | None = None
) -> torch.Tensor:
    """L2 distance between the raw pixels of the same patch in consecutive tubelets: (B, N) float32.

    video: (B, C, T, H, W), float or uint8 (scores then in the input's units; only their order
    matters). No model, no gradient: cheap enough for a data-loader worker. cuts: optional (B, T-1)
    bool shot cuts between frames (module doc); no difference across one is counted.
    """
    B, nt, nh, nw = tubelet_grid(video, tubelet, patch, "pixel_motion_scores")
    C = video.shape[1]
    with torch.no_grad():
        v = video.float().reshape(B, C, nt, tubelet, nh, patch, nw, patch)
        if nt == 1:
            return v.new_zeros(B, nh * nw)
        d2 = (v[:, :, 1:] - v[:, :, :-1]).square().sum(dim=(1, 3, 5, 7))  # (B, T'-1, H', W')
        d = d2.sqrt().flatten(2)  # (B, T'-1, H'W')
        return fill_from_transitions(d, None if cuts is None else valid_transitions(cuts, tubelet))


def embed_motion_scores(
    patch_embed: nn.Module, video: torch.Tensor, cuts: torch.Tensor | None = None, *, affine: bool = True
) -> torch.Tensor:
    """MATS score: L2 distance between the detached patch embeddings (before position embedding) of
    the same spatial patch in consecutive tubelets: (B, N) float32. cuts: optional (B, T-1) bool shot
    cuts and loop seams between frames (module doc); no difference across one is counted.

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
    valid = None if cuts is None else valid_transitions(cuts.to(video.device), t)
    with torch.no_grad():
        if num_tubelets == 1:
            return video.new_zeros(B, (H // patch_embed.patch_size) * (W // patch_embed.patch_size)).float()
        if not affine:
            emb = patch_embed(video)  # (B, N, D)
            x = emb.view(B, num_tubelets, -1, emb.shape[-1])
            d = torch.linalg.vector_norm(x[:, 1:] - x[:, :-1], dim=-1)  # (B, T'-1, H'W')
            return fill_from_transitions(d, valid).float()
        diff = video[:, :, t:] - video[:, :, :-t]  # (B, C, T - t, H, W): tubelet i+1 minus tubelet i
        delta = patch_embed(diff)  # (B, (T'-1) H'W', D) = W d + b
        p = patch_embed.patch_size
        zero = patch_embed(video.new_zeros(1, video.shape[1], t, p, p))  # (1, 1, D) = b
        d = torch.linalg.vector_norm(delta - zero, dim=-1).view(B, num_tubelets - 1, -1)  # (B, T'-1, H'W')
        return fill_from_transitions(d, valid).float()
