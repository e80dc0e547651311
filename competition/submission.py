"""Submission files of RLE rows (Carvana's ``img,rle_mask`` row per image, or Kaggle's ``ImageId_ClassId`` row per
image and class): rows in submission order, written to a temporary file and renamed when complete, resumable (from
one file or from the shard files of several devices), never replacing a finished file unasked, and validated.

Files beside ``--out`` (``submission.csv``):
``submission.csv.partial``              the rows of a run in progress or interrupted, renamed when complete;
``submission.csv.shard2of3[.partial]``  the rows one device of ``infer.py --devices`` writes (shard 2 of 3),
                                        gathered into ``submission.csv.partial`` by the merge or by ``--resume``;
``submission.csv.predicted-by.json``    what those rows are predicted with (checkpoints, TTA, threshold), so that
                                        ``--resume`` never mixes them with rows of other models; removed when the
                                        submission is finished.

With ``--sample-submission FILE`` (``SampleRows``) the rows in progress are keyed by the sample's row number
(``sample_row,EncodedPixels``); when every row is there they are written in the sample's order and columns under
``<out>.sample.partial``, validated, and renamed to ``<out>``.
"""

import glob
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from competition.band_runs import PlaneRuns
from competition.data import image_id_of, read_csv_file
from competition.errors import ConfigError, DataError
from competition.files import atomic_output, partial_path, tagged_partial_path
from competition.rle import RLEError, rle_encode, rle_runs
from competition.rle_table import class_index
from competition.segmentation_data import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

HEADER = "img,rle_mask\n"
RECORD_NAME = "predicted-by.json"  # beside a folder's predictions: what predicted them (``predicted_by``)
SAMPLE = "sample_submission.csv"


class ImageRows:
    """One row per image, ``img,rle_mask`` (Carvana's): the image's file name and its binary mask's RLE, row-major."""

    header = HEADER

    def names(self, image_id: str) -> list[str]:
        return [f"{image_id}.jpg"]

    def image_of(self, name: str) -> str:
        return image_id_of(name)

    def rows(self, image_id: str, mask: np.ndarray) -> list[tuple[str, str]]:
        return [(f"{image_id}.jpg", rle_encode(mask))]

    def band_rows(self, image_id: str, shape: tuple[int, int]) -> "BandRows":
        return BandRows(PlaneRuns(shape, "row", 1, lambda band: [band]), lambda rles: [(f"{image_id}.jpg", rles[0])])

    def order(self, data) -> list[str]:
        return sample_submission_order(data)


class BandRows:
    """An image's rows made from its mask handed on band by band (``write(top, band)``, top to bottom), never held
    whole: ``finish()`` gives the rows that ``rows(image_id, mask)`` gives of the whole mask, byte for byte."""

    def __init__(self, runs: PlaneRuns, rows_of: Callable[[list[str]], list[tuple[str, str]]]):
        self.runs, self.rows_of = runs, rows_of

    def write(self, top: int, band: np.ndarray) -> None:
        self.runs.write(top, band)

    def finish(self) -> list[tuple[str, str]]:
        return self.rows_of(self.runs.encodings())

    def discard(self) -> None:
        """Nothing is written before ``finish``."""


def plane_runs(shape: tuple[int, int], order: str, num_classes: int, multilabel: bool) -> PlaneRuns:
    """The band-by-band encoders of ``class_rles`` (classes 1..K-1 of a class-index mask) or, with ``multilabel``,
    of ``label_rles`` (labels 0..K-1 of a packed one), in ``order``."""
    if multilabel:
        return PlaneRuns(shape, order, num_classes, lambda band: label_planes(band, num_classes))
    return PlaneRuns(shape, order, num_classes - 1, lambda band: class_planes(band, num_classes))


class ClassRows:
    """A row per image and class 1..K-1, Kaggle's ``ImageId_ClassId,EncodedPixels`` (``<image>_<class>``), each
    class's RLE flattened row-major, or column-major with ``order="column"`` (the transposed mask read row by row).
    ``multilabel``: the masks are packed bits of ``num_classes`` classes (no background), each class's rows named
    1..K (Severstal's ClassId) and encoded from its bit (``label_rles``)."""

    header = "ImageId_ClassId,EncodedPixels\n"

    def __init__(self, num_classes: int, order: str = "row", multilabel: bool = False):
        self.num_classes, self.flatten, self.multilabel = num_classes, order, multilabel

    def names(self, image_id: str) -> list[str]:
        first = 0 if self.multilabel else 1
        return [f"{image_id}_{index + 1 - first}" for index in range(first, self.num_classes)]

    def image_of(self, name: str) -> str:
        return name.rsplit("_", 1)[0]

    def rows(self, image_id: str, mask: np.ndarray) -> list[tuple[str, str]]:
        encode = label_rles if self.multilabel else class_rles
        return list(zip(self.names(image_id), encode(mask, self.num_classes, self.flatten)))

    def band_rows(self, image_id: str, shape: tuple[int, int]) -> BandRows:
        runs = plane_runs(shape, self.flatten, self.num_classes, self.multilabel)
        return BandRows(runs, lambda rles: list(zip(self.names(image_id), rles)))

    def order(self, data) -> list[str]:
        """The test images in sorted order (no sample submission is read for these rows)."""
        test_ids = data.test_ids()
        if not test_ids:
            raise DataError(f"{data.root}: no test images (a test/ folder, a test split, or --test-images DIR)")
        return test_ids


def class_rles(mask: np.ndarray, num_classes: int, order: str = "row") -> list[str]:
    """RLE of each class 1..K-1 of a class-index mask (1-indexed start/length pairs), flattened row-major, or
    column-major with ``order="column"``."""
    if order == "column":
        mask = np.ascontiguousarray(mask.T)
    return [rle_encode(plane) for plane in class_planes(mask, num_classes)]


def class_planes(mask: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """bool masks of each class 1..K-1 of a class-index mask."""
    return [mask == index for index in range(1, num_classes)]


def label_planes(packed: np.ndarray, num_labels: int) -> list[np.ndarray]:
    """bool masks of each class 0..K-1 of a packed multilabel mask (bit k: class k; 255, ignored, is in none)."""
    labelled = packed != 255
    return [((packed >> index) & 1).astype(bool) & labelled for index in range(num_labels)]


def label_rles(packed: np.ndarray, num_labels: int, order: str = "row") -> list[str]:
    """RLE of each class 0..K-1 of a packed multilabel mask (bit k: class k; 255, ignored, is in no class),
    1-indexed start/length pairs, flattened row-major, or column-major with ``order="column"``."""
    if order == "column":
        packed = np.ascontiguousarray(packed.T)
    return [rle_encode(plane) for plane in label_planes(packed, num_labels)]


IMAGE_ROWS = ImageRows()
SAMPLE_KEY_HEADER = "sample_row,EncodedPixels\n"  # rows in progress of a --sample-submission run (SampleRows)
HEADERS = (ImageRows.header.encode(), ClassRows.header.encode(), SAMPLE_KEY_HEADER.encode())
RESTORE_SAMPLE = f"restore the competition's full {SAMPLE}, or remove it to predict every test image in sorted order"


def sample_submission_order(data) -> list[str]:
    """The test image ids in the order of ``sample_submission.csv`` (or its .zip), which must list every
    test image once and nothing else; without the file, every test image in sorted order."""
    test_ids = data.test_ids()
    if not test_ids:
        raise DataError(f"{data.root}: no test images (test/ or test.zip is empty or missing)")
    path = next((p for p in (data.root / SAMPLE, data.root / f"{SAMPLE}.zip") if p.is_file()), None)
    if path is None:
        logger.info("%s: no %s: predicting all %d test images in sorted order", data.root, SAMPLE, len(test_ids))
        return test_ids
    try:
        frame = read_csv_file(path, dtype=str, keep_default_na=False)  # there but unreadable: an error, not skipped
    except DataError as error:
        raise DataError(f"{error}; {RESTORE_SAMPLE}") from None
    if list(frame.columns) != HEADER.strip().split(","):
        raise DataError(
            f"{path}: the header is {','.join(map(str, frame.columns))!r}, not {HEADER.strip()!r}; {RESTORE_SAMPLE}"
        )
    order = [image_id_of(img) for img in frame["img"]]
    problems = {
        "empty img value(s)": [f"row {row}" for row, image_id in enumerate(order, start=2) if not image_id],
        "image(s) listed twice": sorted(image_id for image_id, n in Counter(order).items() if n > 1 and image_id),
    }
    for what, examples in problems.items():
        if examples:
            raise DataError(f"{path}: {len(examples)} {what}, e.g. {examples[:3]}; {RESTORE_SAMPLE}")
    absent = sorted(set(order) - set(test_ids))
    if absent:
        raise DataError(f"{path}: lists {len(absent)} image(s) with no file in test/, e.g. {absent[:3]}")
    unlisted = sorted(set(test_ids) - set(order))
    if unlisted:
        raise DataError(
            f"{path}: {len(unlisted)} of the {len(test_ids)} test images are not listed in it, e.g. "
            f"{unlisted[:3]}; {RESTORE_SAMPLE}"
        )
    return order


def sample_image_id(value: str) -> str:
    """A sample's image value as a test image id: its file name without an image extension (``0002cc93b.jpg``
    -> ``0002cc93b``), else the value itself (``case123_day20_slice_0001``)."""
    path = Path(value)
    return path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else value


def split_rle_columns(frame: pd.DataFrame, path) -> tuple[list[str], list[str] | None, str]:
    """(the image of each row, its class or None, the RLE column's name) of an RLE table read from ``path``, by its
    header: of two columns, a first whose name holds ``class`` holds ``<image>_<class>`` (Severstal's
    ``ImageId_ClassId``, split at the last ``_``), any other first column is the image of a row per image (classes
    None: Carvana's ``img,rle_mask``, HuBMAP's ``id,encoding`` and ``id,predicted``); of three, the one whose name
    holds ``class`` is the class, the first other one the image, the last the RLE (``SampleRows``' rule). One line
    when the header follows no such rule."""
    columns = [str(column) for column in frame.columns]
    if len(columns) == 2 and "class" not in columns[0].lower():
        return frame[columns[0]].tolist(), None, columns[1]
    if len(columns) == 2:
        keys = frame[columns[0]].tolist()
        bad = next((number for number, key in enumerate(keys, start=2) if "_" not in key), None)
        if bad is not None:
            raise DataError(
                f"{path}: row {bad}: {keys[bad - 2]!r} is not <image>_<class>, as its first column {columns[0]} "
                "must hold when its name holds 'class'"
            )
        return [key.rsplit("_", 1)[0] for key in keys], [key.rsplit("_", 1)[1] for key in keys], columns[1]
    named = [column for column in columns if "class" in column.lower()]
    if len(columns) != 3 or len(named) != 1:
        raise DataError(
            f"{path}: the header is {','.join(columns)!r}; an RLE table has <image>,<rle> (a row per image: "
            "img,rle_mask or id,predicted), <image>_<class>,<rle> (ImageId_ClassId,EncodedPixels) or three columns, "
            "one of them naming the class (id,class,predicted or ImageId,ClassId,EncodedPixels)"
        )
    image, rle = [column for column in columns if column != named[0]]
    return frame[image].tolist(), frame[named[0]].tolist(), rle


class SampleRows:
    """The rows of a competition's sample submission (``--sample-submission FILE``), in its order and columns: one
    per (image, class) it lists, the class's RLE in the RLE column, flattened row- or column-major (``order``).

    Its columns are read from the header (``split_rle_columns``): with two, a first naming a class holds
    ``<image>_<class>`` (Severstal's ``ImageId_ClassId``, split at the last ``_``), any other is the image of a row per
    image (HuBMAP's ``id,predicted``: a run of one class) and the second the RLE; with three, the class is in the column
    whose name holds ``class`` (``class``, ``ClassId``), the image in the first other one and the RLE in the last
    (UW-Madison's ``id,class,predicted``, Severstal's ``ImageId,ClassId,EncodedPixels``). A class value is a class
    name of the run, or its number 1..K among the predicted classes (Severstal's ClassId) unless the names are
    numbers themselves (``class_index``); an image value is a test
    image's id or file name. The sample defines the rows: test images it does not list are not predicted.
    """

    header = SAMPLE_KEY_HEADER

    def __init__(self, path: str | Path, classes: list[str], multilabel: bool, order: str = "row"):
        self.path, self.classes, self.multilabel, self.flatten = Path(path), classes, multilabel, order
        self.frame = read_csv_file(self.path, dtype=str, keep_default_na=False)
        self.columns = [str(column) for column in self.frame.columns]
        images, class_values, self.rle_column = split_rle_columns(self.frame, self.path)
        if class_values is None:  # a row per image (HuBMAP's id,predicted): the mask of the run's one class
            self._check_one_class()
            self.channels = [0] * len(images)
        else:
            self.channels = [self._channel(value, number) for number, value in enumerate(class_values, start=2)]
        self.image_of_row = [sample_image_id(value) for value in images]
        self.rows_of: dict[str, list[int]] = {}
        for row, image_id in enumerate(self.image_of_row):
            self.rows_of.setdefault(image_id, []).append(row)

    def _check_one_class(self) -> None:
        if len(self.classes) != 1:
            raise DataError(
                f"{self.path}: its header {','.join(self.columns)} holds a row per image, one mask each, but the run "
                f"predicts {len(self.classes)} classes ({','.join(self.classes)}); give a sample with a class column"
            )

    def _channel(self, value: str, number: int) -> int:
        """The predicted class (0-based, in the run's order) that a class value of row ``number`` names."""
        index = class_index(value, self.classes)
        if index is None:
            numbered = any(name.strip().isdigit() for name in self.classes)
            raise DataError(
                f"{self.path}: row {number}: class {value!r} is none of the run's classes {','.join(self.classes)}"
                + ("" if numbered else f" nor their number 1..{len(self.classes)}")
                + "; predict with the checkpoints of this competition, trained with --classes naming every class"
            )
        return index

    def order(self, data) -> list[str]:
        """The test image ids in the order the sample first lists them; a listed image without a file is one
        line, a test image it does not list is left out (logged)."""
        test_ids = data.test_ids()
        known = set(test_ids)
        missing = [image_id for image_id in self.rows_of if image_id not in known]
        if missing:
            raise DataError(
                f"{self.path}: lists {len(missing)} image(s) with no file among the {len(test_ids)} test images, e.g. "
                f"{missing[:3]}; pass the test folder they are in with --test-images DIR"
            )
        order = list(self.rows_of)
        if len(order) < len(test_ids):
            logger.info(
                "%s lists %d of the %d test images: the %d others are not predicted (the sample defines the rows)",
                self.path, len(order), len(test_ids), len(test_ids) - len(order),
            )  # fmt: skip
        return order

    def names(self, image_id: str) -> list[str]:
        return [str(row) for row in self.rows_of.get(image_id, [])]

    def image_of(self, name: str) -> str:
        return self.image_of_row[int(name)]

    def rows(self, image_id: str, mask: np.ndarray) -> list[tuple[str, str]]:
        if self.multilabel:
            rles = label_rles(mask, len(self.classes), self.flatten)
        else:
            rles = class_rles(mask, len(self.classes) + 1, self.flatten)
        return self._rows_of(image_id, rles)

    def band_rows(self, image_id: str, shape: tuple[int, int]) -> BandRows:
        classes = len(self.classes) + (0 if self.multilabel else 1)
        runs = plane_runs(shape, self.flatten, classes, self.multilabel)
        return BandRows(runs, lambda rles: self._rows_of(image_id, rles))

    def _rows_of(self, image_id: str, rles: list[str]) -> list[tuple[str, str]]:
        """The image's rows, each holding the RLE of its class among ``rles`` (one per predicted class)."""
        return [(name, rles[self.channels[int(name)]]) for name in self.names(image_id)]

    def publish(self, keyed: Path, out: Path, shape) -> pd.DataFrame:
        """The keyed rows of ``keyed`` written in the sample's order and columns to ``<out>.sample.partial``,
        validated (``check_rows``), then renamed to ``out``; ``keyed`` removed. The rows with their areas."""
        rows = read_csv_file(keyed, dtype=str, keep_default_na=False)
        checked = check_rows(rows.set_axis(["img", "rle_mask"], axis=1), keyed, [str(row) for row in
                             range(len(self.frame))], shape, self)  # fmt: skip
        by_row = dict(zip(checked["img"].astype(int), checked["rle_mask"]))
        table = self.frame.assign(**{self.rle_column: [by_row[row] for row in range(len(self.frame))]})
        temporary = tagged_partial_path(out, "sample")
        try:
            table.to_csv(temporary, index=False)
            validated = self.validate(temporary, shape)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        os.replace(temporary, out)
        keyed.unlink()
        return validated

    def validate(self, path: Path, shape) -> pd.DataFrame:
        """The rows of a submission in the sample's columns: the sample's rows in its order, every RLE within its
        image (``check_rows``); with each mask's area."""
        frame = read_csv_file(path, dtype=str, keep_default_na=False)
        keys = [column for column in self.columns if column != self.rle_column]
        if [str(column) for column in frame.columns] != self.columns or len(frame) != len(self.frame):
            raise DataError(
                f"{path}: not the {len(self.frame)} rows and columns {','.join(self.columns)} of {self.path}"
            )
        differ = (frame[keys] != self.frame[keys]).any(axis=1).to_numpy()
        if differ.any():
            row = int(differ.argmax())
            raise DataError(f"{path}: row {row + 2} is not row {row + 2} of {self.path}; predict it again")
        rows = pd.DataFrame({"img": [str(row) for row in range(len(frame))], "rle_mask": frame[self.rle_column]})
        return check_rows(rows, path, rows["img"].tolist(), shape, self)


def submission_order(data, rows: "ImageRows | ClassRows" = IMAGE_ROWS) -> list[str]:
    """The test image ids in the order the rows of ``rows``' format are written."""
    return rows.order(data)


def shard_path(path: str | Path, index: int, count: int) -> Path:
    """``submission.csv`` -> ``submission.csv.shard2of3``: the file shard ``index`` of ``count`` writes
    (as ``<it>.partial`` until the shard is complete), beside ``path`` so that ``--resume`` finds it."""
    path = Path(path)
    return path.with_name(f"{path.name}.shard{index}of{count}")


def shard_files(path: str | Path) -> list[Path]:
    """The shard files of any earlier run into ``path``, complete or not, whatever its device count."""
    path = Path(path)
    return sorted(path.parent.glob(f"{glob.escape(path.name)}.shard*"))


def interrupted_files(path: str | Path) -> list[Path]:
    """The files that may hold rows of an unfinished run into ``path``: ``<path>.partial`` and the shard files."""
    return [file for file in (partial_path(path), *shard_files(path)) if file.is_file()]


def complete_rows(path: str | Path) -> Iterator[tuple[str, int, int]]:
    """(image name, byte offset, byte length) of each complete row of a submission file; nothing when the
    header is not ours, and a torn last line (a run killed mid-write) is not a row."""
    with open(path, "rb") as handle:
        if handle.readline() not in HEADERS:
            return
        offset = handle.tell()
        for line in handle:
            if not line.endswith(b"\n"):
                return
            yield line.split(b",", 1)[0].decode(), offset, len(line)
            offset += len(line)


def interrupted_rows(path: str | Path) -> int:
    """How many complete rows the unfinished runs into ``path`` left, in all its files."""
    return sum(1 for file in interrupted_files(path) for _ in complete_rows(file))


def discard_interrupted(path: str | Path) -> None:
    """Start again: the rows of unfinished runs into ``path`` removed (``--overwrite``), with their record."""
    for file in interrupted_files(path):
        file.unlink()
    predicted_by_path(path).unlink(missing_ok=True)


def predicted_by_path(path: str | Path) -> Path:
    """``submission.csv`` -> ``submission.csv.predicted-by.json``: what the unfinished rows are predicted with."""
    path = Path(path)
    return path.with_name(f"{path.name}.predicted-by.json")


def predicted_by(checkpoints: list[str | Path], tta: tuple[str, ...], threshold: float) -> dict:
    """What the rows are predicted with, as JSON: each checkpoint file by its resolved path, size and
    modification time (a fold trained longer rewrites its best.pt), the TTA views and the threshold."""
    files = [Path(checkpoint).resolve() for checkpoint in checkpoints]
    stats = [(file, file.stat()) for file in files]
    return {
        "checkpoints": [
            {"path": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns} for file, stat in stats
        ],
        "tta": list(tta),
        "threshold": threshold,
    }


def _views(tta) -> str:
    return ("+".join(map(str, tta)) or "off") if isinstance(tta, list) else "unknown"


def _changes(recorded: dict, current: dict) -> list[str]:
    """What differs between two records of ``predicted_by``, in words."""
    changes = []
    if recorded.get("checkpoints") != current["checkpoints"]:
        changes.append("checkpoints changed")
    if recorded.get("tta") != current["tta"]:
        changes.append(f"TTA {_views(recorded.get('tta'))} -> {_views(current['tta'])}")
    if recorded.get("threshold") != current["threshold"]:
        changes.append(f"threshold {recorded.get('threshold')} -> {current['threshold']}")
    if recorded.get("output") != current.get("output"):
        changes.append(f"output {recorded.get('output')} -> {current.get('output')}")
    return changes


def start_rows(path: str | Path, predicted_with: dict, resume: bool) -> None:
    """Before predicting into ``path``: the rows of unfinished runs kept with ``resume`` only when they were
    predicted with the same checkpoints and settings (``predicted_with``, from ``predicted_by``) or with no
    record of it (rows of a version that wrote none), else discarded with a warning; removed without
    ``resume``. Then ``predicted_with`` is recorded beside ``path`` for the next ``--resume``."""
    record = predicted_by_path(path)
    current = json.loads(json.dumps(predicted_with))  # as it reads back: tuples are lists
    if not resume:
        discard_interrupted(path)
    elif record.is_file() and interrupted_files(path):
        try:
            recorded = json.loads(record.read_text())
        except (OSError, ValueError):
            recorded = {}  # torn or unreadable: nothing says the rows match
        changes = _changes(recorded if isinstance(recorded, dict) else {}, current)
        if changes:
            if interrupted_rows(path):
                logger.warning(
                    "the rows of %s were predicted by other models or settings (%s): predicting every test image again",
                    ", ".join(str(file) for file in interrupted_files(path)),
                    ", ".join(changes),
                )
            discard_interrupted(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(record) as temporary:
        temporary.write_text(json.dumps(current, indent=2) + "\n")


def finish_rows(path: str | Path) -> None:
    """The submission ``path`` is complete: the record of what its unfinished rows were predicted with goes."""
    predicted_by_path(path).unlink(missing_ok=True)


def gather_rows(path: str | Path, order: list[str], rows: "ImageRows | ClassRows" = IMAGE_ROWS) -> int:
    """Every complete row that unfinished runs left (``<path>.partial`` and every shard file) written into
    ``<path>.partial`` in ``order`` (image ids), each row once, the rows of an image kept only when all of them
    are there (``rows``: the format), rows of other images dropped; then the shard files removed. Returns the
    number of rows kept. Rows are copied by byte offset, never held all in memory (a full Carvana submission is
    hundreds of megabytes)."""
    sources = interrupted_files(path)
    where: dict[str, tuple[Path, int, int]] = {}
    for source in sources:
        for name, offset, length in complete_rows(source):
            where.setdefault(name, (source, offset, length))
    handles = {source: open(source, "rb") for source in sources}  # noqa: SIM115 - closed below
    kept = 0
    try:
        with atomic_output(partial_path(path)) as temporary, open(temporary, "wb") as out:
            out.write(rows.header.encode())
            for names in map(rows.names, order):
                if not all(name in where for name in names):
                    continue
                for name in names:
                    source, offset, length = where[name]
                    handles[source].seek(offset)
                    out.write(handles[source].read(length))
                    kept += 1
    finally:
        for handle in handles.values():
            handle.close()
    for shard in shard_files(path):
        shard.unlink()
    return kept


def check_resume_flags(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise ConfigError("--resume keeps the rows already written and --overwrite starts again: pass one of them")


def keep_finished(path: str | Path, resume: bool, overwrite: bool) -> bool:
    """Whether ``path`` is a finished submission to keep as it is (with ``resume``: nothing left to predict).
    A finished file is never replaced unless ``overwrite`` says so, nor the rows of an interrupted run
    (``<path>.partial`` or shard files) dropped unless ``overwrite`` says so."""
    check_resume_flags(resume, overwrite)
    if not (resume or overwrite):
        rows = {file: sum(1 for _ in complete_rows(file)) for file in interrupted_files(path)}
        left = [str(file) for file, count in rows.items() if count]
        if left:
            raise ConfigError(
                f"{', '.join(left)}: an interrupted run left {sum(rows.values())} predicted rows; "
                "pass --resume to keep them, or --overwrite to start again"
            )
    if overwrite or not Path(path).exists():
        return False
    if resume:
        return True
    raise ConfigError(f"{path} exists; pass --overwrite to replace it")


class SubmissionWriter:
    """Appends rows of ``rows``' format to ``<path>.partial``; ``close`` renames it to ``path``.

    With ``resume`` the rows of an interrupted run are kept (a torn last line is dropped, and so are the rows of
    an image that lacks some of its rows) and ``done`` holds their image ids, so that the caller skips them.
    """

    def __init__(self, path: str | Path, resume: bool = False, rows: "ImageRows | ClassRows" = IMAGE_ROWS):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = partial_path(self.path)
        self.done: set[str] = set()
        if resume and self.partial.exists():
            text = self.partial.read_text()
            lines = text[: text.rfind("\n") + 1].splitlines()[1:] if text.startswith(rows.header) else []
            by_image: dict[str, list[str]] = {}
            for line in lines:
                by_image.setdefault(rows.image_of(line.split(",", 1)[0]), []).append(line)
            kept = {image: found for image, found in by_image.items() if len(found) == len(rows.names(image))}
            self.done = set(kept)
            self.partial.write_text(rows.header + "".join(line + "\n" for found in kept.values() for line in found))
            self.handle = open(self.partial, "a")  # noqa: SIM115 - the writer holds it until close()
        else:
            self.handle = open(self.partial, "w")  # noqa: SIM115 - the writer holds it until close()
            self.handle.write(rows.header)

    def write(self, rows: list[tuple[str, str]]) -> None:
        self.handle.write("".join(f"{img},{rle}\n" for img, rle in rows))
        self.handle.flush()  # on disk at once: a killed run keeps every row written before the kill

    def close(self) -> Path:
        self.handle.close()
        os.replace(self.partial, self.path)
        return self.path


def read_submission(path: str | Path, rows: "ImageRows | ClassRows" = IMAGE_ROWS) -> pd.DataFrame:
    """The rows of a submission file as strings (columns ``img``, ``rle_mask``), its header checked."""
    frame = read_csv_file(path, dtype=str, keep_default_na=False)
    if list(frame.columns) != rows.header.strip().split(","):
        raise DataError(f"{path}: the header must be {rows.header.strip()!r}")
    frame.columns = ["img", "rle_mask"]
    return frame


def first_rows(frame: pd.DataFrame, path) -> dict[str, int]:
    """{row name: its row in the file} of ``frame``'s ``img`` column (the header is row 1); one line naming the first
    row that repeats a name."""
    first_row: dict[str, int] = {}
    repeats = []
    for number, name in enumerate(frame["img"], start=2):
        if name in first_row:
            repeats.append(f"{path}: row {number} repeats {name} of row {first_row[name]}")
        first_row.setdefault(name, number)
    if repeats:
        more = f" ({len(repeats)} repeated rows in all)" if len(repeats) > 1 else ""
        raise DataError(f"{repeats[0]}; each image takes one row{more}")
    return first_row


def check_rows(
    frame: pd.DataFrame, path, expected_images: list[str], shape, rows: "ImageRows | ClassRows" = IMAGE_ROWS,
    expected_from: str = "the test set",
) -> pd.DataFrame:  # fmt: skip
    """Check that every expected row name of ``expected_from`` (e.g. ``the truth t.csv``) appears exactly once in
    the rows ``frame`` read from ``path`` and nothing else, and that every RLE decodes within an image of ``shape``
    (HEIGHT, WIDTH), or of ``shape(image_id)`` when it is a function; a fault names the file's row (the header is
    row 1). Returns the rows with each mask's area fraction."""
    first_row = first_rows(frame, path)
    expected = set(expected_images)
    unknown = [(number, name) for name, number in first_row.items() if name not in expected]
    if unknown:
        more = f" ({len(unknown)} such rows in all)" if len(unknown) > 1 else ""
        raise DataError(f"{path}: row {unknown[0][0]}: {unknown[0][1]} is not in {expected_from}{more}")
    missing = [name for name in expected_images if name not in first_row]
    if missing:
        raise DataError(
            f"{path}: no row for {len(missing)} of the {len(expected)} images of {expected_from}, e.g. {missing[:3]}"
        )
    areas = []
    for number, (img, rle) in enumerate(zip(frame["img"], frame["rle_mask"]), start=2):
        height, width = shape(rows.image_of(img)) if callable(shape) else shape
        n_pixels = height * width
        try:
            starts, ends = rle_runs(rle, n_pixels)
        except RLEError as error:
            raise DataError(f"{path}: row {number} ({img}): {error}") from None
        areas.append(int((ends - starts).sum()) / n_pixels)
    return frame.assign(area=np.asarray(areas, dtype=np.float64))


def validate_submission(
    path: str | Path, expected_images: list[str], shape, rows: "ImageRows | ClassRows" = IMAGE_ROWS
) -> pd.DataFrame:
    """The rows of the submission ``path`` (``read_submission``), checked against the test images' row names
    ``expected_images`` and sizes ``shape`` (``check_rows``), with each mask's area fraction."""
    return check_rows(read_submission(path, rows), path, expected_images, shape, rows)
