"""Run-length encoding of masks in the Carvana convention, compiled with numba.

The convention: the mask is flattened row-major (C order), foreground runs are written
as 1-indexed ``start length`` pairs separated by single spaces, and an empty mask is the
empty string. Some competitions (Severstal, HuBMAP) flatten column-major instead: the
decoders take ``order="column"``. ``rle_encode_numpy`` is the canonical function of the
public kernels and is kept as the reference the fast encoder is tested and benchmarked against.
"""

import numba
import numpy as np

from competition.errors import DataError

# The pixel numberings an RLE may use: row-major (Carvana, UW-Madison, most competitions) or column-major (Severstal,
# HuBMAP, TGS, SIIM): the masks table's (--rle-order of train.py) and a submission's (infer.py's).
RLE_ORDERS = ("row", "column")
_SPACE = 32
_ZERO = 48
_ALL_ONES_BYTES = np.uint64(0x0101010101010101)
_HIGH_BITS = np.uint64(0x8080808080808080)


class RLEError(DataError):
    """A run-length string that is not a valid Carvana mask."""


def rle_encode_numpy(mask: np.ndarray) -> str:
    """The canonical encoder of the public kernels: pad with zeros, diff, pair up."""
    pixels = np.concatenate([[0], mask.flatten(), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def rle_decode_numpy(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """The decoder of the public kernels, kept as the benchmark baseline."""
    numbers = rle.split()
    starts = np.asarray(numbers[0::2], dtype=np.int64) - 1
    ends = starts + np.asarray(numbers[1::2], dtype=np.int64)
    flat = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for low, high in zip(starts, ends):
        flat[low:high] = 1
    return flat.reshape(shape)


@numba.njit(cache=True, nogil=True)
def _find_runs(flat: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Boundaries (1-indexed starts, exclusive ends) of the non-zero runs of ``flat``.

    Whole 8-byte words that cannot hold a boundary (all zero outside a run, all
    non-zero inside one) are skipped, so a car mask costs about one read per word.
    """
    n = flat.shape[0]
    boundaries = np.empty(n + 1, dtype=np.int64)
    count = 0
    inside = False
    i = 0
    while i < n:
        if i & 7 == 0 and i + 8 <= n:
            word = words[i >> 3]
            if inside:
                # No zero byte in the word: the run goes on through it.
                if ((word - _ALL_ONES_BYTES) & ~word & _HIGH_BITS) == 0:
                    i += 8
                    continue
            elif word == 0:
                i += 8
                continue
        if (flat[i] != 0) != inside:
            boundaries[count] = i + 1
            count += 1
            inside = not inside
        i += 1
    if inside:
        boundaries[count] = n + 1
        count += 1
    return boundaries[:count]


@numba.njit(cache=True, nogil=True)
def _format_runs(boundaries: np.ndarray) -> np.ndarray:
    """ASCII bytes of ``start length start length ...`` from run boundaries."""
    out = np.empty(boundaries.shape[0] * 9, dtype=np.uint8)
    digits = np.empty(20, dtype=np.uint8)
    position = 0
    for k in range(boundaries.shape[0]):
        value = boundaries[k] if k % 2 == 0 else boundaries[k] - boundaries[k - 1]
        if k > 0:
            out[position] = _SPACE
            position += 1
        length = 0
        while True:
            digits[length] = _ZERO + value % 10
            length += 1
            value //= 10
            if value == 0:
                break
        for d in range(length - 1, -1, -1):
            out[position] = digits[d]
            position += 1
    return out[:position]


def _as_flat_bytes(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype == np.bool_ or mask.dtype.itemsize != 1:
        mask = mask != 0
    return np.ascontiguousarray(mask).reshape(-1).view(np.uint8)


def rle_encode(mask: np.ndarray) -> str:
    """Encode a mask (any shape; non-zero is foreground) as a Carvana RLE string."""
    flat = _as_flat_bytes(mask)
    words = flat[: flat.shape[0] // 8 * 8].view(np.uint64)
    return runs_text(_find_runs(flat, words))


def runs_text(boundaries: np.ndarray) -> str:
    """The RLE string of runs given by their boundaries, in order: the 1-indexed pixel where each run starts, then
    the one (1-indexed) where it stopped, alternately; what ``rle_encode`` writes of the same runs, byte for byte."""
    return _format_runs(np.asarray(boundaries, np.int64)).tobytes().decode("ascii")


# Error codes returned by the compiled parser; the Python side turns them into messages.
_OK, _BAD_CHAR, _ODD, _BAD_LENGTH, _BAD_START, _PAST_END, _UNORDERED = range(7)
_MESSAGES = {
    _BAD_CHAR: "has a character that is not a digit or a space",
    _ODD: "has an odd count of numbers; it must be start/length pairs",
    _BAD_LENGTH: "has a run of length zero",
    _BAD_START: "has a start of zero; starts are 1-indexed",
    _PAST_END: "has a run past the end of the image",
    _UNORDERED: "has runs out of order or overlapping",
}


@numba.njit(cache=True, nogil=True)
def _parse(text: np.ndarray, n_pixels: int):
    """Parse and validate ASCII ``start length`` pairs into 0-indexed starts and ends."""
    starts = np.empty(text.shape[0] // 4 + 1, dtype=np.int64)
    ends = np.empty(text.shape[0] // 4 + 1, dtype=np.int64)
    count = 0
    pending_start = -1
    value = 0
    in_number = False
    previous_end = 0
    for i in range(text.shape[0] + 1):
        char = text[i] if i < text.shape[0] else _SPACE
        if _ZERO <= char <= _ZERO + 9:
            value = value * 10 + (char - _ZERO)
            if value > 1 << 40:
                return starts[:0], ends[:0], _PAST_END
            in_number = True
            continue
        if char != _SPACE and char != 9 and char != 10 and char != 13:
            return starts[:0], ends[:0], _BAD_CHAR
        if not in_number:
            continue
        in_number = False
        if pending_start < 0:
            if value == 0:
                return starts[:0], ends[:0], _BAD_START
            pending_start = value - 1
        else:
            if value == 0:
                return starts[:0], ends[:0], _BAD_LENGTH
            if pending_start < previous_end:
                return starts[:0], ends[:0], _UNORDERED
            end = pending_start + value
            if end > n_pixels:
                return starts[:0], ends[:0], _PAST_END
            starts[count] = pending_start
            ends[count] = end
            count += 1
            previous_end = end
            pending_start = -1
        value = 0
    if pending_start >= 0:
        return starts[:0], ends[:0], _ODD
    return starts[:count], ends[:count], _OK


@numba.njit(cache=True, nogil=True)
def _fill(starts: np.ndarray, ends: np.ndarray, flat: np.ndarray) -> None:
    for k in range(starts.shape[0]):
        flat[starts[k] : ends[k]] = 1


@numba.njit(cache=True, nogil=True)
def _paint(starts, ends, flat, value: int, combine: bool, height: int, width: int, column_major: bool) -> int:
    """``flat`` (a row-major (height, width) mask) set to ``value`` (``combine``: or-ed with it) over the runs, whose
    pixels are numbered column-major when ``column_major``; the first other non-zero value a run covered, else 0.
    A column-major run is written in place, down each column it crosses: only the runs' pixels are touched, where
    decoding the transposed mask and transposing it back copies every pixel of the image (slow, strided bytes)."""
    covered = 0
    for k in range(starts.shape[0]):
        pixel, end = starts[k], ends[k]
        while pixel < end:
            if column_major:  # the part of the run in one column: a step of one row is a step of width
                row, column = pixel % height, pixel // height
                stop, i, step = min(end, pixel - row + height), row * width + column, width
            else:
                stop, i, step = end, pixel, 1
            for _ in range(stop - pixel):
                old = flat[i]
                if covered == 0 and old != 0 and old != value:
                    covered = old
                flat[i] = (old | value) if combine else value
                i += step
            pixel = stop
    return covered


def rle_runs(rle: str, n_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated 0-indexed run starts and exclusive ends of an RLE over ``n_pixels``."""
    if not isinstance(rle, str):
        raise RLEError(f"RLE must be a string, got {type(rle).__name__}")
    try:
        text = np.frombuffer(rle.encode("ascii"), dtype=np.uint8)
    except UnicodeEncodeError:
        raise RLEError("RLE has a non-ASCII character") from None
    starts, ends, status = _parse(text, n_pixels)
    if status != _OK:
        raise RLEError(f"RLE {_MESSAGES[status]} (image of {n_pixels} pixels)")
    return starts, ends


def reads_as_relative(rle: str, n_pixels: int) -> bool:
    """Whether an RLE reads as SIIM-ACR's relative one (each start counted from the end of the previous run, the
    first from pixel 0) within ``n_pixels``: what to tell of a row refused as absolute runs."""
    numbers = rle.split()
    if not numbers or len(numbers) % 2 or not all(number.isdigit() for number in numbers):
        return False
    values = [int(number) for number in numbers]
    return all(values[1::2]) and sum(values) <= n_pixels


def rle_decode(rle: str, shape: tuple[int, int], order: str = "row") -> np.ndarray:
    """Decode a Carvana RLE string into a uint8 0/1 mask of ``shape`` (height, width), its pixels numbered
    row-major (``order="row"``) or column-major (``"column"``)."""
    height, width = shape
    starts, ends = rle_runs(rle, height * width)
    mask = np.zeros(shape, dtype=np.uint8)
    if order == "column":
        paint_runs(mask, starts, ends, 1, order)
    else:
        _fill(starts, ends, mask.reshape(-1))
    return mask


def paint_runs(
    mask: np.ndarray, starts: np.ndarray, ends: np.ndarray, value: int, order: str = "row", combine: bool = False
) -> int:
    """One RLE's runs (``rle_runs``), numbered in ``order``, drawn into ``mask`` (uint8 (H, W), C-contiguous) as
    ``value``, or or-ed with it (``combine``: the bits of multilabel masks); returns the first other non-zero value
    the runs covered, 0 when none (two classes of an index mask that overlap)."""
    height, width = mask.shape
    return int(_paint(starts, ends, mask.reshape(-1), value, combine, height, width, order == "column"))
