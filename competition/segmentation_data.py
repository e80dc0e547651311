"""The base of the data layouts read from image files: finding files, class names, index masks, official id lists."""

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from competition.data import _decoding, decode_image_and_shape, decoded_image_shape
from competition.errors import ConfigError, DataError
from competition.folds import labelled_folds
from competition.layout_registry import LAYOUT_HELP, LAYOUTS, known_data_set_hint
from competition.mask_values import check_packed_values, label_counts, looks_packed, value_histogram
from competition.slides import header_shape
from competition.splits import read_id_list, resolve

logger = logging.getLogger("competition.layouts")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".gif")


def files_by_stem(folder: Path, extensions: tuple[str, ...], recursive: bool = False) -> dict[str, Path]:
    """stem -> file of the given extensions in ``folder`` (and its subfolders when ``recursive``: Cityscapes keeps
    one folder per city), macOS ``._`` shadow files left out; a stem given twice (``a.jpg`` and ``a.png``, or
    the same name in two subfolders) is refused, since it would be unclear which one is meant."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if path.suffix.lower() not in extensions or path.name.startswith("._") or not path.is_file():
            continue
        if path.stem in found:
            first, second = (found[path.stem].relative_to(folder), path.relative_to(folder))
            raise DataError(f"{folder}: {first} and {second} share a name; keep one of them")
        found[path.stem] = path
    return found


def read_class_names(path: Path) -> list[str]:
    """Class names from ``classes.txt`` (one a line, background first) or labelme's ``labels.txt``
    (``__ignore__`` left out: it names the ignore index; ``_background_`` is the background)."""
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [name for name in names if name != "__ignore__"]


def parse_classes(text: str) -> list[str]:
    """``--classes background,cat,dog`` -> its names, checked: at least two, none twice."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if len(names) < 2:
        raise DataError(f"--classes {text!r}: name at least two classes, background first, e.g. background,cat")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"--classes {text!r}: {repeated} given more than once")
    return names


def read_index_mask(data: bytes, source: str, lossy: bool = False) -> np.ndarray:
    """A mask file -> its class indices (H, W) uint8, read as stored: palette ('P') indices or greyscale values,
    never through an RGB conversion (which would turn indices into colours). ``lossy`` (a JPEG mask to be
    snapped) takes a colour JPEG's grey levels, since JPEG encoders often store grey masks as colour."""
    with _decoding(source, "mask"), Image.open(io.BytesIO(data)) as image:
        mode = image.mode
        if lossy and mode in ("RGB", "CMYK", "YCbCr"):
            image, mode = image.convert("L"), "L"
        if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA"):
            raise DataError(
                f"{source}: the mask is {mode}; masks must hold class indices (a palette or greyscale PNG), or "
                "colours listed in a colour table: pass --colors with a name,r,g,b CSV"
            )
        values = np.asarray(image)
    if values.dtype == bool:
        return values.astype(np.uint8)
    if values.max(initial=0) > 255:
        raise DataError(f"{source}: mask values up to {values.max()}; class indices must be 0..255")
    return values.astype(np.uint8)


class SegmentationData:
    """A data folder of images and class-index masks, read through one layout's ``_mask`` rule: the base of every
    layout but Carvana's, whose class (competition.carvana) has the same methods and facts, so that training,
    folds, inference and inspect_data take either. Image ids are file stems.

    A layout sets ``layout`` (its registry name) and implements ``detect``, ``read``, ``_mask`` and
    ``mask_source``; the facts below hold for images of any size and classes read from the data.
    """

    layout = "folders"
    needs = ""  # what the layout needs in a data folder, said when --layout names it and the folder holds none
    fixed_image_size = False  # images of any size: validation batches group images of one size
    fixed_classes = False  # classes (and stored mask values) come from the data and are saved into the run's config
    submission_format = "png"  # a palette PNG of class indices per test image
    smooth_mask_resize = False  # masks of several classes or the ignore index: resized to the nearest pixel
    # Multilabel data (classes that overlap, --head multilabel): a mask holds bit k for class k and 255 for ignored
    # pixels (mask_values.pack_labels), its classes named without a background. Layouts set it from the run's head.
    multilabel = False
    reads_folder_settings = False  # whether FOLDER_SETTINGS (--images, --masks, --colors, ...) apply
    reads_images_folder = False  # whether --images alone of those applies (a layout whose masks are not files)
    # Set by layouts whose stored mask values are not the class indices (see mask_values.value_lookup).
    mask_values: list[int] | None = None
    value_lookup: np.ndarray | None = None
    known_values: np.ndarray | None = None
    in_channels = 3  # the image channels models take; open_data sets the run's
    # Problems with the classes themselves, found while reading the data (a void value read as a class), one a line:
    # inspect_data lists them, training warns of them.
    class_problems: tuple[str, ...] = ()
    # What may be wrong with them and the data cannot tell (an unbroken run of values whose last may be void):
    # inspect_data lists them to check, without calling them problems.
    class_doubts: tuple[str, ...] = ()

    def __init__(
        self,
        root: Path,
        images: dict[str, Path],
        classes: list[str],
        ignore_index: int,
        test: dict,
        stored_ignore_index: int | None = None,
    ):
        self.root = root
        self.images = images
        self.test_images = test
        self.classes = classes
        self.ignore_index = ignore_index  # as read: what losses and metrics skip
        self.stored_ignore_index = ignore_index if stored_ignore_index is None else stored_ignore_index
        self.splits: dict[str, str] = {}  # image id -> its official split (--split), when one is given

    @staticmethod
    def detect(root: Path) -> bool:
        """Whether ``root`` holds this layout, from its folder and file names."""
        raise NotImplementedError

    @classmethod
    def read(cls, root: Path, test_folder: Path | None, options: dict) -> "SegmentationData":
        """The layout's reader of ``root``, built from ``open_data``'s settings (``options``)."""
        raise NotImplementedError

    @classmethod
    def open(cls, root: Path, test_folder: Path | None, options: dict) -> "SegmentationData":
        """The data folder read by ``read``, its official split applied (``options["split_parts"]`` given as id
        lists), checked to hold images and an ignore index outside the classes."""
        forced = options.get("forced", False)  # named by --layout: the help then says what it needs, not to force one
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found. {'Check --data-dir' if forced else LAYOUT_HELP}")
        data = cls.read(root, test_folder, options)
        if options.get("multilabel") and not data.multilabel:
            raise ConfigError(
                f"--head multilabel: {root} is read as the {data.layout} layout, whose masks hold one class per "
                "pixel; multilabel masks come from image/mask folders (packed bits) or a per-class RLE table"
            )
        if options["by_id_lists"]:  # --test-images wins over the test list
            apply_id_lists(data, options["split_parts"], keep_test_images=test_folder is not None)
        if not data.images and not data.test_images:
            if forced:
                raise DataError(f"{root}: no images found as --layout {cls.layout}: {not_this_layout(cls, root)}")
            raise DataError(
                f"{root}: no images found as the {data.layout} layout.{known_data_set_hint(root)} {LAYOUT_HELP}"
            )
        if test_folder is not None and not data.test_images:
            raise DataError(f"--test-images {test_folder}: no images there ({', '.join(IMAGE_EXTENSIONS)})")
        if data.ignore_index < data.num_classes:
            raise DataError(f"--ignore-index {data.ignore_index} is one of the {data.num_classes} classes; use 255")
        return data

    @staticmethod
    def masks_to_count(train_count: int, total: int, pixel_counts_needed: bool) -> int:
        """Masks counted before training, of the ``total`` (training images first): all of them, so that a class no
        training mask holds is said before training."""
        return total

    def folds(self, n_folds: int, seed: int, *, group_regex, stratify, stratify_classes, progress):
        """(folds, the folds file's text): by the official split when it has a val part, else grouped by
        ``group_regex`` and stratified by class."""
        return labelled_folds(
            self,
            n_folds,
            seed,
            group_regex=group_regex,
            stratify=stratify,
            stratify_classes=stratify_classes,
            progress=progress,
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_ids(self) -> list[str]:
        return sorted(self.images)

    def test_ids(self) -> list[str]:
        return sorted(self.test_images)

    def _image_file(self, image_id: str, split: str) -> Path:
        files = self.images if split == "train" else self.test_images
        if image_id not in files:
            raise DataError(f"{self.root}: no {split} image {image_id}")
        return files[image_id]

    def image_path(self, image_id: str, split: str = "train") -> str:
        return str(self._image_file(image_id, split))

    def read_image(self, image_id: str, split: str = "train", reduce_to=None) -> np.ndarray:
        return self.read_image_and_shape(image_id, split, reduce_to)[0]

    def read_image_and_shape(self, image_id: str, split: str = "train", reduce_to=None):
        path = self._image_file(image_id, split)
        return decode_image_and_shape(path.read_bytes(), str(path), reduce_to, self.in_channels)

    def image_shape(self, image_id: str, split: str = "train") -> tuple[int, int]:
        """(height, width) from the file's header alone: a slide's pixels are neither read nor decoded."""
        return header_shape(self._image_file(image_id, split))

    def mask_rules(self) -> str:
        """What reading a mask file's values as classes depends on besides the file (classes, stored values, the
        ignore index, a colour table, snapping): the key of a mask decoded once into the slide cache."""
        table = getattr(self, "table", None)
        return repr(
            (self.layout, self.classes, self.mask_values, self.stored_ignore_index, self.ignore_index, self.multilabel)
            + (table.key if table is not None else None, getattr(self, "snap", False))
            + (getattr(self, "unknown_values", ""), getattr(self, "unknown_colors", ""))
        )

    def _mask(self, image_id: str, split: str = "train") -> tuple[np.ndarray, str]:
        """(the mask's class indices before checking, the file they came from)."""
        raise NotImplementedError

    def mask_source(self, image_id: str) -> str:
        raise NotImplementedError

    def read_mask(self, image_id: str, shape: tuple[int, int] | None = None, split: str = "train") -> np.ndarray:
        """uint8 (H, W) class indices, the ignore index for pixels left out; a value that is neither stops.
        ``split`` "test": a test image's mask (a test split's), for scoring predictions."""
        return self.classes_of(*self._mask(image_id, split))

    def classes_of(self, mask: np.ndarray, source: str) -> np.ndarray:
        """A mask's values as ``_mask`` gives them (the whole mask, or any window of it) -> uint8 class indices (or
        packed bits), the ignore index for pixels left out; a value that is neither stops, naming ``source``."""
        if self.multilabel:
            check_packed_values(mask, self.num_classes, source)
            return mask
        if self.value_lookup is None:
            self._check_values(mask, source)
            return mask
        unknown = np.flatnonzero(value_histogram(mask) * ~self.known_values)
        if unknown.size:
            stored = ", ".join(f"{value} {name}" for value, name in zip(self.mask_values, self.classes))
            raise DataError(
                f"{source}: mask value(s) {unknown[:5].tolist()} are neither a class's value ({stored}) nor the "
                f"ignore index {self.stored_ignore_index}; fix the mask, give each class's value with --mask-values, "
                "or pass --unknown-values ignore to make such pixels the ignore index"
            )
        return self.value_lookup[mask]

    def _check_values(self, mask: np.ndarray, source: str) -> None:
        counts = value_histogram(mask)
        counts[self.ignore_index] = 0
        bad = np.flatnonzero(counts[self.num_classes :]) + self.num_classes
        if bad.size:
            void = (
                f"if {bad[0]} marks void (unlabelled) pixels pass --ignore-index {bad[0]}; else "
                if bad.size == 1
                else ""
            )
            if looks_packed(np.flatnonzero(counts).tolist()):
                void = (
                    "if the masks hold overlapping classes as bits (bit k for class k) train with --head multilabel "
                    "and --classes naming them without a background; else "
                )
            raise DataError(
                f"{source}: mask value(s) {bad[:5].tolist()} are neither a class (0..{self.num_classes - 1}: "
                f"{', '.join(self.classes)}) nor the ignore index {self.ignore_index}; {void}name every class in "
                "classes.txt or --classes, fix the mask, or pass --unknown-values ignore to make such pixels ignored"
            )

    def test_mask_ids(self) -> list[str]:
        """The test images that have a mask (a test split with its masks): what infer.py's masks are scored on."""
        return [image_id for image_id in self.test_ids() if self.mask_source_exists(image_id)]

    def mask_source_exists(self, image_id: str) -> bool:
        return False

    def check_masks(self, image_ids: list[str]) -> None:
        missing = [image_id for image_id in image_ids if image_id not in self.images]
        if missing:
            raise DataError(f"{self.root}: {len(missing)} image(s) without a mask, e.g. {missing[:3]}")

    def check_sample(self, image_id: str) -> None:
        """Raise the DataError the loader would meet for this image and its mask."""
        self._checked_mask(image_id)

    def _checked_mask(self, image_id: str) -> np.ndarray:
        """The sample's mask, its image decoded to the end of its file (``decoded_image_shape``) and the two
        checked to be one size: each file read once."""
        shape = decoded_image_shape(self, image_id)
        mask = self.read_mask(image_id)
        self._same_size(image_id, shape, mask.shape)
        return mask

    def _same_size(self, image_id: str, shape: tuple[int, int], mask_shape: tuple[int, int]) -> None:
        if mask_shape != shape:
            raise DataError(
                f"{self.image_path(image_id)}: image is {shape[1]}x{shape[0]} but its mask "
                f"{self.mask_source(image_id)} is {mask_shape[1]}x{mask_shape[0]}; the mask belongs to another image"
            )

    def read_sample(self, image_id: str, reduce_to=None) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) of one training image, checked to be the same size before any reduction."""
        image, full_shape = self.read_image_and_shape(image_id, "train", reduce_to)
        mask = self.read_mask(image_id)
        self._same_size(image_id, full_shape, mask.shape)
        return image, mask

    def masks_line(self) -> str:
        """What inspect_data says the masks are, when the layout says it itself (empty: the masks' values tell)."""
        return ""

    def class_pixel_counts(self, image_id: str) -> np.ndarray:
        """Pixels of each class in the image's mask (int64, one per class), the ignore index left out."""
        return self.class_counts(value_histogram(self.read_mask(image_id)))

    def class_counts(self, histograms: np.ndarray) -> np.ndarray:
        """Pixels of each class (..., classes) from masks' 256-value histograms (..., 256): the counts of the class
        indices, or of each class's bit in multilabel masks; the ignore index left out."""
        if self.multilabel:
            return label_counts(histograms, self.num_classes)
        return np.asarray(histograms)[..., : self.num_classes]

    def checked_mask_histogram(self, image_id: str) -> np.ndarray:
        """Pixels of each of the 256 mask values (int64), from one read of the sample, checked as ``check_sample``
        checks it."""
        return value_histogram(self._checked_mask(image_id))


def classes_from(root: Path, classes: str, file_names: tuple[str, ...]) -> list[str] | None:
    """``--classes`` when given, else the first classes file found in the data folder, else None."""
    if classes:
        return parse_classes(classes)
    for name in file_names:
        if (root / name).is_file():
            names = read_class_names(root / name)
            if len(names) < 2:
                raise DataError(f"{root / name}: name at least two classes, one a line, background first")
            return names
    return None


def not_this_layout(layout: type, root: Path) -> str:
    """What a layout named by --layout needs, what ``root`` holds instead, and the layout that holds, if one
    does: e.g. ``it needs labelme JSON files (*.json) beside their images; found images/, masks/, classes.txt
    (read as the folders layout: --layout folders, or auto)``."""
    entries = sorted(root.iterdir()) if root.is_dir() else []
    shown = [entry.name + "/" * entry.is_dir() for entry in entries if not entry.name.startswith(".")][:8]
    found = ", ".join(shown) + (f" and {len(entries) - len(shown)} more" if len(entries) > len(shown) else "")
    others = [name for name, other in LAYOUTS.items() if other is not layout and other.detect(root)]
    hint = f" (read as the {others[0]} layout: --layout {others[0]}, or auto)" if others else ""
    return f"it needs {layout.needs or LAYOUT_HELP}; found {found or 'nothing'}{hint}{known_data_set_hint(root)}"


def apply_id_lists(data: SegmentationData, parts: dict[str, str], keep_test_images: bool = False) -> None:
    """An official split given as id lists: each image's split noted; the test list's images become the test
    images (their masks unused); labelled images in no list are left out, since no published score uses them."""
    listed: dict[str, str] = {}
    for name, spec in parts.items():
        path = resolve(data.root, spec)
        ids = read_id_list(path)
        pool = data.images if name != "test" else {**data.test_images, **data.images}
        missing = [image_id for image_id in ids if image_id not in pool]
        if missing:
            raise DataError(
                f"{path}: {len(missing)} of its {len(ids)} id(s) have no image{' and mask' * (name != 'test')} "
                f"in {data.root}, e.g. {missing[:3]}"
            )
        for image_id in ids:
            if listed.setdefault(image_id, name) != name:
                raise DataError(f"{path}: {image_id} is also in the {listed[image_id]} list; splits must not overlap")
    test_ids = [image_id for image_id, name in listed.items() if name == "test"]
    if "test" in parts and not keep_test_images:
        data.test_images = {image_id: data.images.get(image_id) or data.test_images[image_id] for image_id in test_ids}
    unlisted = sorted(set(data.images) - set(listed))
    if unlisted:
        logger.info(
            "%s: %d labelled image(s) in no split list are left out, e.g. %s", data.root, len(unlisted), unlisted[:3]
        )
    data.images = {image_id: path for image_id, path in data.images.items() if listed.get(image_id, "test") != "test"}
    data.splits = {image_id: name for image_id, name in listed.items() if name != "test"}
