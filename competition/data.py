"""Decoding of image and mask files (any format Pillow reads), resizing, and the torch Dataset of any layout."""

import contextlib
import io
import logging
import math
import os
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from competition.errors import DataError, ProjectError
from competition.mask_values import label_targets

logger = logging.getLogger(__name__)


def read_csv_file(path: str | Path, **options) -> pd.DataFrame:
    """``pd.read_csv`` with every way a file can fail to be a CSV said in one line naming it."""
    try:
        return pd.read_csv(path, **options)
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, zipfile.BadZipFile, OSError) as error:
        raise DataError(f"{path}: not a readable CSV ({' '.join(str(error).split())})") from None


def image_id_of(file_name: str) -> str:
    """``0cdf5b5d0ce1_05.jpg`` (a CSV ``img`` value or a file name) -> ``0cdf5b5d0ce1_05``."""
    return Path(file_name).name.removesuffix(".jpg").removesuffix("_mask.gif")


# A reduced DCT scale that falls short of the target by at most this much is still taken (1918 / 2 = 959
# for a 960-wide target): decoding 640x960 costs a sixth of a full decode, and the resize makes up the pixel.
DRAFT_SHORTFALL = 0.01


@contextlib.contextmanager
def _decoding(source: str, what: str = "image"):
    """Pillow's ways of saying a file is not a readable image, as one DataError naming the file."""
    try:
        yield
    except Image.DecompressionBombError as error:  # not a broken file: one larger than Pillow decodes unasked
        raise DataError(
            f"{source}: the {what} is larger than Pillow decodes whole ({error}); an image this large is a slide: "
            "train and predict it by windows with --tile (masks as tiled TIFFs or an RLE table)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        # Pillow names an unknown format by its stream object's address: the file is named here instead.
        reason = "not an image format Pillow reads" if isinstance(error, UnidentifiedImageError) else error
        raise DataError(
            f"{source}: the {what} does not decode ({reason}); the file is corrupt or cut short: replace it, "
            "or remove the sample"
        ) from None


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
            image.draft("RGB", tuple(max(1, math.floor(side * (1 - DRAFT_SHORTFALL))) for side in reduce_to[::-1]))
        array = image_to_array(image, source, channels)
    return array, full_shape


def decode_image(data: bytes, source: str, reduce_to: tuple[int, int] | None = None, channels: int = 3) -> np.ndarray:
    """Image bytes -> uint8 (H, W, ``channels``). ``reduce_to`` (height, width) lets libjpeg decode at
    1/2, 1/4 or 1/8 scale when that is at least as large, or short by at most 1%: several times faster."""
    return decode_image_and_shape(data, source, reduce_to, channels)[0]


# ``reduce_to`` of the check that an image file is whole: the smallest scale its format decodes at. libjpeg still
# reads every coefficient of the file at 1/8 and reduces only the inverse DCT, so a truncated or corrupt JPEG
# fails there as at full size, in a fraction of the time; PNG, TIFF, ... have no reduced scale and decode in full.
SMALLEST_SCALE = (1, 1)


def decoded_image_shape(data, image_id: str) -> tuple[int, int]:
    """(height, width) of a training image of ``data`` (any layout) decoded to the end of its file as the loader
    decodes it (its mode's rules too), at the smallest scale: the one check that an image file is whole, run by
    the pre-check before training and by inspect_data alike. A header read alone would pass a file cut short,
    and the loader would meet it in the first epoch."""
    return data.read_image_and_shape(image_id, "train", SMALLEST_SCALE)[1]


def decode_mask(data: bytes, source: str) -> np.ndarray:
    """GIF bytes -> uint8 0/1 (H, W). Any non-black pixel is car, whatever the palette."""
    with _decoding(source, "mask"), Image.open(io.BytesIO(data)) as image:
        grey = image.convert("L")
    return (np.asarray(grey) > 0).astype(np.uint8)


def _image_shape(data: bytes, source: str, what: str = "image") -> tuple[int, int]:
    """(height, width) from the file's header alone."""
    with _decoding(source, what), Image.open(io.BytesIO(data)) as image:
        return image.height, image.width


def decoded_file_shape(data: bytes, source: str, what: str = "mask") -> tuple[int, int]:
    """(height, width) of an image or mask file decoded to its end, its pixels left as stored (a Carvana GIF in
    half the time of the 0/1 mask made from it, which cannot fail once the file decodes)."""
    with _decoding(source, what), Image.open(io.BytesIO(data)) as image:
        image.load()
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


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-averaged resize to (height, width): the one resize used in training and inference alike.
    An (H, W, 1) image stays (h, w, 1) (OpenCV alone would drop the channel axis)."""
    resized = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return resized[..., None] if image.ndim == 3 and resized.ndim == 2 else resized


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a class-index mask to (height, width): averaging would invent classes
    between two others and smear the ignore index into its neighbours."""
    return cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


def raised_in_worker(error: ProjectError) -> ProjectError:
    """The error a DataLoader worker raised, as it was raised: torch re-raises it in the main process as its class
    made from "Caught DataError in DataLoader worker process 0.\nOriginal Traceback ..." and the worker's whole
    traceback, whose last line holds the original message (one line, as every project error's is). An error not
    raised in a worker is returned as it is."""
    text = str(error)
    if not (text.startswith("Caught ") and " in DataLoader worker process " in text.split("\n", 1)[0]):
        return error
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    raised = [line.removeprefix(prefix) for line in text.splitlines() if line.startswith(prefix)]
    return type(error)(raised[-1]) if raised else error


class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose workers' project errors reach the user as their one-line message, never as the worker's
    traceback: each loop over it (training, validation, prediction) gets this by construction."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        except ProjectError as error:
            raised = raised_in_worker(error)
            if raised is error:
                raise
            raise raised from None


class SegmentationDataset(torch.utils.data.Dataset):
    """(image uint8 (C, H, W), mask) for a list of training ids of any data layout; C is the data's
    ``in_channels`` (3, or 1 for grey).

    The mask is float32 (1, H, W) when the data is binary (Carvana: 0/1; other layouts may also hold
    the ignore index), the model's one sigmoid channel; int64 (H, W) class indices for multi-class data; float32
    (K, H, W) of 0/1 for multilabel data (``data.multilabel``: its packed masks unpacked after resizing and
    augmentation, an ignored pixel holding the ignore index 255 in every channel, as binary targets hold it).
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
        self.multilabel = getattr(data, "multilabel", False)
        self.binary = data.num_classes == 2 and not self.multilabel
        # Masks that may hold several classes or the ignore index take the nearest pixel; 0/1 masks (the layout
        # says so) an area-averaged resize thresholded at half, which keeps edges smooth. Packed multilabel masks
        # always take the nearest pixel: averaging bits would invent classes.
        self.smooth_resize = data.smooth_mask_resize and not self.multilabel

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.data.read_sample(self.image_ids[index], reduce_to=self.size)
        return self.prepared(image, mask, self.smooth_resize)

    def prepared(self, image: np.ndarray, mask: np.ndarray, smooth_resize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A sample as read (``image``, ``mask`` uint8 (H, W)) resized, augmented and made tensors; a mask that
        may hold the ignore index takes ``smooth_resize`` False (the nearest pixel)."""
        if self.size is not None:
            image = resize_image(image, self.size)
            if not self.full_size_masks:
                if smooth_resize:
                    mask = (resize_image(mask * 255, self.size) > 127).astype(np.uint8)
                else:
                    mask = resize_mask(mask, self.size)
        if self.transform is not None:
            augmented = self.transform(image=image, mask=mask)
            image, mask = augmented["image"], augmented["mask"]
        image = to_chw(image)
        if self.multilabel:
            return image, torch.from_numpy(label_targets(np.ascontiguousarray(mask), self.data.num_classes))
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
