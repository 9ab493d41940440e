"""What each motion score selects on the generator's camera options: the share of MATS's kept tokens
that lie on the moving object, for the pixel, embedding, compensated and compensated_zoom scores.

    PYTHONPATH=. python benchmarks/study_scores.py [--clips 12] [--cameras still,pan,zoom]

Clips from ``mats_scale.data.synth`` (rendered, no codec; 128x176, 16 frames 2 apart, tubelets of
2 x 16 x 16 = 88 tokens per tubelet), the camera still, panning (px/frame) or zooming (relative scale
change per frame) over the default coarse scene, optionally with a fine high-contrast texture. Kept =
MATS's visible + target tokens at rho_pre 0.3, rho 0.9. "object area" is the object's share of all
tokens (what a random pick gets); the most any score can reach is area / 0.3; "lift" = share / area
(1: no better than chance). The rest of the kept tokens lie on static scenery. ``embed`` is the
paper's score through a ViT-B patch embedding at its initialisation (random weights, seed 0; a
trained one differs) on ImageNet-normalised input. Also: the share of kept tokens the pixel and
compensated scores have in common. Markdown table on stdout.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mats_scale.config import IMAGENET_STD
from mats_scale.data import synth
from mats_scale.masking import (
    compensated_motion_scores,
    embed_motion_scores,
    mats_selection,
    pixel_motion_scores,
)
from mats_scale.models.layers import PatchEmbed3D

TUBELET, PATCH, STRIDE, FRAMES = 2, 16, 2, 16
CAMERAS = {
    "still": [dict(texture=t) for t in (0.0, 0.3, 0.5)],
    "pan": [dict(pan=p, texture=t) for t in (0.0, 0.3, 0.5) for p in (0.5, 1.0, 2.0)],
    "zoom": [dict(zoom=z, texture=t) for t in (0.0, 0.3) for z in (0.005, 0.01, 0.02)],
}
SCORES = ("pixel", "embed", "compensated", "compensated_zoom")


def kept(scores: torch.Tensor) -> torch.Tensor:
    sel = mats_selection(scores[None], 0.9, 0.3, torch.Generator().manual_seed(0))
    return torch.cat([sel.visible_ids, sel.target_ids], dim=1)[0]


def camera_label(setting: dict) -> str:
    if setting.get("pan"):
        return f"pan {setting['pan']}"
    if setting.get("zoom"):
        return f"zoom {setting['zoom']}"
    return "still"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=12, help="clips per setting")
    ap.add_argument("--cameras", default="still,pan,zoom", help=f"comma list of {', '.join(CAMERAS)}")
    args = ap.parse_args(argv)
    if args.clips < 1:
        ap.error("--clips must be >= 1")
    cameras = args.cameras.split(",")
    if not cameras or any(c not in CAMERAS for c in cameras):
        ap.error(f"--cameras={args.cameras}: a comma list of {', '.join(CAMERAS)}")
    torch.manual_seed(0)
    embed = PatchEmbed3D(in_chans=3, embed_dim=768, tubelet_size=TUBELET, patch_size=PATCH)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1) * 255.0
    fns = {
        "pixel": lambda v: pixel_motion_scores(v, TUBELET, PATCH),
        "embed": lambda v: embed_motion_scores(embed, v / std),  # the mean cancels in the differences
        "compensated": lambda v: compensated_motion_scores(v, TUBELET, PATCH),
        "compensated_zoom": lambda v: compensated_motion_scores(v, TUBELET, PATCH, zoom=True),
    }
    print(
        "| camera | texture | object area | share on object: pixel / embed / compensated / "
        "compensated_zoom | lift: pixel / embed / compensated / compensated_zoom | "
        "kept in common (pixel, compensated) |"
    )
    print("|---|---|---|---|---|---|")
    for camera in cameras:
        for setting in CAMERAS[camera]:
            params = synth.SynthParams(**setting)
            area, common = [], []
            share: dict[str, list[float]] = {k: [] for k in SCORES}
            for i in range(args.clips):
                frames, spec = synth.render_clip(params, "train", i)
                ids = list(range(0, FRAMES * STRIDE, STRIDE))
                v = torch.from_numpy(frames[ids]).permute(3, 0, 1, 2)[None].float()
                obj = torch.from_numpy(
                    synth.object_tokens(spec, ids, params.height, params.width, TUBELET, PATCH)
                )
                picks = {k: kept(f(v)[0]) for k, f in fns.items()}
                area.append(obj.float().mean().item())
                for k, p in picks.items():
                    share[k].append(obj[p].float().mean().item())
                kp, kc = picks["pixel"].tolist(), picks["compensated"].tolist()
                common.append(len(set(kp) & set(kc)) / len(kp))
            a = np.mean(area)
            s = {k: np.mean(v) for k, v in share.items()}
            print(
                f"| {camera_label(setting)} | {setting.get('texture', 0.0)} | {a:.3f} | "
                + " / ".join(f"{s[k]:.3f}" for k in SCORES)
                + " | "
                + " / ".join(f"{s[k] / a:.2f}" for k in SCORES)
                + f" | {np.mean(common):.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
