"""The dispatch: counts of the issue, shapes == selection_counts, seeding of every strategy, errors."""

import itertools

import pytest
import torch

from mats_scale.config import ConfigError, MaskingConfig, ModelConfig, load_config
from mats_scale.masking import TokenGrid, select_tokens, selection_counts

COMBOS = [
    ("tube", "none", "reference"),
    ("tube", "running_cell", "reference"),
    ("tube", "running_cell", "lean"),
    ("random", "none", "reference"),
    ("random", "running_cell", "reference"),
    ("random", "running_cell", "lean"),
    ("mats", "none", "reference"),
    ("mats", "running_cell", "lean"),
]


def _select(combo, grid, batch, seed, scores_seed=0):
    strategy, decoder, mode = combo
    cfg = MaskingConfig(strategy=strategy, decoder=decoder, decoder_mode=mode)
    scores = None
    if strategy == "mats":
        scores = torch.rand(batch, grid.num_tokens, generator=torch.Generator().manual_seed(scores_seed))
    return cfg, select_tokens(cfg, grid, batch, torch.Generator().manual_seed(seed), scores)


def test_issue_counts():
    vit_b = TokenGrid.from_model(ModelConfig(size="B"))
    vit_g = TokenGrid.from_model(ModelConfig(size="g"))
    assert selection_counts(MaskingConfig(strategy="tube", ratio=0.9), vit_b) == (160, 1408)
    assert selection_counts(MaskingConfig(strategy="tube", ratio=0.9), vit_g) == (208, 1840)
    assert selection_counts(MaskingConfig(strategy="mats", ratio=0.9, keep_ratio=0.3), vit_b) == (156, 314)
    # Running cell 0.5 keeps 784 of 1568; lean feeds only the 176 * 4 loss positions.
    rc = dict(strategy="tube", decoder="running_cell", decoder_ratio=0.5)
    assert selection_counts(MaskingConfig(**rc, decoder_mode="reference"), vit_b) == (160, 784)
    assert selection_counts(MaskingConfig(**rc, decoder_mode="lean"), vit_b) == (160, 704)
    assert selection_counts(
        MaskingConfig(strategy="mats", decoder="running_cell", decoder_mode="lean"), vit_b
    ) == (156, 157)
    sel = select_tokens(MaskingConfig(strategy="tube"), vit_g, 2, torch.Generator().manual_seed(0))
    assert sel.visible_ids.shape == (2, 208) and sel.target_ids.shape == (2, 1840)


@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
@pytest.mark.parametrize("grid", [TokenGrid(8, 14, 14), TokenGrid(3, 4, 6)], ids=["vitb", "small"])
def test_shapes_match_counts_ids_valid_and_seeded(combo, grid):
    cfg, a = _select(combo, grid, 3, seed=11)
    n_vis, n_tgt = selection_counts(cfg, grid)
    assert a.visible_ids.shape == (3, n_vis) and a.target_ids.shape == (3, n_tgt)
    for ids in (a.visible_ids, a.target_ids):
        assert ids.dtype == torch.int64 and ids.min() >= 0 and ids.max() < grid.num_tokens
        assert (ids[:, 1:] > ids[:, :-1]).all()  # ascending, no duplicates
    weights = torch.ones(a.target_ids.shape) if a.target_weights is None else a.target_weights
    for b in range(3):  # every scored target is a token the encoder did not see
        scored = set(a.target_ids[b][weights[b] > 0].tolist())
        assert scored and not scored & set(a.visible_ids[b].tolist())
    _, same = _select(combo, grid, 3, seed=11)
    _, other = _select(combo, grid, 3, seed=12)
    assert all(torch.equal(x, y) for x, y in zip(a, same, strict=False) if x is not None)
    assert not (torch.equal(a.visible_ids, other.visible_ids) and torch.equal(a.target_ids, other.target_ids))


def test_config_cross_checks_and_dispatch_errors():
    with pytest.raises(ConfigError, match="masking.decoder_mode='reference': masking.strategy=mats with"):
        load_config(None, ["masking.strategy=mats", "masking.decoder=running_cell"])
    load_config(None, ["masking.strategy=mats", "masking.decoder=running_cell", "masking.decoder_mode=lean"])
    with pytest.raises(ConfigError, match=r"masking.keep_ratio=0.05: MATS must keep more tokens .* = 78 "):
        load_config(None, ["masking.strategy=mats", "masking.keep_ratio=0.05"])
    with pytest.raises(ConfigError, match="masking.ratio=0.001: masks 0 of N=1568"):
        load_config(None, ["masking.ratio=0.001"])
    with pytest.raises(ConfigError, match="masking.frame_selection=True: selects frame pairs"):
        load_config(None, ["masking.frame_selection=true", "model.tubelet_size=4"])
    with pytest.raises(ConfigError, match="masking.frame_keep_ratio=0.0"):
        load_config(None, ["masking.frame_keep_ratio=0"])
    grid = TokenGrid(8, 14, 14)
    mats = MaskingConfig(strategy="mats")
    with pytest.raises(ValueError, match="needs motion scores"):
        select_tokens(mats, grid, 2, torch.Generator())
    with pytest.raises(ValueError, match=r"scores of shape \(2, 100\), expected \(2, 1568\)"):
        select_tokens(mats, grid, 2, torch.Generator(), torch.rand(2, 100))
    bad = MaskingConfig(strategy="mats")
    bad.decoder = "running_cell"  # built by hand, past validation
    with pytest.raises(ValueError, match="needs masking.decoder_mode=lean"):
        selection_counts(bad, grid)


def test_all_config_combinations_validate_or_fail_with_one_line():
    for strategy, decoder, mode in itertools.product(
        ["tube", "random", "mats"], ["none", "running_cell"], ["reference", "lean"]
    ):
        overrides = [
            f"masking.strategy={strategy}",
            f"masking.decoder={decoder}",
            f"masking.decoder_mode={mode}",
        ]
        try:
            cfg = load_config(None, overrides)
        except ConfigError as e:
            assert (strategy, decoder, mode) == ("mats", "running_cell", "reference") and "\n" not in str(e)
            continue
        n_vis, n_tgt = selection_counts(cfg.masking, TokenGrid.from_model(cfg.model))
        assert n_vis > 0 and n_tgt > 0
