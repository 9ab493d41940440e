"""A camera-motion-compensated motion score: the pixel score after undoing the dominant translation.

The raw pixel (and embedding) score measures every change between consecutive tubelets, so a moving
camera makes every textured edge score as if it moved: on head-mounted or hand-held footage the
budget goes to static scenery. This score first estimates the global (dominant) translation between
consecutive tubelets and scores each token by its residual after compensating it:

1. per tubelet, the mean over its frames and channels, average-pooled by an integer factor to about
   :data:`SHIFT_SIDE` px on the short side (low-pass: large structures, not small objects, decide);
2. phase correlation of consecutive tubelets (``torch.fft``: Hann window, normalised cross-power
   spectrum, inverse FFT) gives a correlation surface whose peak is the shift; a parabola through the
   peak and its neighbours refines it below a pixel; the peak must beat the zero-shift correlation by
   :data:`ZERO_MARGIN`, else the camera is taken as still (a moving object alone never moves it);
3. tubelets t and t+1 are warped by -s/2 and +s/2 (bilinear ``grid_sample``; both halves blur alike),
   and the token score is the L2 norm of their difference over the pixels both cover (the strip the
   camera reveals or hides has no counterpart: it scores 0).

Zoom and rotation are not compensated (translation only). A shift of 0 gives exactly the pixel score.
Pure function of the clip, no model, no gradient: runs in the data loader like the pixel score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mats_scale.masking.motion import fill_from_transitions, valid_transitions

SHIFT_SIDE = 64
"""Short side (px) the tubelets are pooled to for the candidate shifts (phase correlation)."""
CANDIDATES = 3
"""Correlation peaks tried as the camera's shift, besides no shift."""
MIN_GAIN = 0.8
"""A shift must bring the median token residual below this fraction of the unshifted one."""
REFINE_STEPS = 3
"""Robust Lucas-Kanade steps that refine the chosen shift at full resolution."""
MIN_SHIFT = 0.25
"""Shifts smaller than this (px, per axis) are taken as 0."""


def _hann(n: int) -> torch.Tensor:
    return torch.hann_window(n, periodic=False) if n > 1 else torch.ones(n)


def _correlation_peaks(g: torch.Tensor, k: int) -> torch.Tensor:
    """g: (B, T', h, w) pooled tubelets -> (B, T'-1, k, 2) shifts (dy, dx) at the k highest local
    maxima of the phase correlation of consecutive tubelets, refined by a parabola through each."""
    B, nt, h, w = g.shape
    g = (g - g.mean(dim=(-2, -1), keepdim=True)) * (_hann(h)[:, None] * _hann(w)[None, :])
    spec = torch.fft.rfft2(g)  # (B, T', h, w//2+1)
    cross = spec[:, 1:] * spec[:, :-1].conj()
    corr = torch.fft.irfft2(cross / cross.abs().clamp_min(1e-12), s=(h, w))  # (B, T'-1, h, w)
    # Local maxima (circular 3x3 neighbourhood), then the k highest.
    padded = torch.cat([corr[..., -1:, :], corr, corr[..., :1, :]], dim=-2)
    padded = torch.cat([padded[..., -1:], padded, padded[..., :1]], dim=-1)
    local = F.max_pool2d(padded.reshape(-1, 1, h + 2, w + 2), 3, stride=1).view_as(corr)
    flat = torch.where(corr >= local, corr, torch.full_like(corr, -torch.inf)).flatten(2)
    peak = flat.topk(min(k, h * w), dim=-1).indices  # (B, T'-1, k)
    py, px = peak // w, peak % w
    c = corr.flatten(0, 1)  # (P, h, w)
    n = torch.arange(c.shape[0])[:, None]
    iy, ix = py.flatten(0, 1), px.flatten(0, 1)  # (P, k)

    def vertex(lo: torch.Tensor, mid: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        den = lo - 2 * mid + hi
        step = torch.where(den < 0, 0.5 * (lo - hi) / den.clamp(max=-1e-12), torch.zeros_like(mid))
        return step.clamp(-0.5, 0.5)

    mid = c[n, iy, ix]
    fy = vertex(c[n, (iy - 1) % h, ix], mid, c[n, (iy + 1) % h, ix]).view_as(py)
    fx = vertex(c[n, iy, (ix - 1) % w], mid, c[n, iy, (ix + 1) % w]).view_as(px)
    sy = torch.where(py > h // 2, py - h, py).float() + fy
    sx = torch.where(px > w // 2, px - w, px).float() + fx
    return torch.stack([sy, sx], dim=-1)


def _median_token_residual(prev: torch.Tensor, nxt: torch.Tensor, shift: torch.Tensor,
                           block: int) -> torch.Tensor:
    """Median over blocks (tokens) of the mean absolute residual after the symmetric warp by `shift`.

    prev, nxt: (P, 1, H, W); shift: (P, 2) -> (P,). Blocks less than half inside both warps are left out.
    """
    P, _, H, W = prev.shape
    resid = (_translate(nxt, -shift / 2) - _translate(prev, shift / 2)).abs()[:, 0]  # (P, H, W)
    inside = _overlap(shift, H, W).float()
    hb, wb = H // block, W // block
    crop = (slice(None), slice(0, hb * block), slice(0, wb * block))
    num = (resid * inside)[crop].reshape(P, hb, block, wb, block).sum(dim=(2, 4))
    cov = inside[crop].reshape(P, hb, block, wb, block).sum(dim=(2, 4))
    per_block = torch.where(cov >= 0.5 * block * block, num / cov.clamp_min(1), torch.nan)
    return per_block.flatten(1).nanmedian(dim=1).values


def _refine(prev: torch.Tensor, nxt: torch.Tensor, shift: torch.Tensor, steps: int) -> torch.Tensor:
    """Robust Lucas-Kanade (Gauss-Newton on the symmetric warp, pixels with a residual above 3x the
    median absolute residual left out, so the moving object does not pull): (P, 2) -> (P, 2)."""
    P, _, H, W = prev.shape
    for _ in range(steps):
        a, b = _translate(prev, shift / 2)[:, 0], _translate(nxt, -shift / 2)[:, 0]  # (P, H, W)
        r = b - a
        gy, gx = torch.gradient(0.5 * (a + b), dim=(1, 2))  # d r / d s = mean gradient of both halves
        inside = _overlap(shift, H, W)
        inside[:, :1] = inside[:, -1:] = False  # one-sided gradients at the border
        inside[:, :, :1] = inside[:, :, -1:] = False
        mad = torch.where(inside, r.abs(), torch.nan).flatten(1).nanmedian(dim=1).values
        wgt = (inside & (r.abs() <= 3 * mad[:, None, None] + 1e-6)).float()
        jyy, jxx, jxy = (wgt * gy * gy).sum((1, 2)), (wgt * gx * gx).sum((1, 2)), (wgt * gx * gy).sum((1, 2))
        by, bx = -(wgt * gy * r).sum((1, 2)), -(wgt * gx * r).sum((1, 2))
        det = jyy * jxx - jxy * jxy
        ok = det > 1e-6 * (jyy + jxx).square().clamp_min(1e-12)
        safe = det.where(ok, torch.ones_like(det))
        dy = torch.where(ok, (jxx * by - jxy * bx) / safe, torch.zeros_like(det))
        dx = torch.where(ok, (jyy * bx - jxy * by) / safe, torch.zeros_like(det))
        shift = shift + torch.stack([dy, dx], dim=1).clamp(-1.0, 1.0)
    return shift


def global_shifts(video: torch.Tensor, tubelet: int, patch: int = 16, *, side: int = SHIFT_SIDE,
                  candidates: int = CANDIDATES, min_gain: float = MIN_GAIN,
                  refine_steps: int = REFINE_STEPS) -> torch.Tensor:
    """Dominant translation between consecutive tubelets: (B, T'-1, 2) float32 (dy, dx) in pixels;
    content at x in tubelet t is at x + s in tubelet t+1.

    video: (B, C, T, H, W) float or uint8. Steps (module doc): phase-correlation peaks on pooled
    tubelet means are the candidates; the one with the lowest median token residual wins, where
    "no shift" wins unless beaten by `min_gain` (the shift that explains most tokens is the camera's;
    a moving object covers few); the winner is refined at full resolution and must still beat no
    shift there.
    """
    B, C, T, H, W = video.shape
    nt = T // tubelet
    k = max(1, min(H, W) // side)
    with torch.no_grad():
        g = video.float().reshape(B, C, nt, tubelet, H, W).mean(dim=(1, 3))  # (B, T', H, W)
        small = F.avg_pool2d(g, k) if k > 1 else g
        peaks = _correlation_peaks(small, candidates) * k  # (B, T'-1, K, 2), full-resolution px
        P = B * (nt - 1)
        prev, nxt = g[:, :-1].reshape(P, 1, H, W), g[:, 1:].reshape(P, 1, H, W)
        sprev, snxt = small[:, :-1].flatten(0, 1)[:, None], small[:, 1:].flatten(0, 1)[:, None]  # (P,1,h,w)
        block = max(1, patch // k)
        zero = torch.zeros(P, 2)
        best, best_res = zero, _median_token_residual(sprev, snxt, zero, block) * min_gain
        for j in range(peaks.shape[2]):
            cand = peaks[:, :, j].reshape(P, 2)
            res = _median_token_residual(sprev, snxt, cand / k, block)
            better = res < best_res
            best = torch.where(better[:, None], cand, best)
            best_res = torch.where(better, res, best_res)
        moving = best.abs().sum(dim=1) > 0
        if moving.any():
            m = moving.nonzero()[:, 0]
            refined = _refine(prev[m], nxt[m], best[m], refine_steps)
            keep = (_median_token_residual(prev[m], nxt[m], refined, patch)
                    < min_gain * _median_token_residual(prev[m], nxt[m], torch.zeros(len(m), 2), patch))
            best[m] = torch.where(keep[:, None], refined, torch.zeros_like(refined))
        best = torch.where(best.abs() < MIN_SHIFT, torch.zeros_like(best), best)
        return best.view(B, nt - 1, 2)


def _overlap(shift: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(P, 2) shifts -> (P, H, W) bool: pixels both halves of the symmetric warp cover,
    |s|/2 <= coordinate <= size - 1 - |s|/2 per axis."""
    ys = torch.arange(H, dtype=torch.float32)[None, :, None]
    xs = torch.arange(W, dtype=torch.float32)[None, None, :]
    hy, hx = (shift[:, 0].abs() / 2)[:, None, None], (shift[:, 1].abs() / 2)[:, None, None]
    return (ys >= hy) & (ys <= H - 1 - hy) & (xs >= hx) & (xs <= W - 1 - hx)


def _translate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x: (N, C, H, W), shift: (N, 2) (dy, dx) px -> x moved by `shift` (bilinear, zeros outside)."""
    N, _, H, W = x.shape
    theta = torch.zeros(N, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = -2.0 * shift[:, 1] / W  # output(x) = input(x - s); normalised units: 2 / size per px
    theta[:, 1, 2] = -2.0 * shift[:, 0] / H
    grid = F.affine_grid(theta, [N, 1, H, W], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def compensated_motion_scores(video: torch.Tensor, tubelet: int, patch: int,
                              cuts: torch.Tensor | None = None,
                              shifts: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token residual after compensating the global translation: (B, N) float32, in the input's
    units like :func:`~mats_scale.masking.pixel_motion_scores` (equal to it where the shift is 0).

    video: (B, C, T, H, W) float or uint8; cuts: optional (B, T-1) bool shot cuts (no difference
    across one is counted); shifts: optional (B, T'-1, 2) to use instead of :func:`global_shifts`.
    """
    if video.dim() != 5:
        raise ValueError(f"compensated_motion_scores expects (B, C, T, H, W), got shape {tuple(video.shape)}")
    B, C, T, H, W = video.shape
    if T % tubelet or H % patch or W % patch:
        raise ValueError(f"video of {T}x{H}x{W} (T x H x W) is not divisible into tubelets of "
                         f"{tubelet}x{patch}x{patch}")
    nt, nh, nw = T // tubelet, H // patch, W // patch
    if nt == 1:
        return torch.zeros(B, nh * nw)
    with torch.no_grad():
        if shifts is None:
            shifts = global_shifts(video, tubelet, patch)
        v = video.float().reshape(B, C, nt, tubelet, H, W).permute(0, 2, 1, 3, 4, 5)  # (B, T', C, t, H, W)
        prev = v[:, :-1].reshape(B * (nt - 1), C * tubelet, H, W)
        nxt = v[:, 1:].reshape(B * (nt - 1), C * tubelet, H, W)
        s = shifts.reshape(-1, 2).float()
        moving = s.abs().sum(dim=1) > 0
        diff = nxt - prev  # (B(T'-1), C t, H, W)
        if moving.any():  # warp only the pairs with a shift; the others are the pixel score
            m = moving.nonzero()[:, 0]
            sm = s[m]
            resid = _translate(nxt[m], -sm / 2) - _translate(prev[m], sm / 2)
            diff[m] = resid * _overlap(sm, H, W)[:, None]  # the revealed / hidden strip scores 0
        d2 = diff.reshape(B, nt - 1, C * tubelet, nh, patch, nw, patch).square().sum(dim=(2, 4, 6))
        d = d2.sqrt().flatten(2)  # (B, T'-1, H'W')
        return fill_from_transitions(d, None if cuts is None else valid_transitions(cuts, tubelet))
