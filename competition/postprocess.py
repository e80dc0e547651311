"""Post-processing per class (a probability threshold, a minimum connected-component area, a minimum total area that
empties the class), its search on out-of-fold probabilities, and ``postprocess.json`` beside the run's folds."""

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage

from competition.errors import ConfigError, DataError
from competition.files import atomic_output
from competition.mask_values import pack_labels, unpack_labels

FILE_NAME = "postprocess.json"
logger = logging.getLogger(__name__)
RULE_HEADS = ("binary", "multilabel", "softmax")  # one sigmoid channel; one sigmoid channel per class; a softmax
# 8-connected components, as cv2.connectedComponents (the Severstal and SIIM-ACR write-ups) counts them.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# A stack of images labelled in one call: connected within an image, never across the stack's first axis.
STACK_EIGHT_CONNECTED = np.stack([np.zeros((3, 3), bool), EIGHT_CONNECTED, np.zeros((3, 3), bool)])
THRESHOLDS = tuple(round(0.1 * step, 1) for step in range(1, 10))  # 0.1 .. 0.9: one labelling each per class
AREA_FRACTIONS = (0.0, *(2.0**-power for power in range(16, 3, -1)))  # of the image: 0, then 1/65536 .. 1/16
TUNE_LONGEST_SIDE = 384  # out-of-fold probabilities kept at most this long a side, as uint8 (p * 255)
STACK_IMAGES = 200  # images labelled in one call: bounds the int32 labels' memory


@dataclass(frozen=True)
class ClassRule:
    """What makes one class's mask: above ``threshold`` (None for softmax classes: the most probable class wins),
    components of fewer than ``min_area`` pixels removed, the whole mask emptied below ``min_total`` pixels."""

    name: str
    threshold: float | None
    min_area: int = 0
    min_total: int = 0


@dataclass(frozen=True)
class PostProcess:
    """The rules of every predicted class (``head``: one of RULE_HEADS), in channel order (softmax: classes 1..K-1)."""

    head: str
    rules: tuple[ClassRule, ...]

    @property
    def classes(self) -> list[str]:
        return [rule.name for rule in self.rules]

    @property
    def area_rules(self) -> bool:
        """Whether a class has a minimum component area or total: rules on the image's whole components."""
        return any(rule.min_area > 1 or rule.min_total > 0 for rule in self.rules)

    def mask(self, probabilities: np.ndarray) -> np.ndarray:
        """(C, H, W) probabilities of one image -> its uint8 (H, W) mask: 0/1 (binary), packed bits
        (multilabel) or class indices (softmax; a removed component becomes background)."""
        return self.clean(self.labels(probabilities))

    def labels(self, probabilities: np.ndarray) -> np.ndarray:
        """(C, H, W) probabilities of an image, or of a band of one -> uint8 (H, W) labels by the thresholds
        alone, pixel by pixel: 0/1 (binary), packed bits (multilabel) or the most probable class (softmax)."""
        if self.head == "softmax":
            return probabilities.argmax(0).astype(np.uint8)
        present = np.stack([channel > rule.threshold for channel, rule in zip(probabilities, self.rules)])
        return pack_labels(present) if self.head == "multilabel" else present[0].astype(np.uint8)

    def clean(self, labels: np.ndarray) -> np.ndarray:
        """An image's whole uint8 (H, W) ``labels`` with the area rules of every class applied: components are
        the whole image's, so no band of it will do."""
        if not self.area_rules:
            return labels
        if self.head == "softmax":
            return clean_index_mask(labels, self.rules)
        present = unpack_labels(labels, len(self.rules)) if self.head == "multilabel" else labels[None]
        kept = np.stack([component_rule(mask != 0, rule.min_area, rule.min_total)
                         for mask, rule in zip(present, self.rules)])  # fmt: skip
        return pack_labels(kept) if self.head == "multilabel" else kept[0].astype(np.uint8)

    def describe(self) -> str:
        """``car: threshold 0.45, min area 120 px, min total 0 px; ...`` (softmax: the areas alone)."""
        parts = []
        for rule in self.rules:
            threshold = "" if rule.threshold is None else f"threshold {rule.threshold:g}, "
            parts.append(f"{rule.name}: {threshold}min area {rule.min_area} px, min total {rule.min_total} px")
        return "; ".join(parts)


def head_of(config) -> str:
    """The run's head as post-processing sees it (one of RULE_HEADS)."""
    if config.multilabel():
        return "multilabel"
    return "binary" if config.output_channels() == 1 else "softmax"


def predicted_classes(config) -> list[str]:
    """The classes a run's channels predict, in order: its labels (multilabel), else its classes after the
    background (Carvana's: car)."""
    names = config.class_names() or ["background", "car"]
    return names if config.multilabel() else names[1:]


def component_rule(mask: np.ndarray, min_area: int, min_total: int) -> np.ndarray:
    """A boolean (H, W) mask without its components of fewer than ``min_area`` pixels, emptied when fewer than
    ``min_total`` pixels are left."""
    if min_area > 1:
        labels, count = ndimage.label(mask, EIGHT_CONNECTED)
        if count:
            sizes = np.bincount(labels.ravel(), minlength=count + 1)
            keep = sizes >= min_area
            keep[0] = False
            mask = keep[labels]
    if min_total > 0 and np.count_nonzero(mask) < min_total:
        mask = np.zeros_like(mask)
    return mask


def clean_index_mask(mask: np.ndarray, rules: tuple[ClassRule, ...]) -> np.ndarray:
    """A softmax run's (H, W) class indices with the minimum areas of classes 1..K-1 (``rules``) applied: what
    a rule removes becomes background (0)."""
    cleaned = mask.copy()
    for index, rule in enumerate(rules, start=1):
        present = mask == index
        if rule.min_area > 1 or rule.min_total > 0:
            cleaned[present & ~component_rule(present, rule.min_area, rule.min_total)] = 0
    return cleaned


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder of a checkpoint file: ``runs/x`` for ``runs/x/fold0/best.pt`` (or ``runs/x/best.pt``)."""
    folder = Path(checkpoint).parent
    return folder.parent if folder.name.startswith("fold") else folder


def write_postprocess(path: Path, postprocess: PostProcess, tuned: dict, checkpoints: list) -> None:
    """``postprocess.json``: the head, the classes and their rules, what they were tuned on (``tuned``) and the
    checkpoints (as ``submission.predicted_by`` records them)."""
    document = {
        "head": postprocess.head,
        "classes": postprocess.classes,
        "rules": [asdict(rule) for rule in postprocess.rules],
        "tuned": tuned,
        "checkpoints": checkpoints,
    }
    with atomic_output(path) as partial:
        partial.write_text(json.dumps(document, indent=2) + "\n")


def find_file(paths: list[Path]) -> Path:
    """Where ``--tune`` writes the rules of checkpoints ``paths`` and where they are read: ``postprocess.json`` in
    the run folder of the first checkpoint (beside its fold0/, fold1/...)."""
    return run_folder_of(paths[0]) / FILE_NAME


def read_postprocess(
    path: Path, head: str, classes: list[str], checkpoints: list[dict] | None = None, tta: list[str] | None = None
) -> PostProcess:
    """The rules of ``path`` for a run of ``head`` predicting ``classes`` with ``checkpoints`` (as
    ``submission.predicted_by`` records them, when given); one line when the file is not one of ours, or was tuned
    for other classes or other checkpoints. Tuned with other TTA views than ``tta``: a warning."""
    retune = "run `python infer.py --oof --tune` for these checkpoints again, or pass --no-postprocess"
    try:
        document = json.loads(Path(path).read_text())
        rules = tuple(ClassRule(**rule) for rule in document["rules"])
        tuned_head, tuned_classes = document["head"], list(document["classes"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: not a post-processing file of infer.py --oof --tune ({error}); {retune}") from None
    if (tuned_head, tuned_classes) != (head, classes) or [rule.name for rule in rules] != classes:
        raise ConfigError(
            f"{path}: tuned for the classes {','.join(tuned_classes)} ({tuned_head} head), but the checkpoints "
            f"predict {','.join(classes)} ({head} head); {retune}"
        )
    tuned_on = document.get("checkpoints")
    if checkpoints is not None and tuned_on != checkpoints:
        if not isinstance(tuned_on, list) or _by_name_and_size(tuned_on) != _by_name_and_size(checkpoints):
            raise ConfigError(
                f"{path}: tuned on other checkpoints: run infer.py --oof --tune again, or pass --no-postprocess"
            )
        logger.info(
            "%s: its checkpoints moved or were copied since tuning (the same fold files by name and size)", path
        )
    tuned_tta = (document.get("tuned") or {}).get("tta")
    if tta is not None and tuned_tta is not None and tuned_tta != tta:
        logger.warning(
            "%s: tuned with TTA %s, applied to predictions with TTA %s", path, "+".join(tuned_tta) or "off",
            "+".join(tta) or "off",
        )  # fmt: skip
    return PostProcess(head, rules)


def _by_name_and_size(checkpoints: list[dict]) -> list[tuple[str, str, int]]:
    """Checkpoints as a run folder copied elsewhere keeps them (a Kaggle dataset of the run: new paths and
    times): each one's fold folder, file name and size."""
    try:
        return sorted((Path(c["path"]).parent.name, Path(c["path"]).name, int(c["size"])) for c in checkpoints)
    except (KeyError, TypeError, ValueError):
        return []


class OutOfFoldStore:
    """Out-of-fold probabilities kept for the tuning search: per image, each channel as uint8 (p * 255) or, for a
    softmax head, the most probable class; the truth beside them; both at most TUNE_LONGEST_SIDE a side (area
    averaging for probabilities, nearest for classes), grouped by that size."""

    def __init__(self, head: str, num_classes: int, ignore_index: int | None):
        self.head, self.num_classes, self.ignore_index = head, num_classes, ignore_index
        self.groups: dict[tuple[int, int], dict[str, list]] = {}

    def add(self, probabilities: np.ndarray, truth: np.ndarray) -> None:
        """A batch: (N, C, H, W) float probabilities, (N, H, W) uint8 truth (indices, or packed labels)."""
        height, width = truth.shape[-2:]
        scale = min(1.0, TUNE_LONGEST_SIDE / max(height, width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2's (width, height)
        group = self.groups.setdefault((size[1], size[0]), {"predicted": [], "truth": [], "full_area": []})
        for image_probabilities, image_truth in zip(probabilities, truth):
            if self.head == "softmax":
                predicted = image_probabilities.argmax(0).astype(np.uint8)[None]
                predicted = [cv2.resize(predicted[0], size, interpolation=cv2.INTER_NEAREST)]
            else:
                quantised = np.rint(np.clip(image_probabilities, 0, 1) * 255).astype(np.uint8)
                predicted = [cv2.resize(channel, size, interpolation=cv2.INTER_AREA) for channel in quantised]
            group["predicted"].append(np.stack(predicted))
            group["truth"].append(cv2.resize(image_truth.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST))
            group["full_area"].append(height * width)

    @property
    def images(self) -> int:
        return sum(len(group["truth"]) for group in self.groups.values())

    def class_stacks(self, index: int):
        """For class ``index`` (its channel; softmax: its class 1..K-1), per size group: (uint8 (n, h, w) scores
        where the class is predicted above a level (probability * 255; softmax: 255 where it is the argmax, else 0),
        boolean (n, h, w) truth, float (n,) full-size pixels per tuning pixel); ignored pixels are in neither."""
        for group in self.groups.values():
            truth = np.stack(group["truth"])
            if self.head == "softmax":
                scores = np.where(np.stack(group["predicted"])[:, 0] == index, 255, 0).astype(np.uint8)
                true = truth == index
            else:
                scores = np.stack([predicted[index] for predicted in group["predicted"]])
                true = unpack_labels(truth, index + 1)[index] != 0 if self.head == "multilabel" else truth == 1
            if self.ignore_index is not None:
                ignored = truth == self.ignore_index
                scores[ignored], true = 0, true & ~ignored
            scale = np.asarray(group["full_area"], dtype=np.float64) / truth[0].size
            yield scores, true, scale


@dataclass
class Components:
    """The predicted components of every image at one threshold: their size in tuning pixels and in full-size
    pixels, their overlap with the truth, their image; and each image's true area."""

    sizes: np.ndarray
    full_sizes: np.ndarray
    overlaps: np.ndarray
    image: np.ndarray
    true_area: np.ndarray
    scale: np.ndarray


def label_components(stacks, level: int) -> Components:
    """Each image's connected components above ``level`` (uint8), labelled STACK_IMAGES images per call."""
    # each list starts empty-handed: a level no image passes has no components at all
    parts: dict[str, list] = {name: [np.zeros(0, np.int64)] for name in ("sizes", "overlaps", "image", "true_area")}
    parts["scale"] = []
    offset = 0
    for scores, true, scale in stacks:
        for start in range(0, len(scores), STACK_IMAGES):
            chunk, truth = scores[start : start + STACK_IMAGES] > level, true[start : start + STACK_IMAGES]
            parts["true_area"].append(truth.reshape(len(chunk), -1).sum(1))
            predicted = np.flatnonzero(chunk.reshape(len(chunk), -1).any(1))  # the images left empty need no labels
            if not len(predicted):
                continue
            chunk, truth = chunk[predicted], truth[predicted]
            labels, count = ndimage.label(chunk, STACK_EIGHT_CONNECTED)
            parts["sizes"].append(np.bincount(labels[chunk], minlength=count + 1)[1:])
            parts["overlaps"].append(np.bincount(labels[chunk & truth], minlength=count + 1)[1:])
            # labels grow in raster order, so an image's components follow the previous image's
            last = np.maximum.accumulate(labels.reshape(len(chunk), -1).max(1))
            parts["image"].append(np.repeat(offset + start + predicted, np.diff(last, prepend=0)))
        offset += len(scores)
        parts["scale"].append(scale)
    joined = {name: np.concatenate(values) for name, values in parts.items()}
    full_sizes = joined["sizes"] * joined["scale"][joined["image"]]
    return Components(joined["sizes"], full_sizes, joined["overlaps"], joined["image"], joined["true_area"],
                      joined["scale"])  # fmt: skip


def best_areas(components: Components, areas: np.ndarray) -> tuple[float, int, int, float]:
    """(the mean Dice over images, min area, min total) that score best at these components, over every pair
    of ``areas`` (full-size pixels; min total at least the min area, or 0); and the Dice with neither."""
    images = len(components.true_area)
    best = (-1.0, 0, 0)
    untouched = 0.0
    for min_area in areas:
        kept = components.full_sizes >= min_area
        predicted = np.bincount(components.image, weights=components.sizes * kept, minlength=images)
        overlap = np.bincount(components.image, weights=components.overlaps * kept, minlength=images)
        totals = np.asarray([0.0, *areas[areas >= max(min_area, 1)]])
        emptied = (predicted * components.scale)[None] < totals[:, None]  # (totals, images)
        kept_predicted, kept_overlap = np.where(emptied, 0, predicted), np.where(emptied, 0, overlap)
        union = kept_predicted + components.true_area
        dice = np.where(union == 0, 1.0, 2 * kept_overlap / np.maximum(union, 1)).mean(1)
        if min_area == 0:
            untouched = float(dice[0])
        choice = int(dice.argmax())
        if dice[choice] > best[0] + 1e-12:
            best = (float(dice[choice]), int(min_area), int(totals[choice]))
    return (*best, untouched)


def level_of(threshold: float | None) -> int:
    """The uint8 level a quantised probability q must pass for ``threshold``: q > level exactly when
    q / 255 > threshold (softmax's scores, 0 or 255: any level between)."""
    return 127 if threshold is None else math.floor(threshold * 255)


def tune(store: OutOfFoldStore, classes: list[str], threshold: float) -> tuple[PostProcess, pd.DataFrame]:
    """Per class, the threshold (of THRESHOLDS; none for softmax) and minimum areas (AREA_FRACTIONS of the median
    image) maximising the mean Dice over images (empty prediction of an empty truth: 1) on the stored out-of-fold
    probabilities; and the table per class: untuned Dice (``threshold``, no areas), tuned Dice, their choice."""
    full_areas = np.concatenate([group["full_area"] for group in store.groups.values()])
    areas = np.unique(np.rint(np.asarray(AREA_FRACTIONS) * np.median(full_areas)))
    grid = (None,) if store.head == "softmax" else THRESHOLDS
    rules, rows = [], []
    for index, name in enumerate(classes):
        stacks = list(store.class_stacks(index + 1 if store.head == "softmax" else index))
        labelled = {level_of(candidate): label_components(stacks, level_of(candidate)) for candidate in grid}
        untuned_level = level_of(None if store.head == "softmax" else threshold)
        if untuned_level not in labelled:
            labelled[untuned_level] = label_components(stacks, untuned_level)
        untuned = best_areas(labelled[untuned_level], areas[:1])[3]
        best = (-1.0, None, 0, 0)
        for candidate in grid:
            dice, min_area, min_total, _ = best_areas(labelled[level_of(candidate)], areas)
            if dice > best[0] + 1e-12:
                best = (dice, candidate, min_area, min_total)
        rules.append(ClassRule(name, best[1], best[2], best[3]))
        rows.append({"class": name, "untuned": untuned, "tuned": best[0], "gain": best[0] - untuned,
                     "threshold": "-" if best[1] is None else f"{best[1]:g}", "min area": best[2],
                     "min total": best[3]})  # fmt: skip
    return PostProcess(store.head, tuple(rules)), pd.DataFrame(rows)
