import torch

from mats_scale.masking import TokenGrid, tube_masking


def test_tube_counts_and_same_spatial_mask_in_every_slice():
    grid = TokenGrid(8, 14, 14)
    sel = tube_masking(grid, 0.9, 3, torch.Generator().manual_seed(0))
    assert sel.visible_ids.shape == (3, 160) and sel.target_ids.shape == (3, 1408)
    assert sel.visible_ids.dtype == torch.int64
    for b in range(3):
        vis = sel.visible_ids[b].view(grid.t, -1) % grid.spatial
        assert (vis == vis[0]).all()
        both = torch.cat([sel.visible_ids[b], sel.target_ids[b]]).sort().values
        assert torch.equal(both, torch.arange(grid.num_tokens))


def test_tube_seeded():
    grid = TokenGrid(8, 14, 14)
    a = tube_masking(grid, 0.9, 2, torch.Generator().manual_seed(1))
    b = tube_masking(grid, 0.9, 2, torch.Generator().manual_seed(1))
    c = tube_masking(grid, 0.9, 2, torch.Generator().manual_seed(2))
    assert torch.equal(a.visible_ids, b.visible_ids) and not torch.equal(a.visible_ids, c.visible_ids)
