"""Out-of-fold scores of every layout: each fold's models on their held-out images at full resolution, Dice per
image and the best threshold for binary models, the confusion matrix and per-class table for all, the worst
images drawn, and the out-of-fold masks written when asked."""

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from competition import inference
from competition.data import as_rgb, image_id_of
from competition.environment import explain_out_of_memory
from competition.errors import ConfigError, DataError
from competition.files import atomic_output
from competition.folds import read_folds
from competition.inference import Member, fold_ensembles, prediction_record
from competition.metrics import confusion_matrix, dice_per_image, format_class_table, segmentation_scores
from competition.postprocess import (
    TUNE_LONGEST_SIDE,
    OutOfFoldStore,
    PostProcess,
    tune,
    write_postprocess,
)
from competition.prediction import label_masks
from competition.prediction_stream import (
    PredictionImages,
    class_masks,
    device_batches,
    expected_shape,
    image_batches,
    prediction_loader,
)
from competition.submission import RECORD_NAME
from competition.writers import Output, colour_overlay, label_overlay, outlines, overlay, palette, save_png

logger = logging.getLogger(__name__)

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
OOF_RECORD_NAME = "oof.predicted-by.json"


def dice_column(threshold: float) -> str:
    """``dice_0.50``: the out-of-fold column of the Dice at ``threshold``."""
    return f"dice_{threshold:.2f}" if round(threshold, 2) == threshold else f"dice_{threshold:g}"


def _binary_scores(plain, augmented, truth, labelled, thresholds) -> dict[str, list[float]]:
    """Dice of each image over its labelled pixels: without TTA at 0.5, with TTA at each threshold."""
    foreground = (truth == 1) & labelled
    scores = {"dice_plain": dice_per_image((plain[:, 0] > 0.5) & labelled, foreground).tolist()}
    for threshold in thresholds:
        scores[dice_column(threshold)] = dice_per_image((augmented[:, 0] > threshold) & labelled, foreground).tolist()
    return scores


def _label_scores(plain, augmented, truth, classes: list[str], threshold: float) -> dict[str, list[float]]:
    """Multilabel Dice of each image over its labelled pixels (the packed ``truth``'s 255 left out), each class's
    with TTA at ``threshold`` (``dice_<class>``, 1 when the class is in neither mask), their mean (``dice``), and the
    mean without TTA at 0.5 (``dice_plain``)."""
    labelled = (truth != 255).unsqueeze(1)
    bits = (1 << torch.arange(len(classes), device=truth.device)).reshape(1, -1, 1, 1)
    present = ((truth.unsqueeze(1).long() & bits) != 0) & labelled

    def per_class(probabilities, limit) -> torch.Tensor:
        predicted = (probabilities > limit) & labelled
        return dice_per_image(predicted.flatten(0, 1), present.flatten(0, 1)).reshape(len(truth), -1)

    tta, untouched = per_class(augmented, threshold), per_class(plain, 0.5)
    scores = {"dice_plain": untouched.mean(1).tolist(), "dice": tta.mean(1).tolist()}
    scores.update({f"dice_{name}": tta[:, index].tolist() for index, name in enumerate(classes)})
    return scores


class FoldScores:
    """The rows of oof.csv and the confusion matrices (without and with TTA) as the folds' images are scored;
    for a multilabel run each class's Dice per image instead (no confusion matrix: classes overlap)."""

    def __init__(
        self,
        classes: list[str],
        ignore_index: int | None,
        binary: bool,
        thresholds,
        threshold: float,
        multilabel: bool = False,
    ):
        self.classes, self.ignore_index, self.binary = classes, ignore_index, binary
        self.thresholds, self.threshold, self.multilabel = thresholds, threshold, multilabel
        self.rows: list[dict] = []
        self.confusion = {"plain": 0, "tta": 0}

    def add(self, names: list[str], fold: int, plain, augmented, truth) -> np.ndarray:
        """Scores a batch ((N, C, H, W) probabilities, (N, H, W) truth); returns its TTA class masks."""
        if self.multilabel:
            scores = _label_scores(plain, augmented, truth, self.classes, self.threshold)
            for position, name in enumerate(names):
                self.rows.append(
                    {"img": name, "fold": fold} | {key: values[position] for key, values in scores.items()}
                )
            return label_masks(augmented, self.threshold)
        labelled = truth != self.ignore_index if self.ignore_index is not None else torch.ones_like(truth, dtype=bool)
        scores = _binary_scores(plain, augmented, truth, labelled, self.thresholds) if self.binary else {}
        masks = {"plain": class_masks(plain, 0.5), "tta": class_masks(augmented, self.threshold)}
        for position, name in enumerate(names):
            row = {"img": name, "fold": fold} | {key: values[position] for key, values in scores.items()}
            for key, batch_masks in masks.items():
                predicted = torch.from_numpy(batch_masks[position]).to(truth.device)
                image_confusion = confusion_matrix(predicted, truth[position], len(self.classes), self.ignore_index)
                self.confusion[key] = self.confusion[key] + image_confusion.cpu()
            row["miou"] = segmentation_scores(image_confusion, self.classes)["miou"]  # with TTA, at the threshold
            self.rows.append(row)
        return masks["tta"]

    def rank_column(self) -> str:
        """The per-image score the worst images are ranked by: Dice at the threshold (binary), the mean Dice over
        the classes (multilabel), else mIoU."""
        if self.multilabel:
            return "dice"
        return dice_column(self.threshold) if self.binary else "miou"


def same_checkpoints(record_path: Path, record: dict) -> bool:
    """Whether the record at ``record_path`` names the checkpoints of ``record`` (the same files, unchanged)."""
    try:
        recorded = json.loads(record_path.read_text())["checkpoints"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return recorded == json.loads(json.dumps(record["checkpoints"]))


def check_oof_file(out_dir: Path, record: dict, overwrite: bool) -> None:
    """An oof.csv of other checkpoints is never replaced unasked; the same models' one is scored again."""
    if not (out_dir / "oof.csv").is_file() or overwrite:
        return
    if not same_checkpoints(out_dir / OOF_RECORD_NAME, record):
        raise ConfigError(
            f"{out_dir / 'oof.csv'} holds the out-of-fold scores of other checkpoints; pass --overwrite to replace them, or "
            "another --out-dir"
        )


@torch.no_grad()
def out_of_fold(
    members: list[Member],
    data,
    folds_csv: str | Path,
    tta: tuple[str, ...],
    precision: str,
    threshold: float = 0.5,
    batch_size: int = 4,
    workers: int = 4,
    masks_out: str | Path | None = None,
    overwrite: bool = False,
    store: OutOfFoldStore | None = None,
) -> FoldScores:
    """Each fold's models (one per run folder) scored together on their held-out images at full resolution;
    ``masks_out``: a folder the TTA masks of those images go to, as palette PNGs; ``store``: keeps the TTA
    probabilities for the post-processing search."""
    folds = read_folds(folds_csv)
    classes = list(data.classes)
    multilabel = members[0].config.multilabel()
    binary = members[0].config.output_channels() == 1 and not multilabel
    thresholds = tuple(sorted({*THRESHOLDS, threshold})) if binary else ()
    scores = FoldScores(classes, data.ignore_index, binary, thresholds, threshold, multilabel)
    sink = None
    if masks_out is not None:
        writer = Output("png", str(masks_out), len(classes), multilabel=multilabel).writer()
        record = prediction_record([member.path for member in members], tta, threshold, members[0].config)
        same = same_checkpoints(Path(masks_out) / RECORD_NAME, record)  # the same models' masks: written again
        writer.begin(record, [], False, overwrite or same)
        sink = writer.sink(str(masks_out), data, False)
    for fold, ensemble in fold_ensembles(members, tta, precision).items():
        names = folds.loc[folds["fold"] == fold, "img"].tolist()
        if not names:
            raise DataError(f"{folds_csv}: fold {fold} of {ensemble.members[0].path} has no images")
        image_ids = [image_id_of(name) for name in names]
        data.in_channels = ensemble.in_channels  # the models decide the channels they take
        fixed = expected_shape(ensemble, data) is not None
        positions = {image_id: index for index, image_id in enumerate(image_ids)}
        batches = [[positions[image_id] for image_id in batch]
                   for batch in image_batches(data, image_ids, "train", batch_size, fixed)]  # fmt: skip
        dataset = PredictionImages(data, image_ids, "train", ensemble.input_sizes, with_masks=True)
        fix = f"lower --batch-size (now {batch_size})"
        with explain_out_of_memory(f"a batch of {batch_size} validation images", fix):
            loader = prediction_loader(dataset, batches, workers, ensemble.device)
            for batch, images in device_batches(loader, ensemble.device):
                truth = batch["mask"][:, 0].to(ensemble.device)
                plain, augmented = ensemble.plain_and_augmented(images, tuple(truth.shape[-2:]))
                if store is not None:
                    store.add(augmented.float().cpu().numpy(), truth.cpu().numpy())
                indices = batch["index"].tolist()
                masks = scores.add([names[index] for index in indices], fold, plain, augmented, truth)
                if sink is not None:
                    sink.write([(image_ids[index], sink.encode(image_ids[index], mask)) for index, mask in
                                zip(indices, masks)])  # fmt: skip
    return scores


def oof_report(
    members: list[Member],
    data,
    folds_csv: str | Path,
    tta: tuple[str, ...],
    precision: str,
    out_dir: str | Path,
    threshold: float = 0.5,
    worst: int = 8,
    batch_size: int = 4,
    workers: int = 4,
    masks_out: str | Path | None = None,
    overwrite: bool = False,
    store: OutOfFoldStore | None = None,
) -> pd.DataFrame:
    """Out-of-fold scores to ``out_dir/oof.csv`` (refused over another run's without ``overwrite``), the tables
    logged, and overlays of the ``worst`` images at ``threshold``, their score in the name."""
    out_dir = Path(out_dir)
    record = prediction_record([member.path for member in members], tta, threshold, members[0].config)
    check_oof_file(out_dir, record, overwrite)
    scores = out_of_fold(
        members, data, folds_csv, tta, precision, threshold, batch_size, workers, masks_out, overwrite, store
    )
    table = pd.DataFrame(scores.rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / "oof.csv") as partial:
        table.to_csv(partial, index=False)
    with atomic_output(out_dir / OOF_RECORD_NAME) as partial:
        partial.write_text(json.dumps(record, indent=2) + "\n")
    _log_tables(scores, table, tta)
    _draw_worst(members, data, scores, table, tta, precision, out_dir, worst)
    if masks_out is not None:
        logger.info("out-of-fold masks (palette PNGs, with the TTA asked for, at the threshold) -> %s/", masks_out)
    return table


def check_tuning_file(path: Path, record: dict, overwrite: bool) -> None:
    """Rules tuned on other checkpoints are never replaced unasked; the same models' ones are tuned again."""
    if path.is_file() and not overwrite and not same_checkpoints(path, record):
        raise ConfigError(f"{path} was tuned on other checkpoints; pass --overwrite to replace it")


def tune_report(store: OutOfFoldStore, classes: list[str], threshold: float, path: Path, record: dict) -> PostProcess:
    """The post-processing search on the stored out-of-fold probabilities: its table logged, its rules written to
    ``path`` (``postprocess.json``) with what they were tuned on."""
    postprocess, table = tune(store, classes, threshold)
    untuned, tuned = table["untuned"].mean(), table["tuned"].mean()
    logger.info(
        "post-processing tuned out of fold on %d images (at most %d px a side), mean Dice over (image, class):\n%s\n"
        "all classes: %.5f -> %.5f (%+.5f)",
        store.images, TUNE_LONGEST_SIDE,
        table.to_string(index=False, float_format=lambda value: f"{value:.5f}"),
        untuned, tuned, tuned - untuned,
    )  # fmt: skip
    tuned_on = {
        "images": store.images,
        "untuned_dice": float(untuned),
        "tuned_dice": float(tuned),
        "tta": record["tta"],
    }
    write_postprocess(path, postprocess, tuned_on, record["checkpoints"])
    logger.info("%s: written; infer.py applies it (--no-postprocess: not)", path)
    return postprocess


def _log_tables(scores: FoldScores, table: pd.DataFrame, tta: tuple[str, ...]) -> None:
    label = "TTA " + "+".join(tta) if tta else "no TTA"
    if scores.multilabel:
        _log_label_dice(table, scores.classes, label, scores.threshold)
        return
    if scores.binary:
        _log_dice(table, label, scores.threshold, scores.thresholds)
    matrices = {key: segmentation_scores(matrix, scores.classes) for key, matrix in scores.confusion.items()}
    logger.info("out of fold, %d images: mIoU %.4f without TTA", len(table), matrices["plain"]["miou"])
    logger.info("out of fold with %s:\n%s", label, format_class_table(matrices["tta"]))


def _log_dice(table: pd.DataFrame, label: str, threshold: float, thresholds) -> None:
    column = dice_column(threshold)
    by_fold = table.groupby("fold").agg(images=("img", "size"), plain=("dice_plain", "mean"), dice=(column, "mean"))
    by_fold.loc["all"] = [len(table), table["dice_plain"].mean(), table[column].mean()]
    by_fold.columns = ["images", "Dice (no TTA)", f"Dice ({label}) at {threshold:g}"]
    logger.info("out-of-fold Dice:\n%s", by_fold.to_string(float_format=lambda value: f"{value:.5f}"))
    by_threshold = table[[dice_column(t) for t in thresholds]].mean()
    best = by_threshold.idxmax()
    logger.info(
        "best threshold (%s): %s -> Dice %.5f (%g -> %.5f)",
        label,
        best.removeprefix("dice_"),
        by_threshold[best],
        threshold,
        by_threshold[column],
    )


def _log_label_dice(table: pd.DataFrame, classes: list[str], label: str, threshold: float) -> None:
    """Each class's out-of-fold Dice (mean over images, with TTA at the threshold), and the mean over (image,
    class) pairs without and with TTA. A threshold per class is tuned by ``infer.py --oof --tune``."""
    per_class = pd.DataFrame({"Dice": [table[f"dice_{name}"].mean() for name in classes]}, index=pd.Index(classes))
    logger.info(
        "out-of-fold Dice per class (%s at %g):\n%s\nmean Dice %.5f (%s), %.5f without TTA at 0.5, %d images",
        label,
        threshold,
        per_class.to_string(float_format=lambda value: f"{value:.5f}"),
        table["dice"].mean(),
        label,
        table["dice_plain"].mean(),
        len(table),
    )


def _draw_worst(members, data, scores: FoldScores, table, tta, precision, out_dir: Path, worst: int) -> None:
    """Overlays of the ``worst`` images by the rank column (red or tinted: predicted; green: truth)."""
    ensembles = fold_ensembles(members, tta, precision)
    column = scores.rank_column()
    colours = palette(len(scores.classes))
    for rank, (_, row) in enumerate(table.nsmallest(worst, column).iterrows(), start=1):
        image_id = image_id_of(row["img"])
        image, truth = data.read_image(image_id), data.read_mask(image_id)
        predicted = inference.predict_image(ensembles[row["fold"]], image, scores.threshold)
        if scores.multilabel:  # each class tinted; the outline of every true class in green
            truth_labels = np.where(truth == 255, 0, truth)
            drawing = outlines(label_overlay(as_rgb(image), predicted, len(scores.classes)), truth_labels, (0, 200, 0))
        elif scores.binary:
            drawing = overlay(image, predicted, truth == 1)
        else:
            labelled = truth if scores.ignore_index is None else np.where(truth == scores.ignore_index, 0, truth)
            drawing = outlines(colour_overlay(as_rgb(image), predicted, colours), labelled, (0, 200, 0))
        name = column.split("_")[0]
        save_png(drawing, out_dir / f"worst{rank:02d}_{image_id}_{name}{row[column]:.4f}.png")
    logger.info(
        "per-image scores: %s; %d worst overlays by %s at threshold %g (%s, green: truth) in %s/",
        out_dir / "oof.csv",
        min(worst, len(table)),
        column,
        scores.threshold,
        "red: predicted" if scores.binary else "tinted: predicted",
        out_dir,
    )
