"""Running-cell decoder masking (VideoMAE V2): the cell itself, both modes, counts and errors."""

import pytest
import torch

from mats_scale.config import MaskingConfig
from mats_scale.masking import (
    TokenGrid,
    decoder_kept_count,
    draw_phases,
    dual_masking,
    lean_target_range,
    running_cell_drop,
    select_tokens,
    selection_counts,
    tube_masking,
)

# Hand-written cells (1 = dropped), phase 0, slices t = 0..3, read row-major as 2x2 (DESIGN.md):
# c[j] = q[(j + p + t + 1) % 4] with q = [1]*k + [0]*(4-k).
EXPECTED_PHASE0 = {
    0.25: [[0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]],
    0.5: [[1, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0]],
    0.75: [[1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0]],
}


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_cells_match_hand_written_cycle_for_every_phase(ratio):
    grid = TokenGrid(8, 4, 6)
    drop = running_cell_drop(grid, ratio, torch.arange(4)).view(4, grid.t, grid.h, grid.w)
    cycle = torch.tensor(EXPECTED_PHASE0[ratio], dtype=torch.bool)  # (4 slices, 4 cell entries)
    for phase in range(4):
        for t in range(grid.t):
            cell = cycle[(t + phase) % 4].view(2, 2)  # phase p at slice t = phase 0 at slice t + p
            expected = cell.repeat(grid.h // 2, grid.w // 2)  # tiled over the (H', W') grid
            assert torch.equal(drop[phase, t], expected), (phase, t)


@pytest.mark.parametrize("ratio,kept", [(0.25, 3), (0.5, 2), (0.75, 1), (0.6, 2)])
def test_each_position_kept_in_4_minus_k_of_every_4_consecutive_slices(ratio, kept):
    grid = TokenGrid(9, 6, 4)
    drop = running_cell_drop(grid, ratio, torch.arange(4)).view(4, grid.t, grid.spatial)
    for start in range(grid.t - 3):  # every window of 4 consecutive slices
        assert ((~drop[:, start : start + 4]).sum(dim=1) == kept).all()
    # ... and every slice keeps (4 - k) / 4 of its positions, whatever the phase.
    assert ((~drop).sum(dim=2) == grid.spatial * kept // 4).all()


@pytest.mark.parametrize("ratio", [0.1, 0.2, 1.0])
def test_ratio_outside_1_to_3_dropped_per_cell_is_refused(ratio):
    with pytest.raises(ValueError, match=r"k = int\(4 \* ratio\) = \d must be in 1..3"):
        running_cell_drop(TokenGrid(4, 4, 4), ratio, torch.zeros(1, dtype=torch.long))


def test_odd_grid_is_refused():
    with pytest.raises(ValueError, match="even token grid, got 13x14"):
        running_cell_drop(TokenGrid(8, 13, 14), 0.5, torch.zeros(1, dtype=torch.long))


def test_reference_mode_matches_videomae_v2():
    grid = TokenGrid(8, 14, 14)
    gen = torch.Generator().manual_seed(0)
    enc = tube_masking(grid, 0.9, 3, gen)
    phases = torch.tensor([0, 1, 3])
    sel = dual_masking(grid, enc.visible_ids, 0.5, "reference", phases)
    drop = running_cell_drop(grid, 0.5, phases)
    assert sel.target_ids.shape == (3, decoder_kept_count(grid, 0.5)) == (3, 784)
    for b in range(3):
        # Mask tokens at every decoder-kept position, ascending ...
        assert torch.equal(sel.target_ids[b], torch.nonzero(~drop[b]).flatten())
        # ... with loss weight 0 exactly where the encoder saw the token.
        seen = torch.isin(sel.target_ids[b], enc.visible_ids[b])
        assert torch.equal(sel.target_weights[b], (~seen).float())
    assert torch.equal(sel.visible_ids, enc.visible_ids)


@pytest.mark.parametrize("strategy,t", [("tube", 8), ("tube", 6), ("random", 8)])
def test_lean_mode_has_the_same_loss_positions_and_fewer_decoder_tokens(strategy, t):
    grid = TokenGrid(t, 14, 14)
    ref_cfg = MaskingConfig(strategy=strategy, decoder="running_cell", decoder_mode="reference")
    lean_cfg = MaskingConfig(strategy=strategy, decoder="running_cell", decoder_mode="lean")
    ref = select_tokens(ref_cfg, grid, 4, torch.Generator().manual_seed(3))
    lean = select_tokens(lean_cfg, grid, 4, torch.Generator().manual_seed(3))  # same draws
    assert torch.equal(ref.visible_ids, lean.visible_ids)
    lean_w = (
        torch.ones_like(lean.target_ids, dtype=torch.float)
        if lean.target_weights is None
        else lean.target_weights
    )
    for b in range(4):
        ref_pos = ref.target_ids[b][ref.target_weights[b] > 0]
        lean_pos = lean.target_ids[b][lean_w[b] > 0]
        assert torch.equal(ref_pos, lean_pos.sort().values)
        # Padding (weight 0) comes from the reference's own zero-weight slots: lean is a subset.
        assert torch.isin(lean.target_ids[b], ref.target_ids[b]).all()
        assert len(set(lean.target_ids[b].tolist())) == lean.target_ids.shape[1]
    if strategy == "tube":  # for random the worst case is every kept token: no saving, only padding
        assert lean.target_ids.shape[1] < ref.target_ids.shape[1]


def test_lean_tube_count_fixed_when_t_divisible_by_4_padded_otherwise():
    cfg = MaskingConfig(strategy="tube", decoder="running_cell", decoder_mode="lean")
    # T' = 8: each spatial position kept in exactly 4 slices -> 176 masked positions * 4 = 704.
    assert lean_target_range(TokenGrid(8, 14, 14), 0.9, 0.5, "tube") == (704, 704)
    sel = select_tokens(cfg, TokenGrid(8, 14, 14), 2, torch.Generator().manual_seed(0))
    assert sel.target_ids.shape == (2, 704) and sel.target_weights is None
    # T' = 7: the count depends on the phase and the mask; rows are padded to the largest count.
    grid = TokenGrid(7, 14, 14)
    low, high = lean_target_range(grid, 0.9, 0.5, "tube")
    assert low < high
    seen = set()
    for seed in range(12):
        sel = select_tokens(cfg, grid, 4, torch.Generator().manual_seed(seed))
        assert sel.target_ids.shape == (4, high) == (4, selection_counts(cfg, grid)[1])
        n_loss = sel.target_weights.sum(dim=1)
        assert ((n_loss >= low) & (n_loss <= high)).all()
        seen.update(n_loss.tolist())
    assert len(seen) > 1  # the loss count really varies, so padding is exercised


def test_draw_phases_seeded():
    a = draw_phases(64, torch.Generator().manual_seed(5))
    assert torch.equal(a, draw_phases(64, torch.Generator().manual_seed(5)))
    assert set(a.tolist()) == {0, 1, 2, 3}
