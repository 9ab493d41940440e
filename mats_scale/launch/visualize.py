"""Reconstruction picture of pre-trained video MAEs: input, visible tokens, targets, reconstruction.

    mats-visualize RUN_OR_CHECKPOINT [RUN_OR_CHECKPOINT ...] [--video FILE | --index N]
        [--split val|train] [--seed 0] [--out visualize.png] [--device auto|cpu|cuda] [--scale K]
        [--config FILE] [--data-root DIR] [key=value ...]

Also ``python -m mats_scale.launch.visualize``. Each checkpoint (a run directory: its newest verified
checkpoint; a ``step_*`` checkpoint directory; or a ``.pt`` written by ``mats-export``, which needs
``--config RUN/config.yaml``) gets one block of four rows, one column per tubelet (its first frame):

    input           the clip as the model sees it (ImageNet normalisation undone)
    visible         the tokens the encoder sees; the others grey
    targets         the patches the loss is taken on (loss weight > 0); the others grey
    reconstruction  the decoder's prediction at the targets (de-normalised with each target patch's own
                    per-channel mean and std when the model uses normalised pixel targets, as VideoMAE's
                    pictures do); elsewhere the input, dimmed

The model and masking come from the config the checkpoint recorded; the tokens are chosen by
``PretrainTask.step`` itself (motion scores, ``select_tokens``, the model call; eval mode, no
gradient, fp32), with a mask generator seeded by ``--seed``, so every checkpoint of the same preset
sees the same draw. The clip is the test view the evaluation reads (centre clip, short-side resize,
centre crop; adaptive frame selection is not applied) of ``--video FILE`` or of video ``--index N``
(default 0) of the run's ``--split`` (default val); ``data.dataset=synthetic`` runs render in-memory
clip N. ``key=value`` overrides (e.g. ``data.root=DIR`` when the run was made on another machine) are
applied to every checkpoint's config. Prints the loss on the targets and the token counts of each
block, then the path of the PNG. A bad argument is one ``error:`` line on stderr and exit status 2.

Example:

    mats-visualize runs/tube runs/mats_dual --index 3 --out recon.png
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from mats_scale import tokens
from mats_scale.cli import out_dir_problem, prog_name
from mats_scale.config import Config, ConfigError, load_config

ROWS = ("input", "visible", "targets", "reconstruction")
GREY = 128  # uint8 value of a patch that a row does not show
DIM = 0.4  # brightness factor of the input under the reconstruction's non-target patches
LABEL_W = 120  # px: the row-label column
HEADER_H = 20  # px: one text line above each block
GAP = 2  # px: white space after every cell (right and below)


class UserError(Exception):
    """A bad argument: printed as one ``error:`` line, exit status 2."""


@dataclass
class Loaded:
    """One pre-training checkpoint, ready to run."""

    path: str
    cfg: Config
    model: torch.nn.Module
    step: int | None  # None for an exported .pt (the step is not recorded there)

    @property
    def label(self) -> str:
        m = self.cfg.masking
        preset = tokens.preset_of(m) or m.strategy
        if m.strategy == "mats" and m.context_ratio:
            preset += f" + context {m.context_ratio:g}"
        return f"{preset} step {self.step if self.step is not None else '?'}"


@dataclass
class Picture:
    """What one checkpoint did on the clip: rows (4, T', 3, H, W) uint8 and the numbers printed."""

    rows: torch.Tensor
    loss: float
    visible_ids: torch.Tensor  # (Nv,) int64
    loss_ids: torch.Tensor  # (n,) int64: targets with loss weight > 0
    num_predicted: int  # mask tokens the decoder ran (targets incl. zero-weight ones)


# ---- checkpoints ---------------------------------------------------------------------------------
def config_of(text_or_path: str, overrides: list[str], *, is_text: bool) -> Config:
    """The recorded config (YAML text, or a file) with `overrides` on top, validated like a launcher's."""
    try:
        if is_text:
            return load_config(None, overrides, text=text_or_path)
        return load_config(text_or_path, overrides)
    except ConfigError as e:
        raise UserError(f"config: {e}") from None


NOT_PRETRAIN = (
    "; the picture needs a pre-training checkpoint (a run of launchers/pretrain.py: its run directory, "
    "a step_* checkpoint, or a .pt exported from it)"
)


def read_checkpoint(path: str, config: str | None, overrides: list[str]) -> tuple[Config, dict, int | None]:
    """(config, fp32 state dict, step) of `path`; UserError for anything that is not a pre-training one."""
    from mats_scale.models.load import InitError, strip_prefixes
    from mats_scale.parallel.engine import consolidate_checkpoint
    from mats_scale.run.checkpoint import CheckpointError, read_meta
    from mats_scale.safe_load import UnsafeFileError
    from mats_scale.train.export import find_checkpoint, read_weights

    if os.path.isdir(path):
        try:
            ckpt = find_checkpoint(path)  # newest of a run directory, verified against its manifest
            meta = read_meta(ckpt)
        except (OSError, CheckpointError) as e:
            raise UserError(str(e)) from None
        if meta.get("task") != "pretrain":
            raise UserError(f"{ckpt}: a {meta.get('task')!r} checkpoint{NOT_PRETRAIN}")
        cfg = config_of(meta["config"], overrides, is_text=True)
        try:
            sd = consolidate_checkpoint(meta["backend"], str(ckpt / "engine"))
        except UnsafeFileError as e:
            raise UserError(str(e)) from None
        return cfg, sd, int(meta["step"])
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or directory (a run directory, a step_* checkpoint or a .pt)")
    if config is None:
        raise UserError(
            f"{path}: an exported .pt does not record its config: add --config RUN_DIR/config.yaml "
            "(the run's), or pass the run directory instead"
        )
    try:
        sd, _ = read_weights(path)
    except InitError as e:
        raise UserError(str(e).removeprefix("finetune.init=")) from None
    sd = {strip_prefixes(k): v for k, v in sd.items()}
    if "mask_token" not in sd:
        kind = "a fine-tuned classifier" if "head.weight" in sd else "no pre-training decoder (mask_token)"
        raise UserError(f"{path}: {kind}{NOT_PRETRAIN}")
    return config_of(config, overrides, is_text=False), sd, None


def load(path: str, config: str | None, overrides: list[str], device: torch.device) -> Loaded:
    from mats_scale.models.spec import build_model
    from mats_scale.train.pretrain import PretrainTask

    cfg, sd, step = read_checkpoint(path, config, overrides)
    model = build_model(PretrainTask(cfg).model_spec(), device, init=False)
    model.reset_buffers()  # the non-persistent sin-cos tables and pixel statistics
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(
            f"{path}: the weights do not fit model.size={cfg.model.size} of its config "
            f"({first[1].strip() if len(first) > 1 else first[0]})"
        ) from None
    return Loaded(path, cfg, model.eval(), step)


# ---- the clip ------------------------------------------------------------------------------------
def read_clip(
    cfg: Config, video: str | None, index: int, split: str, seed: int
) -> tuple[dict[str, Any], str]:
    """A batch of one clip for `cfg`'s model ({"video": (1, 3, T, S, S)}) and where it came from."""
    from mats_scale.data import synth
    from mats_scale.data.errors import DataError, VideoReadError
    from mats_scale.data.sources import SYNTHETIC_CLIPS, bundled_root, resolve_items
    from mats_scale.data.video import read_eval_views

    d, m = cfg.data, cfg.model
    if video is None and d.dataset == "synthetic":
        from mats_scale.data.clips import TrainClips

        if index >= SYNTHETIC_CLIPS:
            raise UserError(f"--index {index}: data.dataset=synthetic has clips 0..{SYNTHETIC_CLIPS - 1}")
        # In-memory moving squares: item (epoch 0, pos N, index N) is a pure function of the seed.
        clips = TrainClips.from_config(cfg, None, seed=seed)
        clip = clips[(0, index, index)]["video"][:1]  # (1, 3, T, S, S) uint8
        return {"video": clip}, f"synthetic clip {index} (seed {seed})"
    if video is None:
        if d.dataset == "bundled" and not synth.is_complete(bundled_root(cfg)):
            raise UserError(
                f"data.root={bundled_root(cfg)!r}: no bundled dataset there (the run was made elsewhere?): "
                "pass --data-root DIR (or data.root=DIR) where it is, or --video FILE"
            )
        try:
            items = resolve_items(cfg, split)
        except DataError as e:
            raise UserError(f"--split {split}: {e}") from None
        if not 0 <= index < len(items):
            raise UserError(
                f"--index {index}: the {split} split has {len(items)} videos (allowed 0..{len(items) - 1})"
            )
        video, what = items[index].path, f"{split} video {index}"
    else:
        what = "--video"
    try:
        views = read_eval_views(
            video,
            length=m.num_frames,
            rate=d.sampling_rate,
            size=m.img_size,
            segments=d.segment_sampling,
            min_frames=d.min_frames,
            decoder=d.decoder,
        )  # (1, 3, T, S, S) float32, ImageNet-normalised: the evaluation's centre view
    except VideoReadError as e:
        raise UserError(
            f"{what} {e.path}: {e.reason} (a video file that decord or PyAV reads, "
            f"with at least model.num_frames={m.num_frames} frames)"
        ) from None
    return {"video": views}, f"{what} {video}"


# ---- the model's own selection and forward -------------------------------------------------------
class _Recorder:
    """Just enough of the Engine protocol for ``PretrainTask.step`` in one process, fp32 and no
    optimizer; remembers the model call (video, visible_ids, target_ids, target_weights) and output."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.module, self.env = model, SimpleNamespace(device=device)
        self.call: tuple = ()
        self.out: Any = None

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward(self, *args: Any) -> Any:
        self.call, self.out = args, self.module(*args)
        return self.out


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def token_pixels(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """(T', H', W') bool per token -> (T', 1, H, W) per pixel, to broadcast over RGB."""
    return mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, None]


@torch.no_grad()
def picture(run: Loaded, batch: dict[str, Any], seed: int, device: torch.device) -> Picture:
    from mats_scale.models.layers import gather_patches
    from mats_scale.train.pretrain import PretrainTask

    task, model = PretrainTask(run.cfg), run.model
    engine = _Recorder(model, device)
    out = task.step(engine, batch, torch.Generator(device=device).manual_seed(seed))
    video, vis, tgt, weights = engine.call  # (1, C, T, H, W); ids (1, Nv), (1, Nt); weights (1, Nt) or None
    pred = engine.out.pred.float()  # (1, Nt, t*p*p*C)
    t, p, C = model.tubelet_size, model.patch_size, model.in_chans
    grid = task.grid
    # Loss positions: weight > 0 (reference mode's encoder-seen positions and lean mode's pads weigh 0).
    keep = torch.ones_like(tgt[0], dtype=torch.bool) if weights is None else weights[0] > 0  # (Nt,)
    loss_ids = tgt[0][keep]  # (n,)

    # Pixels in [0, 1]: (C, T, H, W) -> one frame per tubelet, (T', C, H, W).
    mean, std = model.pixel_mean.view(C, 1, 1, 1), model.pixel_std.view(C, 1, 1, 1)
    frames = (video[0].float() * std + mean).clamp(0, 1)
    shown = frames[:, ::t].transpose(0, 1)  # (T', C, H, W)

    # Reconstruction: targets (t p q c) -> pixels; norm_pix_loss predicts (x - mean) / (std + 1e-6) per
    # patch and channel (models.pretrain.pixel_targets), undone with the true patch's own statistics.
    raw = gather_patches(video.float(), tgt, t, p).view(1, tgt.shape[1], C, -1)  # (1, Nt, C, t*p*p)
    raw = raw * model.pixel_std + model.pixel_mean
    rec = pred.view(1, tgt.shape[1], -1, C).transpose(-1, -2)  # (1, Nt, C, t*p*p)
    if model.norm_pix_loss:
        sigma = raw.var(dim=-1, unbiased=True, keepdim=True).sqrt() + 1e-6
        rec = rec * sigma + raw.mean(dim=-1, keepdim=True)
    canvas = (frames * DIM).contiguous()  # non-target patches: the input, dimmed
    cells = canvas.view(C, grid.t, t, grid.h, p, grid.w, p)  # a view: assigning into it paints `canvas`
    ti, hi, wi = loss_ids // grid.spatial, (loss_ids // grid.w) % grid.h, loss_ids % grid.w
    # Advanced indices on dims 1, 3, 5 (separated by slices) put the token dim first: (n, C, t, p, p).
    cells[:, ti, :, hi, :, wi, :] = rec[0][keep].view(-1, C, t, p, p).clamp(0, 1)
    recon = canvas[:, ::t].transpose(0, 1)  # (T', C, H, W)

    def only(ids: torch.Tensor) -> torch.Tensor:
        """The input at tokens `ids`, GREY elsewhere: (T', C, H, W) uint8."""
        mask = torch.zeros(grid.num_tokens, dtype=torch.bool, device=ids.device).scatter_(0, ids, True)
        px = token_pixels(mask.view(grid.t, grid.h, grid.w), p)
        return torch.where(px, to_uint8(shown), torch.full_like(to_uint8(shown), GREY))

    rows = torch.stack([to_uint8(shown), only(vis[0]), only(loss_ids), to_uint8(recon)]).cpu()
    return Picture(rows, float(out.loss), vis[0].cpu(), loss_ids.cpu(), tgt.shape[1])


# ---- the PNG -------------------------------------------------------------------------------------
def block_size(columns: int, cell: int) -> tuple[int, int]:
    """(width, height) px of one checkpoint's block of len(ROWS) rows x `columns` cells of `cell` px."""
    return LABEL_W + columns * (cell + GAP), HEADER_H + len(ROWS) * (cell + GAP)


def render(blocks: list[tuple[str, torch.Tensor]], scale: int):
    """PIL image of [(header text, rows (4, T', 3, H, W) uint8)], blocks stacked top to bottom."""
    from PIL import Image, ImageDraw

    sizes = [block_size(r.shape[1], r.shape[-1] * scale) for _, r in blocks]
    img = Image.new("RGB", (max(w for w, _ in sizes), sum(h for _, h in sizes)), "white")
    draw = ImageDraw.Draw(img)
    y = 0
    for (header, rows), (_, height) in zip(blocks, sizes, strict=True):
        draw.text((4, y + 4), header, fill="black")
        cell = rows.shape[-1] * scale
        for r, name in enumerate(ROWS):
            top = y + HEADER_H + r * (cell + GAP)
            draw.text((4, top + cell // 2 - 6), name, fill="black")
            for c in range(rows.shape[1]):
                # (3, H, W) -> (H*scale, W*scale, 3), nearest-neighbour so patch edges stay sharp.
                px = rows[r, c].repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0)
                img.paste(Image.fromarray(px.contiguous().numpy()), (LABEL_W + c * (cell + GAP), top))
        y += height
    return img


# ---- command line --------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UserError(f"{message} (see --help)")


def parse(argv: list[str]) -> argparse.Namespace:
    ap = _Parser(
        prog=prog_name("mats_scale.launch.visualize"),
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "items",
        nargs="*",
        metavar="CHECKPOINT | key=value",
        help="pre-training checkpoints (run directory, step_* directory, exported .pt), one block each; "
        "key=value: a config override for every checkpoint, e.g. data.root=/data/bundled",
    )
    ap.add_argument(
        "--ckpt", action="append", default=[], help="a checkpoint (as a positional one; repeatable)"
    )
    clip = ap.add_mutually_exclusive_group()
    clip.add_argument("--video", help="a video file to show instead of the run's dataset")
    clip.add_argument("--index", type=int, default=0, help="video N of the run's --split (default 0)")
    ap.add_argument("--split", choices=["val", "train"], default="val", help="dataset split (default val)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the mask generator (and synthetic clips)")
    ap.add_argument("--out", default="visualize.png", help="PNG to write (default: visualize.png)")
    ap.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present"
    )
    ap.add_argument(
        "--scale", type=int, default=0, help="pixels per input pixel (default: 128 // img_size, >= 1)"
    )
    ap.add_argument("--config", help="the run's config.yaml, for an exported .pt (records no config)")
    ap.add_argument("--data-root", help="where the run's data is now (same as data.root=DIR)")
    # `--ckpt X` is a positional X, so that the blocks follow the command line's order whichever form
    # each checkpoint takes (argparse would collect the two kinds in separate lists).
    flat, rest = [], list(argv)
    while rest:
        a = rest.pop(0)
        if a == "--ckpt" and rest and not rest[0].startswith("-"):
            flat.append(rest.pop(0))
        else:
            flat.append(a.removeprefix("--ckpt=") if a.startswith("--ckpt=") and len(a) > 7 else a)
    args = ap.parse_intermixed_args(flat)
    args.overrides = [a for a in args.items if "=" in a]
    args.ckpts = [a for a in args.items if "=" not in a]
    if args.data_root:
        args.overrides.append(f"data.root={args.data_root}")
    if not args.ckpts:
        raise UserError("no checkpoint given: pass a run directory, a step_* checkpoint or an exported .pt")
    if args.index < 0:
        raise UserError(f"--index {args.index}: must be >= 0")
    if args.scale < 0:
        raise UserError(f"--scale {args.scale}: must be >= 1 (0: automatic)")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.path.isdir(out_dir):
        raise UserError(
            f"--out {args.out}: needs a file name in an existing directory ({out_dir} is not one)"
        )
    if problem := out_dir_problem(out_dir):
        raise UserError(f"--out {args.out}: {out_dir}: {problem}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here (use --device cpu)")
    return args


def run(args: argparse.Namespace) -> Path:
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    blocks = []
    for path in args.ckpts:
        ckpt = load(path, args.config, args.overrides, device)
        batch, source = read_clip(ckpt.cfg, args.video, args.index, args.split, args.seed)
        pic = picture(ckpt, batch, args.seed, device)
        n = tokens.TokenGrid.from_model(ckpt.cfg.model).num_tokens
        text = (
            f"{ckpt.label}: loss {pic.loss:.4f} on {pic.loss_ids.numel()} target tokens; visible "
            f"{pic.visible_ids.numel()} / {n} tokens; decoder predicts {pic.num_predicted}"
        )
        print(f"{path} ({source}): {text}")
        blocks.append(
            (
                # " | ": PIL's default bitmap font draws spaces narrow.
                f"{ckpt.label} | loss {pic.loss:.4f} | visible {pic.visible_ids.numel()}/{n} | "
                f"targets {pic.loss_ids.numel()}",
                pic.rows,
            )
        )
    scale = args.scale or max(1, 128 // blocks[0][1].shape[-1])
    try:
        render(blocks, scale).save(args.out)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot write the PNG ({e.strerror or e})") from None
    print(f"wrote {args.out}")
    return Path(args.out)


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse(list(sys.argv[1:] if argv is None else argv)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
