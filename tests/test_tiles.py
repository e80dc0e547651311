"""Training on tiles: the index of a slide's windows (tissue, foreground) and the windows sampled from it."""

import numpy as np
import pytest

from competition import synthetic
from competition.errors import ConfigError, DataError
from competition.slides import RunsMask
from competition.sliding_window import InMemory
from competition.tiles import build_index, sample_windows, tissue_share


@pytest.fixture(scope="module")
def slide():
    plan = synthetic.plan_slide(2048, seed=7)
    image = synthetic.slide_window(plan, 0, 0, 2048, 2048)
    mask = RunsMask(synthetic.column_major_rle(plan), (2048, 2048), "column", "train.csv, id slide")
    return plan, InMemory(image), mask


def test_tissue_is_saturated_and_glass_is_not():
    glass = np.full((64, 64, 3), (243, 241, 245), np.uint8)
    tissue = np.full((64, 64, 3), (228, 150, 192), np.uint8)
    black = np.zeros((64, 64, 3), np.uint8)
    assert tissue_share(glass) == 0 and tissue_share(tissue) == 1 and tissue_share(black) == 0
    assert tissue_share(np.concatenate([glass, tissue])) == 0.5


def test_the_index_says_where_the_tissue_and_the_foreground_are(slide):
    plan, image, mask = slide
    index = build_index(image, mask, 256, 0.0)
    assert len(index.tops) == 64 and index.tile == 256
    for top, left, tissue, foreground in zip(index.tops, index.lefts, index.tissue, index.foreground):
        truth = synthetic.slide_mask_window(plan, top, left, 256, 256)
        assert foreground == pytest.approx(truth.mean())
        field = synthetic.tissue_field(plan, np.arange(top, top + 256)[:, None], np.arange(left, left + 256)[None])
        assert abs(tissue - (field > plan.tissue_level + 0.01).mean()) < 0.1  # the rendered tissue, edges aside
    assert (index.foreground > 0).any() and (index.tissue < 0.01).any()


def test_positive_crops_hold_foreground_and_empty_glass_is_drawn_less(slide):
    _, image, mask = slide
    index = build_index(image, mask, 256, 0.0)
    rng = np.random.default_rng(0)
    around = sample_windows(index, mask, 200, rng, empty_weight=0.0, positive_ratio=1.0)
    assert all(mask.read(top, left, 256, 256).any() for top, left in around)
    assert ((around >= 0) & (around <= 2048 - 256)).all()
    tiles = sample_windows(index, mask, 2000, rng, empty_weight=0.0, positive_ratio=0.0)
    empty = {
        (t, l) for t, l, f, s in zip(index.tops, index.lefts, index.foreground, index.tissue) if f == 0 and s < 0.05
    }
    assert empty and not any((top, left) in empty for top, left in tiles.tolist())
    some = sample_windows(index, mask, 4000, rng, empty_weight=1.0, positive_ratio=0.0)
    assert abs(np.mean([tuple(corner) in empty for corner in some.tolist()]) - len(empty) / 64) < 0.05


def test_a_mask_of_another_size_and_bad_sampling_flags_are_one_line(slide):
    _, image, _ = slide
    other = RunsMask("1 5", (2048, 1024), "column", "train.csv, id slide")
    with pytest.raises(DataError, match="train.csv, id slide: the mask is 1024x2048 and its slide 2048x2048"):
        build_index(image, other, 256, 0.25)
    index = build_index(image, None, 512, 0.25)
    for flags, message in (
        ({"empty_weight": 1.5}, "--empty-tile-weight 1.5: must be between 0 and 1"),
        ({"positive_ratio": -0.1}, "--positive-ratio -0.1: must be between 0 and 1"),
        ({"min_tissue": 1.0}, "--min-tissue 1.0: must be at least 0 and below 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            sample_windows(index, None, 4, np.random.default_rng(0), **flags)
