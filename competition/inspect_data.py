"""What the project understood of a data folder, before any training: python -m competition.inspect_data --data-dir D."""

import collections
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from competition.config import add_config_arguments, resolve_config
from competition.data import _decoding
from competition.data_checks import absent_class_problems
from competition.errors import DataError
from competition.layouts import DATA_FLAGS, open_data_as
from competition.logs import OneLineParser, add_logging_arguments, configure_from, exit_on_project_error
from competition.survey import checked_samples, in_data_folder

logger = logging.getLogger("competition.inspect_data")
SHOWN_PROBLEMS = 10  # problems listed one a line; the rest are counted


def image_formats(data, image_ids: list[str], split: str = "train") -> tuple[collections.Counter, list[str]]:
    """((width x height, mode) -> images, one line per unreadable image), from the files' headers alone."""
    formats: collections.Counter = collections.Counter()
    problems = []
    for image_id in image_ids:
        path = data.image_path(image_id, split)
        try:
            with _decoding(path), Image.open(path) as image:
                formats[(f"{image.width}x{image.height}", image.mode)] += 1
        except DataError as error:
            problems.append(in_data_folder(data, error))
    return formats, problems


def scan_masks(data, image_ids: list[str], progress: bool) -> tuple[np.ndarray, int, list[str], int]:
    """(pixels per class, ignored pixels, one line per broken sample, all pixels): every sample checked by the pre-check
    training runs (``checked_samples``: each file decoded to its end, on threads), so any problem training would
    stop on is found here; the masks counted unless the layout fixes its classes."""
    count = 0 if data.fixed_classes else len(image_ids)
    histograms, problems = checked_samples(data, image_ids, count, progress=progress)
    total = np.sum(histograms, axis=0, dtype=np.int64) if histograms else np.zeros(256, dtype=np.int64)
    ignored = (
        int(total[data.ignore_index]) if data.ignore_index is not None and data.ignore_index >= data.num_classes else 0
    )
    return data.class_counts(total), ignored, problems, int(total.sum())  # multilabel: counted per class bit


def describe(data, config, progress: bool = True) -> tuple[list[str], list[str]]:
    """(lines describing the data, problems found)."""
    train_ids, test_ids = data.train_ids(), data.test_ids()
    lines = [f"data folder: {data.root}", f"layout: {data.layout}"]
    splits = getattr(data, "splits", {})
    if splits:
        sizes = collections.Counter(splits.values())
        lines.append(
            "split: " + ", ".join(f"{name} {sizes[name]}" for name in sorted(sizes)) + f", test {len(test_ids)}"
        )
    lines.append(f"images: {len(train_ids)} labelled, {len(test_ids)} test; model input channels: {data.in_channels}")
    # The labelled images' problems are among those the check of the samples finds below.
    (labelled, _), (tests, broken_tests) = image_formats(data, train_ids), image_formats(data, test_ids, "test")
    lines += [f"  {count} labelled image(s) {size} {mode}" for (size, mode), count in labelled.most_common(5)]
    lines += [f"  {count} test image(s) {size} {mode}" for (size, mode), count in tests.most_common(3)]
    if data.fixed_classes:  # nothing to count in the masks: the layout names its classes
        problems = scan_masks(data, train_ids, progress)[2]
        return lines + [data.class_description], problems + broken_tests
    table = getattr(data, "table", None)
    if data.masks_line():
        lines.append(data.masks_line())
    elif data.multilabel:
        lines.append("masks: packed bits of overlapping classes, bit k for class k (--head multilabel)")
    elif table is not None:
        lines.append(f"masks: colours of {table.path} ({len(table.colors)} colours)")
    elif data.mask_values is not None:
        lines.append("masks: stored values " + ", ".join(f"{v}={n}" for v, n in zip(data.mask_values, data.classes)))
    else:
        lines.append("masks: class indices")
    ignores_other_values = table is None and getattr(data, "unknown_values", "error") == "ignore"
    if ignores_other_values:
        lines.append("  any other stored value: the ignore index (--unknown-values ignore)")
    counts, ignored, problems, pixels = scan_masks(data, train_ids, progress)
    problems = list(data.class_problems) + problems  # first: what every other line's classes depend on
    problems += broken_tests
    labelled, every = max(int(counts.sum()), 1), max(int(counts.sum()) + ignored, 1)  # ignored pixels: apart
    if data.multilabel:  # a pixel of several classes counts in each: shares of the pixels, not of the counts
        labelled, every = max(pixels - ignored, 1), max(pixels, 1)
    overlap = " each covers (classes may overlap)" if data.multilabel else ""
    lines.append(f"classes ({data.num_classes}), share of the labelled pixels{overlap}:")
    lines += [
        f"  {index:3d} {name:<20} {100 * counts[index] / labelled:7.3f}%" for index, name in enumerate(data.classes)
    ]
    stored = getattr(data, "stored_ignore_index", data.ignore_index)
    if data.mask_values is not None and stored in data.mask_values:  # 0/255 masks: 255 is the foreground here
        owner = data.classes[list(data.mask_values).index(stored)]
        if ignores_other_values:  # the values no class keeps are ignored even so
            lines.append(
                f"ignored (stored values no class keeps): {100 * ignored / every:.3f}% of all pixels; "
                f"{stored} is the stored value of class {owner!r}"
            )
        else:
            lines.append(f"ignore index: none ({stored} is the stored value of class {owner!r})")
    else:
        lines.append(f"ignore index {stored}: {100 * ignored / every:.3f}% of all pixels, left out of the shares above")
    problems += absent_class_problems(data.classes, counts, None, data.multilabel)
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__)
    add_config_arguments(parser, DATA_FLAGS)
    parser.add_argument("--test-images", type=Path, help="a folder of test images instead of the data's test/")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)
    configure_from(args)
    with exit_on_project_error("inspect_data", args.debug):
        config = resolve_config(args, DATA_FLAGS)
        data = open_data_as(config, test_images=args.test_images)
        lines, problems = describe(data, config, progress=not args.quiet)
    print("\n".join(lines))
    if data.class_doubts:
        print(f"to check ({len(data.class_doubts)}):")
        print("\n".join(f"  {doubt}" for doubt in data.class_doubts))
    if not problems:
        print("problems: none found")
        return 0
    print(f"problems ({len(problems)}):")
    print("\n".join(f"  {problem}" for problem in problems[:SHOWN_PROBLEMS]))
    if len(problems) > SHOWN_PROBLEMS:
        print(f"  ... and {len(problems) - SHOWN_PROBLEMS} more")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
