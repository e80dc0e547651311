"""Where predicted masks go: RLE rows (Carvana's row per image, Kaggle's row per image and class) or a folder of
palette PNGs (with colour overlays) or tiled TIFFs; each writer resumable, shardable over devices, and checked when
finished. Each sink takes whole masks (``encode``, then ``write``) or, for the sliding window, an image's mask band
by band (``image_bands``): RLE rows and TIFFs never hold the whole mask; a PNG is encoded whole."""

import contextlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from competition.data import as_rgb
from competition.errors import ConfigError, DataError, OutputError
from competition.files import atomic_output, no_space_left, partial_path
from competition.postprocess import PostProcess
from competition.sliding_window import Tiling
from competition.submission import (
    RECORD_NAME,
    ClassRows,
    ImageRows,
    SampleRows,
    SubmissionWriter,
    complete_rows,
    finish_rows,
    gather_rows,
    interrupted_files,
    keep_finished,
    shard_files,
    shard_path,
    start_rows,
    validate_submission,
)
from competition.tiff_masks import TiffBands, encode_tiff, tifffile_for_masks

logger = logging.getLogger(__name__)

FORMATS = ("png", "rle-csv", "rle", "tiff")  # rle: one img,rle_mask row per image (Carvana's; binary models)
MASK_FILES = {"png": ".png", "tiff": ".tif"}  # the formats of a file per image, and its suffix
# The first colours of the mask palette: background black, then distinct hues; more classes repeat them darker.
BASE_COLOURS = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
)


def palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8 colours of the class indices: viewers show the mask in colour, the values stay indices."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for index in range(min(num_classes, 255)):
        base = np.array(BASE_COLOURS[index % len(BASE_COLOURS)])
        colours[index] = base // (1 + index // len(BASE_COLOURS))
    colours[255] = (255, 255, 255)  # the ignore index of truth masks
    return colours


def encode_mask_png(mask: np.ndarray, colours: np.ndarray) -> bytes:
    """A class-index mask as a palette PNG."""
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(colours.ravel().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(array: np.ndarray, path: str | Path) -> None:
    with atomic_output(path) as partial:
        partial.write_bytes(encode_png(array))


def colour_overlay(image: np.ndarray, mask: np.ndarray, colours: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """The photo with each non-background class tinted in its palette colour."""
    tinted = image.astype(np.float32)
    labelled = mask > 0
    tinted[labelled] = (1 - opacity) * tinted[labelled] + opacity * colours[mask[labelled]]
    return tinted.astype(np.uint8)


def label_overlay(image: np.ndarray, packed: np.ndarray, num_labels: int, opacity: float = 0.45) -> np.ndarray:
    """The photo with each class of a packed multilabel mask (bit k: class k) tinted in its own colour (the palette's
    colour k + 1), one over the other where classes overlap; ignored pixels (255) left untinted."""
    colours = palette(num_labels + 1)
    tinted = image.astype(np.float32)
    for index in range(num_labels):
        present = ((packed >> index) & 1).astype(bool) & (packed != 255)
        tinted[present] = (1 - opacity) * tinted[present] + opacity * colours[index + 1]
    return tinted.astype(np.uint8)


def outlines(canvas: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """``canvas`` with the outlines of ``mask``'s non-zero regions drawn on it in ``colour``."""
    thickness = max(1, canvas.shape[1] // 640)
    contours, _ = cv2.findContours((mask != 0).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(canvas, contours, -1, colour, thickness)
    return canvas


def overlay(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """The photo with the predicted outline in red and, when given, the true outline in green
    (a grey (H, W, 1) photo is drawn on in colour)."""
    canvas = as_rgb(image).copy()
    if truth is not None:
        outlines(canvas, truth, (0, 200, 0))
    return outlines(canvas, predicted, (230, 30, 30))


@dataclass(frozen=True)
class Output:
    """What predictions are written as, and where: picklable, so that every shard worker builds the same writer."""

    format: str  # one of FORMATS
    path: str
    num_classes: int
    rle_order: str = "row"
    overlays: bool = False
    sample_submission: str | None = None  # rle-csv: the rows and columns of this file (SampleRows)
    classes: tuple[str, ...] = ()  # the classes the channels predict, in order (SampleRows' class values)
    multilabel: bool = False  # masks are packed labels (bit k: class k), not class indices
    postprocess: PostProcess | None = None  # per-class rules making the masks, instead of the threshold
    tiling: Tiling | None = None  # each image predicted by a blended sliding window, not whole

    def writer(self) -> "RowsFile | MaskFolder":
        return MaskFolder(self) if self.format in MASK_FILES else RowsFile(self)


class RowsFile:
    """A CSV of RLE rows: written to ``<path>.partial`` (one device) or shard files, gathered in submission order,
    renamed when complete and validated."""

    def __init__(self, output: Output):
        self.path = Path(output.path)
        if self.path.is_dir():
            raise ConfigError(f"--out {self.path}: RLE rows go to a CSV file; name one, e.g. {self.path / 'out.csv'}")
        self.folder = self.path.parent  # where the rows are written
        if output.sample_submission is not None:
            self.rows = SampleRows(output.sample_submission, list(output.classes), output.multilabel, output.rle_order)
        elif output.format == "rle":
            self.rows = ImageRows()
        else:
            self.rows = ClassRows(output.num_classes, output.rle_order, output.multilabel)
        self.description = "" if output.format == "rle" else f" (per class, {output.rle_order}-major RLE)"
        if output.sample_submission is not None:
            self.description += f" in the rows and columns of {output.sample_submission}"

    def order(self, data) -> list[str]:
        return self.rows.order(data)

    def keep_finished(self, resume: bool, overwrite: bool) -> bool:
        return keep_finished(self.path, resume, overwrite)

    def begin(self, record: dict, order: list[str], resume: bool, overwrite: bool) -> set[str]:
        """The rows of an interrupted run kept with ``resume`` (when ``record`` matches theirs), gathered into
        ``<path>.partial``; the image ids they hold."""
        start_rows(self.path, record, resume)
        if resume and (shard_files(self.path) or partial_path(self.path).is_file()):
            gather_rows(self.path, order, self.rows)
        partial = partial_path(self.path)
        names = {name for name, _, _ in complete_rows(partial)} if partial.is_file() else set()
        return {image_id for image_id in order if all(name in names for name in self.rows.names(image_id))}

    def target(self, index: int | None = None, count: int = 1) -> str:
        """The file a worker appends to (as ``<it>.partial``): the output itself, or shard ``index`` of ``count``."""
        return str(self.path if index is None else shard_path(self.path, index, count))

    def sink(self, target: str, data, resume: bool) -> "RowsSink":
        return RowsSink(SubmissionWriter(target, resume, self.rows), self.rows, target != str(self.path))

    def written(self) -> int:
        """The images whose rows an unfinished run has kept."""
        files = interrupted_files(self.path)
        return len({self.rows.image_of(name) for file in files for name, _, _ in complete_rows(file)})

    def kept_in(self, target: str, image_ids: list[str]) -> str:
        """What a shard that failed keeps, in words."""
        files = [file for file in (Path(target), partial_path(target)) if file.is_file()]
        rows = sum(1 for file in files for _ in complete_rows(file))
        return f"its {rows} row(s) and the other shards' rows are kept"

    def finish(self, order: list[str], data, shape, in_order: bool = True, finished: bool = False):
        """Every row in ``order`` (gathered first unless the rows were written ``in_order``), renamed to the output
        (unless the output was ``finished`` before) and validated (each RLE within ``shape``, or
        ``shape(image_id)``); the rows, with each mask's area."""
        if isinstance(self.rows, SampleRows):
            if finished:
                rows = self.rows.validate(self.path, shape)
            else:
                if not in_order:
                    gather_rows(self.path, order, self.rows)
                rows = self.rows.publish(partial_path(self.path), self.path, shape)
            finish_rows(self.path)
            return rows
        if not finished:
            if not in_order:
                gather_rows(self.path, order, self.rows)
            os.replace(partial_path(self.path), self.path)
        names = [name for image_id in order for name in self.rows.names(image_id)]
        rows = validate_submission(self.path, names, shape, self.rows)
        finish_rows(self.path)
        return rows

    def summary(self, rows) -> str:
        return f"{self.path}: {len(rows)} rows{self.description}, mean mask area {100 * rows['area'].mean():.1f}%"


class RowsSink:
    """Encodes masks into rows and appends them to a row file; a shard's file is renamed when it is complete."""

    def __init__(self, writer: SubmissionWriter, rows, rename_when_complete: bool):
        self.writer, self.rows, self.rename_when_complete = writer, rows, rename_when_complete
        self.done = writer.done

    def encode(self, image_id: str, mask: np.ndarray) -> list[tuple[str, str]]:
        return self.rows.rows(image_id, mask)

    def image_bands(self, image_id: str, shape: tuple[int, int]):
        """The rows of one image, from its mask band by band (``BandRows``): what ``encode`` gives, never whole."""
        return self.rows.band_rows(image_id, shape)

    def write(self, items: list[tuple[str, list[tuple[str, str]]]]) -> None:
        self.writer.write([row for _, rows in items for row in rows])

    def flush(self) -> None:
        self.writer.handle.flush()

    def close(self, finished: bool) -> None:
        if finished and self.rename_when_complete:
            self.writer.close()
        else:
            self.writer.handle.close()


class MaskFolder:
    """A folder of masks, one file per image (same stem): palette PNGs of class indices, with ``overlays/<stem>.png``
    when asked (``--format png``), or tiled TIFFs (``--format tiff``); each written under a temporary name and then
    renamed; every worker writes into the folder itself."""

    def __init__(self, output: Output):
        self.path, self.output, self.suffix = Path(output.path), output, MASK_FILES[output.format]
        kind = output.format.upper()
        if self.path.suffix.lower() == ".csv" or (self.path.exists() and not self.path.is_dir()):
            raise ConfigError(
                f"--out {self.path}: {kind} masks go to a folder; name one, or pass --format rle-csv for a CSV"
            )
        if output.format == "tiff":
            tifffile_for_masks()  # not installed: one line now, not in every worker
        self.folder = self.path
        self.description = f"greyscale {kind} masks of packed bits" if output.multilabel else f"palette {kind} masks"

    def order(self, data) -> list[str]:
        test_ids = data.test_ids()
        if not test_ids:
            raise DataError(f"{data.root}: no test images (a test/ folder, a test split, or --test-images DIR)")
        return test_ids

    def keep_finished(self, resume: bool, overwrite: bool) -> bool:
        return False  # a folder is finished when every mask is in it: begin() finds that out

    def begin(self, record: dict, order: list[str], resume: bool, overwrite: bool) -> set[str]:
        """The stems already predicted by the same checkpoints and settings (kept with ``resume``); a folder of
        other masks is never written into without ``overwrite``."""
        out = self.path
        written = {path.stem for path in out.glob(f"*{self.suffix}")} if out.is_dir() else set()
        record_path = out / RECORD_NAME
        if written and not record_path.is_file():  # the user's own PNGs (the test images themselves, say)
            raise ConfigError(
                f"--out {out} holds {len(written)} {self.suffix} file(s) that infer.py did not write (no {RECORD_NAME}); "
                "name another folder for the masks"
            )
        if written and not (resume or overwrite):
            raise ConfigError(
                f"{out} already holds {len(written)} predicted masks; pass --resume to keep them and predict the "
                "rest, or --overwrite to predict them all again"
            )
        if resume and written:
            recorded = json.loads(record_path.read_text()) if record_path.is_file() else None
            if not isinstance(recorded, dict) or _comparable(recorded) != _comparable(record):
                raise ConfigError(f"{out}: its masks were predicted by other checkpoints or settings; pass --overwrite")
        if overwrite and out.is_dir():
            for path in out.glob(f"*{self.suffix}"):
                path.unlink()
            shutil.rmtree(out / "overlays", ignore_errors=True)
            written = set()
        out.mkdir(parents=True, exist_ok=True)
        for torn in out.glob(f"*{self.suffix}.partial"):  # a killed run's unfinished mask (a slide's: gigabytes)
            torn.unlink()
        if self.output.overlays:
            (out / "overlays").mkdir(exist_ok=True)
        with atomic_output(record_path) as partial:
            partial.write_text(json.dumps(record, indent=2) + "\n")
        return written & set(order) if resume else set()

    def target(self, index: int | None = None, count: int = 1) -> str:
        return str(self.path)

    def sink(self, target: str, data, resume: bool) -> "MaskSink | TiffSink":
        labels = self.output.num_classes if self.output.multilabel else None
        if self.output.format == "tiff":
            sink = TiffSink(Path(target), None if labels else palette(self.output.num_classes))
        else:
            sink = MaskSink(Path(target), data, palette(self.output.num_classes), self.output.overlays, labels)
        if resume:  # a retried shard: the masks its lost attempt wrote are whole (each renamed into place)
            sink.done = {path.stem for path in Path(target).glob(f"*{self.suffix}")}
        return sink

    def written(self) -> int:
        return len(list(self.path.glob(f"*{self.suffix}")))

    def kept_in(self, target: str, image_ids: list[str]) -> str:
        masks = sum((self.path / f"{image_id}{self.suffix}").is_file() for image_id in image_ids)
        return f"its {masks} mask(s) and the other shards' masks are kept"

    def finish(self, order: list[str], data, shape, in_order: bool = True, finished: bool = False) -> int:
        """Checks that every image of ``order`` has its mask; their number."""
        missing = [image_id for image_id in order if not (self.path / f"{image_id}{self.suffix}").is_file()]
        if missing:
            raise DataError(f"{self.path}: no mask for {len(missing)} test image(s), e.g. {missing[:3]}")
        return len(order)

    def summary(self, count: int) -> str:
        overlays = f", overlays in {self.path / 'overlays'}/" if self.output.overlays else ""
        return f"{self.path}/: {count} {self.description} (classes {self.output.num_classes}){overlays}"


def no_space_message(writer: "RowsFile | MaskFolder", total: int) -> str:
    """The line for a disk that filled up while ``writer`` wrote: its folder, what is kept, how to go on."""
    return (
        f"{writer.folder}: no space left on its disk; {writer.written()} of the {total} test images are written "
        "and kept: free some space, then run the same command with --resume to go on"
    )


@contextlib.contextmanager
def disk_full_is_one_line(writer: "RowsFile | MaskFolder", total: int, sinks: list) -> Iterator[None]:
    """A write refused for a full disk while the block runs becomes one line (OutputError, ``no_space_message``);
    the sinks opened (``sinks``) are closed first, the torn end of a row dropped (``--resume`` reads whole rows)."""
    try:
        yield
    except OSError as error:
        if not no_space_left(error):
            raise
        for sink in sinks:
            with contextlib.suppress(OSError):  # what the full disk refused stays unwritten
                sink.close(False)
        raise OutputError(no_space_message(writer, total)) from None


def _comparable(record: dict) -> dict:
    """What must match for masks to be kept by --resume: checkpoints, TTA, threshold and the output's format
    (not the settings record)."""
    return json.loads(json.dumps({key: record.get(key) for key in ("checkpoints", "tta", "threshold", "output")}))


class MaskSink:
    """Encodes masks as palette PNGs (and overlays) and writes each whole into the folder. With ``labels`` (the
    number of classes of a multilabel run) the masks are packed bits, written as greyscale PNGs of those values
    (bit k: class k; a palette would colour combinations, not classes), each class tinted in the overlays."""

    def __init__(self, folder: Path, data, colours: np.ndarray, overlays: bool, labels: int | None = None):
        self.folder, self.data, self.colours, self.overlays, self.labels = folder, data, colours, overlays, labels
        self.done: set[str] = set()

    def encode(self, image_id: str, mask: np.ndarray) -> tuple[bytes, bytes | None]:
        tinted = None
        if self.overlays:
            image = as_rgb(self.data.read_image(image_id, "test"))
            if self.labels is None:
                tinted = encode_png(colour_overlay(image, mask, self.colours))
            else:
                tinted = encode_png(label_overlay(image, mask, self.labels))
        if self.labels is not None:
            return encode_png(mask.astype(np.uint8)), tinted
        return encode_mask_png(mask, self.colours), tinted

    def image_bands(self, image_id: str, shape: tuple[int, int]) -> "WholeMask":
        """A PNG is encoded whole: the bands are gathered into the image's mask first."""
        return WholeMask(shape, lambda mask: self.encode(image_id, mask))

    def write(self, items: list[tuple[str, tuple[bytes, bytes | None]]]) -> None:
        for image_id, (mask, tinted) in items:
            if tinted is not None:  # first: a mask in the folder marks its image done, overlay included
                with atomic_output(self.folder / "overlays" / f"{image_id}.png") as partial:
                    partial.write_bytes(tinted)
            with atomic_output(self.folder / f"{image_id}.png") as partial:
                partial.write_bytes(mask)

    def flush(self) -> None:
        pass

    def close(self, finished: bool) -> None:
        pass


class WholeMask:
    """An image's mask gathered from its bands (``write(top, band)``) for a sink that encodes whole masks:
    ``finish()`` is ``encode`` of it."""

    def __init__(self, shape: tuple[int, int], encode):
        self.mask, self.encode = np.zeros(shape, np.uint8), encode

    def write(self, top: int, band: np.ndarray) -> None:
        self.mask[top : top + len(band)] = band

    def finish(self):
        return self.encode(self.mask)

    def discard(self) -> None:
        """Nothing is written before ``finish``."""


class TiffSink:
    """Writes masks as tiled TIFFs into the folder (``tiff_masks``): a whole mask encoded in memory (``encode``), or
    an image's mask band by band into its temporary file (``image_bands``); ``write`` renames each into place."""

    def __init__(self, folder: Path, colours: np.ndarray | None):
        self.folder, self.colours = folder, colours
        self.done: set[str] = set()

    def encode(self, image_id: str, mask: np.ndarray) -> bytes:
        return encode_tiff(mask, self.colours)

    def image_bands(self, image_id: str, shape: tuple[int, int]) -> TiffBands:
        return TiffBands(self.folder / f"{image_id}.tif", shape, self.colours)

    def write(self, items: list[tuple[str, bytes | Path]]) -> None:
        """Each mask into place: bytes (``encode``) written then renamed, a finished band file (``image_bands``)
        renamed."""
        for image_id, mask in items:
            path = self.folder / f"{image_id}.tif"
            if isinstance(mask, Path):
                os.replace(mask, path)
                continue
            with atomic_output(path) as partial:
                partial.write_bytes(mask)

    def flush(self) -> None:
        pass

    def close(self, finished: bool) -> None:
        pass
