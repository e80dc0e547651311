"""The Carvana layout: images and masks from folders or the competition's zips, train_masks.csv, car ids and car folds."""

import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from competition.data import (
    _image_shape,
    decode_image_and_shape,
    decode_mask,
    decoded_file_shape,
    decoded_image_shape,
    image_id_of,
    read_csv_file,
)
from competition.errors import ConfigError, DataError
from competition.mask_values import value_histogram
from competition.rle import RLEError, rle_decode, rle_runs

# What makes a folder Carvana's: its masks, as GIFs (a folder or the competition's zip) or run-length rows.
CARVANA_MASKS = ("train_masks", "train_masks.zip", "train_masks.csv", "train_masks.csv.zip")
# Module-level, not an attribute: a data set is pickled into loader workers, and a lock cannot be.
_CSV_PARSING = threading.Lock()

CARVANA_HELP = (
    "Expected the Carvana layout: train/<car>_<NN>.jpg, train_masks/<car>_<NN>_mask.gif, "
    "train_masks.csv, metadata.csv, test/*.jpg, sample_submission.csv (folders or the "
    "competition's .zip files). Make a synthetic set with "
    "`python -m competition.synthetic --out input/` or pass --data-dir."
)


def car_id_of(image_id: str) -> str:
    """``0cdf5b5d0ce1_05`` -> ``0cdf5b5d0ce1``: the 16 views of a car share everything before ``_NN``."""
    return image_id.rsplit("_", 1)[0]


def assign_folds(image_ids: list[str], n_folds: int, seed: int, strata: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per image (``img``, ``car_id``, ``fold``), sorted by ``img``.

    Without ``strata`` the cars are shuffled with ``seed`` and dealt round-robin, so fold
    sizes differ by at most one car. With ``strata`` (car_id -> label, e.g. the make)
    scikit-learn's StratifiedGroupKFold balances the labels across folds instead.
    The result depends on the set of ids only, never on their order.
    """
    image_ids = sorted(set(image_ids))
    car_ids = sorted({car_id_of(image_id) for image_id in image_ids})
    if n_folds < 2:
        raise ConfigError(f"--n-folds must be at least 2, got {n_folds}")
    if len(car_ids) < n_folds:
        raise ConfigError(
            f"{len(car_ids)} cars cannot fill {n_folds} folds; "
            + (f"use --n-folds {len(car_ids)} or fewer" if len(car_ids) >= 2 else "folds need two cars at least")
        )
    if strata is None:
        order = np.random.default_rng(seed).permutation(len(car_ids))
        fold_of_car = {car_ids[index]: position % n_folds for position, index in enumerate(order)}
    else:
        missing = [car_id for car_id in car_ids if car_id not in strata]
        if missing:
            raise DataError(f"metadata.csv: {len(missing)} cars have no stratification label, e.g. {missing[:3]}")
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        labels = [strata[car_id] for car_id in car_ids]
        fold_of_car = {}
        for fold, (_, held_out) in enumerate(splitter.split(car_ids, labels, groups=car_ids)):
            fold_of_car.update({car_ids[index]: fold for index in held_out})
    return pd.DataFrame(
        {
            "img": [f"{image_id}.jpg" for image_id in image_ids],
            "car_id": [car_id_of(image_id) for image_id in image_ids],
            "fold": [fold_of_car[car_id_of(image_id)] for image_id in image_ids],
        }
    )


class _Folder:
    """Files with one suffix in a folder, keyed by file name."""

    def __init__(self, path: Path, suffix: str):
        self.path = path
        self.names = sorted(p.name for p in path.iterdir() if p.name.endswith(suffix))

    def describe(self, name: str) -> str:
        return str(self.path / name)

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()


class _Zip:
    """Files with one suffix inside a zip archive, keyed by base name, read without extracting.

    Each process opens its own handle: DataLoader workers must not share a file offset.
    """

    def __init__(self, path: Path, suffix: str):
        self.path = path
        self._handle: zipfile.ZipFile | None = None
        self._pid = -1
        try:
            members = self._archive().namelist()
        except zipfile.BadZipFile as error:
            raise DataError(f"{path}: not a readable zip archive ({error}); download it again") from None
        self._members = {
            Path(member).name: member
            for member in members
            if member.endswith(suffix) and not member.startswith("__MACOSX/")
        }
        self.names = sorted(self._members)

    def _archive(self) -> zipfile.ZipFile:
        if self._handle is None or self._pid != os.getpid():
            self._handle = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._handle

    def describe(self, name: str) -> str:
        return f"{self.path}:{self._members.get(name, name)}"

    def read(self, name: str) -> bytes:
        return self._archive().read(self._members[name])

    def __getstate__(self):
        return {**self.__dict__, "_handle": None, "_pid": -1}


def _open_files(root: Path, name: str, suffix: str) -> "_Folder | _Zip | None":
    if (root / name).is_dir():
        return _Folder(root / name, suffix)
    if (root / f"{name}.zip").is_file():
        return _Zip(root / f"{name}.zip", suffix)
    return None


class CarvanaData:
    """One Carvana-format data folder. Every folder may instead be the competition's ``<name>.zip``. It has the
    methods and facts of the other layouts' base (competition.segmentation_data.SegmentationData), so that training,
    folds, inference and inspect_data take either; it shares none of their reading, so it does not subclass it.

    ``mask_source``: ``gif`` (train_masks/), ``csv`` (train_masks.csv) or ``auto`` (GIFs when present).
    ``in_channels`` (set after construction, e.g. from the config): images are read as RGB (3) or grey (1).
    """

    layout = "carvana"
    classes = ("background", "car")
    num_classes = 2
    ignore_index = None  # every pixel is labelled
    fixed_image_size = True  # every image 1918x1280: validation batches need no same-size grouping
    fixed_classes = True  # background and car: the run's settings are kept as given, no classes saved
    submission_format = "rle"  # the competition's img,rle_mask rows
    smooth_mask_resize = True  # 0/1 masks: an area-averaged resize thresholded at half keeps edges smooth
    reads_folder_settings = False  # --images, --masks, --colors, ... are refused
    reads_images_folder = False
    multilabel = False  # class indices: background 0, car 1
    class_description = "classes: background, car (Carvana)"
    class_problems = class_doubts = ()  # its classes are the competition's: nothing in the masks to doubt

    @staticmethod
    def detect(root: Path) -> bool:
        """Carvana's masks are there: a ``train/`` alone is any data set's (CamVid's beside ``trainannot/``)."""
        return any((root / name).exists() for name in CARVANA_MASKS)

    @classmethod
    def open(cls, root: Path, test_folder: Path | None, options: dict) -> "CarvanaData":
        """The data folder read with the settings of ``open_data`` (Carvana's: ``mask_source``; no split)."""
        if options["split"]:
            raise ConfigError("--split is for other layouts; Carvana's test set is test/ and its folds are by car")
        if options.get("multilabel"):
            raise ConfigError(
                f"--head multilabel is for classes that overlap; {root} is Carvana's data, one class (car): leave "
                "--head at auto"
            )
        return cls(root, options["mask_source"], test_images=test_folder)

    @staticmethod
    def masks_to_count(train_count: int, total: int, pixel_counts_needed: bool) -> int:
        """Masks counted before training, of the ``total`` (training images first): the classes are fixed, so the
        training images' only when --class-weights or --sampler needs their pixels."""
        return train_count if pixel_counts_needed else 0

    def folds(self, n_folds: int, seed: int, *, group_regex, stratify, stratify_classes, progress):
        """Car-grouped folds (``img,car_id,fold``) and the folds file's text, stratified by a metadata.csv column
        when asked."""
        if group_regex:
            raise ConfigError("--group-regex is for other layouts; Carvana's folds are grouped by car")
        strata = None
        if stratify:
            metadata = self.read_csv("metadata.csv", ["id", stratify])
            strata = dict(zip(metadata["id"], metadata[stratify]))
        folds = assign_folds(self.train_ids(), n_folds, seed, strata)
        text = folds[["img", "car_id", "fold"]].to_csv(index=False)
        if strata is not None:
            folds[stratify] = [strata[car_id] for car_id in folds["car_id"]]
        return folds, text

    def __init__(self, root: str | Path, mask_source: str = "auto", test_images: Path | None = None):
        self.splits: dict[str, str] = {}  # no official split: the cars' folds
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data folder not found. {CARVANA_HELP}")
        self.train_images = _open_files(self.root, "train", ".jpg")
        self.train_masks = _open_files(self.root, "train_masks", ".gif")
        if test_images is not None and not test_images.is_dir():
            raise DataError(f"--test-images {test_images}: not a folder of test images")
        self.test_images = _Folder(test_images, ".jpg") if test_images else _open_files(self.root, "test", ".jpg")
        if not any(files and files.names for files in (self.train_images, self.test_images)):
            raise DataError(f"{self.root}: no train or test images. {CARVANA_HELP}")
        if mask_source not in ("auto", "gif", "csv"):
            raise DataError(f"mask_source must be auto, gif or csv, got {mask_source!r}")
        if mask_source == "auto":
            mask_source = "gif" if self.train_masks and self.train_masks.names else "csv"
        self.mask_source = mask_source
        self._csv_masks: dict[str, str] | None = None
        self.in_channels = 3

    def test_mask_ids(self) -> list[str]:
        """Carvana's test masks were never published: none to score against."""
        return []

    def _csv_path(self, name: str) -> Path:
        for candidate in (self.root / name, self.root / f"{name}.zip"):
            if candidate.is_file():
                return candidate
        raise DataError(f"{self.root / name}: not found (nor {name}.zip). {CARVANA_HELP}")

    def read_csv(self, name: str, columns: list[str]) -> pd.DataFrame:
        """A competition CSV (``name`` or ``name.zip``) as strings, checked to have ``columns``."""
        path = self._csv_path(name)
        frame = read_csv_file(path, dtype=str, keep_default_na=False)
        missing = [column for column in columns if column not in frame.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; expected {columns}, found {list(frame.columns)}")
        return frame

    def train_ids(self) -> list[str]:
        """Ids (``<car>_<NN>``) of the training images, sorted."""
        return sorted(image_id_of(name) for name in self.train_images.names) if self.train_images else []

    def test_ids(self) -> list[str]:
        """Ids of the test images, sorted."""
        return sorted(image_id_of(name) for name in self.test_images.names) if self.test_images else []

    def _image_files(self, split: str):
        files = {"train": self.train_images, "test": self.test_images}[split]
        if files is None:
            raise DataError(f"{self.root}: no {split}/ folder or {split}.zip. {CARVANA_HELP}")
        return files

    def image_path(self, image_id: str, split: str = "train") -> str:
        return self._image_files(split).describe(f"{image_id}.jpg")

    def read_image(self, image_id: str, split: str = "train", reduce_to: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 (H, W, ``in_channels``) of one image; see ``decode_image`` for ``reduce_to``."""
        return self.read_image_and_shape(image_id, split, reduce_to)[0]

    def read_image_and_shape(self, image_id: str, split: str = "train", reduce_to: tuple[int, int] | None = None):
        """(image, (height, width) before any reduction) of one image."""
        files = self._image_files(split)
        name = f"{image_id}.jpg"
        return decode_image_and_shape(files.read(name), files.describe(name), reduce_to, self.in_channels)

    def image_shape(self, image_id: str, split: str = "train") -> tuple[int, int]:
        """(height, width) of one image, read from its header alone."""
        files = self._image_files(split)
        return _image_shape(files.read(f"{image_id}.jpg"), files.describe(f"{image_id}.jpg"))

    def _masks_from_csv(self) -> dict[str, str]:
        if self._csv_masks is None:
            with _CSV_PARSING:  # the survey's threads share one data set: the CSV is parsed once, not by each
                if self._csv_masks is None:
                    frame = self.read_csv("train_masks.csv", ["img", "rle_mask"])
                    self._csv_masks = dict(zip(map(image_id_of, frame["img"]), frame["rle_mask"]))
        return self._csv_masks

    def mask_ids(self) -> set[str]:
        """Ids that have a mask in the chosen mask source."""
        if self.mask_source == "gif":
            return {image_id_of(name) for name in self.train_masks.names} if self.train_masks else set()
        return set(self._masks_from_csv())

    def check_masks(self, image_ids: list[str]) -> None:
        """Raise a DataError naming the images that have no mask."""
        missing = sorted(set(image_ids) - self.mask_ids())
        if missing:
            where = "train_masks/" if self.mask_source == "gif" else "train_masks.csv"
            raise DataError(
                f"{self.root}: {len(missing)} training image(s) have no mask in {where}, "
                f"e.g. {missing[:3]}; restore the masks or remove those images"
            )

    def _gif_name(self, image_id: str) -> str:
        """The name of the image's GIF mask in train_masks/, which must hold it."""
        name = f"{image_id}_mask.gif"
        if self.train_masks is None or name not in self.train_masks.names:
            raise DataError(f"{self.root}: image {image_id}.jpg has no mask train_masks/{name}")
        return name

    def read_mask(self, image_id: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 0/1 (H, W) mask of one training image, from its GIF or from train_masks.csv.

        An RLE row carries no size: ``shape`` (height, width), when the caller already knows it,
        saves reading the image's header again.
        """
        if self.mask_source == "gif":
            name = self._gif_name(image_id)
            return decode_mask(self.train_masks.read(name), self.train_masks.describe(name))
        masks = self._masks_from_csv()
        if image_id not in masks:
            raise DataError(f"{self.root}: image {image_id}.jpg has no row in train_masks.csv")
        try:
            return rle_decode(masks[image_id], shape or self.image_shape(image_id))
        except RLEError as error:
            raise DataError(f"{self._csv_path('train_masks.csv')}: row {image_id}.jpg: {error}") from None

    def check_sample(self, image_id: str) -> None:
        """Raise the DataError the loader would meet for this image and its mask: the JPEG decoded to its end
        (``decoded_image_shape``), the GIF too (``decoded_file_shape``), or the RLE row's runs checked against the
        image without being drawn, and both checked to be one size."""
        shape = decoded_image_shape(self, image_id)
        if self.mask_source == "gif":
            name = self._gif_name(image_id)
            mask_shape = decoded_file_shape(self.train_masks.read(name), self.train_masks.describe(name))
            self._same_size(image_id, shape, mask_shape)
            return
        masks = self._masks_from_csv()
        if image_id not in masks:
            raise DataError(f"{self.root}: image {image_id}.jpg has no row in train_masks.csv")
        try:
            rle_runs(masks[image_id], shape[0] * shape[1])  # parsed and checked, not drawn
        except RLEError as error:
            raise DataError(f"{self._csv_path('train_masks.csv')}: row {image_id}.jpg: {error}") from None

    def _same_size(self, image_id: str, shape: tuple[int, int], mask_shape: tuple[int, int]) -> None:
        if mask_shape != shape:
            raise DataError(
                f"{self.image_path(image_id)}: image is {shape[1]}x{shape[0]} but its mask is "
                f"{mask_shape[1]}x{mask_shape[0]}; the mask belongs to another image, replace it"
            )

    def class_pixel_counts(self, image_id: str) -> np.ndarray:
        """Background and car pixels of the image's mask (int64)."""
        return np.bincount(self.read_mask(image_id).ravel(), minlength=2).astype(np.int64)

    def class_counts(self, histograms: np.ndarray) -> np.ndarray:
        """Background and car pixels (..., 2) from masks' 256-value histograms (..., 256)."""
        return np.asarray(histograms)[..., :2]

    def checked_mask_histogram(self, image_id: str) -> np.ndarray:
        """Pixels of each of the 256 mask values (int64), the sample checked as ``check_sample`` checks it, each
        file decoded once."""
        shape = decoded_image_shape(self, image_id)
        mask = self.read_mask(image_id, shape)
        self._same_size(image_id, shape, mask.shape)
        return value_histogram(mask)

    def read_sample(self, image_id: str, reduce_to: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) of one training image, checked to be the same size before any reduction."""
        image, full_shape = self.read_image_and_shape(image_id, "train", reduce_to)
        mask = self.read_mask(image_id, full_shape)
        self._same_size(image_id, full_shape, mask.shape)
        return image, mask
