"""Scores: Carvana's mean Dice per image and IoU; for any data set the confusion matrix and its mIoU, macro F1,
pixel accuracy and per-class IoU/F1.

Batched torch versions for training, numpy versions for scoring, and a scorer for submission files
(``python -m competition.metrics submission.csv truth.csv``; per-class RLE tables such as UW-Madison's
``id,class,predicted`` are scored by mean Dice over (image, class) pairs) or folders of PNG masks
(``python -m competition.metrics predicted/ truth/``: the truth read by the data layer's rules, with the settings
of the model recorded beside the predictions unless flags give them).
"""

import functools
import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from competition.carvana import CarvanaData
from competition.checkpoints import checkpoint_config, load_checkpoint
from competition.config import add_config_arguments, resolve_config
from competition.data import image_id_of, read_csv_file
from competition.errors import ConfigError, DataError, ProjectError
from competition.layouts import DATA_FLAGS, MaskFolder, open_data_as
from competition.logs import OneLineParser, add_logging_arguments, configure_from
from competition.mask_values import check_packed_values, unpack_labels
from competition.rle import RLEError, rle_runs
from competition.rle_table import uw_madison_scans
from competition.segmentation_data import (
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    files_by_stem,
    parse_classes,
    read_index_mask,
)
from competition.slides import header_shape
from competition.splits import resolve
from competition.submission import (
    IMAGE_ROWS,
    RECORD_NAME,
    check_rows,
    first_rows,
    sample_image_id,
    split_rle_columns,
)

logger = logging.getLogger("competition.metrics")


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


def confusion_matrix(predicted: torch.Tensor, truth: torch.Tensor, num_classes: int, ignore_index: int | None = 255):
    """(classes, classes) int64 counts of pixels, rows the true class and columns the predicted one, over every
    pixel whose truth is not ``ignore_index``: sum it over batches for the data set's matrix."""
    truth = truth.reshape(-1).long()
    predicted = predicted.reshape(-1).long()
    if ignore_index is not None:
        labelled = truth != ignore_index
        truth, predicted = truth[labelled], predicted[labelled]
    if truth.numel() and (truth.min() < 0 or truth.max() >= num_classes):
        raise ValueError(f"truth holds class {int(truth.max())}, outside 0..{num_classes - 1}")
    counts = torch.bincount(truth * num_classes + predicted.clamp(0, num_classes - 1), minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes)


def segmentation_scores(confusion, classes) -> dict:
    """mIoU, macro F1 and pixel accuracy of a confusion matrix, and IoU, F1 and truth share per class.

    A class in neither the truth nor the predictions has no IoU (NaN) and stays out of the means, as in
    mmsegmentation and torchmetrics; a class in the truth never predicted (or the reverse) scores 0.
    """
    confusion = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.float64)
    hits = np.diag(confusion)
    truth_pixels, predicted_pixels = confusion.sum(1), confusion.sum(0)
    union = truth_pixels + predicted_pixels - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, hits / union, np.nan)
        f1 = np.where(union > 0, 2 * hits / (truth_pixels + predicted_pixels), np.nan)
    total = confusion.sum()
    per_class = pd.DataFrame(
        {"iou": iou, "f1": f1, "truth_share": truth_pixels / total if total else np.zeros_like(iou)},
        index=pd.Index(list(classes), name="class"),
    )
    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "macro_f1": float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan"),
        "pixel_accuracy": float(hits.sum() / total) if total else float("nan"),
        "per_class": per_class,
        "confusion": confusion.astype(np.int64),
    }


def format_class_table(scores: dict) -> str:
    """The per-class table (IoU, F1, share of the true pixels), then the means: a rare class stays in sight."""
    table = scores["per_class"].copy()
    table["truth_share"] = (table["truth_share"] * 100).map(lambda share: f"{share:.2f}%")
    table.columns = ["IoU", "F1", "share"]
    means = (
        f"mIoU {scores['miou']:.4f}, macro F1 {scores['macro_f1']:.4f}, pixel accuracy {scores['pixel_accuracy']:.4f}"
    )
    return table.to_string(float_format=lambda value: f"{value:.4f}") + "\n" + means


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


def score_submission(
    submission: pd.DataFrame, truth: pd.DataFrame, shape, source: str = "submission", truth_source: str = "the truth"
) -> pd.Series:
    """Dice per image (indexed by ``img``) of a submission against the true masks, both ``img,rle_mask``, each
    mask of ``shape`` (HEIGHT, WIDTH), or of ``shape(image_id)`` when it is a function. The submission's rows are
    checked as infer.py checks its own (``check_rows``: each truth image once, nothing else, every run inside its
    mask), and a fault names ``source``'s row."""
    for name, frame in (("submission", submission), ("truth", truth)):
        missing = {"img", "rle_mask"} - set(frame.columns)
        if missing:
            raise DataError(f"{name} lacks column(s) {sorted(missing)}; expected img,rle_mask")
    if truth.empty:
        raise DataError(f"{truth_source} has no rows: nothing to score; name the truth of the images predicted")
    first_rows(truth, truth_source)  # a repeated truth row would replace the first silently
    checked = check_rows(
        submission[["img", "rle_mask"]], source, truth["img"].tolist(), shape, IMAGE_ROWS, truth_source
    )
    predicted = dict(zip(checked["img"], checked["rle_mask"]))
    scores = {}
    for number, (img, truth_rle) in enumerate(zip(truth["img"], truth["rle_mask"]), start=2):
        height, width = shape(image_id_of(img)) if callable(shape) else shape
        try:
            scores[img] = rle_dice(predicted[img], truth_rle, height * width)
        except RLEError as error:
            raise DataError(f"{truth_source}: row {number} ({img}): {error}") from None
    return pd.Series(scores, name="dice")


def read_rle_table(path, frame: pd.DataFrame | None = None) -> tuple[pd.DataFrame | None, dict[tuple[str, str], str]]:
    """An RLE table read by its header (``split_rle_columns``' rule): a row per image as (``img,rle_mask`` rows,
    {}), a row per (image, class) as (None, {(image, class): RLE}); one line naming a row that repeats a pair."""
    frame = read_csv_file(path, dtype=str, keep_default_na=False) if frame is None else frame
    images, classes, rle_column = split_rle_columns(frame, path)
    if classes is None:
        return pd.DataFrame({"img": images, "rle_mask": frame[rle_column].tolist()}), {}
    table: dict[tuple[str, str], str] = {}
    first: dict[tuple[str, str], int] = {}
    for number, pair in enumerate(zip(images, classes), start=2):
        if pair in table:
            raise DataError(f"{path}: row {number} repeats image {pair[0]} class {pair[1]} of row {first[pair]}")
        first[pair] = number
        table[pair] = frame[rle_column].iat[number - 2]
    return None, table


def read_class_table(path) -> dict[tuple[str, str], str]:
    """A per-class RLE table as {(image, class): RLE}; one line for a table of a row per image."""
    rows, table = read_rle_table(path)
    if rows is not None:
        raise DataError(f"{path}: a row per image, but the truth has a row per (image, class); predict its rows")
    return table


def read_image_table(path) -> pd.DataFrame:
    """A table of a row per image as ``img,rle_mask`` rows; one line for a per-class table."""
    rows, _ = read_rle_table(path)
    if rows is None:
        raise DataError(f"{path}: a row per (image, class), but the truth has a row per image; predict its rows")
    return rows


def score_class_tables(submission_path, truth_path, shape) -> pd.Series:
    """Dice of each (image, class) row of a per-class RLE submission against a per-class RLE truth table (an absent
    truth row is an empty mask; both empty: 1), as Severstal and UW-Madison score, indexed by (image, class). Both
    tables flatten their masks the same way (Dice on runs is the same row- or column-major); a truth mask the
    submission has no row for is one line. ``shape``: (HEIGHT, WIDTH), or ``shape(image_id)``."""
    predicted = read_class_table(submission_path)
    truth = read_class_table(truth_path)
    unscored = [pair for pair, rle in truth.items() if rle.strip() and pair not in predicted]
    if unscored:
        raise DataError(
            f"{submission_path}: no row for {len(unscored)} (image, class) pair(s) with a true mask in {truth_path}, "
            f"e.g. {unscored[:3]}; predict with the competition's sample submission"
        )
    scores = {}
    for (image, name), rle in predicted.items():
        height, width = shape(sample_image_id(image)) if callable(shape) else shape
        try:
            scores[(image, name)] = rle_dice(rle, truth.get((image, name), ""), height * width)
        except RLEError as error:
            raise DataError(f"{submission_path} or {truth_path}: image {image} class {name}: {error}") from None
    return pd.Series(scores, name="dice")


def image_file_shapes(folder: Path, where: str):
    """(height, width) of each image of ``folder``'s ``test/`` or ``train/`` (any image extension), by its id,
    read from the file's header when asked (a slide's TIFF header too: nothing decoded); one line for an id
    without an image."""
    files = {}
    for split in ("train", "test"):
        for extension in IMAGE_EXTENSIONS:
            files |= {path.stem: path for path in (folder / split).rglob(f"*{extension}")}
        if (folder / split).is_dir():
            files |= uw_madison_scans(folder / split)  # named by their row ids, not their stems

    @functools.cache
    def shape(image_id: str) -> tuple[int, int]:
        if image_id not in files:
            raise DataError(
                f"{where}: image {image_id} has no file in {folder}/test/ or train/; give the masks' size with --size "
                "HEIGHTxWIDTH, or their images' folder with --data-dir"
            )
        return header_shape(files[image_id])

    return shape


def truth_image_shapes(truth_path: Path, folder: Path):
    """(height, width) of each truth row's image, by its id, read from the image file's header in the ``test/``
    or ``train/`` images (folders or the competition's zips) of ``folder``: an RLE row carries no size."""
    ask = "give the masks' size with --size HEIGHTxWIDTH, or the folder of their images with --data-dir"
    try:
        data = CarvanaData(folder)
    except DataError:
        raise DataError(
            f"{truth_path}: its RLE rows carry no size and {folder} has no test/ or train/ images; {ask}"
        ) from None
    split_of = {image_id: "train" for image_id in data.train_ids()} | {image_id: "test" for image_id in data.test_ids()}
    logger.info("%s: the masks' sizes are their images' in %s (--size gives one size instead)", truth_path, folder)

    @functools.cache
    def shape(image_id: str) -> tuple[int, int]:
        if image_id not in split_of:
            raise DataError(f"{truth_path}: {image_id}.jpg has no image in {folder}/test/ or train/; {ask}")
        return data.image_shape(image_id, split_of[image_id])

    return shape


def submission_shape(size: str | None, truth_path: Path, data_dir: str | None):
    """The masks' size: ``--size`` HEIGHTxWIDTH, else each image's own beside the truth (``truth_image_shapes``)
    in ``--data-dir``, or in the truth CSV's folder."""
    if size is None:
        return truth_image_shapes(truth_path, Path(data_dir) if data_dir else truth_path.parent)
    try:
        height, width = (int(side) for side in size.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size {size!r} must be HEIGHTxWIDTH, e.g. 1280x1918") from None
    if height < 1 or width < 1:
        raise ConfigError(f"--size {size!r} must be HEIGHTxWIDTH, each at least 1")
    return height, width


def read_mask_png(path: Path) -> np.ndarray:
    """A mask PNG's class indices, read as stored (palette or greyscale), never through RGB."""

    return read_index_mask(path.read_bytes(), str(path))


# The settings that say how truth masks are stored, as TrainConfig names them, and their defaults.
TRUTH_DEFAULTS = {
    "classes": "",
    "ignore_index": 255,
    "mask_values": "",
    "colors": "",
    "unknown_colors": "error",
    "unknown_values": "error",
    "snap_mask_values": False,
    "head": "auto",
}
PET_STORED = {"ignore": "2,1", "class": "2,1,3"}  # Oxford-IIIT Pet trimaps: 2 background, 1 pet, 3 border


def recorded_settings(predicted_dir: Path) -> tuple[dict, str]:
    """The truth settings of the model that wrote ``predicted_dir`` and the file they were read from: the
    ``config`` of its predicted-by.json, else its first checkpoint's; ({}, "") when neither is there."""

    path = predicted_dir / RECORD_NAME
    if not path.is_file():
        return {}, ""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(
            f"{path}: not readable JSON ({error}); delete it and give the truth's classes as flags"
        ) from None
    config = record.get("config") if isinstance(record, dict) else None
    if not isinstance(config, dict):  # written before records held the config: the first checkpoint's
        checkpoints = record.get("checkpoints") if isinstance(record, dict) else None
        first = checkpoints[0].get("path") if checkpoints and isinstance(checkpoints[0], dict) else None
        if not first or not Path(first).is_file():
            return {}, ""
        config, path = asdict(checkpoint_config(load_checkpoint(first), first)), Path(first)
    settings = {name: config[name] for name in TRUTH_DEFAULTS if name in config}
    colors = settings.pop("colors", "")
    table = resolve(Path(config.get("data_dir") or "."), colors) if colors else None
    if table is not None and table.is_file():  # relative to the training data; gone from there: found beside the truth
        settings["colors"] = str(table.resolve())
    if len([name for name in settings.get("classes", "").split(",") if name.strip()]) == 2:
        # Two classes: the truth's own two values say which is which, as training reads two-valued masks;
        # the values of the training masks (0/1) would make another truth's foreground (255) the ignore index.
        settings.pop("mask_values", None)
        settings.pop("unknown_values", None)  # it needs the values popped just above
    if config.get("layout") == "pet":  # trained on trimaps: truth trimaps are read as PetData reads them
        border = config.get("pet_border", "ignore")
        settings["mask_values"] = PET_STORED.get(border, PET_STORED["ignore"])
        if border != "class":
            settings["ignore_index"] = 3
    return settings, str(path)


def score_mask_folders(
    predicted_dir: Path, truth_dir: Path, classes: list[str] | None = None, ignore_index: int | None = None, **given
) -> dict:
    """segmentation_scores of every truth mask in ``truth_dir``, read by the data layer's rules (MaskFolder),
    against the predicted class indices of the same stem. How the truth is stored: ``classes``,
    ``ignore_index`` and ``given`` (TRUTH_DEFAULTS' other names) where not None, else the record beside the
    predictions (recorded_settings), else the defaults."""

    predicted_dir, truth_dir = Path(predicted_dir), Path(truth_dir)
    recorded, record_path = recorded_settings(predicted_dir)
    flags = {**given, "classes": ",".join(classes) if classes else None, "ignore_index": ignore_index}
    settings = TRUTH_DEFAULTS | recorded | {name: value for name, value in flags.items() if value is not None}
    if settings["colors"] and Path(settings["colors"]).is_file():  # named from here rather than the truth folder
        settings["colors"] = str(Path(settings["colors"]).resolve())
    multilabel = settings.pop("head") == "multilabel"
    truth = MaskFolder(truth_dir, **settings, multilabel=multilabel)
    source = "--classes" if classes else record_path if recorded.get("classes") else truth.classes_from
    logger.info("%s: %d classes (%s) from %s", truth_dir, truth.num_classes, ", ".join(truth.classes), source)
    predicted_files = files_by_stem(predicted_dir, MASK_EXTENSIONS)
    missing = sorted(set(truth.masks) - set(predicted_files))
    if missing:
        raise DataError(f"{predicted_dir}: no prediction for {len(missing)} truth mask(s), e.g. {missing[:3]}")
    if multilabel:
        pairs = ((predicted_files[stem], truth.read_mask(stem), truth.mask_source(stem)) for stem in truth.train_ids())
        return score_label_pairs(pairs, truth.classes)
    confusion = torch.zeros((truth.num_classes, truth.num_classes), dtype=torch.int64)
    for stem in truth.train_ids():
        predicted, truth_mask = read_mask_png(predicted_files[stem]), truth.read_mask(stem)
        if predicted.shape != truth_mask.shape:
            raise DataError(
                f"{predicted_files[stem]}: {predicted.shape[1]}x{predicted.shape[0]}, but the truth "
                f"{truth.mask_source(stem)} is {truth_mask.shape[1]}x{truth_mask.shape[0]}; predict at the truth's size"
            )
        if predicted.max() >= truth.num_classes:
            raise DataError(
                f"{predicted_files[stem]}: class {int(predicted.max())}, beyond the truth's {truth.num_classes} "
                f"classes ({', '.join(truth.classes)}); give the model's classes with --classes"
            )
        confusion += confusion_matrix(
            torch.from_numpy(predicted), torch.from_numpy(truth_mask), truth.num_classes, truth.ignore_index
        )
    return {**segmentation_scores(confusion, truth.classes), "images": len(truth.masks)}


def label_dice(predicted: np.ndarray, truth: np.ndarray, num_labels: int) -> np.ndarray:
    """Dice of each class (K,) of one pair of packed multilabel masks (bit k: class k), over the pixels the truth
    does not ignore (255); 1 for a class in neither mask, as Kaggle scores (image, class) pairs."""
    labelled = truth != 255
    predicted_bits, truth_bits = unpack_labels(predicted, num_labels), unpack_labels(truth, num_labels)
    return np.array([dice_score(predicted_bits[k][labelled], truth_bits[k][labelled]) for k in range(num_labels)])


def score_label_pairs(pairs, classes: list[str]) -> dict:
    """Multilabel scores of (predicted PNG path, truth packed mask, truth's source) ``pairs``: ``per_class`` Dice
    (mean over images), ``dice`` the mean over (image, class) pairs, empty/empty scoring 1."""
    rows = []
    for path, truth, source in pairs:
        predicted = read_mask_png(path)
        if predicted.shape != truth.shape:
            raise DataError(
                f"{path}: {predicted.shape[1]}x{predicted.shape[0]}, but the truth {source} is "
                f"{truth.shape[1]}x{truth.shape[0]}; predict at the truth's size"
            )
        check_packed_values(predicted, len(classes), str(path))
        rows.append(label_dice(predicted, truth, len(classes)))
    dice = np.stack(rows)
    per_class = pd.DataFrame({"dice": dice.mean(0)}, index=pd.Index(list(classes), name="class"))
    return {"multilabel": True, "per_class": per_class, "dice": float(dice.mean()), "images": len(rows)}


def format_scores(scores: dict) -> str:
    """The table of ``score_mask_folders``' scores: per-class IoU and F1, or multilabel Dice per class."""
    if not scores.get("multilabel"):
        return format_class_table(scores)
    table = scores["per_class"].to_string(float_format=lambda value: f"{value:.4f}", header=["Dice"])
    return f"{table}\nmean Dice {scores['dice']:.5f} over (image, class) pairs"


def score_test_masks(predicted_dir: Path, data) -> dict:
    """segmentation_scores of the predicted PNG masks against the data's test masks, read as training reads
    masks (colours, stored values, suffixes, splits): a CamVid testannot/, Oxford-IIIT Pet's test trimaps."""
    image_ids = data.test_mask_ids()
    if not image_ids:
        raise DataError(
            f"{data.root}: no test image has a mask to score against; without test masks, score the held-out "
            "folds with infer.py --oof (--out DIR writes their masks), or name a test split with masks "
            "(--split test=IMAGES:MASKS)"
        )
    missing = [image_id for image_id in image_ids if not (predicted_dir / f"{image_id}.png").is_file()]
    if missing:
        raise DataError(f"{predicted_dir}: no prediction for {len(missing)} test mask(s), e.g. {missing[:3]}")
    if data.multilabel:
        pairs = (
            (predicted_dir / f"{image_id}.png", data.read_mask(image_id, split="test"), image_id)
            for image_id in image_ids
        )
        return score_label_pairs(pairs, data.classes)
    confusion = torch.zeros((data.num_classes, data.num_classes), dtype=torch.int64)
    for image_id in image_ids:
        predicted, truth = read_mask_png(predicted_dir / f"{image_id}.png"), data.read_mask(image_id, split="test")
        if predicted.shape != truth.shape or predicted.max() >= data.num_classes:
            raise DataError(
                f"{predicted_dir / image_id}.png: {predicted.shape[1]}x{predicted.shape[0]} with classes up to "
                f"{predicted.max()}, but the truth is {truth.shape[1]}x{truth.shape[0]} with {data.num_classes}"
            )
        confusion += confusion_matrix(
            torch.from_numpy(predicted), torch.from_numpy(truth), data.num_classes, data.ignore_index
        )
    return {**segmentation_scores(confusion, data.classes), "images": len(image_ids)}


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(
        description="Score a submission CSV against a truth CSV (both img,rle_mask), or a folder of predicted PNG "
        "masks (class indices, as infer.py writes them) against a folder of truth masks matched by name and read "
        "as training reads masks (two-valued masks, colour tables, --mask-values; the settings of the model "
        "recorded beside the predictions unless flags say otherwise), or against the test masks of a --data-dir "
        "read with the data flags of train.py (a test split's colour masks, say)."
    )
    parser.add_argument("submission", help="a submission CSV, or a folder of predicted masks")
    parser.add_argument(
        "truth", nargs="?", help="e.g. input/test_masks.csv, or input-parts/test_masks/ (or --data-dir instead)"
    )
    parser.add_argument(
        "--size",
        help="CSV: the masks' HEIGHTxWIDTH, e.g. 1280x1918 (default: each image's own, read from the test/ or train/ "
        "images in the truth CSV's folder, or in --data-dir)",
    )
    parser.add_argument(
        "--classes",
        help="class names a,b,c (default: the model's, from predicted-by.json beside the predictions; else a colour "
        "table or classes.txt beside the truth masks or in their parent folder; else from the masks' values)",
    )
    parser.add_argument("--ignore-index", type=int, help="truth value scored nowhere (default: the model's, else 255)")

    add_config_arguments(parser, tuple(name for name in DATA_FLAGS if name not in ("classes", "ignore_index")))
    add_logging_arguments(parser)
    args = parser.parse_args(argv)
    configure_from(args)
    if args.truth is None:
        try:
            data = open_data_as(resolve_config(args, DATA_FLAGS))
            scores = score_test_masks(Path(args.submission), data)
        except ProjectError as error:
            parser.exit(2, f"metrics: error: {error}\n")
        print(f"{scores['images']} masks")
        print(format_scores(scores))
        return
    if Path(args.submission).is_dir() or Path(args.truth).is_dir():
        given = {name: getattr(args, name) for name in TRUTH_DEFAULTS if name not in ("classes", "ignore_index")}
        try:
            classes = parse_classes(args.classes) if args.classes else None
            scores = score_mask_folders(Path(args.submission), Path(args.truth), classes, args.ignore_index, **given)
        except ProjectError as error:
            parser.exit(2, f"metrics: error: {error}\n")
        print(f"{scores['images']} masks")
        print(format_scores(scores))
        return
    try:
        frame = read_csv_file(args.truth, dtype=str, keep_default_na=False)
        truth, _ = read_rle_table(args.truth, frame)
        if truth is None:  # a per-class table (image, class, RLE)
            return _score_class_tables(args)
        if list(frame.columns) == ["img", "rle_mask"]:  # Carvana's: the sizes of its images, folders or zips
            shape = submission_shape(args.size, Path(args.truth), args.data_dir)
        else:
            shape = _table_shapes(args)
        submission = read_image_table(args.submission)
        scores = score_submission(submission, truth, shape, args.submission, f"the truth {args.truth}")
    except ProjectError as error:
        parser.exit(2, f"metrics: error: {error}\n")
    print(f"mean Dice {scores.mean():.5f} over {len(scores)} images (worst {scores.min():.5f}: {scores.idxmin()})")


def _table_shapes(args):
    """--size, else each image's own from its file's header in --data-dir's (or the truth's folder's) test/ or
    train/ (a slide's TIFF header: never decoded)."""
    folder = Path(args.data_dir) if args.data_dir else Path(args.truth).parent
    return submission_shape(args.size, Path(args.truth), None) if args.size else image_file_shapes(folder, args.truth)


def _score_class_tables(args) -> None:
    scores = score_class_tables(args.submission, args.truth, _table_shapes(args))
    by_class = scores.groupby(level=1).mean()
    images = len(set(scores.index.get_level_values(0)))
    print(
        f"mean Dice {scores.mean():.5f} over {len(scores)} (image, class) pairs of {images} images; per class: "
        + ", ".join(f"{name} {value:.5f}" for name, value in by_class.items())
    )


if __name__ == "__main__":
    main()
