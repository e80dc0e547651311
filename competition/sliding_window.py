"""Sliding-window prediction of images larger than memory: overlapping windows blended by a weight window, the
mask written band by band.

Model-agnostic: ``predict(windows)`` takes uint8 (N, tile, tile, C) windows and returns their (N, K, tile, tile)
probabilities (K = 1: a sigmoid's foreground; K > 1: a softmax's classes, or a sigmoid per class), so TTA and
fold ensembles plug in as the callable, and ``labels(band)`` turns blended bands into label bands by the head's
rule (``labels_of`` by default). Windows are ``tile`` pixels a side, ``stride = round(tile * (1 - overlap))`` apart, the last of a
row or column flush with the image's edge; an image smaller than the tile is padded by reflection.

Each window's probabilities are weighted by a separable window (Gaussian, or a linear ramp; ``uniform``, a plain
average, is the unblended baseline) and divided by the sum of the weights that cover each pixel before they are
added: that sum is the product of two exact 1-D sums (the windows lie on a grid), so no weight map is kept.
Windows run row by row into a float32 band of ``tile`` rows; the rows no later window touches are then final
(labelled by the head's rule, and handed on), and the rest is kept for the next row of windows in the full-size
accumulator, as float16 (rounded once per row of windows: by at most 2**-12, the sums being probabilities in
[0, 1]). The accumulator is an array in memory up to ``memory_limit``
bytes, else a file in ``work_dir`` of which one band of rows is mapped at a time.
"""

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from competition.errors import ConfigError, DiskFullError
from competition.files import atomic_output, format_bytes, no_space_left, reserve_space

TILE_MULTIPLE = 32  # the encoders' output stride: a window of another size would be cropped or padded inside
WEIGHTINGS = ("gaussian", "ramp", "uniform")  # uniform: a plain average, the unblended baseline of seams
GAUSSIAN_SIGMA = 1 / 8  # of the tile, as nnU-Net's sliding window; a border pixel weighs exp(-8) of the centre
WEIGHT_FLOOR = 1e-3  # no pixel of a window weighs nothing: a corner covered by one window is still predicted
MEMORY_LIMIT = 256 * 2**20  # bytes of accumulator held in memory; above it, a file mapped band by band
ACCUMULATOR = np.float16

Predict = Callable[[np.ndarray], np.ndarray]
Labelling = Callable[[np.ndarray], np.ndarray]  # float32 (rows, width, K) blended probabilities -> uint8 (rows, width)


@dataclass(frozen=True)
class Tiling:
    """How images are cut into windows (``--tile``, ``--tile-overlap``, ``--tile-weighting``): picklable, for shards."""

    tile: int
    overlap: float
    weighting: str = "gaussian"
    batch_size: int = 8  # windows predicted at once (--batch-size): how fast, not what is predicted

    def __post_init__(self):
        check_tiling(self.tile, self.overlap)
        weight_profile(TILE_MULTIPLE, self.weighting)  # an unknown weighting is one line here


def check_tiling(tile: int, overlap: float) -> int:
    """The stride of ``tile`` and ``overlap``, or one line naming the flag and the fix."""
    if tile < TILE_MULTIPLE or tile % TILE_MULTIPLE:
        nearest = max(TILE_MULTIPLE, round(tile / TILE_MULTIPLE) * TILE_MULTIPLE)
        raise ConfigError(f"--tile {tile}: must be a positive multiple of {TILE_MULTIPLE}, e.g. {nearest}")
    if not 0 <= overlap < 1:
        raise ConfigError(
            f"--tile-overlap {overlap}: must be at least 0 and below 1 (the share of a tile that the next one "
            "covers again), e.g. 0.25"
        )
    return max(1, round(tile * (1 - overlap)))


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Where windows begin along a side of ``length``: every ``stride``, the last flush with the end."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, stride), length - tile]


def weight_profile(tile: int, weighting: str) -> np.ndarray:
    """float64 (tile,) weights along one side of a window; the window's weights are its outer product."""
    centre = np.arange(tile) - (tile - 1) / 2
    if weighting == "gaussian":
        profile = np.exp(-0.5 * (centre / (GAUSSIAN_SIGMA * tile)) ** 2)
    elif weighting == "ramp":
        profile = 1 - np.abs(centre) / (tile / 2)
    elif weighting == "uniform":
        profile = np.ones(tile)
    else:
        raise ConfigError(f"--tile-weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    return np.maximum(profile, WEIGHT_FLOOR)


def weight_sums(length: int, starts: list[int], profile: np.ndarray) -> np.ndarray:
    """float64 (length,): the sum of the profile of every window covering each position along a side."""
    sums = np.zeros(length)
    for start in starts:
        stop = min(start + profile.size, length)
        sums[start:stop] += profile[: stop - start]
    return sums


class Accumulator:
    """Blended probabilities (height, width, K) as float16: in memory, or in a file of ``work_dir`` (removed
    when closed) of which ``rows`` maps only the rows asked, so memory holds one band of windows."""

    def __init__(self, shape: tuple[int, int, int], work_dir: str | Path | None, memory_limit: int = MEMORY_LIMIT):
        self.shape = shape
        size = math.prod(shape) * np.dtype(ACCUMULATOR).itemsize
        self.path = None
        if size <= memory_limit or work_dir is None:
            self.array = np.zeros(shape, ACCUMULATOR)
            return
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(work_dir) / f"accumulator-{os.getpid()}.f16"
        self.path.write_bytes(b"")
        try:
            reserve_space(self.path, size)  # zeros, on the disk before any band is mapped
        except OSError as error:
            self.close()
            if not no_space_left(error):
                raise
            raise DiskFullError(
                f"{work_dir}: no room left for the sliding window's accumulator ({format_bytes(size)}, float16 "
                "probabilities of the whole image): free some space, or name another work folder"
            ) from None

    def rows(self, top: int, bottom: int) -> np.ndarray:
        """A writable view of rows [top, bottom); on disk, valid until the next call."""
        if self.path is None:
            return self.array[top:bottom]
        row_bytes = self.shape[1] * self.shape[2] * np.dtype(ACCUMULATOR).itemsize
        return np.memmap(self.path, ACCUMULATOR, "r+", offset=top * row_bytes, shape=(bottom - top, *self.shape[1:]))

    def close(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _read_window(slide, top: int, left: int, tile: int) -> np.ndarray:
    height, width = slide.shape[:2]
    rows, columns = min(tile, height - top), min(tile, width - left)
    window = slide.read(top, left, rows, columns)
    if (rows, columns) != (tile, tile):
        window = np.pad(window, ((0, tile - rows), (0, tile - columns), (0, 0)), mode="reflect")
    return window


def blended_bands(
    slide,
    predict: Predict,
    tile: int,
    overlap: float,
    weighting: str = "gaussian",
    batch_size: int = 8,
    work_dir: str | Path | None = None,
    memory_limit: int = MEMORY_LIMIT,
) -> Iterator[tuple[int, np.ndarray]]:
    """(top row, float32 (rows, width, K) blended probabilities) of each finished band, top to bottom.

    ``slide`` is anything with ``shape`` (height, width, C) and ``read(y, x, h, w)`` (a ``slides.Slide``, or an
    array wrapped by ``InMemory``)."""
    stride = check_tiling(tile, overlap)
    profile = weight_profile(tile, weighting)
    height, width = slide.shape[:2]
    tops, lefts = window_starts(height, tile, stride), window_starts(width, tile, stride)
    row_sums, column_sums = weight_sums(height, tops, profile), weight_sums(width, lefts, profile)
    accumulator = None
    try:
        for index, top in enumerate(tops):
            bottom = min(top + tile, height)
            row_weights = (profile[: bottom - top] / row_sums[top:bottom]).astype(np.float32)[:, None, None]
            band = None
            for first in range(0, len(lefts), batch_size):
                starts = lefts[first : first + batch_size]
                windows = np.stack([_read_window(slide, top, left, tile) for left in starts])
                probabilities = np.asarray(predict(windows), np.float32)
                if accumulator is None:
                    accumulator = Accumulator((height, width, probabilities.shape[1]), work_dir, memory_limit)
                if band is None:  # float32 while this row of windows adds to it, from what the rows above left
                    band = np.array(accumulator.rows(top, bottom), np.float32)
                for left, window in zip(starts, probabilities):
                    right = min(left + tile, width)
                    column_weights = (profile[: right - left] / column_sums[left:right]).astype(np.float32)
                    window = np.moveaxis(window[:, : bottom - top, : right - left], 0, -1)
                    band[:, left:right] += window * row_weights * column_weights[None, :, None]
            finished = tops[index + 1] - top if index + 1 < len(tops) else bottom - top
            accumulator.rows(top, bottom)[finished:] = band[finished:]  # for the next row of windows
            yield top, band[:finished]
    finally:
        if accumulator is not None:
            accumulator.close()


def labels_of(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 (rows, width): foreground 1 where K = 1 and the probability passes ``threshold``; else the argmax."""
    if probabilities.shape[-1] == 1:
        return (probabilities[..., 0] > threshold).astype(np.uint8)
    return probabilities.argmax(-1).astype(np.uint8)


@contextlib.contextmanager
def npy_mask_writer(path: str | Path, height: int, width: int) -> Iterator[Callable[[int, np.ndarray], None]]:
    """``write(top, band)`` of a uint8 (height, width) mask saved as ``.npy`` band by band, in order, never held
    whole; under a temporary name until the block ends with every row written (a failure leaves no file)."""
    written = 0

    def write(top: int, band: np.ndarray) -> None:
        nonlocal written
        if top != written or band.shape[1] != width:
            raise ValueError(f"band at row {top}, {band.shape[1]} wide; expected row {written}, {width} wide")
        file.write(np.ascontiguousarray(band, np.uint8).tobytes())
        written += band.shape[0]

    with atomic_output(path) as partial, open(partial, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False, "shape": (height, width)})
        yield write
        if written != height:
            raise ValueError(f"{path}: {written} of {height} rows written")


def predict_mask(
    slide,
    predict: Predict,
    write: Callable[[int, np.ndarray], None],
    tile: int,
    overlap: float,
    labels: Labelling = labels_of,
    **options,
) -> int:
    """The mask of ``slide`` handed to ``write(top, uint8 band)`` band by band, each band labelled by ``labels``
    (of the model's head: ``slide_inference.band_labelling``); returns the windows predicted. ``options``:
    ``weighting``, ``batch_size``, ``work_dir``, ``memory_limit`` of ``blended_bands``."""
    for top, probabilities in blended_bands(slide, predict, tile, overlap, **options):
        write(top, labels(probabilities))
    stride = check_tiling(tile, overlap)
    return len(window_starts(slide.shape[0], tile, stride)) * len(window_starts(slide.shape[1], tile, stride))


class InMemory:
    """An image array in the shape of a slide (``shape``, ``read``): whole-image inputs through the same path."""

    def __init__(self, image: np.ndarray):
        self.image, self.shape = image, image.shape

    def read(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        return self.image[y : y + height, x : x + width]

    def close(self) -> None:
        """Nothing to release (a ``slides.Slide`` closes its file): either is closed alike."""
