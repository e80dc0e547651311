"""Which training images each epoch draws: uniformly (random) or images holding rare classes more often."""

import numpy as np
import torch

SAMPLERS = ("random", "class-balanced")


def class_balanced_weights(pixel_counts: np.ndarray) -> np.ndarray:
    """(images, K) pixel counts per image -> per-image draw weights, the commonest-only images at 1.

    The rule is LVIS's repeat-factor sampling (Gupta, Dollar and Girshick, 2019) at its simplest:
    class c's factor is 1 / f_c, f_c the fraction of images containing c (LVIS takes
    max(1, sqrt(t / f_c)) for a threshold t), and an image draws with the largest factor among the
    classes it contains. So an image holding a class seen in 1 image of 100 is drawn 100x as often
    as one holding only classes seen everywhere. An image with no counted pixels (all ignored) gets
    the smallest weight of the others (1 when every image is empty).
    """
    counts = np.asarray(pixel_counts)
    if counts.ndim != 2:
        raise ValueError(f"pixel_counts must be (images, classes), got shape {counts.shape}")
    present = counts > 0
    images_with = present.sum(axis=0)
    factor = np.where(images_with > 0, len(counts) / np.maximum(images_with, 1), 0.0)
    weights = (present * factor).max(axis=1, initial=0.0)
    empty = ~present.any(axis=1)
    weights[empty] = weights[~empty].min() if (~empty).any() else 1.0
    return weights


def build_sampler(name: str, pixel_counts: np.ndarray | None, seed: int, num_samples: int | None = None):
    """None for ``random`` (the loader shuffles as today); for ``class-balanced`` a seeded
    ``WeightedRandomSampler`` drawing ``num_samples`` (default: the number of images) with replacement."""
    if name == "random":
        return None
    if name != "class-balanced":
        raise ValueError(f"sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    weights = class_balanced_weights(pixel_counts)
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double),
        num_samples=num_samples or len(weights),
        replacement=True,
        generator=generator,
    )
