"""Grouped cross-validation folds: all 16 views of a car (or all photos of one group) fall in one fold."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from competition.data import car_id_of, image_id_of, read_csv_file
from competition.errors import ConfigError, DataError

FOLD_COLUMNS = ["img", "car_id", "fold"]
GROUP_FOLD_COLUMNS = ["img", "group", "fold"]
MERGED_LABEL = "merged"


def assign_folds(image_ids: list[str], n_folds: int, seed: int, strata: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per image (``img``, ``car_id``, ``fold``), sorted by ``img``.

    Without ``strata`` the cars are shuffled with ``seed`` and dealt round-robin, so fold
    sizes differ by at most one car. With ``strata`` (car_id -> label, e.g. the make)
    scikit-learn's StratifiedGroupKFold balances the labels across folds instead.
    The result depends on the set of ids only, never on their order.
    """
    image_ids = sorted(set(image_ids))
    car_ids = sorted({car_id_of(image_id) for image_id in image_ids})
    if n_folds < 2:
        raise ConfigError(f"--n-folds must be at least 2, got {n_folds}")
    if len(car_ids) < n_folds:
        raise ConfigError(
            f"{len(car_ids)} cars cannot fill {n_folds} folds; use --n-folds {max(2, len(car_ids))} or fewer"
        )
    if strata is None:
        order = np.random.default_rng(seed).permutation(len(car_ids))
        fold_of_car = {car_ids[index]: position % n_folds for position, index in enumerate(order)}
    else:
        missing = [car_id for car_id in car_ids if car_id not in strata]
        if missing:
            raise DataError(f"metadata.csv: {len(missing)} cars have no stratification label, e.g. {missing[:3]}")
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        labels = [strata[car_id] for car_id in car_ids]
        fold_of_car = {}
        for fold, (_, held_out) in enumerate(splitter.split(car_ids, labels, groups=car_ids)):
            fold_of_car.update({car_ids[index]: fold for index in held_out})
    return pd.DataFrame(
        {
            "img": [f"{image_id}.jpg" for image_id in image_ids],
            "car_id": [car_id_of(image_id) for image_id in image_ids],
            "fold": [fold_of_car[car_id_of(image_id)] for image_id in image_ids],
        }
    )


def compile_group_regex(group_regex: str) -> re.Pattern:
    """``--group-regex`` compiled; its first capture group is an image's group key."""
    try:
        pattern = re.compile(group_regex)
    except re.error as error:
        raise ConfigError(f"--group-regex {group_regex!r}: not a regular expression ({error})") from None
    if pattern.groups < 1:
        raise ConfigError(
            f"--group-regex {group_regex!r} has no capture group; put the group key in parentheses, e.g. '^(.+)_\\\\d+$'"
        )
    return pattern


def group_of_images(image_ids: list[str], group_regex: str | None = None) -> dict[str, str]:
    """image id -> group key: the regex's first capture group (``re.search``), or the id itself (one group
    per image) when ``group_regex`` is None or empty."""
    if not group_regex:
        return {image_id: image_id for image_id in image_ids}
    pattern = compile_group_regex(group_regex)
    groups = {}
    for image_id in image_ids:
        match = pattern.search(image_id)
        if match is None or not match.group(1):
            raise ConfigError(
                f"--group-regex {group_regex!r} does not match image id {image_id!r} "
                "(or its first group is empty); change the regex so every image id has a group"
            )
        groups[image_id] = match.group(1)
    return groups


def group_class_labels(group_of_image: dict[str, str], presence: dict[str, np.ndarray]) -> dict[str, str]:
    """group -> stratification label: the group's rarest class, where a class is rarer when fewer images
    contain it (ties: the lower class index), as its index in text; ``"none"`` for a group whose images
    hold no labelled pixel. ``presence``: image id -> bool (K,), the classes the image contains."""
    images_holding = np.sum([presence[image_id] for image_id in sorted(presence)], axis=0)
    classes_of_group: dict[str, np.ndarray] = {}
    for image_id, group in group_of_image.items():
        held = np.asarray(presence[image_id], bool)
        classes_of_group[group] = classes_of_group.get(group, np.zeros_like(held)) | held
    labels = {}
    for group, held in classes_of_group.items():
        present = np.flatnonzero(held)
        if present.size == 0:
            labels[group] = "none"
        else:  # argmin keeps the first (lowest index) of equally rare classes
            labels[group] = str(int(present[np.argmin(images_holding[present])]))
    return labels


def merge_rare_labels(labels: dict[str, str], n_folds: int) -> dict[str, str]:
    """Labels held by fewer than ``n_folds`` groups pooled into one ``merged`` label (StratifiedGroupKFold
    cannot spread them over every fold); a pool still smaller than ``n_folds`` joins the smallest label
    that is large enough. Every label then has ``n_folds`` groups or more, or there is one label."""
    sizes = pd.Series(labels).value_counts()
    rare = set(sizes[sizes < n_folds].index)
    if not rare:
        return dict(labels)
    pooled = int(sizes[list(rare)].sum())
    kept = sizes[sizes >= n_folds]
    target = MERGED_LABEL
    if pooled < n_folds and len(kept):
        target = min(kept.index, key=lambda label: (kept[label], label))
    return {group: (target if label in rare else label) for group, label in labels.items()}


def _round_robin(groups: list[str], n_folds: int, seed: int) -> dict[str, int]:
    order = np.random.default_rng(seed).permutation(len(groups))
    return {groups[index]: position % n_folds for position, index in enumerate(order)}


def assign_group_folds(
    image_ids: list[str],
    n_folds: int,
    seed: int,
    group_regex: str | None = None,
    presence: dict[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """One row per image (``img`` = the image id, ``group``, ``fold``), sorted by ``img``.

    Groups come from ``group_regex`` (one per image without it). With ``presence`` (image id -> bool (K,),
    the classes each image contains) every group is labelled by its rarest class (``group_class_labels``),
    labels with fewer groups than folds merged (``merge_rare_labels``), and StratifiedGroupKFold over the
    images balances the labels; with a single label left, or without ``presence``, the groups are shuffled
    with ``seed`` and dealt round-robin. The result depends on the set of ids and the seed only.
    """
    image_ids = sorted(set(image_ids))
    if n_folds < 2:
        raise ConfigError(f"--n-folds must be at least 2, got {n_folds}")
    group_of_image = group_of_images(image_ids, group_regex)
    groups = sorted(set(group_of_image.values()))
    if len(groups) < n_folds:
        raise ConfigError(
            f"{len(groups)} groups cannot fill {n_folds} folds; use --n-folds {max(2, len(groups))} or fewer"
            + (" or a finer --group-regex" if group_regex else "")
        )
    fold_of_group = None
    if presence is not None:
        missing = [image_id for image_id in image_ids if image_id not in presence]
        if missing:
            raise DataError(f"{len(missing)} images have no class counts, e.g. {missing[:3]}")
        labels = merge_rare_labels(group_class_labels(group_of_image, presence), n_folds)
        if len(set(labels.values())) > 1:
            fold_of_group = _stratified_group_folds(image_ids, group_of_image, labels, n_folds, seed)
    if fold_of_group is None:
        fold_of_group = _round_robin(groups, n_folds, seed)
    return pd.DataFrame(
        {
            "img": image_ids,
            "group": [group_of_image[image_id] for image_id in image_ids],
            "fold": [fold_of_group[group_of_image[image_id]] for image_id in image_ids],
        }
    )


def _stratified_group_folds(image_ids, group_of_image, labels, n_folds, seed) -> dict[str, int] | None:
    """StratifiedGroupKFold's folds over the images (each carrying its group's label); None when it leaves
    a fold empty, so the caller deals the groups round-robin instead."""
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    groups = [group_of_image[image_id] for image_id in image_ids]
    image_labels = [labels[group] for group in groups]
    fold_of_group = {}
    for fold, (_, held_out) in enumerate(splitter.split(image_ids, image_labels, groups=groups)):
        if len(held_out) == 0:
            return None
        fold_of_group.update({groups[index]: fold for index in held_out})
    return fold_of_group


def class_fold_summary(folds: pd.DataFrame, presence: dict[str, np.ndarray], classes: list[str]) -> pd.DataFrame:
    """Groups, images and the images holding each class, per fold (``folds`` as ``assign_group_folds``)."""
    grouped = folds.groupby("fold")
    summary = pd.DataFrame({"groups": grouped["group"].nunique(), "images": grouped["img"].size()})
    held = pd.DataFrame([np.asarray(presence[image_id], bool) for image_id in folds["img"]], columns=classes)
    held.index = folds.index
    return summary.join(held.groupby(folds["fold"]).sum().astype(int))


def fold_summary(folds: pd.DataFrame, strata_column: str | None = None) -> pd.DataFrame:
    """Cars and images per fold (and distinct strata labels, when given)."""
    grouped = folds.groupby("fold")
    summary = pd.DataFrame({"cars": grouped["car_id"].nunique(), "images": grouped["img"].size()})
    if strata_column:
        summary[f"{strata_column}s"] = grouped[strata_column].nunique()
    return summary


def read_folds(path) -> pd.DataFrame:
    """A folds CSV written by make_folds.py (Carvana's ``img,car_id,fold`` or ``img,group,fold``), checked
    for its columns and for a group crossing folds. The frame always has a ``group`` column (Carvana's
    copied from ``car_id``) and an ``image_id`` column (Carvana: ``img`` less ``.jpg``; others: ``img``)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: folds file not found; make it with `python make_folds.py`")
    try:
        folds = read_csv_file(path, dtype={"img": str, "car_id": str, "group": str})
    except DataError as error:
        raise DataError(f"{error}; make it again with `python make_folds.py`") from None
    carvana = "car_id" in folds.columns
    columns = FOLD_COLUMNS if carvana else GROUP_FOLD_COLUMNS
    missing = [column for column in columns if column not in folds.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; make it again with `python make_folds.py`")
    if not pd.api.types.is_integer_dtype(folds["fold"]):
        raise DataError(f"{path}: column fold must hold integers; make it again with `python make_folds.py`")
    if carvana:
        folds["group"] = folds["car_id"]
        folds["image_id"] = [image_id_of(img) for img in folds["img"]]
    else:
        folds["image_id"] = folds["img"]
    crossing = folds.groupby("group")["fold"].nunique()
    crossing = crossing[crossing > 1]
    if len(crossing):
        noun = "car" if carvana else "group"
        raise DataError(
            f"{path}: a {noun} appears in more than one fold ({crossing.index[0]!r}); "
            "make it again with `python make_folds.py`"
        )
    return folds
