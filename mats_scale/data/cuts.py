"""Hard shot cuts in decoded clips, found cheaply on the frames the loader decodes anyway, and clip
windows kept inside one shot.

Per frame (:func:`frame_features`): the frame shrunk to about :data:`CUT_SIDE` px on the short side,
its soft joint RGB histogram (:data:`CUT_LEVELS`^3 bins) and a thumbnail of half that side. A step
between two frames is a cut when (:func:`cuts_from_changes`) both

- its histogram distance (total variation, 0-1) is >= ``max(CUT_MIN_CHANGE, CUT_RATIO * median of
  the window's steps below CUT_MIN_CHANGE)``: the colours changed (pans and zooms barely move a
  histogram; the median raises the bar in a window whose ordinary steps are large, and is taken over
  the quiet steps only, so a window of nothing but cuts still finds them), and
- at least :data:`CUT_MIN_AREA` of the picture changed colour, for the best camera shift up to
  :data:`CUT_SHIFT` thumbnail pixels (:func:`area_change`): a new shot changes the whole picture, a
  large object entering or leaving (a car) only its part of it.

A frame unlike both neighbours, which are alike by both measures, and unlike every other frame of
the window is a flash: its two steps are no cuts (a frame like another one is a shot returning, so
A B A B alternation stays all cuts). In the loader (:func:`limit_to_shot`) each step flagged between
sparse frames is confirmed on every frame around it (:meth:`ShotReader.cuts_in`): a cut is a
one-frame step, so a change spread over the stride (an object crossing 8 frames) or a flash between
the sampled frames is not confirmed, and a confirmed cut gets its exact frame. The thresholds do not
depend on the frame stride. ``benchmarks/bench_cuts.py`` measures the rule at sampling rates 1-8
(benchmarks/README.md, "Shot cuts"). Gradual transitions (fades, dissolves) are not cuts here, and a
cut between two shots of very similar colours (histogram step under 0.10) is missed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

CUT_SIDE = 32
"""Short side (px) the frames are pooled to before their histograms are taken (half that for the
structure thumbnails)."""
CUT_LEVELS = 4
"""Histogram bins per colour channel (4^3 = 64 joint bins)."""
CUT_MIN_CHANGE = 0.10
"""A cut moves at least this fraction of the colour-histogram mass ..."""
CUT_RATIO = 3.0
"""... and at least this many times the clip's median step among those below :data:`CUT_MIN_CHANGE` ..."""
CUT_MIN_AREA = 0.6
"""... and changes the colour of at least this fraction of the picture (the thumbnails' pixels), however
the picture is shifted by up to :data:`CUT_SHIFT` thumbnail pixels."""
CUT_PIXEL = 0.04 * 255
"""A thumbnail pixel changed when a colour channel moved by more than this (uint8 units)."""
CUT_SHIFT = 2
"""Largest camera shift tried, in thumbnail pixels (1/8 of the short side: +-2 px = +-12.5%)."""

log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # videos whose extreme cut rate was logged (once per process)


@dataclass(frozen=True)
class FrameFeatures:
    """What the cut rule compares, per frame: colour histograms (F, levels^3) summing to 1, and
    thumbnails (F, 3, h, w) float32 in uint8 units with a short side of about CUT_SIDE / 2."""

    hist: torch.Tensor
    thumb: torch.Tensor

    def __len__(self) -> int:
        return self.hist.shape[0]

    def __getitem__(self, idx) -> FrameFeatures:
        return FrameFeatures(self.hist[idx], self.thumb[idx])


def _shrink(frames: torch.Tensor, side: int) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, 3, h, w) float32, shrunk by an integer factor to about `side` px on the
    short side (torchvision's antialiased uint8 resize: 8x faster here than pooling a float copy)."""
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected decoded frames (F, H, W, 3), got shape {tuple(frames.shape)}")
    _, H, W, _ = frames.shape
    rgb = frames.permute(0, 3, 1, 2)  # (F, 3, H, W) uint8 view
    k = max(1, min(H, W) // side)
    if k > 1:
        rgb = TF.resize(rgb, [H // k, W // k], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return rgb.float()


def _histograms(rgb: torch.Tensor, levels: int) -> torch.Tensor:
    """(F, 3, h, w) float in uint8 units -> (F, levels^3) soft joint RGB histograms summing to 1."""
    n = rgb.shape[0]
    # Bin centres at (i + 0.5) * 256 / levels: position in bin units, its lower bin and weight of the upper.
    pos = (rgb * (levels / 256.0) - 0.5).clamp(0, levels - 1).flatten(2)  # (F, 3, P)
    low = pos.floor().clamp(max=levels - 2).long() if levels > 1 else pos.long()
    up = pos - low  # (F, 3, P) in [0, 1]
    hist = torch.zeros(n, levels**3)
    for corner in range(8):  # the 2 x 2 x 2 neighbouring bins of every pixel
        bits = [(corner >> c) & 1 for c in range(3)]
        idx = ((low[:, 0] + bits[0]) * levels + low[:, 1] + bits[1]) * levels + low[:, 2] + bits[2]
        w = torch.ones_like(up[:, 0])
        for c in range(3):
            w = w * (up[:, c] if bits[c] else 1 - up[:, c])
        hist.scatter_add_(1, idx.clamp(max=levels**3 - 1), w)
    return hist / pos.shape[-1]


def colour_histograms(frames: torch.Tensor, side: int = CUT_SIDE, levels: int = CUT_LEVELS) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, levels^3) float32 soft joint RGB histograms summing to 1, of the
    frames shrunk to about `side` px on the short side (linear binning: a small brightness change
    never flips pixels across a bin edge at once)."""
    return _histograms(_shrink(frames, side), levels)


def frame_features(frames: torch.Tensor) -> FrameFeatures:
    """(F, H, W, 3) uint8 decoded frames -> their :class:`FrameFeatures` (one shrink for both)."""
    rgb = _shrink(frames, CUT_SIDE)
    return FrameFeatures(
        _histograms(rgb, CUT_LEVELS), F.avg_pool2d(rgb, 2) if min(rgb.shape[-2:]) >= 4 else rgb
    )


def histogram_change(a: FrameFeatures, b: FrameFeatures) -> torch.Tensor:
    """Total-variation distance of the colour histograms of frames `a` and `b` (N each) -> (N,) in [0, 1]."""
    return 0.5 * (a.hist - b.hist).abs().sum(dim=1)


def area_change(a: FrameFeatures, b: FrameFeatures, shift: int = CUT_SHIFT) -> torch.Tensor:
    """Fraction of the picture whose colour changed between frames `a` and `b` (N each) -> (N,) in
    [0, 1]: the share of thumbnail pixels with a channel moved by more than :data:`CUT_PIXEL`, the
    smallest over the camera shifts up to `shift` thumbnail pixels each way (over the overlap)."""
    ta, tb = a.thumb, b.thumb  # (N, 3, h, w)
    h, w = ta.shape[-2:]
    r = min(shift, h // 4, w // 4)
    best = torch.ones(ta.shape[0])
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            pa = ta[..., max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)]
            pb = tb[..., max(0, -dy) : h + min(0, -dy), max(0, -dx) : w + min(0, -dx)]
            changed = ((pa - pb).abs().amax(dim=1) > CUT_PIXEL).float().mean(dim=(1, 2))
            best = torch.minimum(best, changed)
    return best


def frame_changes(frames: torch.Tensor) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F-1,) float32 colour-histogram distance of consecutive frames, in [0, 1]."""
    if frames.shape[0] < 2:
        return torch.zeros(0)
    h = colour_histograms(frames)
    return 0.5 * (h[1:] - h[:-1]).abs().sum(dim=1)


def _floor(d: torch.Tensor, min_change: float, ratio: float) -> float:
    """The histogram distance a cut needs in a window whose steps are `d`."""
    quiet = d[d < min_change]  # the steps that are no cut by the absolute threshold alone
    return max(min_change, ratio * float(quiet.median())) if quiet.numel() else min_change


def cuts_from_changes(
    d: torch.Tensor,
    area: torch.Tensor | None = None,
    *,
    min_change: float = CUT_MIN_CHANGE,
    ratio: float = CUT_RATIO,
    min_area: float = CUT_MIN_AREA,
) -> torch.Tensor:
    """(N,) histogram distances (and area changes) -> (N,) bool: ``d >= max(min_change, ratio *
    median(d[d < min_change]))`` and ``area >= min_area``."""
    step = d >= _floor(d, min_change, ratio)
    return step if area is None else step & (area >= min_area)


def cuts_from_features(feats: FrameFeatures) -> torch.Tensor:
    """(F,) frames' features -> (F-1,) bool cuts between consecutive frames (the rule in the module doc):
    a step whose colours changed (histogram and area), unless the frame between two steps is a flash."""
    n = len(feats)
    if n < 2:
        return torch.zeros(0, dtype=torch.bool)
    d1 = histogram_change(feats[:-1], feats[1:])
    cut = cuts_from_changes(d1, area_change(feats[:-1], feats[1:]))
    if n < 3 or not cut.any():
        return cut
    # Frame k is a flash when it is unlike both neighbours, which are alike by both measures, and unlike
    # every other frame of the window too (a frame like another is a shot returning: A B A B is cuts).
    floor = _floor(d1, CUT_MIN_CHANGE, CUT_RATIO)
    out = cut.clone()
    for k in (cut[:-1] & cut[1:]).nonzero()[:, 0].add(1).tolist():  # cut steps either side of frame k
        a, b = feats[[k - 1]], feats[[k + 1]]
        if histogram_change(a, b).item() >= floor or area_change(a, b).item() >= CUT_MIN_AREA:
            continue  # the neighbours differ by either measure: not one shot around a flash
        others = [i for i in range(n) if i != k]
        if _unlike(feats[[k] * len(others)], feats[others], floor).all():
            out[k - 1] = out[k] = False
    return out


def _unlike(a: FrameFeatures, b: FrameFeatures, floor: float) -> torch.Tensor:
    """(N,) bool: frame pairs that differ as a cut does (histogram distance >= `floor`, area)."""
    return (histogram_change(a, b) >= floor) & (area_change(a, b) >= CUT_MIN_AREA)


def detect_cuts(frames: torch.Tensor, *, video: str | None = None) -> torch.Tensor:
    """(F, H, W, 3) uint8 decoded frames -> (F-1,) bool: True where frame j+1 starts a new shot.

    More than half the steps cut (at least 2) logs one WARNING, once per `video` when it is named."""
    if frames.shape[0] < 2:
        _shrink(frames, CUT_SIDE)  # the shape check
        return torch.zeros(0, dtype=torch.bool)
    cuts = cuts_from_features(frame_features(frames))
    n = int(cuts.sum())
    if n >= 2 and 2 * n > cuts.numel() and (video is None or video not in _WARNED):
        if video is not None:
            _WARNED.add(video)
        log.warning(
            "%d of %d frame steps are shot cuts in %s (rapid-cut footage?): cut handling treats each such "
            "step as a cut, so its windows are limited to one shot "
            "(data.shot_cuts=ignore turns that off)",
            n,
            cuts.numel(),
            video if video is not None else "a decoded clip",
        )
    return cuts


def cuts_between(cuts: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Cuts (F-1,) between decoded frames -> cuts (K-1,) between the kept frames `keep` (K,) ascending
    (a step of the kept frames crosses a cut when any decoded step it spans is one)."""
    crossed = torch.cat([torch.zeros(1, dtype=torch.long), cuts.long().cumsum(0)])  # cuts before frame f
    return crossed[keep[1:]] > crossed[keep[:-1]]


def loop_seams(ids: Sequence[int]) -> torch.Tensor:
    """(F-1,) bool: True where a clip's frame numbers jump back (the seam of a looped clip, which the
    scores and the frame selection treat as a cut)."""
    t = torch.as_tensor(list(ids), dtype=torch.long)
    return t[1:] < t[:-1]


class ShotReader:
    """The frames of one video by frame number, each decoded once: ``get(ids)`` -> (len(ids), H, W, 3)."""

    def __init__(self, read: Callable[[list[int]], torch.Tensor], num_frames: int, frames, ids) -> None:
        self.read, self.n = read, num_frames
        self.got = dict(zip(ids, frames, strict=True))

    def get(self, ids: Sequence[int]) -> torch.Tensor:
        missing = sorted({i for i in ids if i not in self.got})
        if missing:
            self.got.update(zip(missing, self.read(missing), strict=True))
        return torch.stack([self.got[i] for i in ids])

    def cuts_in(self, a: int, b: int) -> list[int]:
        """The frames in ``a+1..b`` that start a shot, found on every frame from a-2 to b+2 (a flagged
        sparse step is confirmed and placed at full frame rate; a flash or a change spread over the
        step's frames is no cut there)."""
        ids = list(range(max(a - 2, 0), min(b + 2, self.n - 1) + 1))
        cuts = cuts_from_features(frame_features(self.get(ids)))
        return [ids[j + 1] for j in cuts.nonzero()[:, 0].tolist() if a < ids[j + 1] <= b]

    def extend(self, edge: int, limit: int, step: int, more: int) -> int:
        """From `edge`, a frame of the shot, towards frame `limit` (0 or the last), by at least `more`
        frames where the shot allows: frames `step` apart are checked, a flagged step confirmed at full
        frame rate. Returns the shot's farthest frame found that way."""
        sign = 1 if limit > edge else -1
        far = [edge + sign * step * k for k in range(1, -(-more // step) + 1)]
        ids = sorted({edge, *(min(max(i, 0), self.n - 1) for i in far)})
        if len(ids) < 2:
            return edge
        cuts = cuts_from_features(frame_features(self.get(ids)))
        steps = cuts.nonzero()[:, 0].tolist()
        for j in steps[::-1] if sign < 0 else steps:  # the nearest to `edge` first
            found = self.cuts_in(ids[j], ids[j + 1])
            if found:
                return found[-1] if sign < 0 else found[0] - 1
        return ids[0] if sign < 0 else ids[-1]


def limit_to_shot(
    frames: torch.Tensor,
    ids: list[int],
    pick: Callable[[int], list[int]],
    read: Callable[[list[int]], torch.Tensor],
    num_frames: int,
    video: str | None = None,
) -> tuple[torch.Tensor, list[int], int, torch.Tensor]:
    """Keep a clip window inside one shot.

    frames: (F, H, W, 3) uint8 decoded at frame numbers `ids` of a video of `num_frames` frames. Cuts
    flagged among them are confirmed and placed at full frame rate (:meth:`ShotReader.cuts_in`); without
    a confirmed one the frames come back unchanged. Otherwise the window is re-drawn inside one shot:
    the longest cut-free stretch of the window, extended beyond the window's end it touches (decoding
    what that needs) until it spans the window's frames or meets a cut or the video's end; if it stays
    shorter, the stretch at the window's other end extended too, where longer. ``pick(n)``
    chooses F frame numbers in a shot of n frames (the loader's own sampling: the same stride when the
    shot is long enough, else a smaller one or a loop, as for a short video) and ``read(ids)`` decodes
    ascending unique frame numbers.

    Returns (frames, ids, cuts confirmed in the first window, cuts (F-1,) bool left in the returned
    frames): the loop seams (:func:`loop_seams`) and any cut still found (one missed between sparse
    frames), which the scores and the frame selection must not count. `video` names the file in the
    log line of :func:`detect_cuts`.
    """
    seams = loop_seams(ids)
    flagged = detect_cuts(frames, video=video) & ~seams
    if not flagged.any():
        return frames, ids, 0, seams
    reader = ShotReader(read, num_frames, frames, ids)
    starts = sorted({c for j in flagged.nonzero()[:, 0].tolist() for c in reader.cuts_in(ids[j], ids[j + 1])})
    if not starts:  # flashes and spread-out changes only
        return frames, ids, 0, seams
    first, last = min(ids), max(ids)
    span, step = last - first + 1, max(1, (last - first) // max(len(ids) - 1, 1))  # the window's stride
    bounds = [first, *starts, last + 1]
    shots = [(bounds[i], bounds[i + 1] - 1) for i in range(len(bounds) - 1)]  # (lo, hi) in the window

    def grown(shot: tuple[int, int]) -> tuple[int, int]:
        lo, hi = shot
        more = span - (hi - lo + 1)  # frames missing to span the window
        if more > 0 and lo == first:
            lo = reader.extend(lo, 0, step, more)
        elif more > 0 and hi == last:
            hi = reader.extend(hi, num_frames - 1, step, more)
        return lo, hi

    # The longest stretch (the earliest of equally long ones), grown; when that stays shorter than the
    # window, the stretch at the window's other end grown too, and the longer of the two.
    lo, hi = grown(min(shots, key=lambda s: (s[0] - s[1], s[0])))
    for other in (shots[0], shots[-1]):
        if hi - lo + 1 < span and not lo <= other[0] <= hi:
            olo, ohi = grown(other)
            if ohi - olo > hi - lo:
                lo, hi = olo, ohi
    new_ids = [lo + i for i in pick(hi - lo + 1)]
    new = reader.get(new_ids)
    return new, new_ids, len(starts), detect_cuts(new, video=video) | loop_seams(new_ids)


class CutStats:
    """Shot cuts met by the loader, aggregated in the main process (like the skipped files)."""

    def __init__(self) -> None:
        self.windows = 0  # clip windows that crossed a cut (and were limited to one shot)
        self.cuts = 0  # cuts in those windows
        self.videos: dict[str, int] = {}  # video -> windows limited, first seen first

    def update(self, events: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
        """Add one batch's (path, cuts) events; returns those of videos not seen with a cut before."""
        new = []
        for path, n in events:
            self.windows += 1
            self.cuts += n
            if path not in self.videos:
                new.append((path, n))
            self.videos[path] = self.videos.get(path, 0) + 1
        return new

    def state_dict(self) -> dict:
        return {"windows": self.windows, "cuts": self.cuts, "videos": list(self.videos.items())}

    def load_state_dict(self, sd: dict) -> None:
        self.windows, self.cuts = int(sd["windows"]), int(sd["cuts"])
        self.videos = dict(sd["videos"])

    def __repr__(self) -> str:
        return f"CutStats(windows={self.windows}, cuts={self.cuts}, videos={len(self.videos)})"
