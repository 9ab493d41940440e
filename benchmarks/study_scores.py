"""What each motion score selects on the generator's camera options: the share of MATS's kept tokens
that lie on the moving object, for the pixel and the compensated score.

    PYTHONPATH=. python benchmarks/study_scores.py [--clips 12]

Clips from ``mats_scale.data.synth`` (rendered, no codec; 128x176, 16 frames 2 apart, tubelets of
2 x 16 x 16 = 88 tokens per tubelet), the camera still or panning (px/frame) over the default coarse
scene, optionally with a fine high-contrast texture. Kept = MATS's visible + target tokens at
rho_pre 0.3, rho 0.9. "object area" is the object's share of all tokens (what a random pick gets);
the most any score can reach is area / 0.3. Also: the share of kept tokens the two scores have in
common. Markdown table on stdout.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mats_scale.data import synth
from mats_scale.masking import compensated_motion_scores, mats_selection, pixel_motion_scores

TUBELET, PATCH, STRIDE, FRAMES = 2, 16, 2, 16


def object_tokens(spec: synth.ClipSpec, ids: list[int], height: int, width: int) -> torch.Tensor:
    """(N,) bool: tokens whose tubelet-patch holds part of the object in any of its frames."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    cover = np.stack(
        [
            synth._coverage(
                spec.shape, ys + 0.5 - spec.centers[f][0], xs + 0.5 - spec.centers[f][1], spec.radius
            )
            > 0.5
            for f in ids
        ]
    )
    m = torch.from_numpy(cover).view(
        len(ids) // TUBELET, TUBELET, height // PATCH, PATCH, width // PATCH, PATCH
    )
    return m.any(dim=(1, 3, 5)).flatten()


def kept(scores: torch.Tensor) -> torch.Tensor:
    sel = mats_selection(scores[None], 0.9, 0.3, torch.Generator().manual_seed(0))
    return torch.cat([sel.visible_ids, sel.target_ids], dim=1)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=12, help="clips per setting")
    args = ap.parse_args(argv)
    if args.clips < 1:
        ap.error("--clips must be >= 1")
    print(
        "| camera (px/frame) | texture | object area | pixel: share on object | compensated | "
        "ratio | kept in common |"
    )
    print("|---|---|---|---|---|---|---|")
    for texture in (0.0, 0.3, 0.5):
        for pan in (0.0, 0.5, 1.0, 2.0):
            params = synth.SynthParams(pan=pan, texture=texture)
            area, pix, comp, common = [], [], [], []
            for i in range(args.clips):
                frames, spec = synth.render_clip(params, "train", i)
                ids = list(range(0, FRAMES * STRIDE, STRIDE))
                v = torch.from_numpy(frames[ids]).permute(3, 0, 1, 2)[None].float()
                obj = object_tokens(spec, ids, params.height, params.width)
                kp = kept(pixel_motion_scores(v, TUBELET, PATCH)[0])
                kc = kept(compensated_motion_scores(v, TUBELET, PATCH)[0])
                area.append(obj.float().mean().item())
                pix.append(obj[kp].float().mean().item())
                comp.append(obj[kc].float().mean().item())
                common.append(len(set(kp.tolist()) & set(kc.tolist())) / len(kp))
            camera = "still" if pan == 0 else f"pan {pan}"
            print(
                f"| {camera} | {texture} | {np.mean(area):.3f} | {np.mean(pix):.3f} | "
                f"{np.mean(comp):.3f} | {np.mean(comp) / np.mean(pix):.2f} | {np.mean(common):.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
