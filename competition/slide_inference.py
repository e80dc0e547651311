"""Fold ensembles as the sliding window's ``predict``: a slide's windows through the same models, TTA views and
precision as whole images."""

import numpy as np
import torch

from competition.data import resize_image, to_chw
from competition.sliding_window import Predict


def window_predictor(ensemble) -> Predict:
    """``predict(windows)`` of ``competition.sliding_window`` for an ``inference.Ensemble`` (not imported: the
    prediction stream, below it, predicts slides with this): uint8 (N, tile, tile, C) windows -> float32 numpy
    (N, K, tile, tile) probabilities averaged over the members and their TTA views, each member seeing the windows
    at its input size (a full-size member: as they are) and its probabilities resized back to the tile."""

    def predict(windows: np.ndarray) -> np.ndarray:
        tile = windows.shape[1:3]
        batches = {}
        for key, size in ensemble.input_sizes.items():
            resized = [window if size is None else resize_image(window, size) for window in windows]
            batches[key] = torch.stack([to_chw(window) for window in resized]).to(ensemble.device)
        with torch.inference_mode():
            return ensemble.probabilities(batches, tile).cpu().numpy()

    return predict
