"""Checks of a data set's classes before training: a class no training mask holds is named, not trained blind."""

import numpy as np

from competition.errors import DataError


def absent_class_problems(names: list[str], train_counts: np.ndarray, val_counts: np.ndarray | None) -> list[str]:
    """One line for each class no training mask holds (pixel counts per class, the ignore index left out):
    a mislabelled classes file or shifted indices, found before hours are spent training on it."""
    problems = []
    for index, name in enumerate(names):
        if train_counts[index] > 0:
            continue
        in_val = int(val_counts[index]) if val_counts is not None else 0
        where = f"only in validation ({in_val} pixels)" if in_val else "in no mask"
        problems.append(f"class {index} {name!r} is {where}: 0 of {int(train_counts.sum())} training pixels")
    return problems


def report_absent_classes(names: list[str], train_counts, val_counts, strict: bool, warn) -> None:
    """Warn of each absent class (``warn``: a logger's warning), or stop with them all under ``strict``."""
    problems = absent_class_problems(
        names, np.asarray(train_counts), None if val_counts is None else np.asarray(val_counts)
    )
    if problems and strict:
        raise DataError(
            f"{'; '.join(problems)}; check classes.txt (or --classes, --mask-values) against the masks, "
            "or train without --strict"
        )
    for problem in problems:
        warn("%s; check classes.txt (or --classes) against the masks (--strict stops here)", problem)
