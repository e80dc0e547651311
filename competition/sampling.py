"""Training samplers by name: uniform, or class-balanced (images holding rare classes drawn more often)."""

import numpy as np

SAMPLERS = ("random", "class-balanced")


def class_balanced_weights(pixel_counts: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Per-image draw weights from (images, classes) pixel counts: repeat-factor sampling (Gupta et al. 2019,
    LVIS). Class c is held by a fraction f_c of the images; its repeat factor is max(1, sqrt(t / f_c)), with t
    the threshold fraction (default: the median f_c over the classes that occur); an image weighs the largest
    factor of the classes it holds. The background (class 0), in nearly every image, weighs 1 and leads no image
    to be drawn more often; an image with no labelled pixels weighs 1."""
    present = np.asarray(pixel_counts) > 0
    held = present.mean(0)
    occurring = held[1:][held[1:] > 0]
    if threshold is None:
        threshold = float(np.median(occurring)) if occurring.size else 1.0
    with np.errstate(divide="ignore"):
        factors = np.where(held > 0, np.maximum(1.0, np.sqrt(threshold / held)), 1.0)
    factors[0] = 1.0
    return np.where(present, factors, 1.0).max(1)
