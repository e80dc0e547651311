"""The layouts' registry lines and open_data; the image/mask-folder layout (VOC's names too) and Oxford-IIIT Pet trimaps."""

import collections
import logging
from pathlib import Path

import numpy as np

from competition.carvana import CarvanaData
from competition.colors import MaskCache, read_color_table
from competition.environment import default_work_dir
from competition.errors import ConfigError, DataError
from competition.labelme import LabelmeData
from competition.layout_registry import LAYOUT_HELP, LAYOUTS, detect_layout, layout_choices
from competition.mask_values import (
    MAX_LABELS,
    binary_values,
    describe_binary,
    label_ignore_index,
    looks_packed,
    parse_mask_values,
    skipping_ignore,
    unnamed_values_problem,
    value_lookup,
)
from competition.rle_table import UW_MADISON_COLUMNS, RLETableData
from competition.segmentation_data import (
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    SegmentationData,
    classes_from,
    files_by_stem,
    parse_classes,
    read_class_names,
    read_index_mask,
)
from competition.splits import (
    MASK_FOLDER_SUFFIXES,
    SPLIT_NAMES,
    find_listed_file,
    is_id_list,
    lists_pair_files,
    parse_split,
    read_split_list,
    resolve,
    split_folders,
)
from competition.survey import stored_value_histogram

logger = logging.getLogger(__name__)

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


class FolderData(SegmentationData):
    """Images and masks in folders, same stems (past ``image_suffix``/``mask_suffix``): ``images/`` + ``masks/``, VOC's
    ``JPEGImages/`` + ``SegmentationClass[PNG]/``, folders named by ``images``/``masks``, or one folder pair per
    official split. Masks hold class indices, other values per class (``mask_values``, two-valued masks
    recognised), or colours of a colour table."""

    layout = "folders"
    needs = (
        "images/ + masks/ (or VOC's JPEGImages/ + SegmentationClass/ or SegmentationClassPNG/), or the folders "
        "--images and --masks name"
    )
    reads_folder_settings = True

    @staticmethod
    def detect(root: Path) -> bool:
        return any((root / a).is_dir() and (root / b).is_dir() for a, b in FOLDER_PAIRS)

    @classmethod
    def read(cls, root: Path, test_folder: Path | None, options: dict) -> "FolderData":
        return cls(
            root,
            options["classes"],
            options["ignore_index"],
            test_folder,
            split_folders_by_name=options["folder_split"],
            listed_files=options["listed_files"],
            multilabel=options["multilabel"],
            **options["folder_options"],
        )

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
        listed_files: dict[str, str] | None = None,
        colors: str = "",
        unknown_colors: str = "error",
        mask_values: str = "",
        unknown_values: str = "error",
        snap_mask_values: bool = False,
        multilabel: bool = False,
    ):
        self.root, self.ignore_index = root, ignore_index  # the mask scan below needs them
        self.multilabel = multilabel
        self.unknown_colors, self.unknown_values, self.snap = unknown_colors, unknown_values, snap_mask_values
        if listed_files:  # lists naming each image and its mask (SegNet's): the files they name, nothing searched
            found, test, folder_splits = self.find_listed(listed_files)
        else:
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
        if multilabel:
            names = self.label_names(root, classes, table_path, mask_values)
        elif table_path is not None:
            if unknown_values != "error":
                raise ConfigError(
                    f"--unknown-values is for masks of stored values; {table_path} makes these colour masks: "
                    "pass --unknown-colors ignore instead"
                )
            names = self.open_color_table(table_path, classes)
        else:
            names = self.resolve_values(found, classes_from(root, classes, ("classes.txt",)), mask_values)
        super().__init__(root, found, names, label_ignore_index(ignore_index, len(names)), test, ignore_index)
        self.splits = {stem: name for stem, name in folder_splits.items() if name is not None}

    def label_names(self, folder: Path, classes: str, table_path: Path | None, mask_values: str) -> list[str]:
        """The classes of multilabel masks (greyscale PNGs holding bit k for class k, 255 ignored): named by
        ``--classes`` or classes.txt, without a background, at most MAX_LABELS; colours and stored values have no
        meaning there."""
        if table_path is not None or mask_values or self.snap or self.unknown_values != "error":
            given = (
                f"a colour table {table_path}"
                if table_path
                else "--mask-values, --snap-mask-values or --unknown-values"
            )
            raise ConfigError(
                f"--head multilabel reads masks as bits (bit k for class k, 255 ignored); {given} cannot apply: "
                "save the masks as greyscale PNGs of packed bits"
            )
        class_file = folder / "classes.txt"
        if classes:
            names = [name.strip() for name in classes.split(",") if name.strip()]
        else:
            names = read_class_names(class_file) if class_file.is_file() else None
        if not names:
            raise DataError(
                f"{folder}: --head multilabel needs its classes named, in bit order and without a background: pass "
                "--classes a,b,c or write classes.txt (one a line)"
            )
        if len(set(names)) < len(names):
            raise DataError(f"{'--classes' if classes else class_file}: a class is named twice in {names}")
        if len(names) > MAX_LABELS:
            raise DataError(
                f"{folder}: {len(names)} classes named for --head multilabel; a multilabel mask holds at most "
                f"{MAX_LABELS} (one bit each)"
            )
        return names

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

    def find_listed(self, lists: dict[str, str]) -> tuple[dict, dict, dict]:
        """find_pairs' (images, test images, splits) of split lists whose lines name an image and its mask: each
        file found by its name and the folders above it (lists written on another machine name its paths); the id
        is the image's stem, the mask the line's second file. A test list's lines may name the image alone."""
        found, test, folder_splits = {}, {}, {}
        self.masks, self.test_masks = {}, {}
        for name, spec in lists.items():
            listing = resolve(self.root, spec)
            for image_id, image_text, mask_text in read_split_list(listing):
                if not image_text or (not mask_text and name != "test"):
                    raise DataError(
                        f"{listing}: the line of {image_id} names {'no mask' if image_text else 'no file'}; list each "
                        "image and its mask on one line (as SegNet's lists do) in every list, or ids alone"
                    )
                image = find_listed_file(self.root, image_text, listing, "image")
                mask = find_listed_file(self.root, mask_text, listing, "mask") if mask_text else None
                (test if name == "test" else found)[image_id] = image
                if mask is not None:
                    (self.test_masks if name == "test" else self.masks)[image_id] = mask
                if name != "test":
                    folder_splits[image_id] = name
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
        doubt, is_problem = unnamed_values_problem(present, self.ignore_index)
        self.class_problems = (f"{self.root}: {doubt}",) if is_problem else ()
        self.class_doubts = (f"{self.root}: {doubt}",) if doubt and not is_problem else ()
        if doubt:  # a void value may be trained as a class: said with both fixes (a gap: a problem to inspect_data)
            logger.warning("%s: %s", self.root, doubt)
        else:
            packed = (
                "; if the masks hold overlapping classes as bits (bit k for class k), train with --head multilabel"
                if looks_packed(present)
                else ""
            )
            logger.warning(
                "%s: no classes.txt or --classes: %d classes from the mask values, named class_0..class_%d; "
                "name them with --classes or in classes.txt (one a line, background first)%s",
                self.root,
                len(names),
                len(names) - 1,
                packed,
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


def image_folders_hint(root: Path) -> str:
    """A sentence naming the data folder's folders of images (``train/ holds 367 PNGs``) and the flags that would
    read them: ``--split`` when they are split folders with their mask folders beside (CamVid's), else ``--images``
    and ``--masks``; "" when no folder holds images."""
    held = {}
    for folder in sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")):
        kinds = collections.Counter(
            path.suffix[1:].upper() for path in folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS
        )
        if kinds:
            held[folder.name] = " and ".join(
                f"{count} {kind}{'s' * (count > 1)}" for kind, count in kinds.most_common()
            )
    if not held:
        return ""
    shown = ", ".join(f"{name}/ holds {files}" for name, files in list(held.items())[:8])
    paired = [
        name
        for name in SPLIT_NAMES
        if name in held and (name == "test" or any(name + suffix in held for suffix in MASK_FOLDER_SUFFIXES))
    ]
    if "train" in paired:
        split = ",".join(f"{name}={name}" for name in paired)
        lists = [name for name in paired if (root / f"{name}.txt").is_file()]
        listed = f" (or its lists: --split {','.join(f'{name}={name}.txt' for name in lists)})" if lists else ""
        flags = f"one folder pair per split: pass --split {split}{listed}; or name the image and mask folders"
    else:
        flags = "name the image and mask folders"
    return f" {shown}{' ...' * (len(held) > 8)}: {flags} with --images DIR --masks DIR."


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
    needs = "Oxford-IIIT Pet as downloaded: images/ + annotations/trimaps/"

    @staticmethod
    def detect(root: Path) -> bool:
        return (root / "annotations" / "trimaps").is_dir()

    @classmethod
    def read(cls, root: Path, test_folder: Path | None, options: dict) -> "PetData":
        return cls(root, options["classes"], options["ignore_index"], options["pet_border"], test_folder)

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


# The registry: adding a layout is its module and one line here. Detection tries them in this order.
LAYOUTS["carvana"] = CarvanaData
LAYOUTS["pet"] = PetData
LAYOUTS["folders"] = FolderData
LAYOUTS["labelme"] = LabelmeData
LAYOUTS["rle-table"] = RLETableData  # never detected: --masks-csv selects it
LAYOUT_CHOICES = layout_choices()  # the values --layout takes (a layout registered later is opened by name too)

# The settings (TrainConfig fields, and make_folds.py's and inspect_data's flags) that say how to read a data folder.
DATA_SETTINGS = (
    "layout",
    "classes",
    "labels",
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
    "head",
    "masks_csv",
    "rle_columns",
    "rle_order",
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
    labels: str = "",
    head: str = "auto",
    masks_csv: str = "",
    rle_columns: str = UW_MADISON_COLUMNS,
    rle_order: str = "row",
    **folder_options,
):
    """The data folder ``root`` read as ``layout`` (``auto``: recognised by what it holds) by its registered class's
    ``open``, given these settings by name, ``--split`` parsed (``split_parts``; ``by_id_lists`` when they are id
    lists, else ``folder_split``) and ``folder_options``: FOLDER_SETTINGS, for the image/mask-folder layout
    (``images`` for the rle-table layout too, which ``masks_csv`` selects)."""
    root = Path(root)
    given = [name for name, value in folder_options.items() if value and value != "error"]
    split_parts = parse_split(split) if split else {}
    by_id_lists = bool(split_parts) and is_id_list(next(iter(split_parts.values())))
    folder_split = {} if by_id_lists else split_parts
    # Lists naming each image and its mask (SegNet's CamVid) say where the files are: the folders layout reads them.
    listed_files = split_parts if by_id_lists and root.is_dir() and lists_pair_files(root, split_parts) else {}
    forced = layout != "auto"  # named by --layout: a folder that does not fit says what that layout needs
    if masks_csv and layout not in ("auto", RLETableData.layout):
        raise ConfigError(f"--masks-csv is for the {RLETableData.layout} layout; --layout {layout} reads its own masks")
    if masks_csv:
        layout = RLETableData.layout  # its images are in train/, or the folder --images names
    elif rle_columns != UW_MADISON_COLUMNS or rle_order != "row":
        raise ConfigError("--rle-columns and --rle-order describe the table --masks-csv names: name it too")
    if folder_options.get("images") or folder_options.get("masks") or folder_split or listed_files:
        layout = "folders" if layout == "auto" else layout  # CamVid's train/ is not Carvana's
    layout = detect_layout(root, found_hint=image_folders_hint) if layout == "auto" else layout
    test_folder = Path(test_images) if test_images else None
    if test_folder is not None and not test_folder.exists() and (root / test_folder).is_dir():
        test_folder = root / test_folder  # named relative to the data folder, as --images and --masks are
    reader = LAYOUTS.get(layout)
    if reader is None:
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found. {LAYOUT_HELP}")
        raise DataError(f"--layout {layout!r}: choose one of {', '.join(layout_choices())}")
    if reader.reads_images_folder:
        given = [name for name in given if name != "images"]
    if given and not reader.reads_folder_settings:
        raise ConfigError(f"--{given[0].replace('_', '-')} is for image/mask folders; {root} is read as {layout}")
    if labels and not classes and layout != "labelme":  # classes given (a checkpoint's): the labels are read
        raise ConfigError(f"--labels is for labelme JSON files (--layout labelme); {root} is read as {layout}")
    options = {
        "forced": forced,
        "classes": classes,
        "labels": labels,
        "ignore_index": ignore_index,
        "pet_border": pet_border,
        "mask_source": mask_source,
        "split": split,
        "split_parts": split_parts,
        "by_id_lists": by_id_lists,
        "folder_split": folder_split,
        "listed_files": listed_files,
        "folder_options": folder_options,
        "multilabel": head == "multilabel",
        "head": head,
        "masks_csv": masks_csv,
        "rle_columns": rle_columns,
        "rle_order": rle_order,
    }
    data = reader.open(root, test_folder, options)
    data.in_channels = in_channels
    return data


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
        multilabel: bool = False,
    ):
        folder = Path(folder)
        self.root, self.ignore_index, self.multilabel = folder, ignore_index, multilabel
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
        if multilabel:
            names = self.label_names(class_file.parent if class_file else folder, classes, table_path, mask_values)
        elif table_path is not None:
            if unknown_values != "error":
                raise ConfigError(
                    f"--unknown-values is for masks of stored values; {table_path} makes these colour masks: "
                    "pass --unknown-colors ignore instead"
                )
            names = self.open_color_table(table_path, classes)
        else:
            given = classes_from(class_file.parent if class_file else folder, classes, ("classes.txt",))
            names = self.resolve_values(self.masks, given, mask_values)
        SegmentationData.__init__(
            self, folder, dict(self.masks), names, label_ignore_index(ignore_index, len(names)), {}, ignore_index
        )
