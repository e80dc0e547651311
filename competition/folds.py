"""Car-grouped cross-validation folds: all 16 views of a car fall in one fold."""

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from competition.data import car_id_of, read_csv_file
from competition.errors import ConfigError, DataError

FOLD_COLUMNS = ["img", "car_id", "fold"]


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


def fold_summary(folds: pd.DataFrame, strata_column: str | None = None) -> pd.DataFrame:
    """Cars and images per fold (and distinct strata labels, when given)."""
    grouped = folds.groupby("fold")
    summary = pd.DataFrame({"cars": grouped["car_id"].nunique(), "images": grouped["img"].size()})
    if strata_column:
        summary[f"{strata_column}s"] = grouped[strata_column].nunique()
    return summary


def read_folds(path) -> pd.DataFrame:
    """A folds CSV written by make_folds.py, checked for its columns and for cars crossing folds."""
    if not Path(path).is_file():
        raise DataError(f"{path}: folds file not found; make it with `python make_folds.py`")
    try:
        folds = read_csv_file(path, dtype={"img": str, "car_id": str})
    except DataError as error:
        raise DataError(f"{error}; make it again with `python make_folds.py`") from None
    missing = [column for column in FOLD_COLUMNS if column not in folds.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; make it again with `python make_folds.py`")
    if not pd.api.types.is_integer_dtype(folds["fold"]):
        raise DataError(f"{path}: column fold must hold integers; make it again with `python make_folds.py`")
    if (folds.groupby("car_id")["fold"].nunique() > 1).any():
        raise DataError(f"{path}: a car appears in more than one fold; make it again with `python make_folds.py`")
    return folds
