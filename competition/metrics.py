"""The competition's metric: mean over images of Dice (1.0 when both masks are empty), and IoU.

Batched torch versions for training, numpy versions for scoring, and a scorer for
submission files: ``python -m competition.metrics submission.csv truth.csv``.
"""

import argparse

import numpy as np
import pandas as pd
import torch

from competition.data import read_csv_file
from competition.errors import DataError
from competition.rle import RLEError, rle_runs


def dice_per_image(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Dice of each image of a batch of binary masks (N, ...) -> (N,), in float32."""
    predicted = predicted.flatten(1).float()
    truth = truth.flatten(1).float()
    intersection = (predicted * truth).sum(1)
    total = predicted.sum(1) + truth.sum(1)
    return torch.where(total > 0, 2 * intersection / total.clamp_min(1), torch.ones_like(total))


def iou_per_image(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """IoU (Jaccard) of each image of a batch of binary masks (N, ...) -> (N,), 1.0 when both are empty."""
    predicted = predicted.flatten(1).float()
    truth = truth.flatten(1).float()
    intersection = (predicted * truth).sum(1)
    union = predicted.sum(1) + truth.sum(1) - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))


def dice_score(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice of one pair of binary masks (non-zero is foreground)."""
    predicted, truth = np.asarray(predicted) != 0, np.asarray(truth) != 0
    if predicted.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {predicted.shape} vs {truth.shape}")
    total = int(predicted.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(predicted, truth).sum()) / total


def iou_score(predicted: np.ndarray, truth: np.ndarray) -> float:
    """IoU of one pair of binary masks (non-zero is foreground)."""
    predicted, truth = np.asarray(predicted) != 0, np.asarray(truth) != 0
    if predicted.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {predicted.shape} vs {truth.shape}")
    union = int(np.logical_or(predicted, truth).sum())
    return 1.0 if union == 0 else int(np.logical_and(predicted, truth).sum()) / union


def _runs_overlap(starts_a, ends_a, starts_b, ends_b) -> int:
    """Pixels covered by both of two sorted, disjoint run lists."""
    overlap, i, j = 0, 0, 0
    while i < len(starts_a) and j < len(starts_b):
        overlap += max(0, min(ends_a[i], ends_b[j]) - max(starts_a[i], starts_b[j]))
        if ends_a[i] < ends_b[j]:
            i += 1
        else:
            j += 1
    return overlap


def rle_dice(predicted_rle: str, truth_rle: str, n_pixels: int) -> float:
    """Dice of two RLE strings over an image of ``n_pixels``, computed on the runs without decoding."""
    starts_p, ends_p = rle_runs(predicted_rle, n_pixels)
    starts_t, ends_t = rle_runs(truth_rle, n_pixels)
    total = int((ends_p - starts_p).sum() + (ends_t - starts_t).sum())
    if total == 0:
        return 1.0
    return 2.0 * _runs_overlap(starts_p.tolist(), ends_p.tolist(), starts_t.tolist(), ends_t.tolist()) / total


def score_submission(submission: pd.DataFrame, truth: pd.DataFrame, n_pixels: int) -> pd.Series:
    """Dice per image (indexed by ``img``) of a submission against the true masks, both ``img,rle_mask``."""
    for name, frame in (("submission", submission), ("truth", truth)):
        missing = {"img", "rle_mask"} - set(frame.columns)
        if missing:
            raise DataError(f"{name} lacks column(s) {sorted(missing)}; expected img,rle_mask")
    predicted = dict(zip(submission["img"], submission["rle_mask"]))
    missing_rows = [img for img in truth["img"] if img not in predicted]
    if missing_rows:
        raise DataError(f"submission has no row for {len(missing_rows)} image(s), e.g. {missing_rows[:3]}")
    scores = {}
    for img, truth_rle in zip(truth["img"], truth["rle_mask"]):
        try:
            scores[img] = rle_dice(predicted[img], truth_rle, n_pixels)
        except RLEError as error:
            raise DataError(f"row {img}: {error}") from None
    return pd.Series(scores, name="dice")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Score a submission CSV against a truth CSV (both img,rle_mask).")
    parser.add_argument("submission")
    parser.add_argument("truth", help="e.g. input/test_masks.csv from the synthetic data set")
    parser.add_argument("--size", default="1280x1918", help="image HEIGHTxWIDTH (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        height, width = (int(side) for side in args.size.lower().split("x"))
    except ValueError:
        parser.exit(2, f"metrics: error: --size {args.size!r} must be HEIGHTxWIDTH, e.g. 1280x1918\n")
    try:
        frames = [read_csv_file(path, dtype=str, keep_default_na=False) for path in (args.submission, args.truth)]
        scores = score_submission(*frames, n_pixels=width * height)
    except DataError as error:
        parser.exit(2, f"metrics: error: {error}\n")
    print(f"mean Dice {scores.mean():.5f} over {len(scores)} images (worst {scores.min():.5f}: {scores.idxmin()})")


if __name__ == "__main__":
    main()
