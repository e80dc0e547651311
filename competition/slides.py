"""Images larger than memory: tiled TIFFs read window by window, other images decoded once into a memory-mapped cache.

    python -m competition.slides SLIDE.tif [MORE ...] [--cache DIR]   # says how each is read (and caches it)

``open_slide(path, cache_dir)`` gives a ``Slide``: ``shape`` (height, width, 3) and ``read(y, x, h, w)``, a uint8
RGB window of level 0. A tiled TIFF (pyramidal or not) is read through tifffile one tile at a time: a window costs
the tiles it touches, not the image. Any other image (a TIFF in strips, PNG, JPEG, ...) is decoded once into
``<cache>/<name>-<key>.npy`` (written under a temporary name, renamed when whole) and memory-mapped from there.
Masks are read the same way (``open_mask``: ``MaskWindows``), or from an RLE's runs (``RunsMask``).
"""

import contextlib
import hashlib
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from competition.errors import ConfigError, DataError, DiskFullError, OutputError
from competition.files import atomic_output, check_writable, format_bytes, no_space_left, reserve_space
from competition.logs import OneLineParser, configure, exit_on_project_error
from competition.rle import RLEError, rle_runs

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
INSTALL = "pip install -r requirements-slides.txt"
# Room left on the cache's disk beyond the cached image itself (the .npy header, other writers meanwhile).
CACHE_MARGIN_BYTES = 64 * 2**20
# Rows of a TIFF in strips decoded at a time into the cache: memory stays a band, however tall the image.
CACHE_BAND_ROWS = 1024


def _tifffile():
    try:
        import tifffile
    except ImportError:
        raise ConfigError(f"reading slides (TIFF) needs the tifffile package, not installed here: {INSTALL}") from None
    return tifffile


class Slide:
    """An image of ``shape`` (height, width, 3), read as uint8 RGB windows ``read(y, x, h, w)`` of level 0.

    Pickled (a DataLoader worker) or used after a fork, it opens its file again in the new process: a file
    offset shared between processes would mix their reads."""

    def __init__(self, path: Path, shape: tuple[int, int, int], cached: Path | None = None):
        self.path, self.shape, self.cached = path, shape, cached
        self._opened_in: int | None = None
        self._pixels = None

    def __reduce__(self):
        return (Slide, (self.path, self.shape, self.cached))

    @property
    def tiled(self) -> bool:
        """Read tile by tile from its TIFF (False: memory-mapped from the cache)."""
        return self.cached is None

    def read(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """The uint8 (height, width, 3) window whose top-left pixel is (y, x); it must lie inside the image."""
        if (
            not (0 <= y and 0 <= x and 0 < height and 0 < width)
            or y + height > self.shape[0]
            or x + width > self.shape[1]
        ):
            raise ValueError(f"window {(y, x, height, width)} is not inside {self.path}'s {self.shape[:2]}")
        if self._opened_in != os.getpid():
            self._pixels = _TiffTiles(self.path) if self.cached is None else np.load(self.cached, mmap_mode="r")
            self._opened_in = os.getpid()
        if self.cached is not None:
            return np.array(self._pixels[y : y + height, x : x + width])
        return self._pixels.window(y, x, height, width)

    def close(self) -> None:
        if self._opened_in == os.getpid() and isinstance(self._pixels, _TiffTiles):
            self._pixels.close()
        self._pixels, self._opened_in = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _reading(path: Path):
    """tifffile's and the codecs' ways of saying a file is not a readable TIFF, as one DataError naming it."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (OSError, ValueError, RuntimeError, KeyError, IndexError) as error:  # tifffile's and the codecs' errors
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(
            f"{path}: not a readable TIFF ({reason}); the file is corrupt or cut short: replace it"
        ) from None


class _TiffTiles:
    """Level 0 of a TIFF (its first page), its segments (tiles, or strips) decoded one by one as a window needs."""

    def __init__(self, path: Path):
        tifffile = _tifffile()
        self.path = path
        with _reading(path):
            self.file = tifffile.TiffFile(path)
            self.page = self.file.series[0].levels[0].keyframe
            planes, depth, height, width, samples = self.page.shaped
            self.compression = self.page.compression.name
        try:
            tifffile.TIFF.DECOMPRESSORS[self.page.compression]
        except KeyError:
            self.file.close()
            raise DataError(
                f"{path}: its pixels are compressed as {self.compression}, which needs the imagecodecs package: "
                f"{INSTALL}"
            ) from None
        if depth != 1 or len(self.file.series[0].levels[0].pages) != 1 or planes * samples not in (1, 2, 3, 4):
            self.file.close()
            raise DataError(
                f"{path}: level 0 is {self.page.shaped} (planes, depth, height, width, samples); slides are read as "
                "one page of 1 to 4 channels (grey, RGB, with or without alpha)"
            )
        self.height, self.width, self.channels = height, width, planes * samples
        self.is_tiled = self.page.is_tiled
        self.segment = (self.page.tilelength, self.page.tilewidth) if self.is_tiled else (self.page.rowsperstrip, width)
        self.segment = (min(self.segment[0], height), self.segment[1])
        self.grid = (math.ceil(height / self.segment[0]), math.ceil(width / self.segment[1]))

    def close(self) -> None:
        self.file.close()

    def window(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """uint8 RGB (height, width, 3) from the segments the window touches, and no others."""
        return as_rgb_window(self.stored_window(y, x, height, width), self.path)

    def stored_window(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """(height, width, channels) of the values as stored, from the segments the window touches alone."""
        rows, columns = self.segment
        wanted = [
            plane * self.grid[0] * self.grid[1] + row * self.grid[1] + column
            for plane in range(self.page.shaped[0])
            for row in range(y // rows, (y + height - 1) // rows + 1)
            for column in range(x // columns, (x + width - 1) // columns + 1)
        ]
        out = np.empty((height, width, self.channels), self.page.dtype)
        for decoded, (plane, _, top, left, _) in self._decoded(wanted):
            y0, x0 = max(y, top), max(x, left)
            y1, x1 = min(y + height, top + rows), min(x + width, left + columns)
            channel = slice(plane, plane + 1) if self.page.shaped[0] > 1 else slice(None)
            out[y0 - y : y1 - y, x0 - x : x1 - x, channel] = decoded[y0 - top : y1 - top, x0 - left : x1 - left]
        return out

    def _decoded(self, wanted: list[int]):
        """(rows, columns, samples) of each segment in ``wanted``, and where it lies (plane, depth, top, left, 0)."""
        offsets, counts = self.page.dataoffsets, self.page.databytecounts
        with _reading(self.path):
            segments = self.file.filehandle.read_segments(
                [offsets[k] for k in wanted], [counts[k] for k in wanted], wanted, sort=True
            )
            for data, index in segments:
                decoded, position, _ = self.page.decode(data, index, jpegtables=self.page.jpegtables, _fullsize=True)
                yield decoded[0], position


def as_rgb_window(pixels: np.ndarray, path: Path) -> np.ndarray:
    """(h, w, 1 to 4) of uint8 or uint16 -> uint8 RGB (h, w, 3): grey replicated, alpha dropped, 16 bits scaled."""
    if pixels.dtype == np.uint16:
        from competition.data import scale_sixteen_bit  # imported when needed: competition.data imports torch

        pixels = scale_sixteen_bit(pixels, str(path))
    elif pixels.dtype != np.uint8:
        raise DataError(f"{path}: pixels of {pixels.dtype}; slides are read as 8- or 16-bit images: convert it")
    if pixels.shape[2] <= 2:  # grey, grey + alpha
        return np.repeat(pixels[..., :1], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def open_slide(path: str | Path, cache_dir: str | Path) -> Slide:
    """A ``Slide`` over ``path``: a tiled TIFF read in place, anything else decoded once into ``cache_dir``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found" if not path.exists() else f"{path}: not a file")
    if path.suffix.lower() in TIFF_SUFFIXES:
        tiles = _TiffTiles(path)
        try:
            shape = (tiles.height, tiles.width, 3)
            if tiles.is_tiled:
                return Slide(path, shape)
            return Slide(path, shape, _cached(path, shape, cache_dir, lambda out: _copy_bands(tiles, out)))
        finally:
            tiles.close()
    shape = _pillow_shape(path)
    return Slide(path, shape, _cached(path, shape, cache_dir, lambda out: _decode_whole(path, out)))


@contextlib.contextmanager
def _pixel_limit_lifted():
    """Pillow's decompression-bomb limit off while the block runs: a slide is big on purpose."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _pillow_shape(path: Path) -> tuple[int, int, int]:
    """(height, width, 3) from the file's header (``header_shape``: a file Pillow cannot open is one line)."""
    return (*header_shape(path), 3)


def _copy_bands(tiles: _TiffTiles, out: np.ndarray) -> None:
    for top in range(0, tiles.height, CACHE_BAND_ROWS):
        rows = min(CACHE_BAND_ROWS, tiles.height - top)
        out[top : top + rows] = tiles.window(top, 0, rows, tiles.width)


def _decode_whole(path: Path, out: np.ndarray) -> None:
    """Pillow's decode of the whole file into ``out``, the project's decode of any image (``decode_image``)."""
    from competition.data import decode_image  # imported when needed: reading tiles takes no torch (~0.5 GB)

    with _pixel_limit_lifted():
        out[...] = decode_image(path.read_bytes(), str(path))


def cache_key(path: Path) -> str:
    """Changes when the file does (its resolved path, size and modification time): a stale cache is never read."""
    status = path.stat()
    return hashlib.sha1(f"{path.resolve()}|{status.st_size}|{status.st_mtime_ns}".encode()).hexdigest()[:12]


def _cached(path: Path, shape: tuple[int, ...], cache_dir: str | Path, decode, rules: str = "") -> Path:
    """The cache file of ``path``, made first (``decode(out)`` fills a memory-mapped array) unless it is there.
    ``rules`` (how the file's values were read: a mask's classes) is part of the key: other rules, another file."""
    cache_dir = Path(cache_dir)
    key = cache_key(path) if not rules else hashlib.sha1(f"{cache_key(path)}|{rules}".encode()).hexdigest()[:12]
    cached = cache_dir / f"{path.stem}-{key}.npy"
    if cached.exists():
        return cached
    check_writable(cache_dir, "the slide cache", folder=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    needed, free = math.prod(shape) + CACHE_MARGIN_BYTES, shutil.disk_usage(cache_dir).free
    if needed > free:
        raise OutputError(
            f"{path}: not a tiled TIFF, so it is decoded once into {cache_dir}, which needs {format_bytes(needed)} "
            f"free there and has {format_bytes(free)}: free some space, name another cache folder, or save the "
            "image as a tiled TIFF (read in place)"
        )
    logger.info("%s: not a tiled TIFF: decoding it once into %s (%s)", path, cached, format_bytes(math.prod(shape)))
    with atomic_output(cached) as partial:
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
        try:
            reserve_space(partial, partial.stat().st_size)
        except OSError as error:
            if not no_space_left(error):
                raise
            raise DiskFullError(
                f"{path}: no room left in {cache_dir} to decode it once ({format_bytes(math.prod(shape))}): free some "
                "space, or name another cache folder"
            ) from None
        decode(out)
        out.flush()
        del out
    return cached


def header_shape(path: Path, what: str = "image") -> tuple[int, int]:
    """(height, width) of an image or mask file from its header alone, nothing decoded or read whole: a TIFF's
    first page through tifffile where it is installed (BigTIFF too), anything else through Pillow's lazy open."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        with contextlib.suppress(ConfigError):  # no tifffile: Pillow reads a classic TIFF's header as well
            tifffile = _tifffile()
            with _reading(path), tifffile.TiffFile(path) as tiff:
                return tuple(tiff.series[0].levels[0].keyframe.shaped[2:4])
    try:
        with _pixel_limit_lifted(), Image.open(path) as header:
            return (header.height, header.width)
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (OSError, ValueError, SyntaxError) as error:  # the words of competition.data's decode, which names it too
        reason = "not an image format Pillow reads" if isinstance(error, UnidentifiedImageError) else error
        raise DataError(
            f"{path}: the {what} does not decode ({reason}); the file is corrupt or cut short: replace it, or remove "
            "the sample"
        ) from None


class MaskWindows:
    """A mask file read as uint8 (h, w) windows of class values, ``read(y, x, h, w)``, never whole: a tiled TIFF of
    one channel in place (each window's stored values made classes by ``classes_of(values, source)``, the data
    layer's rule), any other file from its decode into the cache (``open_mask``). ``source`` names it in errors.

    Pickled (a DataLoader worker) or used after a fork, it opens its file again in the new process, as a Slide does."""

    def __init__(self, path: Path, shape: tuple[int, int], cached: Path | None = None, classes_of=None):
        self.path, self.shape, self.cached, self.classes_of = path, shape, cached, classes_of
        self.source = str(path)
        self._opened_in: int | None = None
        self._pixels = None

    def __reduce__(self):
        return (MaskWindows, (self.path, self.shape, self.cached, self.classes_of))

    def read(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        if self._opened_in != os.getpid():
            self._pixels = _TiffTiles(self.path) if self.cached is None else np.load(self.cached, mmap_mode="r")
            self._opened_in = os.getpid()
        if self.cached is not None:
            return np.array(self._pixels[y : y + height, x : x + width])
        return self.classes_of(self._pixels.stored_window(y, x, height, width)[..., 0], self.source)


def open_mask(path: str | Path, cache_dir: str | Path, decode_whole, classes_of, rules: str) -> MaskWindows:
    """``MaskWindows`` over a mask file: a tiled one-channel 8-bit TIFF read window by window through
    ``classes_of`` (None: the layout's values need the whole file, a colour table's); any other (PNG, GIF, a TIFF in strips or of colours) decoded once by ``decode_whole()`` (the
    data layer's whole-mask reading: uint8 class values) into ``cache_dir``, keyed by the file and ``rules``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found" if not path.exists() else f"{path}: not a file")
    shape = header_shape(path, "mask")
    if classes_of is not None and path.suffix.lower() in TIFF_SUFFIXES:
        tiles = _TiffTiles(path)
        try:
            if tiles.is_tiled and tiles.channels == 1 and tiles.page.dtype == np.uint8:
                return MaskWindows(path, shape, classes_of=classes_of)
        finally:
            tiles.close()

    def decode(out: np.ndarray) -> None:
        with _pixel_limit_lifted():  # a slide's mask is big on purpose, as its slide is
            mask = decode_whole()
        if mask.shape != out.shape:  # the header said otherwise: a file whose pages disagree
            raise DataError(
                f"{path}: the mask decodes to {mask.shape[1]}x{mask.shape[0]}, its header says {shape[1]}x{shape[0]}"
            )
        out[...] = mask

    return MaskWindows(path, shape, _cached(path, shape, cache_dir, decode, rules))


class RunsMask:
    """A slide's mask kept as its RLE's runs (HuBMAP's ``column`` order, down each column, or Carvana's ``row``
    order): ``read(y, x, h, w)`` draws one uint8 window, never the whole mask. ``source`` names it in the one line
    said for an RLE that does not fit the slide (a run past its last pixel: a mask of another size)."""

    def __init__(self, rle: str, shape: tuple[int, int], order: str = "column", source: str = "the mask"):
        if order not in ("column", "row"):
            raise ValueError(f"order must be 'column' or 'row', got {order!r}")
        self.shape, self.order, self.source = shape, order, source
        try:
            self.starts, self.ends = rle_runs(rle, shape[0] * shape[1])
        except RLEError as error:
            raise DataError(f"{source}: {error}; the slide is {shape[1]}x{shape[0]}") from None

    def read(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        if self.order == "row":  # a row-major mask is the column-major mask of the transposed image
            return self._window(x, y, width, height, self.shape[1]).T
        return self._window(y, x, height, width, self.shape[0])

    def _window(self, y: int, x: int, height: int, width: int, side: int) -> np.ndarray:
        """(height, width) of the column-major runs over columns ``side`` pixels long."""
        low = np.arange(x, x + width, dtype=np.int64) * side + y  # each column's first pixel in the window
        first = np.searchsorted(self.ends, low, "right")  # the first run ending past it
        last = np.searchsorted(self.starts, low + height, "left")  # runs starting before the window's end
        counts = last - first
        column = np.repeat(np.arange(width), counts)
        run = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(first, counts)
        top = np.clip(self.starts[run] - low[column], 0, height)
        bottom = np.clip(self.ends[run] - low[column], 0, height)
        edges = np.zeros((height + 1, width), np.int32)
        np.add.at(edges, (top, column), 1)
        np.add.at(edges, (bottom, column), -1)
        return (np.cumsum(edges[:-1], axis=0) > 0).astype(np.uint8)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slides", nargs="+", help="image files (tiled TIFFs are read in place)")
    parser.add_argument("--cache", default="slide_cache", help="folder of decoded images (default: slide_cache/)")
    args = parser.parse_args(argv)
    configure()
    with exit_on_project_error(parser.prog):
        for name in args.slides:
            with open_slide(name, args.cache) as slide:
                how = "tiled: read in place" if slide.tiled else f"decoded once: {slide.cached}"
                print(f"{name}: {slide.shape[1]}x{slide.shape[0]}, {how}")


if __name__ == "__main__":
    main()
