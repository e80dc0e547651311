"""Grouped cross-validation folds: all 16 views of a car (or all frames of a room, all photos of a pet) in one fold."""

import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from competition.data import read_csv_file
from competition.errors import ConfigError, DataError
from competition.mask_values import with_background
from competition.survey import survey

logger = logging.getLogger("competition.make_folds")
FOLD_COLUMNS = ["img", "car_id", "fold"]  # Carvana's folds file
GROUP_FOLD_COLUMNS = ["img", "group", "fold"]  # any other layout's: img is the image id (the file's stem)


def groups_of(image_ids: list[str], pattern: str | None) -> dict[str, str]:
    """image id -> its group: the first capture group of ``pattern`` (``--group-regex``), searched in the id;
    without a pattern every image is a group of its own."""
    if not pattern:
        return {image_id: image_id for image_id in image_ids}
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"--group-regex {pattern!r}: not a regular expression ({error})") from None
    if regex.groups < 1:
        raise ConfigError(f"--group-regex {pattern!r}: needs a capture group, the group key, e.g. '^(.+)_\\d+$'")
    groups = {}
    for image_id in image_ids:
        found = regex.search(image_id)
        if found is None or found.group(1) is None:
            raise ConfigError(f"--group-regex {pattern!r} does not match image {image_id!r}; every image needs a group")
        groups[image_id] = found.group(1)
    return groups


def rarest_class_labels(groups: dict[str, str], presence: dict[str, np.ndarray], n_folds: int) -> dict[str, str]:
    """group -> its stratification label: the rarest class (by images holding it) that any of its images holds,
    background aside; ``none`` for groups of background only. Labels held by fewer groups than folds cannot be
    spread over every fold: they are merged into one label, ``few``."""
    images_holding = np.sum([held for held in presence.values()], axis=0)
    group_classes: dict[str, set[int]] = {}
    for image_id, group in groups.items():
        group_classes.setdefault(group, set()).update(np.flatnonzero(presence[image_id][1:]) + 1)
    labels = {
        group: str(min(classes, key=lambda c: (images_holding[c], c))) if classes else "none"
        for group, classes in group_classes.items()
    }
    counts = pd.Series(labels).value_counts()
    return {group: label if counts[label] >= n_folds else "few" for group, label in labels.items()}


def assign_group_folds(
    groups: dict[str, str], n_folds: int, seed: int, presence: dict[str, np.ndarray] | None = None
) -> pd.DataFrame:
    """One row per image (``img``: its id, ``group``, ``fold``), sorted by ``img``; a group never crosses folds.

    ``presence`` (image id -> bool per class: which classes its mask holds) stratifies: scikit-learn's
    StratifiedGroupKFold balances each group's rarest class over the folds, so every fold validates on the rare
    classes where there are groups enough. Without it the groups are shuffled and dealt round-robin. The result
    depends on the set of images, their groups and the seed only."""
    image_ids = sorted(groups)
    group_names = sorted(set(groups.values()))
    if n_folds < 2:
        raise ConfigError(f"--n-folds must be at least 2, got {n_folds}")
    if len(group_names) < n_folds:
        raise ConfigError(
            f"{len(group_names)} groups cannot fill {n_folds} folds; "
            + (f"use --n-folds {len(group_names)} or fewer, or " if len(group_names) >= 2 else "use ")
            + "a --group-regex that makes more groups"
        )
    if presence is None:
        order = np.random.default_rng(seed).permutation(len(group_names))
        fold_of_group = {group_names[index]: position % n_folds for position, index in enumerate(order)}
    else:
        labels = rarest_class_labels(groups, presence, n_folds)
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        fold_of_group = {}
        with warnings.catch_warnings():  # a label merged into "few" may still be short of n_folds groups
            warnings.simplefilter("ignore", UserWarning)
            splits = splitter.split(group_names, [labels[group] for group in group_names], groups=group_names)
            for fold, (_, held_out) in enumerate(splits):
                fold_of_group.update({group_names[index]: fold for index in held_out})
    return pd.DataFrame(
        {
            "img": image_ids,
            "group": [groups[image_id] for image_id in image_ids],
            "fold": [fold_of_group[groups[image_id]] for image_id in image_ids],
        }
    )


def labelled_folds(data, n_folds: int, seed: int, *, group_regex, stratify, stratify_classes, progress):
    """(folds, the folds file's text) of any layout but Carvana's: by its official split when that has a val part,
    else grouped by ``group_regex`` and stratified by class."""
    if "val" in set(data.splits.values()):
        return split_folds(data, group_regex)
    return group_folds(data, n_folds, seed, group_regex, stratify, stratify_classes, progress)


def class_presence(data, image_ids: list[str], progress: bool) -> dict[str, np.ndarray]:
    """image id -> which classes its mask holds (every mask read once, on threads)."""
    counts = survey(data, image_ids, check=False, count=len(image_ids), progress=progress)
    return {image_id: row > 0 for image_id, row in zip(image_ids, counts)}


def group_folds(data, n_folds: int, seed: int, group_regex, stratify, stratify_classes: bool, progress: bool):
    """Folds (``img,group,fold``): grouped by --group-regex, stratified by class."""
    if stratify:
        raise ConfigError("--stratify names a Carvana metadata column; other layouts stratify by class")
    image_ids = data.train_ids()
    if data.splits:
        logger.info("the split has no val part: %d folds over its %d labelled images", n_folds, len(image_ids))
    groups = groups_of(image_ids, group_regex)
    presence = class_presence(data, image_ids, progress) if stratify_classes else None
    stratified = presence
    if presence is not None and getattr(data, "multilabel", False):  # class 0 is a class, not a background
        stratified = dict(zip(presence, with_background(np.array(list(presence.values()), dtype=bool))))
    folds = assign_group_folds(groups, n_folds, seed, stratified)
    if presence is not None:
        for index, name in enumerate(data.classes):
            folds[f"with {name}"] = [bool(presence[image_id][index]) for image_id in folds["img"]]
    return folds, folds[["img", "group", "fold"]].to_csv(index=False)


def split_folds(data, group_regex):
    """An official split with a val part: fold 0 holds exactly the val images, fold 1 everything else, so that
    fold 0's scores compare with published tables (``img,group,fold,split``)."""
    if group_regex:
        raise ConfigError("--group-regex with --split: the official split decides which images validate")
    image_ids = data.train_ids()
    splits = [data.splits[image_id] for image_id in image_ids]
    folds = pd.DataFrame(
        {"img": image_ids, "group": image_ids, "fold": [0 if name == "val" else 1 for name in splits], "split": splits}
    )
    return folds, folds.to_csv(index=False)


def fold_summary(folds: pd.DataFrame, strata_column: str | None = None) -> pd.DataFrame:
    """Cars and images per fold (and distinct strata labels, when given)."""
    grouped = folds.groupby("fold")
    if "car_id" in folds.columns:
        summary = pd.DataFrame({"cars": grouped["car_id"].nunique(), "images": grouped["img"].size()})
    else:
        summary = pd.DataFrame({"groups": grouped["group"].nunique(), "images": grouped["img"].size()})
    if strata_column:
        summary[f"{strata_column}s"] = grouped[strata_column].nunique()
    return summary


SUMMARY_WIDTH = 100  # columns the fold summary fits in, however many classes and folds
SUMMARY_NAME_WIDTH = 40  # a longer class name is cut to this many characters in the summary


def fold_summary_text(folds: pd.DataFrame, strata_column: str | None = None, width: int = SUMMARY_WIDTH) -> str:
    """The fold summary as printed: groups (or cars) and images per fold, then, when the folds were stratified by
    class, the images holding each class per fold, one class a row (so that 40 classes make 40 short lines, not
    one 800-character row); folds past ``width`` wrap onto further blocks."""
    text = fold_summary(folds, strata_column).to_string(line_width=width)
    columns = [column for column in folds.columns if column.startswith("with ")]
    if not columns:
        return text
    per_class = folds.groupby("fold")[columns].sum().T
    per_class.index = [_cut(column.removeprefix("with "), SUMMARY_NAME_WIDTH) for column in columns]
    per_class.index.name = "images with"
    return f"{text}\n{per_class.to_string(line_width=width)}"


def _cut(name: str, width: int) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def read_folds(path) -> pd.DataFrame:
    """A folds CSV written by make_folds.py (Carvana's ``img,car_id,fold`` or ``img,group,fold``), checked for
    its columns and for groups crossing folds; ``group`` is always there (Carvana's: the car)."""
    if not Path(path).is_file():
        raise DataError(
            f"{path}: folds file not found; make it with `python make_folds.py` and the data flags given here "
            "(--data-dir, --config, ...)"
        )
    try:
        folds = read_csv_file(path, dtype={"img": str, "car_id": str, "group": str}, keep_default_na=False)
    except DataError as error:
        raise DataError(f"{error}; make it again with `python make_folds.py`") from None
    if "car_id" in folds.columns and "group" not in folds.columns:
        folds["group"] = folds["car_id"]
    missing = [column for column in GROUP_FOLD_COLUMNS if column not in folds.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; make it again with `python make_folds.py`")
    if not pd.api.types.is_integer_dtype(folds["fold"]):
        raise DataError(f"{path}: column fold must hold integers; make it again with `python make_folds.py`")
    if (folds.groupby("group")["fold"].nunique() > 1).any():
        raise DataError(f"{path}: a group appears in more than one fold; make it again with `python make_folds.py`")
    return folds
