"""Fine-tuning model, MATS selection, initialisation from checkpoints and the layer-decay recipe (CPU)."""

from __future__ import annotations

import pytest
import torch

from mats_scale.config import load_config
from mats_scale.masking.mats import finetune_selection
from mats_scale.models.args import ModelArgs
from mats_scale.models.classifier import VideoClassifier, build_classifier
from mats_scale.models.load import InitError, export_videomae, map_state, unwrap
from mats_scale.models.pretrain import build_pretrain_model
from mats_scale.optim import layer_decay_groups, optimizer_groups, set_lr
from mats_scale.train.export import read_weights

ARGS = ModelArgs(size="debug", num_frames=4, img_size=32, attn_impl="math")  # grid 2 x 2 x 2 = 8 tokens
K = 5


def model(**kw) -> VideoClassifier:
    torch.manual_seed(0)
    return build_classifier(ARGS, K, **kw).eval()


def clip(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randn(
        batch, 3, ARGS.num_frames, ARGS.img_size, ARGS.img_size, generator=torch.Generator().manual_seed(seed)
    )


def token_pixels(ids: torch.Tensor) -> torch.Tensor:
    """(B, n) token ids -> (B, 1, T, H, W) bool mask of their pixels (tubelet 2, patch 16, grid 2x2x2)."""
    B = ids.shape[0]
    mask = torch.zeros(B, 1, ARGS.num_frames, ARGS.img_size, ARGS.img_size, dtype=torch.bool)
    t, p = ARGS.tubelet_size, ARGS.patch
    _, gh, gw = ARGS.grid
    for b in range(B):
        for i in ids[b].tolist():
            tt, hh, ww = i // (gh * gw), (i // gw) % gh, i % gw
            mask[b, :, tt * t : (tt + 1) * t, hh * p : (hh + 1) * p, ww * p : (ww + 1) * p] = True
    return mask


# ---- MATS selection in fine-tuning ----------------------------------------------------------------
def test_selection_keeps_exactly_the_top_rho_post_tokens():
    scores = torch.rand(3, 1568, generator=torch.Generator().manual_seed(1))
    ids = finetune_selection(scores, 0.6)
    assert ids.shape == (3, int(0.6 * 1568))
    for b in range(3):
        top = set(scores[b].topk(int(0.6 * 1568)).indices.tolist())
        assert set(ids[b].tolist()) == top
        kept = scores[b, ids[b]]
        dropped = scores[b][~torch.isin(torch.arange(1568), ids[b])]
        assert kept.min() >= dropped.max()
    assert torch.equal(finetune_selection(scores, 0.6), ids)  # deterministic
    assert torch.equal(finetune_selection(scores, 0.6, keep_all=True)[0], torch.arange(1568))


def test_dropped_tokens_do_not_change_the_logits():
    m, video = model(), clip()
    ids = finetune_selection(m.motion_scores(video), 0.5)  # 4 of 8 tokens
    assert ids.shape == (2, 4)
    logits = m(video, ids)
    dropped = ~token_pixels(ids)
    noisy = torch.where(dropped, video + 5 * torch.randn_like(video), video)
    assert torch.equal(m(noisy, ids), logits)
    kept_changed = torch.where(~dropped, video + 5 * torch.randn_like(video), video)
    assert not torch.allclose(m(kept_changed, ids), logits)


def test_all_tokens_equals_selecting_every_token():
    m, video = model(), clip()
    every = torch.arange(ARGS.num_tokens).expand(2, -1)
    torch.testing.assert_close(m(video, None), m(video, every))


def test_eval_switch_chooses_selected_or_all_tokens():
    from mats_scale.train.finetune import FinetuneTask

    class Eng:  # the engine surface FinetuneTask.select uses
        def __init__(self, module):
            self.module = module

        def autocast(self):
            import contextlib

            return contextlib.nullcontext()

    cfg = load_config(
        None, ["model.size=debug", "model.num_frames=4", "model.img_size=32", "finetune.num_classes=5"]
    )
    task, video, m = FinetuneTask(cfg), clip(), model()
    assert task.select(Eng(m), video, keep_all=True) is None
    ids = task.select(Eng(m), video, keep_all=False)
    assert torch.equal(ids, finetune_selection(m.motion_scores(video), cfg.masking.finetune_keep_ratio))


# ---- layer-wise lr decay and weight decay -----------------------------------------------------------
def videomae_layer_id(var_name: str, num_max_layer: int) -> int:
    # Transcribed from VideoMAE optim_factory.py, get_num_layer_for_vit (num_max_layer = depth + 2).
    if var_name in ("cls_token", "mask_token", "pos_embed") or var_name.startswith("patch_embed"):
        return 0
    elif var_name.startswith("rel_pos_bias"):
        return num_max_layer - 1
    elif var_name.startswith("blocks"):
        return int(var_name.split(".")[1]) + 1
    else:
        return num_max_layer - 1


def test_layer_decay_multipliers_per_block_and_no_decay_on_norms_biases_pos():
    m = model(learned_pos=True)
    groups = layer_decay_groups(m, 0.05, 0.75)
    of = {id(p): g for g in groups for p in g["params"]}
    depth = len(m.blocks)
    for name, p in m.named_parameters():
        g = of[id(p)]
        assert g["lr_scale"] == pytest.approx(0.75 ** (depth + 1 - videomae_layer_id(name, depth + 2))), name
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name == "pos_embed"
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    scales = {n: of[id(p)]["lr_scale"] for n, p in m.named_parameters()}
    assert scales["head.weight"] == 1.0 and scales["fc_norm.weight"] == 1.0
    assert scales["blocks.1.attn.qkv.weight"] == 0.75 and scales["blocks.0.attn.qkv.weight"] == 0.75**2
    assert scales["patch_embed.proj.weight"] == scales["pos_embed"] == 0.75**3
    assert of[id(m.blocks[0].attn.q_bias)]["weight_decay"] == 0.0


def test_engines_apply_the_group_lr_scale():
    cfg = load_config(None, ["optim.layer_decay=0.5"])
    opt = torch.optim.AdamW(optimizer_groups(model(), cfg.optim), lr=1.0)
    set_lr(opt, 0.1)
    assert sorted({round(g["lr"], 8) for g in opt.param_groups}) == [0.0125, 0.025, 0.05, 0.1]
    plain = torch.optim.AdamW(optimizer_groups(model(), load_config(None, []).optim), lr=1.0)
    set_lr(plain, 0.1)
    assert {g["lr"] for g in plain.param_groups} == {0.1}


# ---- initialisation from checkpoints ------------------------------------------------------------------
def videomae_finetune_keys(depth: int, dim: int, mlp: int, tubelet: int, patch: int, classes: int) -> dict:
    """Key names and shapes of VideoMAE's modeling_finetune.VisionTransformer (mean pooling, fixed pos)."""
    shapes = {"patch_embed.proj.weight": (dim, 3, tubelet, patch, patch), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (dim,),
                b + "norm1.bias": (dim,),
                b + "attn.q_bias": (dim,),
                b + "attn.v_bias": (dim,),
                b + "attn.qkv.weight": (3 * dim, dim),
                b + "attn.proj.weight": (dim, dim),
                b + "attn.proj.bias": (dim,),
                b + "norm2.weight": (dim,),
                b + "norm2.bias": (dim,),
                b + "mlp.fc1.weight": (mlp, dim),
                b + "mlp.fc1.bias": (mlp,),
                b + "mlp.fc2.weight": (dim, mlp),
                b + "mlp.fc2.bias": (dim,),
            }
        )
    shapes.update(
        {
            "fc_norm.weight": (dim,),
            "fc_norm.bias": (dim,),
            "head.weight": (classes, dim),
            "head.bias": (classes,),
        }
    )
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def videomae_pretrain_keys(enc: dict, decoder_dim: int, decoder_depth: int, out_dim: int) -> dict:
    """modeling_pretrain.PretrainVisionTransformer: encoder.* (with encoder.norm), decoder.*, mask_token."""
    sd = {f"encoder.{k}": v for k, v in enc.items() if not k.startswith(("fc_norm", "head"))}
    dim = enc["patch_embed.proj.bias"].shape[0]
    sd.update(
        {
            "encoder.norm.weight": torch.ones(dim),
            "encoder.norm.bias": torch.zeros(dim),
            "encoder_to_decoder.weight": torch.randn(decoder_dim, dim),
            "mask_token": torch.zeros(1, 1, decoder_dim),
            "decoder.norm.weight": torch.ones(decoder_dim),
            "decoder.head.weight": torch.randn(out_dim, decoder_dim),
        }
    )
    for i in range(decoder_depth):
        sd[f"decoder.blocks.{i}.attn.qkv.weight"] = torch.randn(3 * decoder_dim, decoder_dim)
    return sd


def target():
    return build_classifier(ARGS, K, device="meta").state_dict()


DEBUG = dict(depth=2, dim=64, mlp=128, tubelet=2, patch=16)


@pytest.mark.parametrize(
    "wrap,prefix",
    [("model", ""), ("module", "module."), ("model", "_orig_mod."), (None, "module._orig_mod.")],
)
def test_official_finetuned_checkpoint_loads_strictly(tmp_path, wrap, prefix):
    sd = videomae_finetune_keys(**DEBUG, classes=K)
    raw = {prefix + k: v for k, v in sd.items()}
    path = tmp_path / "ft.pth"
    torch.save({wrap: raw, "epoch": 3} if wrap else raw, path)
    state, report = map_state(*read_weights(str(path))[:1], target(), ARGS.grid, source="ft")
    assert report.loaded == len(sd) and report.fresh == []
    assert all(torch.equal(state[k], sd[k]) for k in sd)


@pytest.mark.parametrize("decoder_dim", [32, 640])  # VideoMAE V2 / this project: 512-wide; EVEREST ViT-H: 640
def test_pretraining_checkpoints_load_encoder_and_set_the_rest_aside(decoder_dim):
    enc = videomae_finetune_keys(**DEBUG, classes=K)
    sd = {"model": videomae_pretrain_keys(enc, decoder_dim, 2, 3 * 2 * 16 * 16)}
    state, report = map_state(unwrap(sd), target(), ARGS.grid, source="pt")
    assert sorted(report.fresh) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report.set_aside["encoder norm (unused with mean pooling)"] == 2
    assert report.set_aside["pre-training decoder"] == 6
    assert torch.equal(state["blocks.1.mlp.fc2.weight"], enc["blocks.1.mlp.fc2.weight"])
    assert "loaded 28 tensors" in report.lines()


def test_this_projects_pretraining_weights_load_and_the_export_round_trips():
    torch.manual_seed(1)
    pre = build_pretrain_model(ARGS).state_dict()
    state, report = map_state(pre, target(), ARGS.grid, source="pre")
    exported = export_videomae(pre)
    assert set(exported) == {"module"} and not any(
        k.startswith(("encoder.", "decoder.", "norm.")) for k in exported["module"]
    )
    again, _ = map_state(unwrap(exported), target(), ARGS.grid, source="exported")
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    # ... and the classifier built with them carries exactly those weights
    m = build_classifier(ARGS, K, init_state=state)
    msd = m.state_dict()
    assert all(torch.equal(msd[k], state[k]) for k in state)


def test_another_size_is_refused_naming_both_shapes():
    sd = videomae_finetune_keys(depth=2, dim=384, mlp=1536, tubelet=2, patch=16, classes=K)
    with pytest.raises(
        InitError,
        match=r"refusing a partial load.*checkpoint \(384, 3, 2, 16, 16\) vs model "
        r"\(64, 3, 2, 16, 16\)",
    ):
        map_state(sd, target(), ARGS.grid, source="S")


def test_missing_or_unexpected_keys_are_refused():
    sd = videomae_finetune_keys(**DEBUG, classes=K)
    del sd["blocks.1.norm1.weight"]
    with pytest.raises(InitError, match="1 missing: blocks.1.norm1.weight"):
        map_state(sd, target(), ARGS.grid, source="x")
    sd = videomae_finetune_keys(**DEBUG, classes=K)
    sd["blocks.2.norm1.weight"] = torch.ones(64)  # a deeper model
    with pytest.raises(InitError, match="unexpected: blocks.2.norm1.weight"):
        map_state(sd, target(), ARGS.grid, source="x")
    sd = videomae_finetune_keys(**DEBUG, classes=400)
    with pytest.raises(InitError, match="finetune.drop_head"):
        map_state(sd, target(), ARGS.grid, source="k400")
    _, report = map_state(sd, target(), ARGS.grid, source="k400", drop_head=True)
    assert report.fresh == ["head.weight", "head.bias"]


def test_position_tables_follow_frames_and_resolution():
    from mats_scale.models.layers import sincos_table

    sd = videomae_finetune_keys(**DEBUG, classes=K)
    sd["pos_embed"] = sincos_table(4 * 14 * 14, 64)[None]  # a saved fixed table of another grid: rebuilt
    _, report = map_state(dict(sd), target(), ARGS.grid, source="x")
    assert report.set_aside["fixed sin-cos pos_embed (rebuilt)"] == 1
    sd["pos_embed"] = torch.randn(1, 2 * 4 * 4, 64)  # learned, at twice the resolution
    with pytest.raises(InitError, match="learned_pos"):
        map_state(dict(sd), target(), ARGS.grid, source="x")
    learned = build_classifier(ARGS, K, device="meta", learned_pos=True).state_dict()
    state, report = map_state(dict(sd), learned, ARGS.grid, source="x")
    assert state["pos_embed"].shape == (1, 8, 64)
    assert "interpolated from grid (2, 4, 4) to (2, 2, 2)" in report.lines()
    # 2x2 average pooling of each 4x4 slice is what trilinear interpolation by 1/2 computes
    src = sd["pos_embed"].reshape(2, 4, 4, 64)
    want = src.reshape(2, 2, 2, 2, 2, 64).mean(dim=(2, 4)).reshape(1, 8, 64)
    torch.testing.assert_close(state["pos_embed"], want)
    sd["pos_embed"] = torch.randn(1, 4 * 2 * 2, 64)  # learned, twice the frames
    state, report = map_state(dict(sd), learned, ARGS.grid, source="x")
    assert "interpolated from grid (4, 2, 2) to (2, 2, 2)" in report.lines()


def test_finetune_flops_follow_the_selection():
    from mats_scale.profiling.finetune import classifier_flops

    args = ModelArgs(size="debug", num_frames=4, img_size=64)  # 32 tokens
    full, half = classifier_flops(args, K, None), classifier_flops(args, K, 0.5)
    assert (full["tokens"], half["tokens"], full["score"]) == (32, 16, 0)
    # linear parts halve, attention quarters
    assert half["score"] > 0 and 0.4 < half["encoder"] / full["encoder"] < 0.55


def test_random_erasing_gives_each_frame_its_own_box_and_replays_from_the_generator():
    """VideoMAE erases (T, C, H, W) with timm's RandomErasing: frames are erased independently."""
    from mats_scale.train.finetune import ClipErasing

    cfg = load_config(None, ["finetune.reprob=1.0", "finetune.remode=const"])
    erase = ClipErasing(cfg, torch.device("cpu"))
    video = torch.ones(2, 3, 8, 32, 32)
    a = erase(video.clone(), torch.Generator().manual_seed(5))
    assert torch.equal(a, erase(video.clone(), torch.Generator().manual_seed(5)))
    assert not torch.equal(a, erase(video.clone(), torch.Generator().manual_seed(6)))
    boxes = a == 0  # const mode fills with 0; the input is 1 everywhere
    assert boxes.any(dim=(1, 3, 4)).all()  # probability 1: every frame of every clip has a box
    assert torch.equal(boxes[:, 0], boxes[:, 1]) and torch.equal(boxes[:, 0], boxes[:, 2])  # channels alike
    per_frame = boxes[0, 0]  # (T, H, W)
    assert any(not torch.equal(per_frame[0], per_frame[t]) for t in range(1, 8))


def test_augmentation_keys_are_checked():
    from mats_scale.errors import ConfigError

    load_config(None, ["finetune.rand_aug=rand-m7-n4-mstd0.5-inc1"])
    for bad in (
        "finetune.rand_aug=augmix-m5",
        "finetune.rand_aug=rand-x3",
        "finetune.reprob=1.5",
        "finetune.remode=noise",
        "finetune.recount=0",
    ):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


def test_linear_probe_fits_separable_features_and_stays_near_chance_on_noise():
    from mats_scale.train.probe import fit_linear_probe

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(200) % 4
    x = centres[y] + torch.randn(200, 16, generator=g) + 50.0  # offset: the probe standardises
    probe = fit_linear_probe(x[:120], y[:120], 4)
    assert (probe(x[120:]).argmax(-1) == y[120:]).float().mean() == 1.0
    noise = torch.randn(200, 16, generator=g)
    probe = fit_linear_probe(noise[:120], y[:120], 4)
    assert (probe(noise[120:]).argmax(-1) == y[120:]).float().mean() < 0.5


def test_pooled_forward_is_the_head_input():
    args = ModelArgs(size="debug", num_frames=4, img_size=32)
    model = build_classifier(args, 5, device="cpu").eval()
    video = torch.randn(2, 3, 4, 32, 32)
    feats = model(video, pooled=True)
    assert feats.shape == (2, args.arch.embed_dim)
    assert torch.allclose(model.head(feats), model(video))


def test_finetune_activation_memory_on_meta_matches_the_cpu_and_is_affine():
    """The planner's classifier activations: meta (CPU attention kernel) equals a real CPU run, the line
    through batch 1 and 2 predicts batch 3, and selection / checkpointing shrink what is saved."""
    from mats_scale.profiling.memory import activation_model, measure_step
    from mats_scale.profiling.workload import FinetuneWorkload, build_model

    args = ModelArgs(size="debug", num_frames=4, img_size=64)  # 32 tokens
    f32 = torch.float32

    def measure(device, batch, keep, every=0):
        if device == "meta":
            wl = FinetuneWorkload(args, K, keep, batch, f32, (every, 0))
            model, inputs = build_model(wl), wl.inputs("meta")
        else:
            torch.manual_seed(0)
            model = build_classifier(args, K, device="cpu").train()
            video = torch.randn(batch, 3, 4, 64, 64)
            inputs = (
                (video,) if keep is None else (video, finetune_selection(model.motion_scores(video), keep))
            )
        label = torch.zeros(batch, dtype=torch.int64, device=device)
        return measure_step(
            model,
            inputs,
            lambda out: torch.nn.functional.cross_entropy(out, label),
            batch=batch,
            dtype=f32,
            device=device,
            target="cpu",
        )

    for keep in (None, 0.5):
        assert measure("meta", 2, keep).saved_bytes == measure("cpu", 2, keep).saved_bytes
    line = activation_model(FinetuneWorkload(args, K, None, dtype=f32), target="cpu")
    three = measure("meta", 3, None)
    assert line.saved(3) == three.saved_bytes and line.inputs(3) == three.input_bytes
    full, half = (
        line.saved_per_clip,
        activation_model(FinetuneWorkload(args, K, 0.5, dtype=f32)).saved_per_clip,
    )
    ckpt = activation_model(FinetuneWorkload(args, K, None, dtype=f32, checkpoint=(1, 0))).saved_per_clip
    assert 0.4 < half / full < 0.6 and ckpt < 0.6 * full  # 2 blocks: their inputs and the head stay


@pytest.mark.integration
def test_finetune_plan_fits_more_clips_with_the_selection_and_with_checkpointing():
    from mats_scale.launch.plan_finetune import main
    from mats_scale.profiling.feasibility import ENGINE_CHOICES, NODES
    from mats_scale.profiling.finetune import plan_rows

    args = ModelArgs(size="S", num_frames=8, img_size=112)
    plans = plan_rows(
        args, K, 0.5, NODES["a100-40"], dtype=torch.bfloat16, mfu=0.3, epochs=1, train_clips=1000
    )
    assert len(plans) == 4 * len(ENGINE_CHOICES)
    best = {(p.strategy, p.checkpoint, p.engine): p.max_batch for p in plans}
    for engine in ENGINE_CHOICES:
        assert 0 < best[("all", "none", engine)] < best[("top 0.5", "none", engine)]
        assert best[("all", "none", engine)] < best[("all", "every 1", engine)]
    assert all(p.row()["total_gib"] <= 40 for p in plans)
    assert main(["--size", "debug", "--frames", "4", "--img", "32", "--plan", "--node", "a100-40"]) == 0


def test_top5_only_with_more_than_five_classes_and_the_confusion_plot_names_classes():
    import matplotlib

    matplotlib.use("Agg")
    from mats_scale.train.evaluate import accuracy_note, confusion_figure, score_results

    two = score_results(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), torch.tensor([0, 1, 1]), 2)
    assert two["top5"] is None and accuracy_note(two) == "top-1 0.6667"
    scores = torch.cat([torch.eye(7), torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.03, 0.01, 0.01]])])
    seven = score_results(scores, torch.tensor([0, 1, 2, 3, 4, 5, 6, 1]), 7)
    assert seven["top5"] == 1.0 and accuracy_note(seven) == "top-1 0.8750 top-5 1.0000"
    fig = confusion_figure({**two, "views": "1x1", "classes": ["left", "right"]})
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [0, 1] and [t.get_text() for t in ax.get_xticklabels()] == [
        "left",
        "right",
    ]
    fig = confusion_figure({**seven, "views": "1x1"})  # no names known: the class indices
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [str(i) for i in range(7)]


def test_evaluation_results_go_next_to_the_weights(tmp_path):
    from mats_scale.train.finetune import results_home

    step = tmp_path / "run" / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    assert results_home(str(tmp_path / "run"), "runs/x") == str(tmp_path / "run")
    assert results_home(str(step), "runs/x") == str(tmp_path / "run")
    assert results_home(str(tmp_path / "w" / "vit_b.pt"), "runs/x") == str(tmp_path / "w" / "vit_b")
    assert results_home("", "runs/x") == "runs/x"  # no weights: train.out_dir
