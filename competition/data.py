"""The Carvana data layout: image and mask files from folders or the competition's zips, and the Dataset."""

import contextlib
import io
import logging
import math
import os
import threading
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from competition.errors import DataError
from competition.mask_values import value_histogram
from competition.rle import RLEError, rle_decode, rle_runs

logger = logging.getLogger(__name__)
# Module-level, not an attribute: a data set is pickled into loader workers, and a lock cannot be.
_CSV_PARSING = threading.Lock()

LAYOUT_HELP = (
    "Expected the Carvana layout: train/<car>_<NN>.jpg, train_masks/<car>_<NN>_mask.gif, "
    "train_masks.csv, metadata.csv, test/*.jpg, sample_submission.csv (folders or the "
    "competition's .zip files). Make a synthetic set with "
    "`python -m competition.synthetic --out input/` or pass --data-dir."
)


def read_csv_file(path: str | Path, **options) -> pd.DataFrame:
    """``pd.read_csv`` with every way a file can fail to be a CSV said in one line naming it."""
    try:
        return pd.read_csv(path, **options)
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, zipfile.BadZipFile, OSError) as error:
        raise DataError(f"{path}: not a readable CSV ({' '.join(str(error).split())})") from None


def car_id_of(image_id: str) -> str:
    """``0cdf5b5d0ce1_05`` -> ``0cdf5b5d0ce1``: the 16 views of a car share everything before ``_NN``."""
    return image_id.rsplit("_", 1)[0]


def image_id_of(file_name: str) -> str:
    """``0cdf5b5d0ce1_05.jpg`` (a CSV ``img`` value or a file name) -> ``0cdf5b5d0ce1_05``."""
    return Path(file_name).name.removesuffix(".jpg").removesuffix("_mask.gif")


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


# A reduced DCT scale that falls short of the target by at most this much is still taken (1918 / 2 = 959
# for a 960-wide target): decoding 640x960 costs a sixth of a full decode, and the resize makes up the pixel.
DRAFT_SHORTFALL = 0.01


@contextlib.contextmanager
def _decoding(source: str, what: str = "image"):
    """Pillow's ways of saying a file is not a readable image, as one DataError naming the file."""
    try:
        yield
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{source}: the {what} does not decode ({error}); the file is corrupt, replace it") from None


# Modes Pillow opens 16-bit greyscale as (PNG, TIFF; ``I`` also for 32-bit integer TIFFs, refused when out of
# 16-bit range). Pillow's own ``convert("L")`` clips them (257 -> 255) instead of scaling: they are scaled here.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
GREY_MODES = ("L", "1", "LA", "La")  # one grey channel (bilevel 0/255), and alpha dropped for the last two
_alpha_noted: set[str] = set()  # folders whose dropped alpha channel was already said, in this process


def _note_alpha(source: str) -> None:
    """Say once per process and folder (a data set's images share it) that the alpha channel is dropped."""
    folder = os.path.dirname(source)
    if folder not in _alpha_noted:
        _alpha_noted.add(folder)
        logger.info(
            "%s: images have an alpha channel: dropped (the model sees the colour only; said once per folder)",
            folder or source,
        )


def scale_sixteen_bit(values: np.ndarray, source: str) -> np.ndarray:
    """16-bit grey levels -> uint8 by the bit depth: round(value * 255 / 65535), i.e. round(value / 257),
    so 0, 257, 65535 -> 0, 1, 255 (Pillow's ``convert("L")`` would clip 257 to 255 and lose the image)."""
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(
            f"{source}: 32-bit integer grey levels {values.min()}..{values.max()} do not fit 16 bits; "
            "save the image as 8- or 16-bit"
        )
    return ((values + 128) // 257).astype(np.uint8)  # no ties: value / 257 is never k + 1/2 for an integer value


def image_to_array(image: Image.Image, source: str, channels: int = 3) -> np.ndarray:
    """An opened Pillow image of any mode -> uint8 (H, W, 3) with ``channels`` 3 (grey replicated into each
    channel), or (H, W, 1) with ``channels`` 1 (colour turned to grey by Pillow's ``L`` luma,
    L = R * 299/1000 + G * 587/1000 + B * 114/1000).

    16-bit greyscale is scaled to 8 bits (``scale_sixteen_bit``); an alpha channel (RGBA, LA, PA, or a
    palette's transparency) is dropped, said once per folder; palette and CMYK images take Pillow's RGB;
    floating-point (``F``) images are refused: their range is unknown.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mode = image.mode
    if mode == "RGB" and channels == 3:  # the photo (every Carvana JPEG): Pillow's own pixels, as ever
        return np.asarray(image.convert("RGB"))
    if mode == "F":
        raise DataError(
            f"{source}: a 32-bit floating-point image (mode F) has no fixed range of grey levels; "
            "save it as an 8- or 16-bit image"
        )
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        _note_alpha(source)
    if mode in SIXTEEN_BIT_MODES:
        grey = scale_sixteen_bit(np.asarray(image), source)
    elif mode in GREY_MODES:
        grey = np.asarray(image.convert("L"))
    elif channels == 3:
        return np.asarray(image.convert("RGB"))
    elif mode == "RGB":
        grey = np.asarray(image.convert("L"))
    else:
        grey = np.asarray(image.convert("RGB").convert("L"))  # palette, CMYK, ...: their colours, then the luma
    grey = grey[..., None]
    return grey if channels == 1 else np.repeat(grey, 3, axis=2)


def decode_image_and_shape(
    data: bytes, source: str, reduce_to: tuple[int, int] | None = None, channels: int = 3
) -> tuple[np.ndarray, tuple[int, int]]:
    """Image bytes (any format Pillow reads) -> (uint8 (H, W, ``channels``), (height, width) before any
    reduction). ``channels`` 3: RGB, greyscale replicated; 1: grey (see ``image_to_array`` for every mode)."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    with _decoding(source), Image.open(io.BytesIO(data)) as image:  # Pillow's reading alone is guarded
        full_shape = (image.height, image.width)
        if reduce_to is not None:
            image.draft("RGB", tuple(math.floor(side * (1 - DRAFT_SHORTFALL)) for side in reduce_to[::-1]))
        array = image_to_array(image, source, channels)
    return array, full_shape


def decode_image(data: bytes, source: str, reduce_to: tuple[int, int] | None = None, channels: int = 3) -> np.ndarray:
    """Image bytes -> uint8 (H, W, ``channels``). ``reduce_to`` (height, width) lets libjpeg decode at
    1/2, 1/4 or 1/8 scale when that is at least as large, or short by at most 1%: several times faster."""
    return decode_image_and_shape(data, source, reduce_to, channels)[0]


def decode_mask(data: bytes, source: str) -> np.ndarray:
    """GIF bytes -> uint8 0/1 (H, W). Any non-black pixel is car, whatever the palette."""
    with _decoding(source, "mask"), Image.open(io.BytesIO(data)) as image:
        grey = image.convert("L")
    return (np.asarray(grey) > 0).astype(np.uint8)


def _image_shape(data: bytes, source: str, what: str = "image") -> tuple[int, int]:
    """(height, width) from the file's header alone."""
    with _decoding(source, what), Image.open(io.BytesIO(data)) as image:
        return image.height, image.width


def as_rgb(image: np.ndarray) -> np.ndarray:
    """A grey (H, W, 1) image as (H, W, 3) for drawing in colour; an RGB one as it is."""
    return np.repeat(image, 3, axis=2) if image.ndim == 3 and image.shape[2] == 1 else image


def to_chw(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 array (C 3 or 1; an (H, W) array is one channel) -> (C, H, W) uint8 tensor, the
    layout models take."""
    if image.ndim == 2:
        image = image[..., None]
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    # One channel needs no copy to be contiguous: a read-only decode (Pillow's buffer) is copied here instead.
    return torch.from_numpy(chw if chw.flags.writeable else chw.copy())


class CarvanaData:
    """One Carvana-format data folder. Every folder may instead be the competition's ``<name>.zip``.

    ``mask_source``: ``gif`` (train_masks/), ``csv`` (train_masks.csv) or ``auto`` (GIFs when present).
    ``in_channels`` (set after construction, e.g. from the config): images are read as RGB (3) or grey (1).
    """

    layout = "carvana"
    classes = ("background", "car")
    num_classes = 2
    ignore_index = None  # every pixel is labelled
    fixed_image_size = True  # every image 1918x1280: test images are checked against the models' size
    submission_format = "rle"  # the competition's img,rle_mask rows

    def __init__(self, root: str | Path, mask_source: str = "auto", test_images: Path | None = None):
        self.splits: dict[str, str] = {}  # no official split: the cars' folds
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data folder not found. {LAYOUT_HELP}")
        self.train_images = _open_files(self.root, "train", ".jpg")
        self.train_masks = _open_files(self.root, "train_masks", ".gif")
        if test_images is not None and not test_images.is_dir():
            raise DataError(f"--test-images {test_images}: not a folder of test images")
        self.test_images = _Folder(test_images, ".jpg") if test_images else _open_files(self.root, "test", ".jpg")
        if not any(files and files.names for files in (self.train_images, self.test_images)):
            raise DataError(f"{self.root}: no train or test images. {LAYOUT_HELP}")
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
        raise DataError(f"{self.root / name}: not found (nor {name}.zip). {LAYOUT_HELP}")

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
            raise DataError(f"{self.root}: no {split}/ folder or {split}.zip. {LAYOUT_HELP}")
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

    def read_mask(self, image_id: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 0/1 (H, W) mask of one training image, from its GIF or from train_masks.csv.

        An RLE row carries no size: ``shape`` (height, width), when the caller already knows it,
        saves reading the image's header again.
        """
        if self.mask_source == "gif":
            name = f"{image_id}_mask.gif"
            if self.train_masks is None or name not in self.train_masks.names:
                raise DataError(f"{self.root}: image {image_id}.jpg has no mask train_masks/{name}")
            return decode_mask(self.train_masks.read(name), self.train_masks.describe(name))
        masks = self._masks_from_csv()
        if image_id not in masks:
            raise DataError(f"{self.root}: image {image_id}.jpg has no row in train_masks.csv")
        try:
            return rle_decode(masks[image_id], shape or self.image_shape(image_id))
        except RLEError as error:
            raise DataError(f"{self._csv_path('train_masks.csv')}: row {image_id}.jpg: {error}") from None

    def check_sample(self, image_id: str) -> None:
        """Raise the DataError the loader would meet for this image and its mask, reading headers and the RLE
        row only: the image's size, and the mask's size (GIF header) or its runs (train_masks.csv)."""
        shape = self.image_shape(image_id)
        if self.mask_source == "gif":
            name = f"{image_id}_mask.gif"
            if self.train_masks is None or name not in self.train_masks.names:
                raise DataError(f"{self.root}: image {image_id}.jpg has no mask train_masks/{name}")
            mask_shape = _image_shape(self.train_masks.read(name), self.train_masks.describe(name), "mask")
        else:
            masks = self._masks_from_csv()
            if image_id not in masks:
                raise DataError(f"{self.root}: image {image_id}.jpg has no row in train_masks.csv")
            try:
                rle_runs(masks[image_id], shape[0] * shape[1])  # parsed and checked, not drawn
            except RLEError as error:
                raise DataError(f"{self._csv_path('train_masks.csv')}: row {image_id}.jpg: {error}") from None
            return
        if mask_shape != shape:
            raise DataError(
                f"{self.image_path(image_id)}: image is {shape[1]}x{shape[0]} but its mask is "
                f"{mask_shape[1]}x{mask_shape[0]}; the mask belongs to another image, replace it"
            )

    def class_pixel_counts(self, image_id: str) -> np.ndarray:
        """Background and car pixels of the image's mask (int64)."""
        return np.bincount(self.read_mask(image_id).ravel(), minlength=2).astype(np.int64)

    def checked_mask_histogram(self, image_id: str) -> np.ndarray:
        """Pixels of each of the 256 mask values (int64), the sample checked first as ``check_sample`` checks it."""
        self.check_sample(image_id)
        return value_histogram(self.read_mask(image_id))

    def read_sample(self, image_id: str, reduce_to: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) of one training image, checked to be the same size before any reduction."""
        image, full_shape = self.read_image_and_shape(image_id, "train", reduce_to)
        mask = self.read_mask(image_id, full_shape)
        if full_shape != mask.shape:
            raise DataError(
                f"{self.image_path(image_id)}: image is {full_shape[1]}x{full_shape[0]} but its mask is "
                f"{mask.shape[1]}x{mask.shape[0]}; the mask belongs to another image, replace it"
            )
        return image, mask


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-averaged resize to (height, width): the one resize used in training and inference alike.
    An (H, W, 1) image stays (h, w, 1) (OpenCV alone would drop the channel axis)."""
    resized = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return resized[..., None] if image.ndim == 3 and resized.ndim == 2 else resized


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a class-index mask to (height, width): averaging would invent classes
    between two others and smear the ignore index into its neighbours."""
    return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


class SegmentationDataset(torch.utils.data.Dataset):
    """(image uint8 (C, H, W), mask) for a list of training ids of any data layout; C is the data's
    ``in_channels`` (3, or 1 for grey).

    The mask is float32 (1, H, W) when the data is binary (Carvana: 0/1; other layouts may also hold
    the ignore index), the model's one sigmoid channel; int64 (H, W) class indices for multi-class data.
    ``size`` (height, width) resizes both (JPEG decoded at reduced scale where it can), or the
    image alone with ``full_size_masks`` (validation scores at full resolution);
    ``transform`` is an albumentations transform applied to image and mask together.
    Images stay uint8: the model normalises them on the device, a quarter of the bytes to copy.
    """

    def __init__(
        self,
        data,
        image_ids: list[str],
        size: tuple[int, int] | None = None,
        transform=None,
        full_size_masks: bool = False,
    ):
        data.check_masks(image_ids)
        self.data = data
        self.image_ids = list(image_ids)
        self.size = size
        self.transform = transform
        self.full_size_masks = full_size_masks
        self.binary = data.num_classes == 2
        # Carvana's masks are 0/1 only: an area-averaged resize thresholded at half keeps edges smooth.
        # Masks that may hold several classes or the ignore index take the nearest pixel instead.
        self.smooth_resize = data.layout == "carvana"

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_id = self.image_ids[index]
        image, mask = self.data.read_sample(image_id, reduce_to=self.size)
        if self.size is not None:
            image = resize_image(image, self.size)
            if not self.full_size_masks:
                if self.smooth_resize:
                    mask = (resize_image(mask * 255, self.size) > 127).astype(np.uint8)
                else:
                    mask = resize_mask(mask, self.size)
        if self.transform is not None:
            augmented = self.transform(image=image, mask=mask)
            image, mask = augmented["image"], augmented["mask"]
        image = to_chw(image)
        mask = torch.from_numpy(np.ascontiguousarray(mask))
        return image, mask.unsqueeze(0).float() if self.binary else mask.long()


def same_size_batches(shapes: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices in batches of at most ``batch_size`` images of one size, in order within each size: full-resolution
    masks of different sizes (Oxford-IIIT Pet, people's own photos) cannot be stacked into one batch."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for index, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(index)
    return [
        group[start : start + batch_size] for group in by_shape.values() for start in range(0, len(group), batch_size)
    ]
