"""A camera-motion-compensated motion score: the pixel score after undoing the dominant translation.

The raw pixel (and embedding) score measures every change between consecutive tubelets, so a moving
camera makes every textured edge score as if it moved: on head-mounted or hand-held footage the
budget goes to static scenery. This score estimates the global (dominant) translation between
consecutive tubelets and scores each token by its residual after compensating it:

1. per tubelet, the green channel (a stand-in for luma that needs no arithmetic) of its first frame,
   average-pooled by an integer factor to about :data:`REFINE_SIDE` px on the short side, and that
   further to about :data:`SEARCH_SIDE` px for steps 2-3;
2. candidates: the :data:`CANDIDATES` highest peaks of the phase correlation of consecutive tubelets
   (``torch.fft``: Hann window, normalised cross-power spectrum, inverse FFT), each refined below a
   pixel by a parabola through the peak and its neighbours;
3. choice: the candidate with the lowest *median* token residual wins, and "no shift" unless a
   candidate brings it below :data:`MIN_GAIN` of the unshifted median. The shift that explains most
   tokens is the camera's; a moving object covers few tokens, so it never moves the camera (on a
   still camera the score is exactly the pixel score), whatever its share of the picture's edges;
4. refinement: a few robust Lucas-Kanade steps on the larger images (pixels with a residual above
   3x the median absolute residual are left out: the moving object does not pull), then the same
   median test once more (on the small ones);
5. score: with s rounded to whole pixels, tubelet t is moved by floor(s/2) and t+1 back by the rest
   (slices, no interpolation: no blur, and as cheap as the pixel score), and the token score is the
   L2 norm of their difference over the pixels both cover (the strip the camera reveals or hides
   has no counterpart: it scores 0). Rounding costs little: on the generator's panning textures the
   object's share of the kept tokens was 0.30-0.31 with whole pixels and 0.31-0.32 with bilinear
   sub-pixel moves.

Zoom and rotation are not compensated (translation only). Pure function of the clip, no model, no
gradient: runs in the data loader like the pixel score (cost: README, "Which motion score").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mats_scale.masking.motion import fill_from_transitions, tubelet_grid, valid_transitions

SEARCH_SIDE = 56
"""Short side (px) of the pooled tubelets the candidates are found and tested on."""
REFINE_SIDE = 112
"""Short side (px) of the pooled tubelets the chosen shift is refined on (0.1 px matters when the
score rounds it to whole pixels; the search images alone gave errors of 0.4 px)."""
CANDIDATES = 3
"""Correlation peaks tried as the camera's shift, besides no shift."""
MIN_GAIN = 0.8
"""A shift must bring the median token residual below this fraction of the unshifted one."""
REFINE_STEPS = 3
"""Robust Lucas-Kanade steps of the refinement."""
MIN_SHIFT = 0.25
"""Shifts smaller than this (px, per axis) are taken as 0."""


def translate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x: (P, C, H, W), shift: (P, 2) (dy, dx) px -> each x[i] moved by shift[i] (bilinear, zeros
    outside): out(y, x) = in(y - dy, x - dx), one ``grid_sample`` over a grid built by broadcasting."""
    P, _, H, W = x.shape
    # Pixel centres in grid_sample's normalised coordinates (align_corners=False): (2 i + 1) / size - 1.
    gy = (2 * torch.arange(H, dtype=torch.float32) + 1) / H - 1
    gx = (2 * torch.arange(W, dtype=torch.float32) + 1) / W - 1
    sy, sx = (2 * shift[:, 0] / H)[:, None, None], (2 * shift[:, 1] / W)[:, None, None]
    grid = torch.stack(
        [(gx[None, None, :] - sx).expand(P, H, W), (gy[None, :, None] - sy).expand(P, H, W)], dim=-1
    )  # (P, H, W, 2) as (x, y)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _overlap(shift: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(P, 2) shifts -> (P, H, W) bool: pixels both halves of the symmetric move cover,
    |s|/2 <= coordinate <= size - 1 - |s|/2 per axis."""
    ys = torch.arange(H, dtype=torch.float32)[None, :, None]
    xs = torch.arange(W, dtype=torch.float32)[None, None, :]
    hy, hx = (shift[:, 0].abs() / 2)[:, None, None], (shift[:, 1].abs() / 2)[:, None, None]
    return (ys >= hy) & (ys <= H - 1 - hy) & (xs >= hx) & (xs <= W - 1 - hx)


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
    # Local maxima (circular 3x3 neighbourhood: separable maxima of rolled copies; max_pool2d on
    # one-channel maps is several times slower on CPU), then the k highest.
    rows = torch.maximum(torch.maximum(corr.roll(1, -2), corr), corr.roll(-1, -2))
    local = torch.maximum(torch.maximum(rows.roll(1, -1), rows), rows.roll(-1, -1))
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


def _median_token_residual(
    prev: torch.Tensor, nxt: torch.Tensor, shift: torch.Tensor, block: int
) -> torch.Tensor:
    """Median over blocks (tokens) of the mean absolute residual after the symmetric move by `shift`.

    prev, nxt: (P, 1, H, W); shift: (P, 2) -> (P,). Blocks less than half inside both moves are left out.
    """
    P, _, H, W = prev.shape
    resid = (translate(nxt, -shift / 2) - translate(prev, shift / 2)).abs()[:, 0]  # (P, H, W)
    inside = _overlap(shift, H, W).float()
    hb, wb = H // block, W // block
    crop = (slice(None), slice(0, hb * block), slice(0, wb * block))
    num = (resid * inside)[crop].reshape(P, hb, block, wb, block).sum(dim=(2, 4))
    cov = inside[crop].reshape(P, hb, block, wb, block).sum(dim=(2, 4))
    per_block = torch.where(cov >= 0.5 * block * block, num / cov.clamp_min(1), torch.nan)
    return per_block.flatten(1).nanmedian(dim=1).values


def _refine(prev: torch.Tensor, nxt: torch.Tensor, shift: torch.Tensor, steps: int) -> torch.Tensor:
    """Robust Lucas-Kanade: Gauss-Newton on the symmetric move, pixels with a residual above 3x the
    median absolute residual left out (the moving object does not pull). (P, 2) -> (P, 2)."""
    P, _, H, W = prev.shape
    for _ in range(steps):
        a, b = translate(prev, shift / 2)[:, 0], translate(nxt, -shift / 2)[:, 0]  # (P, H, W)
        r = b - a
        gy, gx = torch.gradient(0.5 * (a + b), dim=(1, 2))  # d r / d s = mean gradient of both halves
        inside = _overlap(shift, H, W)
        inside[:, :1] = inside[:, -1:] = False  # one-sided gradients at the border
        inside[:, :, :1] = inside[:, :, -1:] = False
        sub = torch.where(inside, r.abs(), torch.nan)[:, ::2, ::2]  # the median from every 4th pixel
        mad = sub.flatten(1).nanmedian(dim=1).values
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


def _pool_to(x: torch.Tensor, side: int) -> tuple[torch.Tensor, int]:
    """(..., H, W) average-pooled by the integer factor that brings the short side to about `side`."""
    k = max(1, min(x.shape[-2:]) // side)
    return (F.avg_pool2d(x, k) if k > 1 else x), k


def global_shifts(
    video: torch.Tensor,
    tubelet: int,
    patch: int = 16,
    *,
    candidates: int = CANDIDATES,
    min_gain: float = MIN_GAIN,
    refine_steps: int = REFINE_STEPS,
) -> torch.Tensor:
    """Dominant translation between consecutive tubelets: (B, T'-1, 2) float32 (dy, dx) in pixels;
    content at x in tubelet t is at x + s in tubelet t+1 (0: no camera motion found). Steps 1-4 of
    the module doc. video: (B, C, T, H, W) float or uint8."""
    B, C, T, H, W = video.shape
    nt = T // tubelet
    with torch.no_grad():
        g = video[:, min(1, C - 1), ::tubelet].float()  # (B, T', H, W): green, first frame of each tubelet
        fine, r = _pool_to(g, REFINE_SIDE)  # (B, T', h, w)
        small, k = _pool_to(fine, SEARCH_SIDE)  # (B, T', h', w')
        P = B * (nt - 1)
        prev, nxt = small[:, :-1].flatten(0, 1)[:, None], small[:, 1:].flatten(0, 1)[:, None]  # (P,1,h',w')
        peaks = _correlation_peaks(small, candidates).flatten(0, 1)  # (P, K, 2) in search px
        block = max(1, patch // (r * k))  # a token, in search px
        best = torch.zeros(P, 2)
        unshifted = _median_token_residual(prev, nxt, best, block)
        best_res = unshifted * min_gain
        for j in range(peaks.shape[1]):
            res = _median_token_residual(prev, nxt, peaks[:, j], block)
            better = res < best_res
            best = torch.where(better[:, None], peaks[:, j], best)
            best_res = torch.where(better, res, best_res)
        moving = best.abs().sum(dim=1) > 0
        if moving.any():
            m = moving.nonzero()[:, 0]
            fprev, fnxt = fine[:, :-1].flatten(0, 1)[m, None], fine[:, 1:].flatten(0, 1)[m, None]
            refined = _refine(fprev, fnxt, best[m] * k, refine_steps) / k
            keep = _median_token_residual(prev[m], nxt[m], refined, block) < min_gain * unshifted[m]
            best[m] = torch.where(keep[:, None], refined, torch.zeros_like(refined))
        best = best * (k * r)  # full-resolution px
        best = torch.where(best.abs() < MIN_SHIFT, torch.zeros_like(best), best)
        return best.view(B, nt - 1, 2)


def compensated_motion_scores(
    video: torch.Tensor,
    tubelet: int,
    patch: int,
    cuts: torch.Tensor | None = None,
    shifts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token residual after compensating the global translation: (B, N) float32, in the input's
    units like :func:`~mats_scale.masking.pixel_motion_scores` (equal to it where the shift is 0).

    video: (B, C, T, H, W) float or uint8; cuts: optional (B, T-1) bool shot cuts (no difference
    across one is counted); shifts: optional (B, T'-1, 2) to use instead of :func:`global_shifts`.
    """
    B, nt, nh, nw = tubelet_grid(video, tubelet, patch, "compensated_motion_scores")
    C, H, W = video.shape[1], video.shape[3], video.shape[4]
    if nt == 1:
        return torch.zeros(B, nh * nw)
    with torch.no_grad():
        if shifts is None:
            shifts = global_shifts(video, tubelet, patch)
        v = video.float().view(B, C, nt, tubelet, H, W)
        diff = v[:, :, 1:] - v[:, :, :-1]  # (B, C, T'-1, t, H, W), as the pixel score
        s = shifts.reshape(-1, 2).round().long().tolist()  # whole pixels
        for p, (sy, sx) in enumerate(s):
            if not (sy or sx):
                continue  # no camera motion: the plain difference
            b, t = divmod(p, nt - 1)
            ay, ax = sy // 2, sx // 2  # tubelet t moves by a, tubelet t+1 back by s - a
            y0, y1, x0, x1 = max(0, sy), min(H, H + sy), max(0, sx), min(W, W + sx)
            diff[b, :, t] = 0.0  # the strip the camera reveals or hides scores 0
            if y0 < y1 and x0 < x1:
                diff[b, :, t, :, y0 - ay : y1 - ay, x0 - ax : x1 - ax] = (
                    v[b, :, t + 1, :, y0:y1, x0:x1] - v[b, :, t, :, y0 - sy : y1 - sy, x0 - sx : x1 - sx]
                )
        d2 = diff.reshape(B, C, nt - 1, tubelet, nh, patch, nw, patch).square().sum(dim=(1, 3, 5, 7))
        d = d2.sqrt().flatten(2)  # (B, T'-1, H'W')
        return fill_from_transitions(d, None if cuts is None else valid_transitions(cuts, tubelet))
