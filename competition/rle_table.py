"""The rle-table layout: masks as a table of RLE rows, one per image and class (UW-Madison's, Severstal's), beside the images."""

import logging
import re
from pathlib import Path

import numpy as np

from competition.data import decoded_image_shape, read_csv_file
from competition.errors import ConfigError, DataError
from competition.mask_values import MAX_LABELS
from competition.rle import RLEError, paint_runs, reads_as_relative, rle_runs
from competition.segmentation_data import IMAGE_EXTENSIONS, SegmentationData, files_by_stem, parse_classes
from competition.splits import resolve

logger = logging.getLogger("competition.layouts")

EMPTY_CELLS = ("", "-1", "nan")  # an RLE cell for a class the image lacks (stripped, lower-cased), as tables write it
HEADER_LINES = 1  # a row's line number as a spreadsheet shows it: the header is line 1, the first row line 2
RELATIVE_FIX = (  # a refused row that reads as SIIM-ACR's train-rle.csv: its starts are offsets from the previous run
    "fix the row; if its starts count from the end of the previous run (a relative RLE, as SIIM-ACR's train-rle.csv "
    "writes), rewrite them as absolute 1-indexed pixel numbers: --masks-csv reads those"
)
UW_MADISON_COLUMNS = "id,class,segmentation"  # --rle-columns' default: UW-Madison's train.csv (and the synthetic one)
Row = tuple[int, str, int]  # (the class's index among the table's classes, its RLE, its line in the file)
# UW-Madison's scans as Kaggle ships them: train/case123/case123_day20/scans/slice_0001_266_266_1.50_1.50.png is
# the row id case123_day20_slice_0001 (width, height and pixel spacing in the name).
UW_MADISON_SLICE = re.compile(r"(?:.*/)?(case\d+_day\d+)/scans/(slice_\d+)_\d+_\d+_[\d.]+_[\d.]+\.png")


def parse_rle_columns(text: str) -> tuple[str, str | None, str]:
    """``--rle-columns``: (id, class, RLE) column names; a table without classes names two (class None)."""
    names = [name.strip() for name in text.split(",")]
    if len(names) not in (2, 3) or not all(names) or len(set(names)) < len(names):
        raise ConfigError(
            f"--rle-columns {text!r}: name the id, class and RLE columns, e.g. id,class,segmentation, or the id and "
            "RLE columns of a table without classes, e.g. ImageId,EncodedPixels"
        )
    return (names[0], None, names[1]) if len(names) == 2 else (names[0], names[1], names[2])


def read_rle_frame(path: Path, columns: tuple[str, str | None, str]):
    """The table as strings (an empty cell is ""), checked to have ``columns``; a header's names are read without
    the spaces around them (SIIM's ``ImageId, EncodedPixels``), as ``--rle-columns`` reads its own."""
    frame = read_csv_file(path, dtype=str, keep_default_na=False)
    frame.columns = [str(name).strip() for name in frame.columns]
    missing = [name for name in columns if name is not None and name not in frame.columns]
    if missing:
        found = [str(name) for name in frame.columns]
        example = ",".join(found) if len(found) in (2, 3) else "ImageId,ClassId,EncodedPixels"
        raise DataError(
            f"{path}: no column {', '.join(missing)} (its columns: {', '.join(found)}); name the id, class and RLE "
            f"columns with --rle-columns, e.g. --rle-columns {example}"
        )
    return frame


def sorted_values(values: set[str]) -> list[str]:
    """The class column's distinct values in order: numerically when every one is a number (Severstal's 1..4)."""
    if all(value.strip().isdigit() for value in values):
        return sorted(values, key=lambda value: int(value))
    return sorted(values)


def table_labels(values: list[str], classes: str, multilabel: bool, has_class_column: bool) -> list[str]:
    """The table's classes in order (no background): named by ``--classes`` (background first unless
    ``multilabel``), else the class column's distinct values, else (a table without classes) one."""
    if classes:
        if not multilabel:
            return parse_classes(classes)[1:]
        labels = [name.strip() for name in classes.split(",") if name.strip()]
        if len(set(labels)) < len(labels):
            raise DataError(f"--classes {classes!r}: a label given more than once")
        return labels
    if not has_class_column:
        return ["foreground"]
    return sorted_values({value for value in values if value.strip()})  # a blank class cell is refused by its row


def class_index(value: str, labels: list[str]) -> int | None:
    """The 0-based index of a class cell: one of ``labels`` by name, or its 1-based number (Severstal's ClassId)
    unless the names are numbers themselves (classes 1,3,4 of a table that lacks class 2: a 2 is then no class)."""
    if value in labels:
        return labels.index(value)
    number = value.strip()
    numbered = any(label.strip().isdigit() for label in labels)
    return int(number) - 1 if not numbered and number.isdigit() and 1 <= int(number) <= len(labels) else None


def group_rows(frame, columns, labels: list[str], path: Path) -> tuple[dict[str, list[Row]], set[str]]:
    """(table id -> its rows that draw something, every id of the table): parsed once, the classes checked; a row
    with an empty RLE cell draws nothing."""
    id_column, class_column, rle_column = columns
    class_cells = frame[class_column] if class_column else [None] * len(frame)
    indices: dict[str | None, int | None] = {None: 0}
    rows: dict[str, list[Row]] = {}
    for position, (table_id, value, rle) in enumerate(zip(frame[id_column], class_cells, frame[rle_column])):
        line = position + HEADER_LINES + 1
        if value not in indices:
            indices[value] = class_index(value, labels)
        if indices[value] is None:
            raise DataError(
                f"{path}: line {line}: class {value!r} is none of the classes ({', '.join(labels)}) nor their number "
                f"1..{len(labels)}; fix the row, or name every class with --classes (background first, unless --head "
                "multilabel: its classes overlap and have no background)"
            )
        if not table_id.strip():
            raise DataError(f"{path}: line {line}: no image id in column {id_column}; fix the row")
        if rle.strip().lower() not in EMPTY_CELLS:
            rows.setdefault(table_id, []).append((indices[value], rle, line))
    return rows, set(frame[id_column])


def uw_madison_scans(folder: Path) -> dict[str, Path]:
    """Row id -> file of UW-Madison's scans in ``folder``'s case and day subfolders (``UW_MADISON_SLICE``)."""
    slices = (UW_MADISON_SLICE.fullmatch(path.relative_to(folder).as_posix()) for path in sorted(folder.rglob("*.png")))
    return {f"{match[1]}_{match[2]}": folder / match[0] for match in slices if match}


def table_images(folder: Path) -> dict[str, Path]:
    """Image id -> file of ``folder``: the images in it by stem, or, when it holds none, UW-Madison's scans in its
    case and day subfolders, each by its row id."""
    found = files_by_stem(folder, IMAGE_EXTENSIONS)
    return found if found or not folder.is_dir() else uw_madison_scans(folder)


def image_of(table_id: str, images: dict[str, Path]) -> str | None:
    """The image a table id names: its stem (UW-Madison's ``case123_day20_slice_0001``) or its file name
    (Severstal's ``0002cc93b.jpg``); None when no image has it."""
    if table_id in images:
        return table_id
    name = Path(table_id)
    return name.stem if name.suffix.lower() in IMAGE_EXTENSIONS and name.stem in images else None


class RLETableData(SegmentationData):
    """Images in a folder (``train/``, or ``--images``) and their masks in a table of RLE rows (``--masks-csv``),
    one row per image and class, row- or column-major (``--rle-order``); the image's size from its header. An
    image with no row, or a row with an empty cell, has an empty mask for that class. The table is parsed once
    (rows grouped by image); each mask is drawn when its sample is read. Binary (one class), class indices
    (background 0, the table's classes from 1; classes that overlap are refused), or, with ``--head
    multilabel``, bit k for class k (classes may overlap)."""

    layout = "rle-table"
    needs = "--masks-csv FILE: a table of RLE rows, one per image and class, and the images in train/ (or --images)"
    reads_images_folder = True  # --images names the images' folder; the masks are the table's

    def masks_line(self) -> str:
        bits = ", bit k of a pixel for class k (--head multilabel)" if self.multilabel else ""
        return f"masks: {self.rle_order}-major RLE rows of {self.csv}{bits}"

    @staticmethod
    def detect(root: Path) -> bool:
        return False  # a table is given by --masks-csv: a folder's names cannot say which CSV holds masks

    @classmethod
    def read(cls, root: Path, test_folder: Path | None, options: dict) -> "RLETableData":
        if not options["masks_csv"]:
            raise ConfigError(f"--layout {cls.layout} reads masks from a table: name it with --masks-csv FILE")
        if options["folder_split"] or options["listed_files"]:
            raise ConfigError(
                "--split with --masks-csv takes lists of ids (a .txt file per split, e.g. train=train.txt,val=val.txt): "
                "the table holds the masks, train/ (or --images) the images"
            )
        csv = resolve(root, options["masks_csv"])
        if not csv.is_file():
            raise DataError(
                f"--masks-csv {options['masks_csv']}: not found (relative to --data-dir {root}, or absolute)"
            )
        return cls(
            root,
            csv,
            test_folder,
            classes=options["classes"],
            ignore_index=options["ignore_index"],
            images=options["folder_options"].get("images", ""),
            columns=parse_rle_columns(options["rle_columns"]),
            order=options["rle_order"],
            multilabel=options["head"] == "multilabel",
        )

    def __init__(
        self,
        root: Path,
        csv: Path,
        test_images: Path | None,
        *,
        classes: str,
        ignore_index: int,
        images: str,
        columns: tuple[str, str | None, str],
        order: str,
        multilabel: bool,
    ):
        self.csv, self.rle_order, self.multilabel = csv, order, multilabel
        frame = read_rle_frame(csv, columns)
        values = list(frame[columns[1]]) if columns[1] else []
        labels = table_labels(values, classes, multilabel, columns[1] is not None)
        if multilabel and len(labels) > MAX_LABELS:
            raise DataError(
                f"{csv}: {len(labels)} classes; --head multilabel holds at most {MAX_LABELS} (a bit each in a byte): "
                "use --head auto if they never overlap"
            )
        rows, table_ids = group_rows(frame, columns, labels, csv)
        folder = resolve(root, images) if images else root / "train"
        if not folder.is_dir():
            raise DataError(
                f"{folder}: no such folder; the images of --masks-csv are in train/, or name their folder with --images"
            )
        found = table_images(folder)
        self.rows = self.match_images(rows, table_ids, found, folder)
        test = table_images(test_images or root / "test")
        names = labels if multilabel else ["background", *labels]
        super().__init__(root, found, names, ignore_index, test)

    def match_images(
        self, rows: dict[str, list[Row]], table_ids: set[str], images: dict[str, Path], folder: Path
    ) -> dict[str, list[Row]]:
        """Image id -> its rows. Ids without an image are left out (said in one line); an image without a row has
        an empty mask (Severstal lists the images with a defect only); a table none of whose ids names an image
        stops."""
        image_ids = {table_id: image_of(table_id, images) for table_id in table_ids}
        orphans = sorted(table_id for table_id, image_id in image_ids.items() if image_id is None)
        if images and table_ids and len(orphans) == len(table_ids):
            joined = [table_id for table_id in orphans if image_of(table_id.rsplit("_", 1)[0], images)]
            if joined:
                raise DataError(
                    f"{self.csv}: its ids are <image>_<class> (e.g. {joined[0]!r}, as Severstal's first "
                    "ImageId_ClassId column writes them); --masks-csv reads the image and the class from two columns: "
                    "split that column in two, e.g. ImageId,ClassId, and pass --rle-columns ImageId,ClassId,EncodedPixels"
                )
            raise DataError(
                f"{self.csv}: none of its {len(table_ids)} ids names an image in {folder} (e.g. {orphans[0]!r} and "
                f"{next(iter(images.values())).name}); ids are the images' names or stems: check --images or --rle-columns"
            )
        if orphans:
            logger.warning(
                "%s: %d id(s) have no image in %s and are left out, e.g. %s",
                self.csv,
                len(orphans),
                folder,
                orphans[:3],
            )
        unlisted = len(set(images) - set(image_ids.values()))
        if unlisted:
            logger.info("%s: %d image(s) have no row in %s: their masks are empty", folder, unlisted, self.csv.name)
        return {image_ids[table_id]: found for table_id, found in rows.items() if image_ids[table_id] is not None}

    def mask_source(self, image_id: str) -> str:
        return str(self.csv)

    def draw(self, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        """The image's mask (``shape``: its height and width) drawn from its rows: class indices, or a multilabel
        mask's bits; a row whose RLE is malformed or runs past the image, or two classes that overlap in an index
        mask, stops with the line of the file."""
        height, width = shape
        mask = np.zeros(shape, dtype=np.uint8)
        first_line: dict[int, int] = {}  # mask value -> the line of its first row: what an overlap is named by
        for label, rle, line in self.rows.get(image_id, ()):
            value = 1 << label if self.multilabel else label + 1
            try:
                starts, ends = rle_runs(rle, height * width)
            except RLEError as error:
                relative = "out of order" in str(error) and reads_as_relative(rle, height * width)
                fix = RELATIVE_FIX if relative else "fix the row"
                raise DataError(f"{self.csv}: line {line} (image {image_id}): {error}; {fix}") from None
            covered = paint_runs(mask, starts, ends, value, self.rle_order, combine=self.multilabel)
            first_line.setdefault(value, line)
            if covered and not self.multilabel:
                raise DataError(
                    f"{self.csv}: lines {first_line[covered]} and {line} (image {image_id}): classes "
                    f"{self.classes[covered]} and {self.classes[value]} overlap, and a softmax gives each pixel one "
                    "class: pass --head multilabel (a sigmoid channel per class)"
                )
        return mask

    def class_pixel_counts(self, image_id: str) -> np.ndarray:
        """Pixels of each class from the rows' runs and the image's header, no mask drawn (a slide's would take
        gigabytes): what make_folds stratifies by. An image with two rows of one class is drawn, since its rows may
        overlap; so is one with a malformed row, to stop with drawing's line."""
        rows = self.rows.get(image_id, ())
        if len({label for label, _, _ in rows}) < len(rows):
            return super().class_pixel_counts(image_id)
        height, width = self.image_shape(image_id)
        counts = np.zeros(self.num_classes, np.int64)
        runs = []
        for label, rle, _ in rows:
            try:
                starts, ends = rle_runs(rle, height * width)
            except RLEError:
                return super().class_pixel_counts(image_id)  # drawn, to stop with drawing's line and its fix
            counts[label if self.multilabel else label + 1] = (ends - starts).sum()
            runs.append((starts, ends))
        if not self.multilabel:
            if _runs_overlap(runs):  # classes that overlap: drawn, to stop with the overlap's one line
                return super().class_pixel_counts(image_id)
            counts[0] = height * width - counts[1:].sum()
        return counts

    def _mask(self, image_id: str, split: str = "train") -> tuple[np.ndarray, str]:
        return self.draw(image_id, self.image_shape(image_id, split)), str(self.csv)

    def read_mask(self, image_id: str, shape: tuple[int, int] | None = None, split: str = "train") -> np.ndarray:
        """The mask as drawn: every value is a class's (or a set of classes' bits), nothing to check."""
        return self.draw(image_id, shape or self.image_shape(image_id, split))

    def read_sample(self, image_id: str, reduce_to=None) -> tuple[np.ndarray, np.ndarray]:
        image, full_shape = self.read_image_and_shape(image_id, "train", reduce_to)
        return image, self.draw(image_id, full_shape)

    def _checked_mask(self, image_id: str) -> np.ndarray:
        """The mask drawn at the size of its image decoded to the end: every row checked against that image."""
        return self.draw(image_id, decoded_image_shape(self, image_id))


def _runs_overlap(runs: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    """Whether any two of the rows' runs (pixel index ``[start, end)`` in one flattening order) share a pixel."""
    if not runs:
        return False
    starts, ends = (np.concatenate(parts) for parts in zip(*runs))
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    return bool((starts[1:] < np.maximum.accumulate(ends)[:-1]).any())
