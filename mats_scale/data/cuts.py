"""Hard shot cuts in decoded clips, found cheaply on the frames the loader decodes anyway.

A cut is a frame step that changes the colour distribution of the picture a lot, both in absolute
terms and against the clip's typical step. Per frame: average-pool to about :data:`CUT_SIDE` px on the
short side, then a joint RGB histogram of :data:`CUT_LEVELS`^3 bins with linear (soft) binning, so a
small brightness change never flips pixels across a bin edge at once. The change between consecutive
frames is the total-variation distance of their histograms, in [0, 1] (the fraction of the picture
whose colour moved elsewhere). A colour histogram ignores where things are, so camera pans, zooms and
moving objects barely change it (the classic shot-boundary cue), while a new shot changes it: step j
is a cut when its distance is >= ``max(min_change, ratio * median of the clip's steps below
min_change)``. The absolute threshold decides; the median, taken over the steps that are no cut by
that threshold alone, only raises the bar in a clip whose ordinary steps are already large, so the
rule still works when most steps are cuts (rapid-cut footage: a median over all steps would be a
cut's size and hide every cut). A clip with more than half its steps cut is logged once (WARNING).

Measured on the bundled generator's clips (``synth.SynthParams(cut=True, ...)``, frame strides 1, 2
and 4): every cut step >= 0.18 (>= 0.19 over 120 still-camera cut clips, 10th percentile 0.31-0.50),
every other step <= 0.14 even with pans of 4 px/frame over high-contrast texture, <= 0.03 with a
still camera; hence :data:`CUT_MIN_CHANGE` 0.15 with :data:`CUT_RATIO` 3 (a clip whose ordinary steps
change a lot anyway needs a bigger jump). Gradual transitions (fades, dissolves) are not cuts here, and a cut
between two shots of very similar colours can be missed. Not yet measured on real footage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torchvision.transforms.v2 import functional as TF

CUT_SIDE = 32
"""Short side (px) the frames are pooled to before their histograms are taken."""
CUT_LEVELS = 4
"""Histogram bins per colour channel (4^3 = 64 joint bins)."""
CUT_MIN_CHANGE = 0.15
"""A cut moves at least this fraction of the histogram mass."""
CUT_RATIO = 3.0
"""... and at least this many times the clip's median step among those below :data:`CUT_MIN_CHANGE`."""

log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # videos whose extreme cut rate was logged (once per process)


def colour_histograms(frames: torch.Tensor, side: int = CUT_SIDE, levels: int = CUT_LEVELS) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F, levels^3) float32 soft joint RGB histograms summing to 1, of the
    frames shrunk by an integer factor to about `side` px on the short side (torchvision's antialiased
    uint8 resize: 8x faster here than pooling a float copy of the frames)."""
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected decoded frames (F, H, W, 3), got shape {tuple(frames.shape)}")
    n, H, W, _ = frames.shape
    rgb = frames.permute(0, 3, 1, 2)  # (F, 3, H, W) uint8 view
    k = max(1, min(H, W) // side)
    if k > 1:
        rgb = TF.resize(rgb, [H // k, W // k], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    rgb = rgb.float()
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


def frame_changes(frames: torch.Tensor) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (F-1,) float32 histogram distance of consecutive frames, in [0, 1]."""
    if frames.shape[0] < 2:
        return torch.zeros(0)
    h = colour_histograms(frames)
    return 0.5 * (h[1:] - h[:-1]).abs().sum(dim=1)


def cuts_from_changes(
    d: torch.Tensor, *, min_change: float = CUT_MIN_CHANGE, ratio: float = CUT_RATIO
) -> torch.Tensor:
    """(F-1,) step distances -> (F-1,) bool: ``d >= max(min_change, ratio * median(d[d < min_change]))``."""
    quiet = d[d < min_change]  # the steps that are no cut by the absolute threshold alone
    floor = max(min_change, ratio * float(quiet.median())) if quiet.numel() else min_change
    return d >= floor


def detect_cuts(
    frames: torch.Tensor,
    *,
    min_change: float = CUT_MIN_CHANGE,
    ratio: float = CUT_RATIO,
    video: str | None = None,
) -> torch.Tensor:
    """(F, H, W, 3) uint8 decoded frames -> (F-1,) bool: True where frame j+1 starts a new shot.

    More than half the steps cut (at least 2) logs one WARNING, once per `video` when it is named."""
    d = frame_changes(frames)
    if d.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    cuts = cuts_from_changes(d, min_change=min_change, ratio=ratio)
    n = int(cuts.sum())
    if n >= 2 and 2 * n > d.numel() and (video is None or video not in _WARNED):
        if video is not None:
            _WARNED.add(video)
        log.warning(
            "%d of %d frame steps are shot cuts in %s (rapid-cut footage?): cut handling treats each such "
            "step as a cut, so its windows are limited to the longest cut-free stretch "
            "(data.shot_cuts=ignore turns that off)",
            n,
            d.numel(),
            video if video is not None else "a decoded clip",
        )
    return cuts


def longest_shot(cuts: torch.Tensor) -> tuple[int, int]:
    """(F-1,) bool cuts -> (first, last) positions (inclusive) of the longest run of frames without a
    cut between them; the earliest of equally long runs."""
    bounds = [0] + [j + 1 for j in cuts.nonzero()[:, 0].tolist()] + [cuts.numel() + 1]
    runs = [(bounds[i + 1] - bounds[i], -bounds[i]) for i in range(len(bounds) - 1)]
    length, neg_start = max(runs)
    return -neg_start, -neg_start + length - 1


def cuts_between(cuts: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Cuts (F-1,) between decoded frames -> cuts (K-1,) between the kept frames `keep` (K,) ascending
    (a step of the kept frames crosses a cut when any decoded step it spans is one)."""
    crossed = torch.cat([torch.zeros(1, dtype=torch.long), cuts.long().cumsum(0)])  # cuts before frame f
    return crossed[keep[1:]] > crossed[keep[:-1]]


def limit_to_shot(
    frames: torch.Tensor,
    ids: list[int],
    pick: Callable[[int], list[int]],
    read: Callable[[list[int]], torch.Tensor],
    video: str | None = None,
) -> tuple[torch.Tensor, list[int], int, torch.Tensor]:
    """Keep a clip window inside one shot.

    frames: (F, H, W, 3) uint8 decoded at video frame numbers `ids`. Without a cut among them they
    come back unchanged. Otherwise the window is re-drawn inside the longest cut-free stretch of the
    decoded frames, video frames ``lo..hi``: ``pick(n)`` chooses F frame numbers in a video of
    n = hi - lo + 1 frames (the loader's own sampling, so a short stretch gets a smaller stride, or
    loops, as a short video does), and ``read(ids)`` decodes them. That costs a second decode, only
    for windows that met a cut.

    Returns (frames, ids, cuts met in the first window, cuts (F-1,) bool still found in the returned
    frames): the second is normally all False; what it holds (a cut missed between the sparse first
    frames, a loop across shots) the scores and the frame selection must not count. `video` names the
    file in the log line of :func:`detect_cuts`.
    """
    cuts = detect_cuts(frames, video=video)
    met = int(cuts.sum())
    if not met:
        return frames, ids, 0, cuts
    first, last = longest_shot(cuts)
    lo, hi = min(ids[first : last + 1]), max(ids[first : last + 1])
    new_ids = [lo + i for i in pick(hi - lo + 1)]
    frames = read(new_ids)
    return frames, new_ids, met, detect_cuts(frames, video=video)


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
