"""Masks as tiled TIFFs (uint8, deflate, ``TIFF_TILE`` pixels a side; a palette of the classes, or greyscale packed
label bits): encoded whole, or written band by band into a file, so an image's mask is never held whole.

Both give the same bytes for the same mask. tifffile takes an image's tiles from an iterator: band by band, a
thread runs tifffile on the tiles of each finished row of tiles, handed over through a short queue, so memory
holds about three rows of tiles (``TIFF_TILE`` rows of the mask each)."""

import contextlib
import io
import queue
import threading
from pathlib import Path

import numpy as np

from competition.errors import ConfigError
from competition.files import partial_path
from competition.slides import INSTALL

TIFF_TILE = 256  # pixels a side of the mask's tiles: a multiple of 16, as TIFF requires
QUEUED_TILE_ROWS = 2  # rows of tiles waiting for the writer thread: the band side waits beyond it
_ABANDONED = "abandoned"  # what the band side tells the writer thread when the image's prediction failed


def tifffile_for_masks():
    """The tifffile module, or one line saying how to install it."""
    try:
        import tifffile
    except ImportError:
        raise ConfigError(
            f"--format tiff writes masks with the tifffile package, not installed here: {INSTALL}"
        ) from None
    return tifffile


def tiff_options(colours: np.ndarray | None) -> dict:
    """tifffile's settings of a mask: a palette of ``colours`` ((256, 3) uint8), or greyscale when None."""
    options = {"tile": (TIFF_TILE, TIFF_TILE), "compression": "zlib", "photometric": "minisblack"}
    if colours is not None:
        options.update(photometric="palette", colormap=(colours.astype(np.uint16) * 257).T.copy())
    return options


def encode_tiff(mask: np.ndarray, colours: np.ndarray | None) -> bytes:
    """A uint8 (H, W) mask as the bytes of a tiled TIFF."""
    buffer = io.BytesIO()
    tifffile_for_masks().imwrite(buffer, np.ascontiguousarray(mask, np.uint8), **tiff_options(colours))
    return buffer.getvalue()


class _Abandoned(Exception):
    """The band side stopped before the last row: the writer thread stops too."""


class TiffBands:
    """``write(top, band)`` of a uint8 (height, width) mask, in order, into ``<path>.partial`` as a tiled TIFF;
    ``finish()`` checks every row came and returns the partial file (the sink renames it); ``discard()`` removes it.
    """

    def __init__(self, path: Path, shape: tuple[int, int], colours: np.ndarray | None):
        self.partial, self.shape = partial_path(path), shape
        self.written, self.pending = 0, []  # rows handed on; bands of the row of tiles being filled
        self.rows: queue.Queue = queue.Queue(QUEUED_TILE_ROWS)
        self.error: BaseException | None = None
        options = tiff_options(colours)
        self.thread = threading.Thread(target=self._write_file, args=(tifffile_for_masks(), options), daemon=True)
        self.thread.start()

    def _tiles(self):
        while True:
            row = self.rows.get()  # tifffile stops asking after the image's last tile: no end is marked
            if isinstance(row, str):
                raise _Abandoned
            for left in range(0, self.shape[1], TIFF_TILE):
                yield row[:, left : left + TIFF_TILE]

    def _write_file(self, tifffile, options: dict) -> None:
        try:
            tifffile.imwrite(self.partial, self._tiles(), shape=self.shape, dtype=np.uint8, **options)
        except Exception as error:  # noqa: BLE001 - any failure is raised again on the band side, by the caller
            self.error = error

    def _hand_on(self, item) -> None:
        """``item`` into the queue, unless the writer thread has stopped: then its error."""
        while True:
            if self.error is not None:
                raise self.error
            if not self.thread.is_alive():
                raise RuntimeError(f"{self.partial}: the TIFF writer stopped before the last row")
            with contextlib.suppress(queue.Full):
                self.rows.put(item, timeout=0.5)
                return

    def write(self, top: int, band: np.ndarray) -> None:
        height, width = self.shape
        if top != self.written or band.ndim != 2 or band.shape[1] != width or top + len(band) > height:
            raise ValueError(
                f"band of shape {band.shape} at row {top}; expected row {self.written} of {height}x{width}"
            )
        self.pending.append(np.asarray(band, np.uint8))
        self.written += len(band)
        gathered = sum(len(rows) for rows in self.pending)
        if gathered >= TIFF_TILE or self.written == height:
            rows = np.concatenate(self.pending)
            whole = len(rows) if self.written == height else len(rows) // TIFF_TILE * TIFF_TILE
            for start in range(0, whole, TIFF_TILE):
                self._hand_on(rows[start : min(start + TIFF_TILE, whole)])
            self.pending = [rows[whole:]] if whole < len(rows) else []

    def finish(self) -> Path:
        if self.written != self.shape[0]:
            raise ValueError(f"{self.partial}: {self.written} of the mask's {self.shape[0]} rows written")
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.partial

    def discard(self) -> None:
        if self.thread.is_alive():
            with contextlib.suppress(queue.Empty):  # rows the writer has not taken: the end needs their room
                while True:
                    self.rows.get_nowait()
            self.rows.put(_ABANDONED)  # only this side puts: the emptied queue takes it at once
            self.thread.join()
        self.partial.unlink(missing_ok=True)
