"""Checks of a data set's classes before training: a class no training mask holds is named, not trained blind."""

import numpy as np

from competition.errors import DataError

# Multilabel masks with no class bit anywhere are most often binary 0/255 masks, whose 255 the head reads as ignored.
NO_BITS_HINT = (
    " (with --head multilabel class k is bit k of a mask value, 1, 2, 4, ..., and 255 is ignored: binary 0/255 "
    "masks hold no class there; train them with --head auto)"
)


def absent_class_problems(
    names: list[str], train_counts: np.ndarray, val_counts: np.ndarray | None, multilabel: bool = False
) -> list[str]:
    """One line naming every class no training mask holds (pixel counts per class, the ignore index left out),
    however many there are: a mislabelled classes file or shifted indices, found before hours are spent
    training on it. Empty when every class is there."""
    nowhere, validation_only = [], []
    for index, name in enumerate(names):
        if train_counts[index] > 0:
            continue
        in_val = int(val_counts[index]) if val_counts is not None else 0
        if in_val:
            validation_only.append(f"{index} {name!r} ({in_val} pixels)")
        else:
            nowhere.append(f"{index} {name!r}")
    if not nowhere and not validation_only:
        return []
    parts = []
    if nowhere:
        parts.append(f"{', '.join(nowhere)} {'is' if len(nowhere) == 1 else 'are'} in no mask")
    if validation_only:
        parts.append(f"{', '.join(validation_only)} {'is' if len(validation_only) == 1 else 'are'} only in validation")
    absent = len(nowhere) + len(validation_only)
    hint = NO_BITS_HINT if multilabel and not train_counts.any() else ""
    return [
        f"{absent} of the {len(names)} classes {'has' if absent == 1 else 'have'} 0 of the {int(train_counts.sum())} training pixels: class "
        + "; class ".join(parts)
        + hint
    ]


def report_absent_classes(
    names: list[str], train_counts, val_counts, strict: bool, warn, multilabel: bool = False
) -> None:
    """Warn once of the absent classes (``warn``: a logger's warning), or stop naming them under ``strict``."""
    problems = absent_class_problems(
        names, np.asarray(train_counts), None if val_counts is None else np.asarray(val_counts), multilabel
    )
    if problems and strict:
        raise DataError(
            f"{'; '.join(problems)}; check classes.txt (or --classes, --mask-values) against the masks, "
            "or train without --strict"
        )
    for problem in problems:
        warn("%s; check classes.txt (or --classes) against the masks (--strict stops here)", problem)
