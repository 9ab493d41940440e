"""A camera-motion-compensated motion score: the pixel score after undoing the dominant translation
(optionally also a zoom).

The raw pixel (and embedding) score measures every change between consecutive tubelets, so a moving
camera makes every textured edge score as if it moved: on head-mounted or hand-held footage the
budget goes to static scenery. This score estimates the global (dominant) translation between
consecutive tubelets and scores each token by its residual after compensating it:

1. per tubelet, the green channel (a stand-in for luma that needs no arithmetic) of its first frame,
   average-pooled by integer factors to about :data:`SEARCH_SIDE` px on the short side (the search
   images) and, for the refinements, to about :data:`REFINE_SIDE` px (the larger images);
2. candidates: the :data:`CANDIDATES` highest peaks of the phase correlation of consecutive tubelets
   (``torch.fft``: Hann window, normalised cross-power spectrum, inverse FFT), each refined below a
   pixel by a parabola through the peak and its neighbours;
3. evidence, per token (blocks of a token at the search size): its mean absolute residual after the
   symmetric move by the candidate, r_s, and without a move, r_0 (both images moved by the same
   fractional part, so that interpolation, which averages noise away, favours neither);
   *informative*: max(r_s, r_0) above twice the clip's floor (the median of min(r_s, r_0));
   *explained*: informative and r_s < :data:`MIN_GAIN` r_0. The candidate explaining most tokens is
   chosen, and it is the camera's only if it explains at least half of the border ring's tokens and
   more than half of the informative tokens (:func:`_camera_moved`); else "no shift". A moving object
   passes only when it reaches at least half of the border *and* most of what changes; on a still
   camera the score is otherwise exactly the pixel score;
4. refinement of a shift that passed: :data:`REFINE_STEPS` Lucas-Kanade steps on the larger images
   over the explained tokens only (a moving object does not pull), at most 1 px each;
5. score: with s rounded to whole pixels, tubelet t is moved by floor(s/2) and t+1 back by the rest
   (slices, no interpolation: no blur, and as cheap as the pixel score), and the token score is the
   L2 norm of their difference over the pixels both cover (the strip the camera reveals or hides
   has no counterpart: it scores 0). Rounding costs little: on the generator's panning textures the
   object's share of the kept tokens was 0.30-0.31 with whole pixels and 0.31-0.32 with bilinear
   sub-pixel moves;
6. zoom (``zoom=True``, ``masking.score=compensated_zoom``): where no shift passed, the scale of
   :data:`ZOOM_CANDIDATES` (about the centre) that lowers the mean residual most, if by a fifth,
   starts a Lucas-Kanade fit of a similarity (scale + shift) on the search, then the larger images;
   it must pass the same camera test (the comparator samples both images at the warp's fractional
   displacement), and the score is the residual of tubelet t against tubelet t+1 sampled where each
   pixel's content went (bilinear, at full resolution: costlier than the whole-pixel slices).

Rotation is not compensated. Pure function of the clip, no model, no gradient: runs in the data
loader like the pixel score (cost: docs/masking.md, "Which motion score").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mats_scale.masking.motion import (
    fill_from_transitions,
    pixel_motion_scores,
    tubelet_grid,
    valid_transitions,
)

SEARCH_SIDE = 56
"""Short side (px) of the pooled tubelets the candidates are found and tested on."""
REFINE_SIDE = 112
"""Short side (px) of the pooled tubelets the chosen shift is refined on (0.1 px matters when the
score rounds it to whole pixels; the search images alone gave errors of 0.4 px)."""
CANDIDATES = 3
"""Correlation peaks tried as the camera's shift, besides no shift."""
MIN_GAIN = 0.5
"""A token is explained by a shift whose residual is below this fraction of the unshifted one."""
REFINE_STEPS = 2
"""Lucas-Kanade steps of the refinement (2 reach ~0.1 px on the generator's pans at 16x224)."""
MIN_SHIFT = 0.25
"""Shifts smaller than this (px, per axis) are taken as 0."""
ZOOM_CANDIDATES = (0.92, 0.96, 0.98, 1.02, 1.04, 1.08)
"""Scale changes between tubelets tried as the start of the similarity fit."""
ZOOM_STEPS = (3, 2)
"""Lucas-Kanade steps of the similarity fit on the search, then the larger images."""
MIN_ZOOM = 0.002
"""Scale changes between tubelets smaller than this are taken as none."""


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


def _token_evidence(
    prev: torch.Tensor, nxt: torch.Tensor, shift: torch.Tensor, block: int, gain: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which tokens (blocks of `block` px) the symmetric move by `shift` explains.

    prev, nxt: (P, 1, H, W); shift: (P, 2) -> explained, informative, covered: (P, H//block, W//block)
    bool. The unshifted comparator moves both images by the same fractional part as the shifted pair
    (bilinear interpolation averages noise away: without this, any fractional shift "explains" a
    flat, noisy background). covered: at least a quarter of the block inside both moves;
    informative: covered and either residual above twice the clip's floor (the median over tokens of
    the smaller of the two: noise, or the interpolation error of a good shift); explained:
    informative and the shifted residual below `gain` x the unshifted one.
    """
    P, _, H, W = prev.shape
    half = shift / 2
    frac = half - half.round()  # same interpolation weights as +-half, zero relative move
    moved = translate(torch.cat([prev, nxt, prev, nxt]), torch.cat([half, -half, frac, frac]))[:, 0]
    return _evidence(*moved.chunk(4), _overlap(shift, H, W), block, gain)


def _evidence(
    a: torch.Tensor,
    b: torch.Tensor,
    a0: torch.Tensor,
    b0: torch.Tensor,
    inside: torch.Tensor,
    block: int,
    gain: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_token_evidence` from the moved pair a, b, the comparator pair a0, b0 and the pixels
    both moves cover, `inside` (all (P, H, W))."""
    inside = inside.float()[:, None]  # (P, 1, H, W)
    cov = F.avg_pool2d(inside, block)  # (P, 1, H//block, W//block): crops the remainder
    resid = F.avg_pool2d(torch.stack([(b - a).abs(), (b0 - a0).abs()], dim=1) * inside, block)
    rs, r0 = (resid / cov.clamp_min(1e-6)).unbind(1)  # mean |residual| per token
    cov = cov[:, 0]
    covered = cov >= 0.25
    floor = torch.where(covered, torch.minimum(rs, r0), torch.nan).flatten(1).nanmedian(dim=1).values
    eps = 1e-4 * (1.0 + a0.abs().mean(dim=(1, 2)))  # exact zeros (rendered clips) are not signal
    informative = covered & (torch.maximum(rs, r0) > (2 * floor + eps)[:, None, None])
    return informative & (rs < gain * r0), informative, covered


def _camera_moved(explained: torch.Tensor, informative: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """(P, h, w) bool token maps -> (P,) bool: the shift is the camera's. It must explain at least half
    of the covered tokens of the border ring (the scenery a still camera keeps still there: a moving
    object rarely reaches half of the border) and more than half of the informative tokens."""
    ring = torch.ones(explained.shape[1:], dtype=torch.bool)
    ring[1:-1, 1:-1] = False
    border = (covered & ring).sum(dim=(1, 2))
    e_border = (explained & ring).sum(dim=(1, 2))
    return (
        (e_border > 0)
        & (2 * e_border >= border)
        & (2 * explained.sum(dim=(1, 2)) > informative.sum(dim=(1, 2)))
    )


def _refine(
    prev: torch.Tensor, nxt: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor, steps: int
) -> torch.Tensor:
    """Lucas-Kanade, inverse compositional (Jacobian and normal matrix from the gradient of `prev`,
    computed once): Gauss-Newton on nxt(x + s) = prev(x) over the pixels of `weight` (P, H, W): the
    tokens the shift explains (a moving object does not pull), inside both images for any shift
    within `steps` px of the start. prev, nxt: (P, 1, H, W); shift: (P, 2) -> (P, 2)."""
    P, _, H, W = prev.shape
    a = prev[:, 0]
    gy, gx = torch.gradient(a, dim=(1, 2))  # (P, H, W)
    m = steps + 1  # margin: the shift moves by at most 1 px per step; one-sided gradients at the border
    ys = torch.arange(H, dtype=torch.float32)[None, :, None] + shift[:, 0, None, None]
    xs = torch.arange(W, dtype=torch.float32)[None, None, :] + shift[:, 1, None, None]
    wgt = weight * ((ys >= m) & (ys <= H - 1 - m) & (xs >= m) & (xs <= W - 1 - m))
    wgt[:, :1] = wgt[:, -1:] = 0
    wgt[:, :, :1] = wgt[:, :, -1:] = 0
    wy, wx = wgt * gy, wgt * gx
    jyy, jxx, jxy = (wy * gy).sum((1, 2)), (wx * gx).sum((1, 2)), (wx * gy).sum((1, 2))
    det = jyy * jxx - jxy * jxy
    ok = det > 1e-6 * (jyy + jxx).square().clamp_min(1e-12)
    inv = (
        torch.stack([jxx, -jxy, -jxy, jyy], dim=1).view(P, 2, 2)
        / det.where(ok, torch.ones_like(det))[:, None, None]
    )
    inv = inv * ok[:, None, None]  # (P, 2, 2): no update where the gradients cannot fix a shift
    for _ in range(steps):
        r = translate(nxt, -shift)[:, 0] - a  # nxt(x + s) - prev(x)
        b = -torch.stack([(wy * r).sum((1, 2)), (wx * r).sum((1, 2))], dim=1)  # (P, 2)
        shift = shift + (inv @ b[:, :, None])[:, :, 0].clamp(-1.0, 1.0)
    return shift


def _similarity_grid(zoom: torch.Tensor, shift: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``grid_sample`` grid (P, H, W, 2) (x, y) that samples every pixel x at c + z (x - c) + s
    (c: the image centre; zoom (P,), shift (P, 2) (dy, dx) px), in normalised coordinates."""
    gy = (2 * torch.arange(H, dtype=torch.float32) + 1) / H - 1  # pixel centres, relative to c
    gx = (2 * torch.arange(W, dtype=torch.float32) + 1) / W - 1
    z = zoom[:, None, None]
    x = z * gx[None, None, :] + (2 * shift[:, 1] / W)[:, None, None]
    y = z * gy[None, :, None] + (2 * shift[:, 0] / H)[:, None, None]
    return torch.stack([x.expand(-1, H, W), y.expand(-1, H, W)], dim=-1)


def _zoom_candidates(prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """(P,) the scale of :data:`ZOOM_CANDIDATES` whose warp (no shift) brings the mean absolute
    residual below 0.8x that of no warp, the lowest; 1 where none does. prev, nxt: (P, 1, H, W)."""
    P, _, H, W = prev.shape
    zs = torch.tensor([1.0, *ZOOM_CANDIDATES])
    Z = len(zs)
    grid = _similarity_grid(zs.repeat_interleave(P), torch.zeros(Z * P, 2), H, W)
    warped = F.grid_sample(nxt.repeat(Z, 1, 1, 1), grid, align_corners=False)[:, 0]  # (Z P, H, W)
    inside = (grid.abs() <= 1).all(dim=-1)
    res = ((warped - prev[:, 0].repeat(Z, 1, 1)).abs() * inside).sum((1, 2)) / inside.sum((1, 2)).clamp_min(1)
    res = res.view(Z, P)
    best = res[1:].argmin(dim=0)
    good = res[1:].min(dim=0).values < 0.8 * res[0]
    return torch.where(good, zs[1:][best], torch.ones(P))


def _fit_similarity(
    prev: torch.Tensor, nxt: torch.Tensor, zoom: torch.Tensor, shift: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lucas-Kanade for nxt(c + z (x - c) + s) = prev(x) (Jacobian from the gradient of `prev`),
    pixels with a residual above 3x the mean absolute residual left out, at most 1 px of move at the
    border per step. prev, nxt: (P, 1, H, W); zoom (P,), shift (P, 2) -> refined (zoom, shift)."""
    P, _, H, W = prev.shape
    a = prev[:, 0]
    gy, gx = torch.gradient(a, dim=(1, 2))
    yc = torch.arange(H, dtype=torch.float32)[:, None] - (H - 1) / 2
    xc = torch.arange(W, dtype=torch.float32)[None, :] - (W - 1) / 2
    J = torch.stack([gy * yc + gx * xc, gy, gx], dim=1)  # (P, 3, H, W): d/dz, d/dsy, d/dsx
    edge = torch.zeros(H, W, dtype=torch.bool)
    edge[1:-1, 1:-1] = True  # one-sided gradients at the border
    for _ in range(steps):
        grid = _similarity_grid(zoom, shift, H, W)
        r = F.grid_sample(nxt, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0] - a
        w = edge & (grid.abs() <= 1).all(dim=-1)
        mean = (w * r.abs()).sum((1, 2)) / w.sum((1, 2)).clamp_min(1)
        w = (w & (r.abs() <= 3 * mean[:, None, None] + 1e-6)).float()
        jw = J * w[:, None]
        normal = torch.einsum("pihw,pjhw->pij", jw, J) + 1e-6 * torch.eye(3)
        step = torch.linalg.solve(normal, -torch.einsum("pihw,phw->pi", jw, r))  # (P, 3)
        zoom = zoom + step[:, 0].clamp(-2 / max(H, W), 2 / max(H, W))
        shift = shift + step[:, 1:].clamp(-1.0, 1.0)
    return zoom, shift


def _similarity_evidence(
    prev: torch.Tensor, nxt: torch.Tensor, zoom: torch.Tensor, shift: torch.Tensor, block: int, gain: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_token_evidence` for the warp of :func:`_fit_similarity` (nxt warped, prev as it is; the
    comparator samples both at the warp's fractional displacement: no relative move, the same
    interpolation as the warped image)."""
    P, _, H, W = prev.shape
    grid = _similarity_grid(zoom, shift, H, W)
    size = torch.tensor([W, H], dtype=torch.float32)
    ident = _similarity_grid(torch.ones(P), torch.zeros(P, 2), H, W)
    disp = (grid - ident) * size / 2  # px
    grid0 = ident + (disp - disp.round()) * 2 / size
    b, a0, b0 = F.grid_sample(
        torch.cat([nxt, prev, nxt]), torch.cat([grid, grid0, grid0]), align_corners=False
    )[:, 0].chunk(3)
    inside = (grid.abs() <= 1).all(dim=-1) & (grid0.abs() <= 1).all(dim=-1)
    return _evidence(prev[:, 0], b, a0, b0, inside, block, gain)


def global_motion(
    video: torch.Tensor,
    tubelet: int,
    patch: int = 16,
    *,
    candidates: int = CANDIDATES,
    min_gain: float = MIN_GAIN,
    refine_steps: int = REFINE_STEPS,
    zoom: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The camera's motion between consecutive tubelets: shifts (B, T'-1, 2) float32 (dy, dx) px and
    zooms (B, T'-1) (1: none; always 1 without `zoom`): content at x in tubelet t is at
    c + z (x - c) + s in tubelet t+1 (c: the centre). Steps 1-4 (and 6 with `zoom`) of the module
    doc. video: (B, C, T, H, W) float or uint8."""
    B, C, T, H, W = video.shape
    nt = T // tubelet
    with torch.no_grad():
        g = video[:, min(1, C - 1), ::tubelet].float()  # (B, T', H, W): green, first frame of each tubelet
        r = max(1, min(H, W) // REFINE_SIDE)  # full px per fine px
        k = max(1, min(H, W) // r // SEARCH_SIDE)  # fine px per search px
        small = F.avg_pool2d(g, r * k) if r * k > 1 else g  # (B, T', h', w')
        P = B * (nt - 1)
        prev, nxt = small[:, :-1].flatten(0, 1)[:, None], small[:, 1:].flatten(0, 1)[:, None]  # (P,1,h',w')
        peaks = _correlation_peaks(small, candidates).flatten(0, 1)  # (P, K, 2) in search px
        K = peaks.shape[1]
        block = max(1, patch // (r * k))  # a token, in search px
        # All candidates in one batch: (K P, ...) ordered candidate-major.
        evidence = _token_evidence(
            prev.repeat(K, 1, 1, 1),
            nxt.repeat(K, 1, 1, 1),
            peaks.transpose(0, 1).flatten(0, 1),
            block,
            min_gain,
        )
        explained, informative, covered = (e.view(K, P, *e.shape[1:]) for e in evidence)
        pick = explained.sum(dim=(2, 3)).argmax(dim=0)  # (P,): the candidate that explains most tokens
        n = torch.arange(P)
        best, expl = peaks[n, pick], explained[pick, n]  # (P, 2), (P, h'', w'')
        info, cov = informative[pick, n], covered[pick, n]
        moving = _camera_moved(expl, info, cov) & (best.abs().sum(dim=1) > 0)
        best = torch.where(moving[:, None], best, torch.zeros_like(best))
        zooms = torch.ones(P)
        (hb, wb), bk = expl.shape[1:], block * k  # bk: a token, in fine px
        if moving.any() and refine_steps:
            m = moving.nonzero()[:, 0]
            fine = g[..., : hb * bk * r, : wb * bk * r]  # the pixels of whole tokens
            fine = F.avg_pool2d(fine, r) if r > 1 else fine  # (B, T', hb bk, wb bk)
            fprev, fnxt = fine[:, :-1].flatten(0, 1)[m, None], fine[:, 1:].flatten(0, 1)[m, None]
            weight = (
                expl[m, :, None, :, None].expand(len(m), hb, bk, wb, bk).reshape(len(m), hb * bk, wb * bk)
            )
            # The tested candidate, sharpened.
            best[m] = _refine(fprev, fnxt, best[m] * k, weight.float(), refine_steps) / k
        # Zoom: where no shift passed, the scale candidate (of ZOOM_CANDIDATES, no shift) that lowers
        # the mean residual most, if by a fifth, is fitted as a similarity; it must pass the camera test.
        if zoom and not moving.all():
            m = (~moving).nonzero()[:, 0]
            z0 = _zoom_candidates(prev[m], nxt[m])
            m, z0 = m[z0 != 1], z0[z0 != 1]
            if len(m):
                z, sh = _fit_similarity(prev[m], nxt[m], z0, torch.zeros(len(m), 2), ZOOM_STEPS[0])
                whole = F.avg_pool2d(g, r) if r > 1 else g  # uncropped: the search images' centre
                fprev, fnxt = whole[:, :-1].flatten(0, 1)[m, None], whole[:, 1:].flatten(0, 1)[m, None]
                z, sh = _fit_similarity(fprev, fnxt, z, sh * k, ZOOM_STEPS[1])
                ok = _camera_moved(*_similarity_evidence(prev[m], nxt[m], z, sh / k, block, min_gain))
                ok &= (z - 1).abs() >= MIN_ZOOM
                zooms[m] = torch.where(ok, z, torch.ones_like(z))
                best[m] = torch.where(ok[:, None], sh / k, best[m])
        best = best * (k * r)  # full-resolution px
        best = torch.where(best.abs() < MIN_SHIFT, torch.zeros_like(best), best)
        return best.view(B, nt - 1, 2), zooms.view(B, nt - 1)


def global_shifts(video: torch.Tensor, tubelet: int, patch: int = 16, **kwargs) -> torch.Tensor:
    """The dominant translation alone: the shifts (B, T'-1, 2) of :func:`global_motion` (no zoom)."""
    return global_motion(video, tubelet, patch, **kwargs)[0]


def compensated_motion_scores(
    video: torch.Tensor,
    tubelet: int,
    patch: int,
    cuts: torch.Tensor | None = None,
    shifts: torch.Tensor | None = None,
    zooms: torch.Tensor | None = None,
    *,
    zoom: bool = False,
) -> torch.Tensor:
    """Per-token residual after compensating the camera's motion: (B, N) float32, in the input's
    units like :func:`~mats_scale.masking.pixel_motion_scores` (equal to it where there is none).

    video: (B, C, T, H, W) float or uint8; cuts: optional (B, T-1) bool shot cuts (no difference
    across one is counted); shifts (B, T'-1, 2) and zooms (B, T'-1): optional, to use instead of
    :func:`global_motion` (shifts alone: translations); zoom: estimate zooms too (``masking.score``
    compensated_zoom).
    """
    B, nt, nh, nw = tubelet_grid(video, tubelet, patch, "compensated_motion_scores")
    C, H, W = video.shape[1], video.shape[3], video.shape[4]
    if nt == 1:
        return torch.zeros(B, nh * nw)
    with torch.no_grad():
        if shifts is None:
            shifts, zooms = global_motion(video, tubelet, patch, zoom=zoom)
        s = shifts.reshape(-1, 2).round().long()  # whole pixels
        z = torch.ones(len(s)) if zooms is None else zooms.reshape(-1).float()
        if not s.any() and (z == 1).all():
            return pixel_motion_scores(video, tubelet, patch, cuts)  # no camera motion: the plain difference
        v = video.float().view(B, C, nt, tubelet, H, W)
        diff = torch.empty(B, C, nt - 1, tubelet, H, W)  # (B, C, T'-1, t, H, W), as the pixel score
        for p, ((sy, sx), zp) in enumerate(zip(s.tolist(), z.tolist(), strict=True)):
            b, t = divmod(p, nt - 1)
            if zp != 1:  # a zoom: tubelet t+1 sampled where each pixel's content went (bilinear)
                grid = _similarity_grid(z[p : p + 1], shifts.reshape(-1, 2)[p : p + 1].float(), H, W)
                nxt = v[b, :, t + 1].reshape(1, C * tubelet, H, W)
                warped = F.grid_sample(nxt, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                inside = (grid.abs() <= 1).all(dim=-1)  # (1, H, W): the rest has no counterpart, scores 0
                diff[b, :, t] = ((warped - v[b, :, t].reshape(1, C * tubelet, H, W)) * inside).view(
                    C, tubelet, H, W
                )
                continue
            if not (sy or sx):
                torch.sub(v[b, :, t + 1], v[b, :, t], out=diff[b, :, t])
                continue
            ay, ax = sy // 2, sx // 2  # tubelet t moves by a, tubelet t+1 back by s - a
            y0, y1, x0, x1 = max(0, sy), min(H, H + sy), max(0, sx), min(W, W + sx)
            diff[b, :, t] = 0.0  # the strip the camera reveals or hides scores 0
            if y0 < y1 and x0 < x1:
                torch.sub(
                    v[b, :, t + 1, :, y0:y1, x0:x1],
                    v[b, :, t, :, y0 - sy : y1 - sy, x0 - sx : x1 - sx],
                    out=diff[b, :, t, :, y0 - ay : y1 - ay, x0 - ax : x1 - ax],
                )
        d2 = diff.view(B, C, nt - 1, tubelet, nh, patch, nw, patch).square_().sum(dim=(1, 3, 5, 7))
        d = d2.sqrt().flatten(2)  # (B, T'-1, H'W')
        return fill_from_transitions(d, None if cuts is None else valid_transitions(cuts, tubelet))
