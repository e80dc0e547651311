"""Data layouts beyond Carvana: image/mask folders (VOC's names too), labelme JSON and Oxford-IIIT Pet trimaps."""

import base64
import io
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from competition.data import CarvanaData, _decoding, _image_shape, decode_image_and_shape, image_to_array
from competition.environment import default_work_dir
from competition.errors import ConfigError, DataError
from competition.mask_values import (
    binary_values,
    describe_binary,
    label_ignore_index,
    parse_mask_values,
    skipping_ignore,
    value_histogram,
    value_lookup,
)
from competition.splits import is_id_list, parse_split, read_id_list, resolve, split_folders
from competition.survey import stored_value_histogram

logger = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112  # the EXIF tag of a photo's orientation
LAYOUTS = ("auto", "carvana", "folders", "labelme", "pet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".gif")
LOSSY_MASK_EXTENSIONS = (".jpg", ".jpeg")  # found so that they can be refused with the reason, or snapped
# Colour tables looked for in the data folder when --colors names none: Kaggle CamVid's, CamVid's, generic names.
COLOR_TABLE_NAMES = ("class_dict.csv", "label_colors.txt", "colors.csv", "colors.txt")
# (image folder, mask folder) pairs the folders layout recognises, in the order they are tried.
FOLDER_PAIRS = (
    ("images", "masks"),
    ("JPEGImages", "SegmentationClass"),
    ("JPEGImages", "SegmentationClassPNG"),
)
# Oxford-IIIT Pet trimap values: 1 pet, 2 background, 3 border (the undecided pixels around the pet).
PET_TRIMAP = {"pet": 1, "background": 2, "border": 3}
LAYOUT_HELP = (
    "Expected one of: Carvana (train/ + train_masks/ or their zips); image/mask folders (images/ + masks/, or "
    "VOC's JPEGImages/ + SegmentationClass/ or SegmentationClassPNG/, masks named as their images); labelme JSON "
    "files beside their images; Oxford-IIIT Pet (images/ + annotations/trimaps/). Force one with --layout"
)


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
    """A data folder of images and class-index masks, read through one layout's ``_mask`` rule.

    The methods match ``CarvanaData``'s, so training and inference take either. Image ids are file stems.
    """

    layout = "folders"
    # Set by layouts whose stored mask values are not the class indices (see mask_values.value_lookup).
    mask_values: list[int] | None = None
    value_lookup: np.ndarray | None = None
    known_values: np.ndarray | None = None
    in_channels = 3  # the image channels models take; open_data sets the run's
    fixed_image_size = False  # images of any size: each predicted at its own
    submission_format = "png"  # a palette PNG of class indices per test image

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
        path = self._image_file(image_id, split)
        return _image_shape(path.read_bytes(), str(path))

    def _mask(self, image_id: str, split: str = "train") -> tuple[np.ndarray, str]:
        """(the mask's class indices before checking, the file they came from)."""
        raise NotImplementedError

    def mask_source(self, image_id: str) -> str:
        raise NotImplementedError

    def read_mask(self, image_id: str, shape: tuple[int, int] | None = None, split: str = "train") -> np.ndarray:
        """uint8 (H, W) class indices, the ignore index for pixels left out; a value that is neither stops.
        ``split`` "test": a test image's mask (a test split's), for scoring predictions."""
        mask, source = self._mask(image_id, split)
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
            raise DataError(
                f"{source}: mask value(s) {bad[:5].tolist()} are neither a class (0..{self.num_classes - 1}: "
                f"{', '.join(self.classes)}) nor the ignore index {self.ignore_index}; name the classes in "
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
        self.read_sample(image_id)

    def read_sample(self, image_id: str, reduce_to=None) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask) of one training image, checked to be the same size before any reduction."""
        image, full_shape = self.read_image_and_shape(image_id, "train", reduce_to)
        mask = self.read_mask(image_id)
        if mask.shape != full_shape:
            raise DataError(
                f"{self.image_path(image_id)}: image is {full_shape[1]}x{full_shape[0]} but its mask "
                f"{self.mask_source(image_id)} is {mask.shape[1]}x{mask.shape[0]}; the mask belongs to another image"
            )
        return image, mask

    def class_pixel_counts(self, image_id: str) -> np.ndarray:
        """Pixels of each class in the image's mask (int64, one per class), the ignore index left out."""
        return value_histogram(self.read_mask(image_id))[: self.num_classes]

    def checked_mask_histogram(self, image_id: str) -> np.ndarray:
        """Pixels of each of the 256 mask values (int64), from one read of the sample as training reads it."""
        _, mask = self.read_sample(image_id)
        return value_histogram(mask)


class FolderData(SegmentationData):
    """Images and masks in folders, same stems (past ``image_suffix``/``mask_suffix``): ``images/`` + ``masks/``, VOC's
    ``JPEGImages/`` + ``SegmentationClass[PNG]/``, folders named by ``images``/``masks``, or one folder pair per
    official split. Masks hold class indices, other values per class (``mask_values``, two-valued masks
    recognised), or colours of a colour table."""

    layout = "folders"

    def __init__(
        self,
        root: Path,
        classes: str,
        ignore_index: int,
        test_images: Path | None,
        *,
        images: str = "",
        masks: str = "",
        mask_suffix: str = "",
        image_suffix: str = "",
        split_folders_by_name: dict[str, str] | None = None,
        colors: str = "",
        unknown_colors: str = "error",
        mask_values: str = "",
        unknown_values: str = "error",
        snap_mask_values: bool = False,
    ):
        self.root, self.ignore_index = root, ignore_index  # the mask scan below needs them
        self.unknown_colors, self.unknown_values, self.snap = unknown_colors, unknown_values, snap_mask_values
        parts = (
            [(name, *split_folders(root, name, spec, masks)) for name, spec in split_folders_by_name.items()]
            if split_folders_by_name
            else [(None, *pair_folders(root, images, masks))]
        )
        explicit = bool(split_folders_by_name or images or masks)
        found, test, folder_splits = self.find_pairs(parts, (image_suffix, mask_suffix), explicit)
        self.refuse_lossy_masks()
        if test_images is not None or not test:  # --test-images wins over a test split
            test = files_by_stem(test_images or root / "test", IMAGE_EXTENSIONS)
        self.table = self.cache = None
        table_path = color_table_path(root, colors)
        if table_path is not None:
            if unknown_values != "error":
                raise ConfigError(
                    f"--unknown-values is for masks of stored values; {table_path} makes these colour masks: "
                    "pass --unknown-colors ignore instead"
                )
            names = self.open_color_table(table_path, classes)
        else:
            names = self.resolve_values(found, _classes_from(root, classes, ("classes.txt",)), mask_values)
        super().__init__(root, found, names, label_ignore_index(ignore_index, len(names)), test, ignore_index)
        self.splits = {stem: name for stem, name in folder_splits.items() if name is not None}

    def find_pairs(self, parts, suffixes: tuple[str, str], explicit: bool) -> tuple[dict, dict, dict]:
        """(image id -> image with a mask, image id -> test image, image id -> split name) of every
        (split, image folder, mask folder) part; the masks are kept in ``self.masks``."""
        found, test, folder_splits = {}, {}, {}
        self.masks, self.test_masks = {}, {}
        for name, image_folder, mask_folder in parts:
            split_images, split_masks = match_pair(image_folder, mask_folder, suffixes, explicit, name == "test")
            if name == "test":  # its masks, when it has them, score infer.py's masks (competition.metrics)
                test.update(split_images)
                self.test_masks.update(split_masks)  # apart: splits may reuse names (0001.png in train and test)
                continue
            for stem in split_images:
                if stem in found:
                    raise DataError(f"{split_images[stem]}: image {stem} is also {found[stem]}; ids must be unique")
                folder_splits[stem] = name
            found.update(split_images)
            self.masks.update(split_masks)
        return found, test, folder_splits

    def refuse_lossy_masks(self) -> None:
        lossy = [path for path in self.masks.values() if path.suffix.lower() in LOSSY_MASK_EXTENSIONS]
        if lossy and not self.snap:
            raise DataError(
                f"{lossy[0]}: a JPEG mask ({len(lossy)} in all); JPEG is lossy and smears the class values around "
                "every edge: save the masks as PNG, or pass --snap-mask-values to map each value to the nearest class's"
            )

    def open_color_table(self, path: Path, classes: str) -> list[str]:
        """Masks painted in colours: the table's class names; masks decoded once into a cache in the work dir."""
        from competition.colors import MaskCache, read_color_table

        self.table = read_color_table(path)  # first for its classes, then with the ignore index they leave
        label_ignore = label_ignore_index(self.ignore_index, len(self.table.names))
        if label_ignore != 255:
            self.table = read_color_table(path, label_ignore)
        names = list(self.table.names)
        if classes:
            given = parse_classes(classes)
            if len(given) != len(names):
                raise DataError(f"--classes {classes!r}: the colour table {path} names {len(names)}: {names}")
            names = given
        settings = f"{self.table.key}-{self.unknown_colors}-{self.snap}-{label_ignore}"
        self.cache = MaskCache(default_work_dir() / "cache" / "masks", settings)
        logger.info(
            "%s: %d colours for %d classes; masks decoded once into %s",
            path,
            len(self.table.colors),
            len(names),
            self.cache.folder,
        )
        return names

    def resolve_values(self, images: dict, given: list[str] | None, mask_values: str) -> list[str]:
        """The class names and each class's stored mask value: given (``mask_values``), recognised from
        two-valued masks (0/255: 255 is the foreground, said in one line), the most common values of snapped
        masks, or the class index itself."""
        values = parse_mask_values(mask_values) if mask_values else None
        if self.unknown_values == "ignore":
            self.check_unknown_values_ignored(values, given)
        if values is not None:
            if given is not None and len(given) != len(values):
                raise DataError(f"--mask-values {mask_values!r}: {len(values)} values for {len(given)} classes {given}")
            names = given or (
                ["background", "foreground"] if len(values) == 2 else [f"class_{i}" for i in range(len(values))]
            )
        elif given is not None and len(given) > 2:
            names = given  # stored as their index (snapped to the nearest one, if asked): nothing to scan
        else:
            names, values = self.values_from_masks(images, given)
        if values is None and self.ignore_index < len(names):  # ADE20K: 0 unlabelled, the classes stored from 1
            values = skipping_ignore(len(names), self.ignore_index)
        self.set_values(values, len(names))
        return names

    def check_unknown_values_ignored(self, values: list[int] | None, given: list[str] | None) -> None:
        """``--unknown-values ignore`` needs to know which values are classes before any is ignored."""
        if self.snap:
            raise ConfigError(
                "--snap-mask-values maps every stored value to a class, so --unknown-values ignore would ignore "
                "nothing: pass one of them"
            )
        if values is None and (given is None or len(given) <= 2):  # 0/255 masks would lose their foreground
            raise ConfigError(
                "--unknown-values ignore needs each class's stored value (--mask-values, e.g. 0,255) or three or more "
                "classes named (stored as their index); two-valued masks would be read as indices, 255 ignored"
            )

    def set_values(self, values: list[int] | None, num_classes: int) -> None:
        if values is None and not self.snap and self.unknown_values == "error":
            return  # class indices as stored, each checked as it is read
        self.mask_values = values if values is not None else list(range(num_classes))
        self.value_lookup, self.known_values = value_lookup(
            self.mask_values, num_classes, self.ignore_index, self.snap, unknown=self.unknown_values
        )

    def values_from_masks(self, images: dict, given: list[str] | None) -> tuple[list[str], list[int] | None]:
        """(names, stored values or None for indices) read from the masks themselves (every mask read once)."""
        histogram = stored_value_histogram(lambda stem: self._mask(stem)[0], list(images))
        present = np.flatnonzero(histogram).tolist()
        if given is None or len(given) == 2:
            binary = binary_values(present, self.snap, histogram)
            if binary is not None:
                logger.info("%s: %s", self.root, describe_binary(binary, self.ignore_index))
                return given or ["background", "foreground"], binary
        if self.snap:  # several classes stored lossily as their index: each value snaps to the nearest index
            return given, None
        if self.ignore_index in present:
            logger.info(
                "%s: %d pixel(s) hold %d, the ignore index: left out of losses and metrics",
                self.root,
                histogram[self.ignore_index],
                self.ignore_index,
            )
        if given is not None:
            return given, None
        largest = max((value for value in present if value != self.ignore_index), default=0)
        count = largest + (0 if self.ignore_index <= largest else 1)  # values skip an ignore index among them
        names = [f"class_{index}" for index in range(max(count, 2))]
        logger.warning(
            "%s: no classes.txt or --classes: %d classes from the mask values, named class_0..class_%d; "
            "name them in classes.txt (one a line, background first)",
            self.root,
            len(names),
            len(names) - 1,
        )
        return names, None

    def mask_source(self, image_id: str) -> str:
        return str(self.masks[image_id])

    def mask_source_exists(self, image_id: str) -> bool:
        return image_id in self.test_masks

    def _mask(self, image_id: str, split: str = "train") -> tuple[np.ndarray, str]:
        path = (self.test_masks if split == "test" else self.masks)[image_id]
        if self.table is not None:
            from competition.colors import read_color_mask

            def decode() -> np.ndarray:
                return read_color_mask(
                    path.read_bytes(), str(path), self.table, self.ignore_index, self.unknown_colors, self.snap
                )

            return self.cache.get(path, decode), str(path)
        return read_index_mask(path.read_bytes(), str(path), lossy=self.snap), str(path)


def pair_folders(root: Path, images: str, masks: str) -> tuple[Path, Path]:
    """(image folder, mask folder): as named by ``--images``/``--masks``, else the first known pair present."""
    if images or masks:
        if not (images and masks):
            raise ConfigError("--images and --masks go together: name both folders, e.g. --images img --masks gt")
        pair = resolve(root, images), resolve(root, masks)
        for flag, folder in zip(("--images", "--masks"), pair):
            if not folder.is_dir():
                raise DataError(f"{flag} {folder}: folder not found (relative to --data-dir {root}, or absolute)")
        return pair
    return next(
        ((root / a, root / b) for a, b in FOLDER_PAIRS if (root / a).is_dir() and (root / b).is_dir()),
        (root / "images", root / "masks"),
    )


def by_id(files: dict[str, Path], suffix: str) -> tuple[dict[str, Path], list[str]]:
    """(id -> file, for the files whose stem ends with ``suffix``, the id being the stem without it; the stems
    of the others)."""
    ids = {stem[: len(stem) - len(suffix)]: path for stem, path in files.items() if stem.endswith(suffix)}
    return ids, sorted(stem for stem in files if not stem.endswith(suffix))


def _names_an_id(stem: str, ids: dict) -> bool:
    """Whether ``stem`` is an id of ``ids`` followed by ``_`` and more: ``x_gtFine_color`` for the id ``x``."""
    return any(stem[:end] in ids for end, char in enumerate(stem) if char == "_")


def suffix_hint(image_stems: list[str], mask_stems: list[str]) -> str:
    """The flags that would pair these names, when a mask's name is an image's and more (or the reverse). Several
    kinds of file beside each image (Cityscapes' _gtFine_color, _gtFine_labelIds) are each named."""
    images = set(image_stems)
    added: list[str] = []
    for mask in mask_stems[:200]:
        end = next((end for end in range(len(mask) - 1, 0, -1) if mask[:end] in images), None)
        if end is not None and mask[end:] not in added:
            added.append(mask[end:])
    if len(added) == 1:
        return f"; their names differ by a suffix: pass --mask-suffix {added[0]}"
    if added:
        return (
            f"; their names add one of {', '.join(sorted(added)[:5])} to an image's: pass the masks' as --mask-suffix"
        )
    masks = set(mask_stems)
    for image in image_stems[:50]:
        for end in range(len(image) - 1, 0, -1):
            if image[:end] in masks:
                return f"; their names differ by a suffix: pass --image-suffix {image[end:]}"
    return "; a mask is named as its image (--mask-suffix and --image-suffix name what each adds)"


def match_pair(
    image_folder: Path, mask_folder: Path | None, suffixes: tuple[str, str], explicit: bool, test: bool
) -> tuple[dict[str, Path], dict[str, Path]]:
    """(image id -> image, image id -> mask) of the images that have a mask (every image for a test split).
    An id is a file's stem without its ``suffixes`` (image, mask): Cityscapes' ``x_leftImg8bit.png`` and
    ``x_gtFine_labelIds.png`` are both ``x``. Unmatched files are listed in one line: a warning for folders
    the user named, a note for VOC's JPEGImages (which holds the detection images too); a mask's companions
    named after its id without the mask suffix (Cityscapes' _gtFine_color) in a note of their own."""
    image_suffix, mask_suffix = suffixes
    image_files = files_by_stem(image_folder, IMAGE_EXTENSIONS, recursive=explicit)
    images, unsuffixed = by_id(image_files, image_suffix)
    if unsuffixed:
        logger.warning(
            "%s: %d image(s) not named *%s are left out, e.g. %s",
            image_folder,
            len(unsuffixed),
            image_suffix,
            unsuffixed[:3],
        )
    if mask_folder is None:
        return images, {}
    stored = files_by_stem(mask_folder, MASK_EXTENSIONS + LOSSY_MASK_EXTENSIONS, recursive=explicit)
    masks, unsuffixed = by_id(stored, mask_suffix)
    if test:  # every test image is predicted; the masks it has are for scoring
        return images, {image_id: path for image_id, path in masks.items() if image_id in images}
    if image_files and stored and not set(images) & set(masks):
        raise DataError(
            f"{image_folder}: none of its {len(image_files)} image(s) has a mask in {mask_folder} ({len(stored)} "
            f"there), e.g. {next(iter(image_files.values())).name} and {next(iter(stored.values())).name}"
            f"{suffix_hint(list(images) or list(image_files), list(stored))}"
        )
    unmasked = sorted(set(images) - set(masks))
    orphans = sorted(set(masks) - set(images))
    # A mask's companions (Cityscapes' x_gtFine_color and x_gtFine_instanceIds beside x_gtFine_labelIds): named
    # after an id that has its mask, so not masks. Any other file without the suffix may be a mask misnamed.
    companions = [stem for stem in unsuffixed if _names_an_id(stem, masks)]
    orphans += [stem for stem in unsuffixed if stem not in set(companions)]
    if companions:
        logger.info(
            "%s: %d file(s) named after a mask's id but not *%s are not read as masks, e.g. %s",
            mask_folder,
            len(companions),
            mask_suffix,
            companions[:3],
        )
    if unmasked:
        say = logger.warning if explicit else logger.info
        say(
            "%s: %d image(s) without a mask%s in %s are left out, e.g. %s",
            image_folder,
            len(unmasked),
            f" (*{mask_suffix})" if mask_suffix else "",
            mask_folder,
            unmasked[:3],
        )
    if orphans:
        logger.warning(
            "%s: %d mask(s) without an image in %s, e.g. %s", mask_folder, len(orphans), image_folder, orphans[:3]
        )
    return {stem: path for stem, path in images.items() if stem in masks}, masks


def color_table_path(root: Path, colors: str) -> Path | None:
    """The colour table named by ``--colors``, else one of COLOR_TABLE_NAMES in the data folder, else None."""
    if colors:
        path = resolve(root, colors)
        if not path.is_file():
            raise DataError(f"--colors {colors}: colour table not found (relative to --data-dir {root}, or absolute)")
        return path
    return next((root / name for name in COLOR_TABLE_NAMES if (root / name).is_file()), None)


class PetData(SegmentationData):
    """Oxford-IIIT Pet as downloaded: ``images/*.jpg`` and ``annotations/trimaps/*.png`` (1 pet, 2 background,
    3 border). Classes: background, pet; the border is ignored, or a class of its own with ``pet_border=class``."""

    layout = "pet"

    def __init__(self, root: Path, classes: str, ignore_index: int, pet_border: str, test_images: Path | None):
        images = files_by_stem(root / "images", IMAGE_EXTENSIONS)
        self.trimaps = files_by_stem(root / "annotations" / "trimaps", (".png",))
        unmatched = len(set(images) ^ set(self.trimaps))
        if unmatched:
            logger.info("%s: %d image(s) or trimap(s) without their other half are left out", root, unmatched)
        images = {stem: path for stem, path in images.items() if stem in self.trimaps}
        names = ["background", "pet"] + (["border"] if pet_border == "class" else [])
        if classes:
            given = parse_classes(classes)
            if len(given) != len(names):
                raise DataError(f"--classes {classes!r}: Oxford-IIIT Pet with --pet-border {pet_border} has {names}")
            names = given
        border = 2 if pet_border == "class" else ignore_index
        self.lookup = np.full(256, 255, dtype=np.uint8)  # a value outside 1-3 stays out of range: refused
        self.lookup[[PET_TRIMAP["background"], PET_TRIMAP["pet"], PET_TRIMAP["border"]]] = [0, 1, border]
        self.lookup[ignore_index] = ignore_index
        super().__init__(
            root, images, names, ignore_index, files_by_stem(test_images or root / "test", IMAGE_EXTENSIONS)
        )

    def mask_source(self, image_id: str) -> str:
        return str(self.trimaps[image_id])

    def mask_source_exists(self, image_id: str) -> bool:
        return image_id in self.trimaps

    def _mask(self, image_id: str, split: str = "train") -> tuple[np.ndarray, str]:
        path = self.trimaps[image_id]
        trimap = read_index_mask(path.read_bytes(), str(path))
        outside = np.setdiff1d(np.unique(trimap), list(PET_TRIMAP.values()))
        if outside.size:
            raise DataError(f"{path}: trimap value(s) {outside[:5].tolist()}; Oxford-IIIT Pet trimaps hold 1, 2 and 3")
        return self.lookup[trimap], str(path)


class LabelmeData(SegmentationData):
    """labelme JSON files beside their images: each shape drawn in file order, later over earlier.

    Rasterised here with Pillow rather than with labelme's own ``shapes_to_label``: the labelme package
    installs PyQt5 and imports Qt at start-up, which a headless notebook or CI machine does not have."""

    layout = "labelme"

    def __init__(self, root: Path, classes: str, ignore_index: int, test_images: Path | None):
        self.annotations = {path.stem: path for path in sorted(root.glob("*.json")) if not path.name.startswith("._")}
        images = files_by_stem(root, IMAGE_EXTENSIONS)
        unlabelled = sorted(set(images) - set(self.annotations))
        if unlabelled:
            logger.info("%s: %d image(s) without a labelme JSON are not training images", root, len(unlabelled))
        images = {stem: path for stem, path in images.items() if stem in self.annotations}
        missing = sorted(set(self.annotations) - set(images))
        if missing:
            logger.warning("%s: %d labelme JSON(s) without their image, e.g. %s", root, len(missing), missing[:3])
        names = _classes_from(root, classes, ("labels.txt", "classes.txt"))
        if not names:
            labels = sorted({shape["label"] for stem in images for shape in self._shapes(stem)} - {"__ignore__"})
            names = ["_background_"] + [label for label in labels if label != "_background_"]
            logger.warning("%s: no labels.txt: classes from the JSON files' labels: %s", root, ", ".join(names))
        super().__init__(
            root, images, names, ignore_index, files_by_stem(test_images or root / "test", IMAGE_EXTENSIONS)
        )

    def read_image_and_shape(self, image_id: str, split: str = "train", reduce_to=None):
        """The image turned by its EXIF orientation, as labelme shows it and as its points are drawn."""
        path = self._image_file(image_id, split)
        with _decoding(str(path)), Image.open(path) as image:
            array = image_to_array(ImageOps.exif_transpose(image), str(path), self.in_channels)
        return array, array.shape[:2]

    def image_shape(self, image_id: str, split: str = "train") -> tuple[int, int]:
        path = self._image_file(image_id, split)
        with _decoding(str(path)), Image.open(path) as image:
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # a quarter turn swaps the sides
            return (image.width, image.height) if turned else (image.height, image.width)

    def _shapes(self, image_id: str) -> list[dict]:
        path = self.annotations[image_id]
        try:
            shapes = json.loads(path.read_text())["shapes"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DataError(f"{path}: not a labelme JSON file ({type(error).__name__}: {error})") from None
        return shapes

    def mask_source(self, image_id: str) -> str:
        return str(self.annotations[image_id])

    def _mask(self, image_id: str, split: str = "train") -> tuple[np.ndarray, str]:
        height, width = self.image_shape(image_id)
        index = {name: value for value, name in enumerate(self.classes)} | {"__ignore__": self.ignore_index}
        source = str(self.annotations[image_id])
        canvas = Image.new("L", (width, height), 0)
        for shape in self._shapes(image_id):
            label = shape.get("label")
            if label not in index:
                raise DataError(
                    f"{source}: label {label!r} is not a class ({', '.join(self.classes)}); add it to labels.txt "
                    "or --classes"
                )
            draw_shape(canvas, shape, index[label], source)
        return np.array(canvas, dtype=np.uint8), source  # a writable copy, as every other layout gives


LABELME_LINE_WIDTH, LABELME_POINT_RADIUS = 10, 5  # as labelme's own shape_to_mask draws lines and points


def draw_shape(canvas: Image.Image, shape: dict, value: int, source: str) -> None:
    """One labelme shape filled with ``value``, as labelme's own conversion draws it: polygon, rectangle, circle
    (centre, a point on the rim), line and linestrip (10 px wide), point (a disc of radius 5), and labelme 5's
    ``mask`` (a base64 PNG of the box from its first point)."""
    kind = shape.get("shape_type") or "polygon"
    try:
        points = [(float(x), float(y)) for x, y in shape.get("points") or []]
    except (TypeError, ValueError):
        raise DataError(f"{source}: shape {shape.get('label')!r} has malformed points") from None
    draw = ImageDraw.Draw(canvas)
    if kind == "mask" and points:
        _paste_mask_shape(canvas, shape, points[0], value, source)
    elif kind == "polygon" and len(points) >= 3:
        draw.polygon(points, fill=value)
    elif kind == "rectangle" and len(points) == 2:
        (x0, y0), (x1, y1) = points
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=value)
    elif kind == "circle" and len(points) == 2:
        (cx, cy), (px, py) = points
        radius = ((px - cx) ** 2 + (py - cy) ** 2) ** 0.5
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=value)
    elif kind in ("line", "linestrip") and len(points) >= 2:
        draw.line(points, fill=value, width=LABELME_LINE_WIDTH)
    elif kind == "point" and len(points) == 1:
        (cx, cy), radius = points[0], LABELME_POINT_RADIUS
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=value)
    else:
        raise DataError(
            f"{source}: shape {shape.get('label')!r} is a {kind} with {len(points)} point(s), which cannot be "
            "drawn; fix or delete it in labelme"
        )


def _paste_mask_shape(canvas: Image.Image, shape: dict, corner, value: int, source: str) -> None:
    try:
        with Image.open(io.BytesIO(base64.b64decode(shape["mask"]))) as image:
            inside = np.asarray(image.convert("L")) > 0
    except (KeyError, ValueError, OSError):
        raise DataError(f"{source}: shape {shape.get('label')!r} of type mask has no readable mask") from None
    pixels = np.array(canvas)
    top, left = int(corner[1]), int(corner[0])
    region = pixels[top : top + inside.shape[0], left : left + inside.shape[1]]
    region[inside[: region.shape[0], : region.shape[1]]] = value
    canvas.paste(Image.fromarray(pixels))


def _classes_from(root: Path, classes: str, file_names: tuple[str, ...]) -> list[str] | None:
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


def detect_layout(root: str | Path) -> str:
    """The layout a data folder holds, from its folder names (the same on every copy of a data set)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found. {LAYOUT_HELP}")
    if any((root / name).exists() for name in ("train", "train.zip", "train_masks", "train_masks.zip")):
        return "carvana"
    if (root / "annotations" / "trimaps").is_dir():
        return "pet"
    if any((root / a).is_dir() and (root / b).is_dir() for a, b in FOLDER_PAIRS):
        return "folders"
    if any(path.suffix == ".json" and not path.name.startswith("._") for path in root.iterdir()):
        return "labelme"
    raise DataError(f"{root}: no data layout recognised.{known_data_set_hint(root)} {LAYOUT_HELP}")


def known_data_set_hint(root: Path) -> str:
    """A sentence naming the settings of a data set recognised by its folders, when reading it needs them."""
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return " It looks like Cityscapes as downloaded (leftImg8bit/, gtFine/): pass --config configs/cityscapes.toml."
    return ""


# The settings (TrainConfig fields, and make_folds.py's and inspect_data's flags) that say how to read a data folder.
DATA_SETTINGS = (
    "layout",
    "classes",
    "ignore_index",
    "pet_border",
    "mask_source",
    "images",
    "masks",
    "mask_suffix",
    "image_suffix",
    "split",
    "colors",
    "unknown_colors",
    "mask_values",
    "unknown_values",
    "snap_mask_values",
    "in_channels",
)
DATA_FLAGS = ("data_dir", *DATA_SETTINGS)  # train.py's flags that make_folds.py and inspect_data take too
# Of those, the ones that only the image/mask-folder layout reads.
FOLDER_SETTINGS = (
    "images",
    "masks",
    "mask_suffix",
    "image_suffix",
    "colors",
    "mask_values",
    "unknown_values",
    "snap_mask_values",
)


def open_data_as(settings, data_dir: str | Path | None = None, test_images: str | Path | None = None):
    """The data folder read as ``settings`` (a TrainConfig, or flags of the same names) say."""
    options = {name: getattr(settings, name) for name in DATA_SETTINGS}
    return open_data(data_dir or settings.data_dir, test_images=test_images, **options)


def open_data(
    root: str | Path,
    layout: str = "auto",
    classes: str = "",
    ignore_index: int = 255,
    pet_border: str = "ignore",
    mask_source: str = "auto",
    test_images: str | Path | None = None,
    *,
    split: str = "",
    in_channels: int = 3,
    **folder_options,
):
    """The data folder ``root`` read as ``layout`` (``auto``: recognised by what it holds). ``folder_options``
    are FOLDER_SETTINGS, for the image/mask-folder layout."""
    root = Path(root)
    given = [name for name, value in folder_options.items() if value and value != "error"]
    split_parts = parse_split(split) if split else {}
    by_id_lists = bool(split_parts) and is_id_list(next(iter(split_parts.values())))
    folder_split = {} if by_id_lists else split_parts
    if folder_options.get("images") or folder_options.get("masks") or folder_split:
        layout = "folders" if layout == "auto" else layout  # CamVid's train/ is not Carvana's
    layout = detect_layout(root) if layout == "auto" else layout
    test_folder = Path(test_images) if test_images else None
    if test_folder is not None and not test_folder.exists() and (root / test_folder).is_dir():
        test_folder = root / test_folder  # named relative to the data folder, as --images and --masks are
    if layout in ("carvana", "pet", "labelme") and given:
        raise ConfigError(f"--{given[0].replace('_', '-')} is for image/mask folders; {root} is read as {layout}")
    if layout == "carvana":
        if split:
            raise ConfigError("--split is for other layouts; Carvana's test set is test/ and its folds are by car")
        data = CarvanaData(root, mask_source, test_images=test_folder)
        data.in_channels = in_channels
        return data
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found. {LAYOUT_HELP}")
    if layout == "folders":
        data = FolderData(
            root, classes, ignore_index, test_folder, split_folders_by_name=folder_split, **folder_options
        )
    elif layout == "pet":
        data = PetData(root, classes, ignore_index, pet_border, test_folder)
    elif layout == "labelme":
        data = LabelmeData(root, classes, ignore_index, test_folder)
    else:
        raise DataError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    data.in_channels = in_channels
    if by_id_lists:
        apply_id_lists(data, split_parts, keep_test_images=test_folder is not None)  # --test-images wins
    if not data.images and not data.test_images:
        raise DataError(f"{root}: no images found as the {layout} layout.{known_data_set_hint(root)} {LAYOUT_HELP}")
    if test_folder is not None and not data.test_images:
        raise DataError(f"--test-images {test_folder}: no images there ({', '.join(IMAGE_EXTENSIONS)})")
    if data.ignore_index < data.num_classes:
        raise DataError(f"--ignore-index {data.ignore_index} is one of the {data.num_classes} classes; use 255")
    return data


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


class MaskFolder(FolderData):
    """A folder of masks without images (the truth that predicted masks are scored against), read by the folders
    layout's rules: two-valued masks, ``mask_values``, a colour table, the ignore index. A colour table or
    classes.txt is looked for in the folder, then in its parent. Ids are the masks' stems."""

    def __init__(
        self,
        folder: Path,
        classes: str = "",
        ignore_index: int = 255,
        *,
        colors: str = "",
        unknown_colors: str = "error",
        mask_values: str = "",
        unknown_values: str = "error",
        snap_mask_values: bool = False,
    ):
        folder = Path(folder)
        self.root, self.ignore_index = folder, ignore_index
        self.unknown_colors, self.unknown_values, self.snap = unknown_colors, unknown_values, snap_mask_values
        self.masks, self.test_masks = files_by_stem(folder, MASK_EXTENSIONS + LOSSY_MASK_EXTENSIONS), {}
        if not self.masks:
            raise DataError(f"{folder}: no mask files ({', '.join(MASK_EXTENSIONS)})")
        self.refuse_lossy_masks()
        self.table = self.cache = None
        table_path = color_table_path(folder, colors) or (None if colors else color_table_path(folder.parent, ""))
        class_file = next(
            (place / "classes.txt" for place in (folder, folder.parent) if (place / "classes.txt").is_file()), None
        )
        # Where the class names come from, for the line that says it: the caller's, a file's, or the masks' values.
        self.classes_from = "" if classes else str(table_path or class_file or "the masks' values")
        if table_path is not None:
            if unknown_values != "error":
                raise ConfigError(
                    f"--unknown-values is for masks of stored values; {table_path} makes these colour masks: "
                    "pass --unknown-colors ignore instead"
                )
            names = self.open_color_table(table_path, classes)
        else:
            given = _classes_from(class_file.parent if class_file else folder, classes, ("classes.txt",))
            names = self.resolve_values(self.masks, given, mask_values)
        SegmentationData.__init__(
            self, folder, dict(self.masks), names, label_ignore_index(ignore_index, len(names)), {}, ignore_index
        )
