"""Fold ensembles as the sliding window's ``predict``, and its bands labelled as whole images are: a slide's
windows through the same models, TTA views and precision, its masks by the same head's rule and post-processing."""

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

import numpy as np
import torch

from competition.data import resize_image, to_chw
from competition.files import format_bytes
from competition.mask_values import pack_labels
from competition.postprocess import PostProcess
from competition.sliding_window import Labelling, Predict, labels_of

logger = logging.getLogger(__name__)

Write = Callable[[int, np.ndarray], None]


def window_predictor(ensemble) -> Predict:
    """``predict(windows)`` of ``competition.sliding_window`` for an ``inference.Ensemble`` (not imported: the
    prediction stream, below it, predicts slides with this): uint8 (N, tile, tile, C) windows -> float32 numpy
    (N, K, tile, tile) probabilities averaged over the members and their TTA views (a softmax, one sigmoid, or a
    sigmoid per class for a multilabel ensemble, as ``Ensemble.probabilities`` gives them to whole images), each
    member seeing the windows at its input size (a full-size member: as they are) and its probabilities resized
    back to the tile."""

    def predict(windows: np.ndarray) -> np.ndarray:
        tile = windows.shape[1:3]
        batches = {}
        for key, size in ensemble.input_sizes.items():
            resized = [window if size is None else resize_image(window, size) for window in windows]
            batches[key] = torch.stack([to_chw(window) for window in resized]).to(ensemble.device)
        with torch.inference_mode():
            return ensemble.probabilities(batches, tile).cpu().numpy()

    return predict


def band_labelling(threshold: float, multilabel: bool, postprocess: PostProcess | None = None) -> Labelling:
    """The labels of each blended band (float32 (rows, width, K)) as whole-image inference makes an image's
    (``prediction_stream.class_masks``, ``PostProcess.labels``): ``postprocess``'s per-class thresholds (its area
    rules need the whole image: ``area_rules_applied``); else, multilabel, the packed bits of every class above
    ``threshold``; else ``labels_of`` (one sigmoid above ``threshold``, or a softmax's most probable class)."""
    if postprocess is not None:
        return lambda band: postprocess.labels(np.moveaxis(band, -1, 0))
    if multilabel:
        limit = np.float32(threshold)  # compared in float32, as class_masks compares the probabilities' own dtype
        return lambda band: pack_labels(np.moveaxis(band, -1, 0) > limit)
    return functools.partial(labels_of, threshold=threshold)


@contextlib.contextmanager
def area_rules_applied(
    write: Write, shape: tuple[int, int], postprocess: PostProcess | None, name: str
) -> Iterator[Write]:
    """``write`` itself, unless ``postprocess`` has area rules (a minimum component area or total): they need the
    image's whole components, so the bands are held in one uint8 (height, width) mask, cleaned by
    ``PostProcess.clean`` as whole-image inference cleans it, and handed to ``write`` as one band at the end."""
    if postprocess is None or not postprocess.area_rules:
        yield write
        return
    mask = np.empty(shape, np.uint8)
    logger.info(
        "%s: post-processing's area rules need the whole image's components: its mask is held whole as uint8 (%s)",
        name, format_bytes(mask.nbytes),
    )  # fmt: skip

    def hold(top: int, band: np.ndarray) -> None:
        mask[top : top + band.shape[0]] = band

    yield hold
    write(0, postprocess.clean(mask))
