"""RLE of masks handed on band by band (rows top to bottom, as the sliding window finishes them), never held whole:
the same strings as ``rle.rle_encode`` of the whole mask, row-major or column-major (HuBMAP's), one per class.

Memory holds the runs found so far (8 bytes per run boundary) and one row of the mask between bands."""

from collections.abc import Callable, Iterable

import numpy as np

from competition.rle import RLE_ORDERS, runs_text


class _BandOrder:
    """Checks that bands of a (height, width) mask come in order, each as wide as the mask, until every row is in."""

    def __init__(self, height: int, width: int):
        self.height, self.width, self.written = height, width, 0

    def take(self, top: int, band: np.ndarray) -> np.ndarray:
        """The band as bool (non-zero is foreground), once its place is checked."""
        if top != self.written or band.ndim != 2 or band.shape[1] != self.width or top + len(band) > self.height:
            raise ValueError(
                f"band of shape {band.shape} at row {top}; expected row {self.written} of a {self.height}x{self.width}"
                " mask"
            )
        self.written += len(band)
        return np.asarray(band) != 0

    def check_complete(self) -> None:
        if self.written != self.height:
            raise ValueError(f"{self.written} of the mask's {self.height} rows written")


class RowMajorRuns(_BandOrder):
    """Carvana's RLE (pixels numbered along each row) of a mask written band by band (``write(top, band)``, in
    order): the rows come in the order their pixels are numbered, so a band's runs follow the last band's."""

    def __init__(self, height: int, width: int):
        super().__init__(height, width)
        self.last = np.zeros(1, bool)  # the last pixel written: a run goes on into the next band
        self.boundaries: list[np.ndarray] = []  # 0-indexed pixels where the mask changes, in order

    def write(self, top: int, band: np.ndarray) -> None:
        flat = self.take(top, band).reshape(-1)
        if not flat.size:
            return
        self.boundaries.append(np.flatnonzero(np.diff(flat, prepend=self.last)) + top * self.width)
        self.last = flat[-1:]

    def encoding(self) -> str:
        """The RLE string, once every row is written."""
        self.check_complete()
        end = [np.array([self.height * self.width])] if self.last[0] else []  # a run open at the last pixel ends
        return runs_text(np.concatenate([*self.boundaries, *end, np.zeros(0, np.int64)]) + 1)


class ColumnMajorRuns(_BandOrder):
    """HuBMAP's RLE (pixels numbered down each column) of a mask written band by band (``write(top, band)``, in
    order): each column's changes are found down the bands, numbered ``column * height + row`` and sorted at the
    end."""

    def __init__(self, height: int, width: int):
        super().__init__(height, width)
        self.previous = np.zeros(width, bool)  # the last row written: runs go on across bands
        self.changes: list[np.ndarray] = []  # column * height + row of each pixel that differs from the one above

    def write(self, top: int, band: np.ndarray) -> None:
        rows = np.vstack([self.previous[None], self.take(top, band)])
        row, column = np.nonzero(rows[1:] != rows[:-1])
        self.changes.append(column.astype(np.int64) * self.height + row + top)
        self.previous = rows[-1]

    def encoding(self) -> str:
        """The RLE string, once every row is written."""
        self.check_complete()
        (column,) = np.nonzero(self.previous)  # a run open at a column's last row ends past it
        changes = np.sort(np.concatenate([*self.changes, column.astype(np.int64) * self.height + self.height]))
        # A run that ends at a column's last row and one that starts at the next column's top are one run: the end
        # and the start are the same pixel, and both go.
        twice = changes[1:] == changes[:-1]
        once = np.ones(changes.size, bool)
        once[1:] &= ~twice
        once[:-1] &= ~twice
        return runs_text(changes[once] + 1)


def runs_of_order(order: str, height: int, width: int) -> RowMajorRuns | ColumnMajorRuns:
    """The band-by-band encoder of an RLE in ``order`` (``RLE_ORDERS``)."""
    if order not in RLE_ORDERS:
        raise ValueError(f"RLE order {order!r}: one of {', '.join(RLE_ORDERS)}")
    return (RowMajorRuns if order == "row" else ColumnMajorRuns)(height, width)


class PlaneRuns:
    """One RLE per plane that ``planes(band)`` makes of each band (a class's pixels of a class-index mask, a label's
    bit of a packed one), each encoded band by band in ``order``."""

    def __init__(
        self, shape: tuple[int, int], order: str, count: int, planes: Callable[[np.ndarray], Iterable[np.ndarray]]
    ):
        self.encoders = [runs_of_order(order, *shape) for _ in range(count)]
        self.planes = planes

    def write(self, top: int, band: np.ndarray) -> None:
        planes = list(self.planes(band))
        if len(planes) != len(self.encoders):
            raise ValueError(f"{len(planes)} planes of a band; expected {len(self.encoders)}")
        for encoder, plane in zip(self.encoders, planes):
            encoder.write(top, plane)

    def encodings(self) -> list[str]:
        """Each plane's RLE string, once every row is written."""
        return [encoder.encoding() for encoder in self.encoders]
