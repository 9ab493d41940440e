"""Video MAE pre-training (single process; clips generated in memory).

    python launchers/pretrain.py [--config FILE] [key=value ...]

Without --config the bundled default (configs/default.yaml) runs: a debug-size model that trains in
a few minutes on a CPU with a falling loss.
"""

from __future__ import annotations

import os
import sys
import time

from mats_scale.config import load_config_or_exit, parse_args

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "default.yaml")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    path, _ = parse_args(argv)
    if path is None:
        argv = ["--config", os.path.normpath(DEFAULT_CONFIG), *argv]
    cfg = load_config_or_exit(argv)

    import torch  # heavy imports only after the config is known to be valid

    from mats_scale.data.inmemory import moving_square_clips, normalize
    from mats_scale.masking import TokenGrid, tube_masking
    from mats_scale.models.pretrain import build_pretrain_model, count_params
    from mats_scale.optim import build_adamw, lr_at

    device = torch.device("cuda" if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.train.seed)
    model = build_pretrain_model(cfg.model, device=device)
    batch = cfg.data.batch_size
    total_batch = batch * cfg.optim.grad_accum
    opt = build_adamw(model, cfg.optim, total_batch)
    grid = TokenGrid.from_model(cfg.model)
    data_gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    mask_gen = torch.Generator().manual_seed(cfg.train.seed + 2)
    print(f"model {cfg.model.size}: {count_params(model) / 1e6:.2f}M params, grid {grid}, device {device}",
          flush=True)

    t0 = time.perf_counter()
    for step in range(cfg.train.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.train.steps, cfg.optim, total_batch)
        opt.zero_grad(set_to_none=True)
        for _ in range(cfg.optim.grad_accum):
            video, _ = moving_square_clips(batch, cfg.model.num_frames, cfg.model.img_size, data_gen)
            sel = tube_masking(grid, cfg.masking.ratio, batch, mask_gen)
            out = model(normalize(video).to(device), *(t.to(device) if t is not None else None for t in sel))
            if not torch.isfinite(out.loss):
                print(f"error: non-finite loss {out.loss.item()} at step {step}", file=sys.stderr)
                return 1
            (out.loss / cfg.optim.grad_accum).backward()
        if cfg.optim.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        opt.step()
        if step % cfg.logging.log_every == 0 or step == cfg.train.steps - 1:
            print(f"step {step:5d}  loss {out.loss.item():.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
