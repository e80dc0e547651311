"""Class-balanced sampling: draw weights by hand, and rare-class images drawn more often."""

import numpy as np
import pytest

from competition.sampling import SAMPLERS, build_sampler, class_balanced_weights


def test_weights_by_hand():
    # 4 images, classes background, common, rare: background in all 4 (factor 1), common in 2 (factor 2),
    # rare in 1 (factor 4); the last image holds only ignored pixels -> the smallest other weight.
    counts = np.array([[10, 5, 0], [10, 0, 0], [10, 5, 1], [10, 0, 0], [0, 0, 0]])
    # with 5 images: background in 4 -> 5/4, common in 2 -> 5/2, rare in 1 -> 5
    assert class_balanced_weights(counts) == pytest.approx([2.5, 1.25, 5, 1.25, 1.25])


def test_random_is_no_sampler():
    assert SAMPLERS == ("random", "class-balanced")
    assert build_sampler("random", None, seed=0) is None


def test_rare_class_images_are_drawn_more_often_and_the_draw_is_seeded():
    counts = np.zeros((10, 2), dtype=np.int64)
    counts[:, 0] = 100
    counts[0, 1] = 3  # only image 0 holds the rare class
    draws = list(build_sampler("class-balanced", counts, seed=1, num_samples=2000))
    assert draws == list(build_sampler("class-balanced", counts, seed=1, num_samples=2000))
    frequency = np.bincount(draws, minlength=10) / len(draws)
    # weights 10 for image 0, 1 for the nine others -> image 0 drawn 10/19 of the time
    assert frequency[0] == pytest.approx(10 / 19, abs=0.04)
    assert frequency[1:].max() < 0.1
    assert len(list(build_sampler("class-balanced", counts, seed=1))) == 10


def test_an_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="class-balanced"):
        build_sampler("balanced", np.ones((2, 2)), seed=0)
