"""Training on tiles of slides: an index of each slide's windows (how much tissue and foreground each holds), and
windows sampled from it: empty glass less often, crops around the foreground at a ratio the user sets.

A pixel is tissue when its saturation, ``(max - min) / max`` of its RGB on 0-255, reaches ``saturation`` and it is
not near black (pen marks, the scanner's border): the HuBMAP solutions' test, white glass being unsaturated.
"""

from dataclasses import dataclass

import numpy as np

from competition.errors import ConfigError, DataError
from competition.slides import RunsMask
from competition.sliding_window import check_tiling, window_starts

TISSUE_SATURATION = 40  # of 255: glass and its shadows stay under it, stained tissue is well above
IGNORE_INDEX = 255  # the mask value left out of losses and metrics: no foreground
DARK = 32  # a pixel whose brightest channel is under this is no tissue (black borders, ink)
TISSUE_STEP = 4  # every 4th pixel of each side is tested: a tile's share of tissue needs no more


@dataclass
class TileIndex:
    """A slide's training windows: their top-left corners, and the share of tissue and of foreground in each."""

    shape: tuple[int, int]
    tile: int
    tops: np.ndarray
    lefts: np.ndarray
    tissue: np.ndarray
    foreground: np.ndarray


def tissue_share(window: np.ndarray, saturation: int = TISSUE_SATURATION) -> float:
    """The share of a uint8 RGB window's pixels (every ``TISSUE_STEP``-th) that are tissue."""
    pixels = window[::TISSUE_STEP, ::TISSUE_STEP].astype(np.int16)
    brightest, darkest = pixels.max(-1), pixels.min(-1)
    tissue = ((brightest - darkest) * 255 >= saturation * np.maximum(brightest, 1)) & (brightest >= DARK)
    return float(tissue.mean())


def foreground(mask_window: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Where a mask window holds foreground: any class but the background (0), or any label bit of a multilabel
    mask, and not the ignore index."""
    return (mask_window != 0) & (mask_window != ignore_index)


def build_index(
    slide,
    mask,
    tile: int,
    overlap: float,
    saturation: int = TISSUE_SATURATION,
    ignore_index: int = IGNORE_INDEX,
):
    """The ``TileIndex`` of ``slide`` (``shape``, ``read``) on the sliding window's grid of ``tile`` and
    ``overlap``, its foreground (``foreground``) from ``mask`` (``shape``, ``read``, ``source``; None: a test
    slide, none)."""
    stride = check_tiling(tile, overlap)
    height, width = slide.shape[:2]
    if mask is not None and tuple(mask.shape) != (height, width):
        named = f" {slide.path}" if getattr(slide, "path", None) else ""
        raise DataError(
            f"{mask.source}: the mask is {mask.shape[1]}x{mask.shape[0]} and its slide{named} {width}x{height}: "
            "a mask must be its slide's size"
        )
    corners = [
        (top, left) for top in window_starts(height, tile, stride) for left in window_starts(width, tile, stride)
    ]
    tissue, shares = [], []
    for top, left in corners:
        rows, columns = min(tile, height - top), min(tile, width - left)
        tissue.append(tissue_share(slide.read(top, left, rows, columns), saturation))
        share = 0.0 if mask is None else float(foreground(mask.read(top, left, rows, columns), ignore_index).mean())
        shares.append(share)
    tops, lefts = (np.array(values, np.int64) for values in zip(*corners))
    return TileIndex((height, width), tile, tops, lefts, np.array(tissue), np.array(shares))


def check_sampling(empty_weight: float, positive_ratio: float, min_tissue: float) -> None:
    """One line naming the flag for a sampling setting that cannot be used."""
    for flag, value in (("--empty-tile-weight", empty_weight), ("--positive-ratio", positive_ratio)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{flag} {value}: must be between 0 and 1")
    if not 0 <= min_tissue < 1:
        raise ConfigError(f"--min-tissue {min_tissue}: must be at least 0 and below 1 (a share of the tile)")


def sample_windows(
    index: TileIndex,
    mask,
    count: int,
    rng: np.random.Generator,
    empty_weight: float = 0.1,
    positive_ratio: float = 0.5,
    min_tissue: float = 0.05,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """int64 (count, 2) top-left corners of training windows of ``index.tile``: a share ``positive_ratio`` of them
    centred on a random foreground pixel (shifted by up to a quarter tile, kept inside the slide), the rest tiles
    of the index, those with no foreground and under ``min_tissue`` tissue drawn ``empty_weight`` times as often.
    The foreground pixel is drawn from a ``RunsMask``'s runs, or from a tile of the index holding foreground."""
    check_sampling(empty_weight, positive_ratio, min_tissue)
    empty = (index.foreground == 0) & (index.tissue < min_tissue)
    weights = np.where(empty, empty_weight, 1.0)
    if weights.sum() == 0:
        weights = np.ones_like(weights)  # a slide of glass alone: its tiles, rather than none
    corners = np.stack([index.tops, index.lefts], 1)[rng.choice(len(weights), count, p=weights / weights.sum())]
    has_foreground = mask is not None and (index.foreground > 0).any()
    around = rng.random(count) < positive_ratio if has_foreground else np.zeros(count, bool)
    if around.any():
        if isinstance(mask, RunsMask):
            centres = foreground_pixels(mask, int(around.sum()), rng)
        else:
            centres = foreground_pixels_of_tiles(index, mask, int(around.sum()), rng, ignore_index)
        jitter = rng.integers(-index.tile // 4, index.tile // 4 + 1, centres.shape)
        limits = np.maximum(np.array(index.shape) - index.tile, 0)
        corners[around] = np.clip(centres + jitter - index.tile // 2, 0, limits)
    return corners


def foreground_pixels(mask: RunsMask, count: int, rng: np.random.Generator) -> np.ndarray:
    """int64 (count, 2) (y, x) of foreground pixels drawn uniformly, from the runs (no mask drawn)."""
    lengths = mask.ends - mask.starts
    runs = rng.choice(lengths.size, count, p=lengths / lengths.sum())
    flat = mask.starts[runs] + (rng.random(count) * lengths[runs]).astype(np.int64)
    if mask.order == "column":
        x, y = np.divmod(flat, mask.shape[0])
    else:
        y, x = np.divmod(flat, mask.shape[1])
    return np.stack([y, x], 1)


def foreground_pixels_of_tiles(index: TileIndex, mask, count: int, rng: np.random.Generator, ignore_index: int):
    """int64 (count, 2) (y, x) of foreground pixels of any mask (``read``): a tile of the index drawn by its share of
    foreground, then one of its foreground pixels uniformly (a window read per pixel drawn, never the whole mask)."""
    tiles = rng.choice(index.foreground.size, count, p=index.foreground / index.foreground.sum())
    pixels = np.empty((count, 2), np.int64)
    for number, tile in enumerate(tiles):
        top, left = int(index.tops[tile]), int(index.lefts[tile])
        rows, columns = min(index.tile, index.shape[0] - top), min(index.tile, index.shape[1] - left)
        ys, xs = np.nonzero(foreground(mask.read(top, left, rows, columns), ignore_index))
        chosen = rng.integers(ys.size)
        pixels[number] = (top + ys[chosen], left + xs[chosen])
    return pixels
