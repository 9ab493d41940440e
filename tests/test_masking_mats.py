"""MATS motion-aware selection on constructed clips, MATS + dual masking, fine-tuning selection."""

import pytest
import torch

from mats_scale.data.inmemory import normalize, render_squares, textured_background
from mats_scale.masking import (
    TokenGrid,
    embed_motion_scores,
    finetune_selection,
    mats_dual_selection,
    mats_selection,
    pixel_motion_scores,
    running_cell_drop,
)
from mats_scale.masking.common import ids_to_mask
from mats_scale.models.layers import PatchEmbed3D

T, SIZE, P, SQUARE = 16, 96, 16, 24
GRID = TokenGrid(T // 2, SIZE // P, SIZE // P)  # 8 x 6 x 6 = 288 tokens


def _moving_square_batch():
    """Two clips, squares moving diagonally / downwards over static textures, and their corners."""
    g = torch.Generator().manual_seed(0)
    start = torch.tensor([[8.0, 8.0], [10.0, 60.0]])
    velocity = torch.tensor([[4.0, 4.0], [5.0, 0.0]])  # px per frame (y, x)
    pos = start[:, None] + torch.arange(T, dtype=torch.float32)[None, :, None] * velocity[:, None]
    video = render_squares(textured_background(2, SIZE, SIZE, g), pos, SQUARE, torch.rand(2, 3, generator=g))
    return video, pos


def _path_mask(pos):
    """(B, N) bool: token (t', h, w) is on the path when the square overlaps patch (h, w) in a frame of
    tubelet t' or of the tubelet its score compares with (t'-1; tubelet 0 compares 0 with 1)."""
    B = pos.shape[0]
    y0, x0 = pos[..., 0].round(), pos[..., 1].round()  # (B, T)
    edges = torch.arange(GRID.h) * P
    over_y = (y0[..., None] < edges + P) & (y0[..., None] + SQUARE > edges)  # (B, T, H')
    over_x = (x0[..., None] < edges + P) & (x0[..., None] + SQUARE > edges)  # (B, T, W')
    touched = (over_y[..., :, None] & over_x[..., None, :]).view(B, GRID.t, 2, GRID.h, GRID.w).any(2)
    prev = torch.cat([touched[:, 1:2], touched[:, :-1]], dim=1)  # the tubelet each one is compared with
    return (touched | prev).flatten(1)


@pytest.mark.parametrize("score", ["embed", "pixel"])
def test_selected_tokens_lie_on_the_moving_square_path(score):
    video, pos = _moving_square_batch()
    if score == "embed":
        torch.manual_seed(0)
        scores = embed_motion_scores(
            PatchEmbed3D(in_chans=3, embed_dim=32, tubelet_size=2, patch_size=P), normalize(video)
        )
    else:
        scores = pixel_motion_scores(video, 2, P)
    path = _path_mask(pos)
    n_changed = (scores > 0).sum(dim=1)
    assert ((scores > 0) <= path).all()  # the static background scores exactly 0
    # keep 0.2 -> 57 tokens, fewer than the changing tokens: every selected token is on the path.
    assert (n_changed >= 57).all()
    for seed in range(3):
        sel = mats_selection(scores, ratio=0.9, keep_ratio=0.2, generator=torch.Generator().manual_seed(seed))
        assert sel.visible_ids.shape == (2, 28) and sel.target_ids.shape == (2, 29)
        chosen = ids_to_mask(sel.visible_ids, GRID.num_tokens) | ids_to_mask(sel.target_ids, GRID.num_tokens)
        assert (chosen <= path).all()
    # keep 0.5 -> 144 > changing tokens: every changing token is selected, the rest are random ties.
    sel = mats_selection(scores, ratio=0.9, keep_ratio=0.5, generator=torch.Generator().manual_seed(0))
    chosen = ids_to_mask(sel.visible_ids, GRID.num_tokens) | ids_to_mask(sel.target_ids, GRID.num_tokens)
    assert ((scores > 0) <= chosen).all()


def test_static_clip_fixed_counts_random_ties():
    video = textured_background(2, SIZE, SIZE, torch.Generator().manual_seed(0))[:, :, None].expand(
        -1, -1, T, -1, -1
    )
    scores = pixel_motion_scores(video, 2, P)
    assert (scores == 0).all()
    a = mats_selection(scores, 0.9, 0.3, torch.Generator().manual_seed(0))
    b = mats_selection(scores, 0.9, 0.3, torch.Generator().manual_seed(1))
    assert a.visible_ids.shape == (2, 28) and a.target_ids.shape == (2, 58)
    assert not torch.equal(a.target_ids, b.target_ids)
    # Ties broken at random: with all scores equal, the 86 kept tokens spread over the whole clip.
    kept = torch.cat([a.visible_ids, a.target_ids], dim=1)
    assert len(set((kept // GRID.spatial).flatten().tolist())) == GRID.t


def test_visible_and_targets_split_the_top_set_by_a_random_shuffle():
    scores = torch.arange(1568, dtype=torch.float32).flip(0).expand(3, -1)  # token i has rank i
    top = set(range(470))
    visible_sets = set()
    for seed in range(4):
        sel = mats_selection(scores, 0.9, 0.3, torch.Generator().manual_seed(seed))
        assert sel.visible_ids.shape == (3, 156) and sel.target_ids.shape == (3, 314)
        for b in range(3):
            vis, tgt = set(sel.visible_ids[b].tolist()), set(sel.target_ids[b].tolist())
            assert vis | tgt == top and not vis & tgt
            visible_sets.add(tuple(sorted(vis)))
    assert len(visible_sets) == 12  # a different random split per clip and seed


def test_mats_dual_prefers_running_cell_kept_targets_with_fixed_count():
    grid = TokenGrid(8, 14, 14)
    g = torch.Generator().manual_seed(0)
    branches = set()
    for seed in range(6):
        scores = torch.rand(4, grid.num_tokens, generator=g)
        scores[:, : 200 * (seed % 3)] += 10  # vary where the top set lies (first 0 / 200 / 400 ids)
        base = mats_selection(scores, 0.9, 0.3, torch.Generator().manual_seed(seed))
        sel = mats_dual_selection(grid, scores, 0.9, 0.3, 0.5, torch.Generator().manual_seed(seed))
        assert torch.equal(sel.visible_ids, base.visible_ids)  # same draws first
        assert sel.target_ids.shape == (4, 157) and sel.target_weights is None
        # Recover the phases the function drew (after the MATS draws) to check the preference rule.
        replay = torch.Generator().manual_seed(seed)
        mats_selection(scores, 0.9, 0.3, replay)
        phases = torch.randint(4, (4,), generator=replay)
        kept = ~running_cell_drop(grid, 0.5, phases)
        for b in range(4):
            mats_t, chosen = set(base.target_ids[b].tolist()), set(sel.target_ids[b].tolist())
            kept_t = {i for i in mats_t if kept[b, i]}
            assert chosen <= mats_t
            branches.add(len(kept_t) >= 157)
            if len(kept_t) >= 157:
                assert chosen <= kept_t  # too many kept: a subset of them
            else:
                assert kept_t <= chosen  # too few: all of them, filled with dropped ones
    assert branches == {True, False}  # both the thinning and the filling case occurred


def test_finetune_selection_is_deterministic_top_k():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.0, 0.3], [1.0, 0.0, 0.0, 0.0, 0.0, 2.0]])
    ids = finetune_selection(scores, 0.5)
    assert torch.equal(ids, torch.tensor([[1, 2, 3], [0, 1, 5]]))  # ties go to the lower id
    assert torch.equal(finetune_selection(scores, 0.5), ids)
    assert torch.equal(finetune_selection(scores, 0.5, keep_all=True), torch.arange(6).expand(2, 6))
    big = torch.rand(2, 1568, generator=torch.Generator().manual_seed(0))
    ids = finetune_selection(big, 0.6)
    assert ids.shape == (2, 940)
    assert (big.gather(1, ids).min(dim=1).values >= big.topk(940, dim=1).values[:, -1]).all()


# ---- context tokens --------------------------------------------------------------------------------
def _mats_before_context_tokens(scores, ratio, keep_ratio, generator):
    """MATS selection as it was written before context tokens existed (a transcription)."""
    from mats_scale.masking.common import rand, sorted_ids
    from mats_scale.tokens import mats_counts

    B, N = scores.shape
    n_vis, n_tgt = mats_counts(N, ratio, keep_ratio)
    perm = rand((B, N), generator, scores.device).argsort(dim=1)
    order = scores.gather(1, perm).argsort(dim=1, descending=True, stable=True)[:, : n_vis + n_tgt]
    kept = perm.gather(1, order)
    kept = kept.gather(1, rand(kept.shape, generator, scores.device).argsort(dim=1))
    return sorted_ids(kept[:, :n_vis]), sorted_ids(kept[:, n_vis:])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_context_ratio_zero_is_mats_exactly(seed):
    scores = torch.randint(0, 5, (3, 288), generator=torch.Generator().manual_seed(seed)).float()  # ties
    vis, tgt = _mats_before_context_tokens(scores, 0.9, 0.3, torch.Generator().manual_seed(seed))
    sel = mats_selection(scores, 0.9, 0.3, torch.Generator().manual_seed(seed), context_ratio=0.0)
    assert torch.equal(sel.visible_ids, vis) and torch.equal(sel.target_ids, tgt)
    dual = mats_dual_selection(GRID, scores, 0.9, 0.3, 0.5, torch.Generator().manual_seed(seed))
    dual0 = mats_dual_selection(GRID, scores, 0.9, 0.3, 0.5, torch.Generator().manual_seed(seed), 0.0)
    assert torch.equal(dual.visible_ids, dual0.visible_ids) and torch.equal(dual.target_ids, dual0.target_ids)


def test_context_tokens_come_from_outside_the_top_set_uniformly_and_keep_the_counts():
    N, n_keep = 288, int(0.3 * 288)  # 86 kept, int(0.25 * 86) = 21 of them context
    scores = torch.arange(N, dtype=torch.float32).flip(0).expand(4, N)  # token i ranks i-th
    plain = mats_selection(scores, 0.9, 0.3, torch.Generator().manual_seed(0))
    hits = torch.zeros(N)
    for seed in range(200):
        sel = mats_selection(scores, 0.9, 0.3, torch.Generator().manual_seed(seed), context_ratio=0.25)
        assert (
            sel.visible_ids.shape == plain.visible_ids.shape
            and sel.target_ids.shape == plain.target_ids.shape
        )
        kept = torch.cat([sel.visible_ids, sel.target_ids], 1)
        assert (kept < n_keep - 21).sum(1).tolist() == [n_keep - 21] * 4  # the top 65 always
        assert (kept >= n_keep - 21).sum(1).tolist() == [21] * 4
        hits += torch.bincount(kept.flatten(), minlength=N).float()
        vis_context = (sel.visible_ids >= n_keep - 21).sum().item()
        assert 0 <= vis_context <= 21 * 4
    rest = hits[n_keep - 21 :] / (200 * 4)  # each of the 223 other tokens: 21/223 = 0.094 expected
    assert abs(rest.mean().item() - 21 / 223) < 1e-6 and rest.min() > 0.05 and rest.max() < 0.15


def test_context_ratio_is_validated():
    from mats_scale.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"masking.context_ratio.*applies to masking.strategy=mats only"):
        load_config(None, ["masking.preset=tube", "masking.context_ratio=0.2"])
    with pytest.raises(ConfigError, match=r"masking.context_ratio.*must be in \[0, 1\)"):
        load_config(None, ["masking.preset=mats", "masking.context_ratio=1.0"])
    assert (
        load_config(None, ["masking.preset=mats+dual", "masking.context_ratio=0.2"]).masking.context_ratio
        == 0.2
    )
