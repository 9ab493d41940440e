"""mats-synth: generate the bundled sample dataset (procedurally moving objects over textured static
backgrounds).

    mats-synth OUT_DIR [--num-train 400] [--num-val 80] [--seed 0] [--frames 32]
        [--height 128] [--width 176] [--codec libx264] [--workers 2]
        [--pan 0] [--zoom 0] [--texture 0] [--cut] [--fast-object 0] [--flash]

Also ``python -m mats_scale.launch.synth``. Writes ``OUT_DIR/{train,val}/NNNNNN.mp4``, the list files
``train.txt`` / ``val.txt``, ``classes.txt`` and last ``meta.json``; :mod:`mats_scale.data.synth`
describes the classes, the scenes and the camera options.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from mats_scale.cli import command_parser, run
from mats_scale.data.synth import SynthParams, generate


def main(argv: Sequence[str] | None = None) -> int:
    return run(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    d = SynthParams()
    ap = command_parser("mats_scale.launch.synth", __doc__, summary=True)
    ap.add_argument("out_dir")
    ap.add_argument("--num-train", type=int, default=d.num_train)
    ap.add_argument("--num-val", type=int, default=d.num_val)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--frames", type=int, default=d.frames, help="frames per clip")
    ap.add_argument("--height", type=int, default=d.height)
    ap.add_argument("--width", type=int, default=d.width)
    ap.add_argument("--fps", type=int, default=d.fps)
    ap.add_argument("--codec", choices=["libx264", "mpeg4"], default=d.codec)
    ap.add_argument("--crf", type=int, default=d.crf, help="libx264 constant rate factor")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="encoding processes")
    ap.add_argument("--pan", type=float, default=d.pan, help="camera pan, px per frame (direction per clip)")
    ap.add_argument("--zoom", type=float, default=d.zoom, help="camera zoom, relative scale change per frame")
    ap.add_argument("--texture", type=float, default=d.texture, help="fine high-contrast texture amplitude")
    ap.add_argument("--cut", action="store_true", help="one hard cut per clip, to another scene and object")
    ap.add_argument(
        "--fast-object",
        type=float,
        default=d.fast_object,
        help="a large box crossing the screen, px per frame",
    )
    ap.add_argument("--flash", action="store_true", help="one frame per clip brightened towards white")
    a = ap.parse_args(argv)
    if a.workers < 1:
        ap.error(f"--workers={a.workers}: must be >= 1")
    params = SynthParams(
        num_train=a.num_train,
        num_val=a.num_val,
        seed=a.seed,
        frames=a.frames,
        height=a.height,
        width=a.width,
        fps=a.fps,
        codec=a.codec,
        crf=a.crf,
        pan=a.pan,
        zoom=a.zoom,
        texture=a.texture,
        cut=a.cut,
        fast_object=a.fast_object,
        flash=a.flash,
    )
    try:
        params.check()
    except ValueError as e:
        ap.error(str(e))
    generate(a.out_dir, params, workers=a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
