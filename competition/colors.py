"""Colour-coded RGB masks: colour tables, decoding colours to class indices, and a disk cache of decoded masks."""

import hashlib
import io
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from competition.data import _decoding
from competition.errors import DataError

IGNORE_NAME = "__ignore__"  # labelme's name for the pixels no class claims; its colour maps to the ignore index
UNKNOWN_COLORS = ("error", "ignore")
# Modes whose pixels Pillow turns into colours as drawn; 16-bit and float masks hold values, not colours.
COLOR_MODES = ("RGB", "RGBA", "P", "PA", "L", "LA", "1")
# Unique colours whose distances to the table are computed at once when snapping: bounds memory to
# this many x table rows int32s however noisy the mask.
SNAP_CHUNK = 1 << 16


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to one bool
class ColorTable:
    """A colour table: ``colors`` (N, 3) uint8, every row as written; ``classes`` (N,) uint8, the class index of
    each row: several colours may share a name and so a class, and ``__ignore__`` rows give the ignore index.
    ``names``: the class names in order of first appearance, ``__ignore__`` not among them."""

    path: str
    names: list[str]
    colors: np.ndarray
    classes: np.ndarray

    @property
    def key(self) -> str:
        """A short hash of what decoding depends on (colours, their classes, the names), for cache keys."""
        content = hashlib.sha1(self.colors.tobytes())
        content.update(self.classes.tobytes())
        content.update("\n".join(self.names).encode())
        return content.hexdigest()[:16]


def _is_number(field: str) -> bool:
    """An integer as written, sign allowed (so that -1 is refused as out of range, not as malformed)."""
    return re.fullmatch(r"-?[0-9]+", field) is not None


def _row(line: str) -> tuple[str, list[str]]:
    """One table line -> (name, its three colour fields, unparsed): ``r g b name`` when the first three
    words are numbers (a name may then hold commas), else ``name,r,g,b`` (a name may hold spaces)."""
    words = line.split(maxsplit=3)
    if len(words) == 4 and all(_is_number(word) for word in words[:3]):
        return words[3], words[:3]
    fields = [field.strip() for field in line.rsplit(",", 3)]
    return fields[0], fields[1:]


def _is_header(line: str) -> bool:
    """A CSV header such as ``name,r,g,b``: four fields, none of the colour fields a number."""
    fields = _row(line)[1]
    return len(fields) == 3 and not any(_is_number(field) for field in fields)


def read_color_table(path: Path, ignore_index: int = 255) -> ColorTable:
    """A colour table as ``name,r,g,b`` CSV (Kaggle CamVid's ``class_dict.csv``; header row optional) or as
    ``r g b name`` text (CamVid's ``label_colors.txt``); blank lines and ``#`` comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # -sig: a BOM from Excel is not part of the first name
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: the colour table cannot be read ({error}); give a UTF-8 text file") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)]
    lines = [(number, line) for number, line in lines if line and not line.startswith("#")]
    if lines and _is_header(lines[0][1]):
        lines = lines[1:]
    rows: list[tuple[str, tuple[int, ...]]] = []
    line_of: dict[tuple[int, ...], int] = {}
    for number, line in lines:
        name, fields = _row(line)
        if len(fields) != 3 or not name or not all(_is_number(field) for field in fields):
            raise DataError(
                f"{path}: line {number} {line!r} is neither 'name,r,g,b' nor 'r g b name'; fix or remove it"
            )
        color = tuple(int(field) for field in fields)
        if not all(0 <= value <= 255 for value in color):
            raise DataError(f"{path}: line {number} {line!r} has a value outside 0..255; colours are 8-bit RGB")
        if color in line_of:
            raise DataError(
                f"{path}: line {number} gives the colour {color} of line {line_of[color]} again; "
                "one colour can mean only one class, remove one of them"
            )
        line_of[color] = number
        rows.append((name, color))
    names = list(dict.fromkeys(name for name, _ in rows if name != IGNORE_NAME))
    if len(names) < 2:
        raise DataError(f"{path}: {len(names)} class(es) in the colour table; name at least two, background first")
    if len(names) > ignore_index:
        raise DataError(
            f"{path}: {len(names)} classes reach the ignore index {ignore_index}; class indices must stay below it, "
            "raise --ignore-index (at most 255); to ignore a colour, name its row __ignore__"
        )
    index = {name: value for value, name in enumerate(names)} | {IGNORE_NAME: ignore_index}
    return ColorTable(
        path=str(path),
        names=names,
        colors=np.array([color for _, color in rows], dtype=np.uint8).reshape(-1, 3),
        classes=np.array([index[name] for name, _ in rows], dtype=np.uint8),
    )


def _packed(colors: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) uint32, one integer a colour, so colours compare and sort as numbers."""
    colors = colors.astype(np.uint32)
    return (colors[..., 0] << 16) | (colors[..., 1] << 8) | colors[..., 2]


def _nearest_rows(colors: np.ndarray, table: ColorTable) -> np.ndarray:
    """(U, 3) colours -> the index of the nearest table row to each (squared RGB distance; the first row on a tie)."""
    table_colors = table.colors.astype(np.int32)
    nearest = np.empty(len(colors), dtype=np.intp)
    for start in range(0, len(colors), SNAP_CHUNK):
        chunk = colors[start : start + SNAP_CHUNK].astype(np.int32)
        distances = ((chunk[:, None, :] - table_colors[None, :, :]) ** 2).sum(axis=2)
        nearest[start : start + SNAP_CHUNK] = distances.argmin(axis=1)
    return nearest


def decode_color_mask(
    rgb: np.ndarray, table: ColorTable, source: str, ignore_index: int, unknown: str = "error", snap: bool = False
) -> np.ndarray:
    """An RGB mask (H, W, 3) uint8 -> class indices (H, W) uint8 through ``table``.

    A colour not in the table raises DataError (``unknown="error"``) or becomes ``ignore_index``
    (``unknown="ignore"``). ``snap``: every colour takes the nearest table colour's class instead, for masks
    saved lossily (JPEG) or resampled; the distances are computed once per distinct colour in the image."""
    if unknown not in UNKNOWN_COLORS:
        raise ValueError(f"unknown={unknown!r}: choose one of {UNKNOWN_COLORS}")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{source}: expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    if snap:
        keys, inverse = np.unique(_packed(rgb), return_inverse=True)  # thousands of colours in a JPEG, not H*W
        colors = np.stack([keys >> 16, (keys >> 8) & 255, keys & 255], axis=1)
        return table.classes[_nearest_rows(colors, table)][inverse.reshape(-1)].reshape(height, width)
    keys = _packed(table.colors)
    order = np.argsort(keys)
    sorted_keys = keys[order]
    pixels = _packed(rgb).reshape(-1)
    position = np.minimum(np.searchsorted(sorted_keys, pixels), len(sorted_keys) - 1)
    known = sorted_keys[position] == pixels
    indices = np.where(known, table.classes[order][position], np.uint8(ignore_index)).astype(np.uint8)
    if unknown == "error" and not known.all():
        y, x = divmod(int(np.argmin(known)), width)  # argmin: the first False, row-major
        color = tuple(int(value) for value in rgb[y, x])
        raise DataError(
            f"{source}: the pixel at x={x}, y={y} has the colour {color}, which is not in the colour table "
            f"{table.path}; add it to the table, or pass --unknown-colors ignore to make such pixels the ignore index"
        )
    return indices.reshape(height, width)


def read_color_mask(
    data: bytes, source: str, table: ColorTable, ignore_index: int, unknown: str = "error", snap: bool = False
) -> np.ndarray:
    """Colour-coded mask file bytes (PNG, BMP, a palette or greyscale file, JPEG...) -> class indices (H, W) uint8.
    A palette is looked up into its colours and alpha is dropped before the colours are decoded."""
    with _decoding(source, "mask"), Image.open(io.BytesIO(data)) as image:
        if image.mode not in COLOR_MODES:
            raise DataError(f"{source}: the mask is {image.mode}, which holds values, not colours; save it as RGB")
        rgb = np.asarray(image.convert("RGB"))
    return decode_color_mask(rgb, table, source, ignore_index, unknown, snap)


class MaskCache:
    """Decoded masks on disk, one greyscale PNG each, so that colour decoding happens once and not every epoch.

    An entry is named by a hash of the source file's resolved path, size and modification time and of
    ``settings_key`` (what else the decoding depends on: the table's key, unknown colours, snapping), so an
    edited mask or a changed setting is simply a new entry; stale entries are never read again."""

    def __init__(self, folder: Path, settings_key: str):
        self.folder = Path(folder)
        self.settings_key = settings_key

    def entry(self, path: Path) -> Path:
        """The cache file of the source file ``path`` as it is now."""
        stat = Path(path).stat()
        key = f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{self.settings_key}"
        return self.folder / f"{hashlib.sha1(key.encode()).hexdigest()[:24]}.png"

    def get(self, path: Path, decode: Callable[[], np.ndarray]) -> np.ndarray:
        """The decoded mask of ``path``: from the cache, else ``decode()``'s (H, W) uint8 result, then stored."""
        entry = self.entry(path)
        try:
            with Image.open(entry) as image:
                return np.array(image)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            pass  # absent, or unreadable (a disk that filled up, a hand-edited file): decoded again and replaced
        mask = decode()
        self.folder.mkdir(parents=True, exist_ok=True)
        # A name of its own per writer: DataLoader workers may store the same entry at once, and
        # each os.replace puts a complete file in place.
        handle, partial = tempfile.mkstemp(dir=self.folder, prefix=entry.name, suffix=".partial")
        try:
            with os.fdopen(handle, "wb") as file:
                Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).save(file, format="PNG", compress_level=1)
            os.replace(partial, entry)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        return mask
