"""Per-class RLE table decoding: the rle-table layout's path (numba) against the public kernels' numpy, in one run.

    python -m bench.rle_table_bench [--rows 30000] [--classes 4] [--size 256x1600] [--order column]

A Severstal-like table (ImageId,ClassId,EncodedPixels; about 40% of the rows hold runs, each class's defects in
a band of its own so the classes never overlap) is written with its images (hard links to one PNG). The project's
path opens it as train.py does (the table parsed and grouped once) and draws every image's class-index mask; the
numpy reference reads it with pandas, groups it and decodes each row with the kernels' decoder. Each is timed once,
from reading the table to the last mask; their masks are checked equal on a sample first.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from competition.layouts import open_data
from competition.rle import rle_decode_numpy

COLUMNS = "ImageId,ClassId,EncodedPixels"
CHECKED = 50  # images whose masks are compared before the timing


def box_runs(rng: np.random.Generator, band: tuple[int, int], height: int, order: str, width: int) -> str:
    """The RLE of 1-3 boxes side by side within the columns ``band`` of an image, in ``order``."""
    low, high = band
    edges = np.sort(rng.choice(np.arange(low, high), size=2 * int(rng.integers(1, 4)), replace=False))
    runs = []
    for left, right in zip(edges[0::2], edges[1::2]):
        top = int(rng.integers(0, height - 8))
        bottom = int(rng.integers(top + 4, height))
        if order == "column":  # one run per column of the box
            runs += [(column * height + top + 1, bottom - top) for column in range(left, right)]
        else:  # one run per row of the box
            runs += [(row * width + left + 1, right - left) for row in range(top, bottom)]
    return " ".join(f"{start} {length}" for start, length in sorted(runs))


def write_table(root: Path, rows: int, classes: int, shape: tuple[int, int], order: str, seed: int = 0) -> None:
    """``train.csv`` of ``rows`` rows (``rows // classes`` images, a row per image and class) and ``train/``."""
    height, width = shape
    rng = np.random.default_rng(seed)
    bands = [(k * width // classes, (k + 1) * width // classes) for k in range(classes)]
    (root / "train").mkdir(parents=True)
    Image.fromarray(np.full(shape, 90, np.uint8)).save(root / "image.png")
    table = []
    for index in range(rows // classes):
        name = f"{index:09x}.png"  # Severstal's ids are file names
        os.link(root / "image.png", root / "train" / name)
        for k in range(classes):
            rle = box_runs(rng, bands[k], height, order, width) if rng.random() < 0.4 else ""
            table.append((name, k + 1, rle))
    pd.DataFrame(table, columns=COLUMNS.split(",")).to_csv(root / "train.csv", index=False)


def numpy_masks(csv: Path, shape: tuple[int, int], order: str):
    """Every image's class-index mask as the public kernels make it: pandas, then each row's numpy decode."""
    height, width = shape
    for image_id, rows in pd.read_csv(csv).groupby("ImageId"):
        mask = np.zeros(shape, np.uint8)
        for class_id, rle in zip(rows["ClassId"], rows["EncodedPixels"]):
            if not isinstance(rle, str):  # NaN: an empty cell
                continue
            drawn = rle_decode_numpy(rle, (width, height)).T if order == "column" else rle_decode_numpy(rle, shape)
            mask[drawn == 1] = class_id
        yield image_id.removesuffix(".png"), mask


def project_masks(root: Path, shape: tuple[int, int], order: str):
    """Every image's mask as training reads it: the table opened once, each mask drawn (sizes known, as the loader
    knows them from the image it decoded)."""
    data = open_data(root, masks_csv="train.csv", rle_columns=COLUMNS, rle_order=order)
    for image_id in data.train_ids():
        yield image_id, data.read_mask(image_id, shape)


def timed(masks) -> tuple[float, int]:
    """(seconds to make every mask, how many)."""
    start = time.perf_counter()
    count = sum(1 for _ in masks)
    return time.perf_counter() - start, count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--size", default="256x1600", help="HEIGHTxWIDTH of the images (Severstal's)")
    parser.add_argument("--order", choices=("row", "column"), default="column")
    args = parser.parse_args(argv)
    shape = tuple(int(side) for side in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_table(root, args.rows, args.classes, shape, args.order)
        reference = dict(item for item, _ in zip(numpy_masks(root / "train.csv", shape, args.order), range(CHECKED)))
        for image_id, mask in project_masks(root, shape, args.order):  # numba compiles or loads its cache here too
            if image_id in reference:
                assert np.array_equal(mask, reference[image_id]), f"masks of {image_id} differ"
        baseline, images = timed(numpy_masks(root / "train.csv", shape, args.order))
        ours, drawn = timed(project_masks(root, shape, args.order))
        assert drawn == images
        frame = pd.read_csv(root / "train.csv", keep_default_na=False)
    filled = frame["EncodedPixels"] != ""
    runs = frame["EncodedPixels"][filled].str.count(" ").add(1).floordiv(2).mean()
    print(
        f"{len(frame)} rows ({drawn} images of {shape[1]}x{shape[0]}, {args.classes} classes, {args.order}-major; "
        f"{int(filled.sum())} rows with runs, {runs:.0f} runs each on average), table read and every mask drawn once"
    )
    print(f"{'':8}{'numpy s':>10}{'numba s':>10}{'speed-up':>10}")
    print(f"{'decode':8}{baseline:10.3f}{ours:10.3f}{baseline / ours:9.1f}x")


if __name__ == "__main__":
    main()
