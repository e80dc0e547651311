"""The competition's metric: mean over images of Dice (1.0 when both masks are empty), and IoU.

Batched torch versions for training, numpy versions for scoring, a scorer for
submission files: ``python -m competition.metrics submission.csv truth.csv``, and multi-class
scores from a confusion matrix accumulated over the data set (``confusion_matrix`` per batch, summed,
then ``segmentation_scores``), also for folders of PNG masks: ``python -m competition.metrics PRED_DIR TRUTH_DIR``.
"""

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from competition.data import read_csv_file
from competition.errors import DataError
from competition.rle import RLEError, rle_runs


def dice_per_image(predicted: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Dice of each image of a batch of binary masks (N, ...) -> (N,), in float32.

    ``valid``: optional bool mask (same shape) of the pixels scored; ignore-index pixels are False.
    """
    predicted = predicted.flatten(1).float()
    truth = truth.flatten(1).float()
    if valid is not None:
        keep = valid.flatten(1).float()
        predicted, truth = predicted * keep, truth * keep
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


def confusion_matrix(
    predicted: torch.Tensor, truth: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """Confusion matrix int64 (K, K) of class-index masks of any equal shape: rows truth, columns predicted.

    Pixels whose truth is ``ignore_index`` are left out. Sum the matrices of batches to get the data set's.
    """
    predicted, truth = torch.as_tensor(predicted), torch.as_tensor(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {tuple(predicted.shape)} vs {tuple(truth.shape)}")
    truth = truth.reshape(-1).long()
    predicted = predicted.reshape(-1).long().to(truth.device)
    if ignore_index is not None:
        keep = truth != ignore_index
        truth, predicted = truth[keep], predicted[keep]
    for name, values in (("truth", truth), ("prediction", predicted)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            bad = torch.unique(values[(values < 0) | (values >= num_classes)])[:5].tolist()
            raise ValueError(f"{name} holds value(s) {bad} outside the classes 0..{num_classes - 1}")
    counts = torch.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def segmentation_scores(confusion, classes) -> dict:
    """Per-class IoU, F1 (= Dice) and truth share, mIoU, macro F1 and pixel accuracy of a confusion matrix.

    A class absent from both truth and prediction has IoU and F1 NaN and is left out of the means (as
    mmsegmentation's nanmean); a class present in only one of them scores 0 and counts.
    """
    matrix = torch.as_tensor(confusion).detach().cpu().double().numpy()
    if matrix.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix {matrix.shape} does not match {len(classes)} classes")
    hits = np.diag(matrix)
    truth_pixels, predicted_pixels = matrix.sum(1), matrix.sum(0)
    union = truth_pixels + predicted_pixels - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, hits / union, np.nan)
        f1 = np.where(union > 0, 2 * hits / (truth_pixels + predicted_pixels), np.nan)
    total = matrix.sum()
    share = truth_pixels / total if total > 0 else np.zeros_like(truth_pixels)
    per_class = pd.DataFrame({"iou": iou, "f1": f1, "truth_share": share}, index=pd.Index(list(classes), name="class"))
    present = ~np.isnan(iou)
    return {
        "miou": float(iou[present].mean()) if present.any() else math.nan,
        "macro_f1": float(f1[present].mean()) if present.any() else math.nan,
        "pixel_accuracy": float(hits.sum() / total) if total > 0 else math.nan,
        "per_class": per_class,
        "confusion": torch.as_tensor(confusion).detach().cpu(),
    }


def format_class_table(scores: dict) -> str:
    """The per-class IoU, F1 and truth share as a text table, then the means."""
    per_class = scores["per_class"]
    width = max([len("class")] + [len(str(name)) for name in per_class.index])
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'F1':>7}  {'share':>8}"]
    for name, row in per_class.iterrows():
        iou = "    n/a" if math.isnan(row["iou"]) else f"{row['iou']:7.4f}"
        f1 = "    n/a" if math.isnan(row["f1"]) else f"{row['f1']:7.4f}"
        lines.append(f"{name!s:<{width}}  {iou}  {f1}  {100 * row['truth_share']:7.2f}%")
    lines.append(
        f"mIoU {scores['miou']:.4f}  macro F1 {scores['macro_f1']:.4f}  pixel accuracy {scores['pixel_accuracy']:.4f}"
    )
    return "\n".join(lines)


def read_index_png(path) -> np.ndarray:
    """A PNG of class indices (palette, greyscale or 16-bit) as its indices, never through RGB."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I;16", "I", "1"):
            raise DataError(
                f"{path}: PNG mode {image.mode} is not a mask of class indices; save it as palette or greyscale"
            )
        return np.asarray(image).astype(np.int64)


def _classes_for(truth_dir: Path, classes: str, max_value: int) -> list[str]:
    """--classes, else classes.txt in the truth folder or its parent, else class_0..class_{max}."""
    if classes:
        return [name.strip() for name in classes.split(",") if name.strip()]
    for folder in (truth_dir, truth_dir.parent):
        path = folder / "classes.txt"
        if path.is_file():
            return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [f"class_{index}" for index in range(max_value + 1)]


def score_mask_folders(pred_dir, truth_dir, classes: str = "", ignore_index: int = 255) -> dict:
    """segmentation_scores of the PNG masks in ``pred_dir`` against those in ``truth_dir`` (matched by stem)."""
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    truth_paths = sorted(truth_dir.glob("*.png"))
    if not truth_paths:
        raise DataError(f"{truth_dir} holds no PNG masks")
    predicted_paths = {path.stem: path for path in pred_dir.glob("*.png")}
    pairs = []
    for truth_path in truth_paths:
        if truth_path.stem not in predicted_paths:
            raise DataError(f"{pred_dir / (truth_path.stem + '.png')}: no prediction for truth mask {truth_path}")
        predicted, truth = read_index_png(predicted_paths[truth_path.stem]), read_index_png(truth_path)
        if predicted.shape != truth.shape:
            raise DataError(
                f"{predicted_paths[truth_path.stem]}: size {predicted.shape} differs from truth {truth.shape}"
            )
        pairs.append((truth_path, predicted, truth))
    max_value = max(int(np.max(values[values != ignore_index], initial=0)) for _, p, t in pairs for values in (p, t))
    names = _classes_for(truth_dir, classes, max_value)
    confusion = torch.zeros(len(names), len(names), dtype=torch.int64)
    for truth_path, predicted, truth in pairs:
        try:
            confusion += confusion_matrix(
                torch.from_numpy(predicted), torch.from_numpy(truth), len(names), ignore_index
            )
        except ValueError as error:
            raise DataError(f"{truth_path}: {error} ({', '.join(names)})") from None
    scores = segmentation_scores(confusion, names)
    scores["images"] = len(pairs)
    return scores


def main_folders(argv: list[str]) -> None:
    """The PNG-folder mode of the command line."""
    parser = argparse.ArgumentParser(description="Score a folder of predicted PNG masks against truth masks.")
    parser.add_argument("pred_dir")
    parser.add_argument("truth_dir")
    parser.add_argument("--classes", default="", help="a,b,c (default: classes.txt in TRUTH_DIR or its parent)")
    parser.add_argument("--ignore-index", type=int, default=255)
    args = parser.parse_args(argv)
    try:
        scores = score_mask_folders(args.pred_dir, args.truth_dir, args.classes, args.ignore_index)
    except DataError as error:
        parser.exit(2, f"metrics: error: {error}\n")
    print(f"{scores['images']} mask(s) scored")
    print(format_class_table(scores))


def main(argv: list[str] | None = None) -> None:
    import sys

    raw = sys.argv[1:] if argv is None else list(argv)
    # the mode is decided by whether the two positional arguments are folders (options' values skipped)
    positional, skip = [], False
    for arg in raw:
        if skip:
            skip = False
        elif arg in ("--classes", "--ignore-index", "--size"):
            skip = True
        elif not arg.startswith("-"):
            positional.append(arg)
    if len(positional) >= 2 and all(Path(arg).is_dir() for arg in positional[:2]):
        return main_folders(raw)
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
