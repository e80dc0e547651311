"""Which stored mask value means which class: 0/255 binary masks, values given by the user, lossy values snapped,
and the bits of multilabel masks."""

import numpy as np

from competition.errors import DataError


def value_histogram(mask: np.ndarray) -> np.ndarray:
    """Pixels of each of the 256 values of a uint8 mask (int64): the one count behind class shares and value checks."""
    return np.bincount(mask.ravel(), minlength=256).astype(np.int64, copy=False)


def parse_mask_values(text: str, flag: str = "--mask-values") -> list[int]:
    """``0,255`` -> [0, 255]: the stored value of each class in class order, each 0..255 and none twice."""
    try:
        values = [int(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise DataError(
            f"{flag} {text!r}: give whole numbers 0..255, one per class in class order, e.g. 0,255"
        ) from None
    if len(values) < 2 or any(not 0 <= value <= 255 for value in values) or len(set(values)) < len(values):
        raise DataError(f"{flag} {text!r}: give at least two different values 0..255, one per class, e.g. 0,255")
    return values


def binary_values(present: list[int], snap: bool, histogram: np.ndarray) -> list[int] | None:
    """The (background, foreground) values of two-valued masks, or None when the masks are not binary so stored.

    Masks holding exactly two values are binary whatever the two (0/1, 0/255, 0/38): the lower is background.
    Snapped (lossy) masks smear their values, so their two most common values are taken instead."""
    if snap:
        return sorted(np.argsort(histogram, kind="stable")[::-1][:2].tolist())
    return present if len(present) == 2 else None


def describe_binary(values: list[int], ignore_index: int) -> str:
    """The one line that says how two-valued masks were read (logged, so 255 is never ignored silently)."""
    background, foreground = values
    note = f"; {ignore_index} is then a class value, not ignored" if foreground == ignore_index else ""
    return (
        f"masks hold {{{background}, {foreground}}}: {background} is the background, {foreground} the foreground{note}"
    )


def describe_runs(values: list[int]) -> str:
    """[0, 1, 2, 3, 200] -> ``0..3, 200``: sorted values as their runs of consecutive ones."""
    runs: list[list[int]] = []
    for value in sorted(values):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(f"{first}..{last}" if last > first else str(first) for first, last in runs)


def unnamed_values_problem(present: list[int], ignore_index: int) -> tuple[str, bool]:
    """(the sentence that says a void value may be trained as a class, or "" when nothing suggests one; whether it is
    a problem rather than a doubt). No class is named (each stored value is read as its index) and the masks hold more
    than two values: a problem when some stand apart from the run of the others (0..10 and 200: a gap no class
    explains); a doubt when the run is unbroken and no pixel holds the ignore index (SegNet's CamVid: 0..10 the
    classes and 11 void), since a set of fully labelled classes looks just the same. Its fix is named: --ignore-index V
    (the largest value, void's usual place) or --classes."""
    values = sorted(value for value in present if value != ignore_index)
    if len(values) <= 2:
        return "", False
    run_end = next((index for index in range(1, len(values)) if values[index] != values[index - 1] + 1), len(values))
    apart = values[run_end:]
    if not apart and ignore_index in present:  # the void has its value already (VOC's 255, ADE20K's 0 when given)
        return "", False
    largest = values[-1]
    as_class = f"class_{largest - (1 if ignore_index < largest else 0)}"
    if apart:
        held = f"the run {describe_runs(values[:run_end])} and, apart from it, {describe_runs(apart)}"
    else:
        held = f"the values {describe_runs(values)} and no pixel the ignore index {ignore_index}"
    sentence = (
        f"no classes are named and the masks hold {held}: each value is read as a class, so {largest} is trained as "
        f"{as_class}; if {largest} marks void (unlabelled) pixels pass --ignore-index {largest} (another void value "
        "likewise), else name the classes with --classes or classes.txt (one a line, background first)"
    )
    return sentence, bool(apart)


def label_ignore_index(ignore_index: int, num_classes: int) -> int:
    """The value ignored pixels hold once read: the stored ignore index, or 255 when that is below the number of
    classes (ADE20K stores 0 for unlabelled pixels and its classes as 1..150, read as 0..149)."""
    return ignore_index if ignore_index >= num_classes else 255


def skipping_ignore(num_classes: int, ignore_index: int) -> list[int]:
    """The stored value of each class when the ignore index lies among them: the indices with it left out
    (ignore index 0: the classes are stored as 1, 2, ...)."""
    return [value for value in range(num_classes + 1) if value != ignore_index][:num_classes]


def value_lookup(
    values: list[int] | None, num_classes: int, ignore_index: int, snap: bool, unknown: str = "error"
) -> tuple[np.ndarray, np.ndarray]:
    """(lookup, known): 256 entries each; ``lookup[stored]`` is the class index (or the label ignore index) of a
    stored value, and ``known[stored]`` whether that value means anything (an unknown one is refused, never
    guessed; with ``unknown`` "ignore", every value not listed means the ignore index). ``ignore_index`` is the
    stored one.

    ``values`` None means the classes are stored as their index. With ``snap`` every value maps to the class
    of the nearest class value (ties to the lower), for masks saved lossily (JPEG)."""
    values = list(range(num_classes)) if values is None else values
    label_ignore = label_ignore_index(ignore_index, num_classes)
    lookup = np.full(256, label_ignore, dtype=np.uint8)
    known = np.zeros(256, dtype=bool)
    known[ignore_index] = True
    for index, value in enumerate(values):
        lookup[value], known[value] = index, True
    if unknown == "ignore":  # Cityscapes' labelIds: the ids no class keeps are left out of losses and metrics
        known[:] = True
    if snap:  # the nearest of the class values and the ignore index: VOC's smeared 255 border stays ignored
        targets = list(values) + ([ignore_index] if ignore_index not in values else [])
        meanings = list(range(len(values))) + ([label_ignore] if ignore_index not in values else [])
        distance = np.abs(np.arange(256)[:, None] - np.asarray(targets)[None, :])
        nearest = np.argmin(distance, axis=1)  # ties to the first listed: a class before the ignore index
        lookup = np.asarray(meanings, dtype=np.uint8)[nearest]
        known[:] = True
    return lookup, known


# Multilabel masks (classes that overlap) travel through the pipeline as one uint8 (H, W) array, like index masks, so
# that resizing, augmentation, caching and PNG writing stay the same: bit k (value 1 << k) is class k. Bit 7 is never
# a class, so 255 (every bit) stays free for the ignore index.
MAX_LABELS = 7


def pack_labels(masks: np.ndarray) -> np.ndarray:
    """(K, H, W) masks, non-zero where class k is present -> uint8 (H, W) with bit k set there (K <= MAX_LABELS)."""
    if masks.shape[0] > MAX_LABELS:
        raise ValueError(f"{masks.shape[0]} labels: a multilabel mask holds at most {MAX_LABELS}")
    packed = np.zeros(masks.shape[1:], dtype=np.uint8)
    for index, mask in enumerate(masks):
        packed |= (mask != 0).astype(np.uint8) << index
    return packed


def unpack_labels(packed: np.ndarray, num_labels: int) -> np.ndarray:
    """uint8 (..., H, W) with bit k for class k -> uint8 (K, ..., H, W) of 0/1; the ignore value (255) unpacks as
    every class present: mask it out first where it matters."""
    bits = np.arange(num_labels, dtype=np.uint8).reshape((num_labels,) + (1,) * packed.ndim)
    return (packed[None] >> bits) & 1


def label_counts(histogram: np.ndarray, num_labels: int) -> np.ndarray:
    """Pixels of each of ``num_labels`` classes in packed multilabel masks, from their 256-value histograms (...,
    256): the pixels of every value with bit k set, the ignore value (255) left out. int64 (..., K)."""
    values = np.arange(255)
    bits = (values[:, None] >> np.arange(num_labels)[None, :]) & 1  # (255, K)
    return (np.asarray(histogram)[..., :255] @ bits).astype(np.int64)


def class_pixels(mask: np.ndarray, num_classes: int, multilabel: bool) -> np.ndarray:
    """Pixels of each class of one uint8 mask (int64, ``num_classes``): its class indices, or each class's bit of
    a packed multilabel mask; the ignore value (255) left out."""
    histogram = value_histogram(mask)
    return label_counts(histogram, num_classes) if multilabel else histogram[:num_classes]


def with_background(rows: np.ndarray) -> np.ndarray:
    """(images, K) per-label counts or presence of multilabel masks, whose column 0 is a class -> (images, 1 + K)
    with a leading empty background column, as single-label masks' class counts are read (class 0: background)."""
    rows = np.asarray(rows)
    return np.concatenate([np.zeros((len(rows), 1), dtype=rows.dtype), rows.reshape(len(rows), -1)], axis=1)


def check_packed_values(mask: np.ndarray, num_labels: int, source: str) -> None:
    """A packed multilabel mask holds bits of its ``num_labels`` classes and the ignore value 255 alone; another
    value (a bit of no class) stops, naming the file."""
    counts = value_histogram(mask)
    counts[255] = 0
    bad = np.flatnonzero(counts[1 << num_labels :]) + (1 << num_labels)
    if bad.size:
        raise DataError(
            f"{source}: mask value(s) {bad[:5].tolist()} set bits of no class: a multilabel mask holds bit k for "
            f"class k of the {num_labels} classes (values 0..{(1 << num_labels) - 1}) and 255 for ignored pixels; "
            "name every class with --classes or classes.txt, or fix the mask"
        )


def label_targets(packed: np.ndarray, num_labels: int, ignore_value: float = 255.0) -> np.ndarray:
    """A packed multilabel mask (H, W) -> float32 (K, H, W) targets: 1 where class k is present, 0 where absent,
    and ``ignore_value`` (255, the ignore index, as binary targets hold it) in every channel of an ignored pixel,
    which the losses and metrics leave out."""
    targets = unpack_labels(packed, num_labels).astype(np.float32)
    targets[:, packed == 255] = ignore_value
    return targets


def looks_packed(present: list[int]) -> bool:
    """Whether masks' values (the ignore value 255 aside) look like bit combinations of overlapping classes rather
    than class indices: all within seven bits, some holding two bits or more (3, 5, 6, ...), and not an unbroken
    run from 0 as indices are (0, 1, 2, 4, 5 is a box, a disc, a dot and the dot inside the box)."""
    values = sorted({value for value in present if value != 255})
    unbroken = values == list(range(len(values)))
    return bool(values) and values[-1] < 128 and not unbroken and any(value.bit_count() > 1 for value in values)
