"""Segmentation data sets beyond Carvana: image/mask folders (VOC names too), labelme JSON and Oxford-IIIT Pet."""

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from competition.data import CarvanaData, _decode_jpeg, _decoding, _image_shape
from competition.errors import DataError

LAYOUTS = ("auto", "carvana", "folders", "labelme", "pet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".gif")
PET_BORDERS = ("ignore", "class")

LAYOUT_NEEDS = {
    "carvana": "train/*.jpg (or train.zip) with train_masks/ or train_masks.csv",
    "folders": "images/ + masks/ (same stems), or VOC's JPEGImages/ + SegmentationClass/ or SegmentationClassPNG/",
    "labelme": "labelme *.json files (with 'shapes') beside their images",
    "pet": "Oxford-IIIT Pet's images/*.jpg + annotations/trimaps/*.png",
}

# Oxford-IIIT Pet trimaps: 1 pet, 2 background, 3 the uncertain border between them.
PET_TRIMAP_PET, PET_TRIMAP_BACKGROUND, PET_TRIMAP_BORDER = 1, 2, 3

LABELME_IGNORE = "__ignore__"
LABELME_BACKGROUND = "_background_"

log = logging.getLogger("competition.layouts")


def _layout_help() -> str:
    return "; ".join(f"{name}: {needs}" for name, needs in LAYOUT_NEEDS.items())


def is_image_file(path: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    """An image by its extension; macOS's ``._*`` AppleDouble files and other hidden files are not."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in extensions


def files_by_stem(folder: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> dict[str, Path]:
    """``{stem: path}`` of the image files in ``folder``; two files with one stem (a.jpg, a.png) stop."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not is_image_file(path, extensions):
            continue
        if path.stem in found:
            raise DataError(
                f"{folder}: {found[path.stem].name} and {path.name} share the id {path.stem!r}; keep one of them"
            )
        found[path.stem] = path
    return found


def parse_classes(text: str) -> list[str]:
    """``"background,cat,dog"`` (the --classes flag) -> names, background first."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if len(names) < 2:
        raise DataError(f"--classes {text!r}: give at least two names, background first, e.g. background,cat")
    if len(set(names)) != len(names):
        raise DataError(f"--classes {text!r}: a class name appears twice")
    return names


def read_classes_file(path: Path) -> list[str]:
    """``classes.txt``: one name a line, background first, blank lines ignored."""
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) < 2:
        raise DataError(f"{path}: needs at least two class names, one a line, background first")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: a class name appears twice")
    return names


def read_labelme_labels(path: Path) -> list[str]:
    """labelme's ``labels.txt``: ``__ignore__`` dropped (it is the ignore index), ``_background_`` is class 0
    named ``background``; the other lines are the classes in order."""
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    names = ["background" if name == LABELME_BACKGROUND else name for name in names if name != LABELME_IGNORE]
    if len(names) < 2:
        raise DataError(f"{path}: needs at least two labels besides __ignore__, _background_ first")
    return names


def decode_index_mask(path: Path) -> np.ndarray:
    """A mask file -> its class indices as stored (palette or greyscale), never through an RGB conversion."""
    with _decoding(str(path), "mask"), Image.open(path) as image:
        mode = image.mode
        if mode in ("P", "L", "1", "I;16", "I;16B", "I;16L", "I"):
            values = np.asarray(image)
        else:
            values = None
    if values is None:
        raise DataError(
            f"{path}: the mask is {mode}; masks must hold class indices (palette or greyscale PNG), "
            "not colours; convert the colours to indices"
        )
    return values.astype(np.int64) if values.dtype != np.uint8 else values


def check_mask_values(values: np.ndarray, source: str, classes: list[str], ignore_index: int) -> np.ndarray:
    """Class indices -> uint8 mask; a value that is neither a class nor the ignore index stops."""
    if values.dtype == np.uint8:  # a histogram is several times faster than np.unique on a whole mask
        present = np.flatnonzero(np.bincount(values.ravel(), minlength=256))
    else:
        present = np.unique(values)
    bad = [int(v) for v in present if not (0 <= v < len(classes)) and v != ignore_index]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        raise DataError(
            f"{source}: mask value(s) {shown} are not classes 0..{len(classes) - 1} {classes} nor the ignore "
            f"index {ignore_index}; fix the mask or the classes (classes.txt or --classes)"
        )
    return values.astype(np.uint8, copy=False)


def _shape_points(shape: dict, source: str) -> list[tuple[float, float]]:
    try:
        return [(float(x), float(y)) for x, y in shape.get("points") or []]
    except (TypeError, ValueError):
        raise DataError(f"{source}: shape {shape.get('label')!r} has malformed points") from None


def draw_labelme_shape(canvas: Image.Image, shape: dict, value: int, source: str) -> None:
    """Paint one labelme shape onto an 'L' canvas with ``value``, as labelme's own conversion draws it."""
    kind = shape.get("shape_type") or "polygon"
    points = _shape_points(shape, source)
    draw = ImageDraw.Draw(canvas)
    if kind == "mask":
        _draw_labelme_mask(canvas, shape, points, value, source)
    elif kind == "circle" and len(points) == 2:
        (cx, cy), (px, py) = points
        radius = ((cx - px) ** 2 + (cy - py) ** 2) ** 0.5
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=value)
    elif kind == "rectangle" and len(points) == 2:
        (x0, y0), (x1, y1) = points
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=value)
    elif kind in ("line", "linestrip") and len(points) >= 2:
        draw.line(points, fill=value, width=10)  # labelme draws lines 10 pixels wide
    elif kind == "point" and len(points) == 1:
        (cx, cy), radius = points[0], 5  # labelme draws a point as a disc of radius 5
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=value)
    elif kind == "polygon" and len(points) >= 3:
        draw.polygon(points, fill=value)
    else:
        raise DataError(
            f"{source}: shape {shape.get('label')!r} is a {kind} with {len(points)} point(s), which cannot be "
            "drawn; fix or delete it in labelme"
        )


def _draw_labelme_mask(canvas: Image.Image, shape: dict, points: list, value: int, source: str) -> None:
    """labelme 5's ``mask`` shape: a base64 PNG of the box between its two points."""
    import base64
    import io

    try:
        with Image.open(io.BytesIO(base64.b64decode(shape["mask"]))) as image:
            inside = np.asarray(image.convert("L")) > 0
        (x0, y0) = points[0]
    except (KeyError, IndexError, ValueError, OSError):
        raise DataError(f"{source}: shape {shape.get('label')!r} of type mask has no readable mask") from None
    pixels = np.asarray(canvas).copy()
    top, left = int(y0), int(x0)  # labelme truncates the box corner the same way
    region = pixels[top : top + inside.shape[0], left : left + inside.shape[1]]
    region[inside[: region.shape[0], : region.shape[1]]] = value
    canvas.paste(Image.fromarray(pixels))


def read_labelme_json(path: Path) -> dict:
    """One labelme JSON file, checked to hold a ``shapes`` list."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable labelme JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("shapes"), list):
        raise DataError(f"{path}: not a labelme annotation (no 'shapes' list)")
    return document


def rasterise_labelme(
    document: dict, shape: tuple[int, int], class_of: Callable[[str], int], source: str
) -> np.ndarray:
    """labelme shapes -> uint8 (H, W) class indices, painted in file order so later shapes cover earlier."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    for item in document["shapes"]:
        draw_labelme_shape(canvas, item, class_of(str(item.get("label", ""))), source)
    return np.asarray(canvas).copy()


def _has_labelme_json(folder: Path) -> bool:
    for path in sorted(folder.glob("*.json"))[:20]:
        try:
            if isinstance(json.loads(path.read_text(encoding="utf-8")).get("shapes"), list):
                return True
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
    return False


def _labelme_folder(root: Path) -> Path | None:
    """Where the JSON files sit: the data folder itself, else the one sub-folder (not test/) holding them."""
    if _has_labelme_json(root):
        return root
    if (root / "train").is_dir():
        return None
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "test"):
        if _has_labelme_json(folder):
            return folder
    return None


def _folders_pair(root: Path) -> tuple[Path, Path] | None:
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return root / "images", root / "masks"
    for masks in ("SegmentationClassPNG", "SegmentationClass"):
        if (root / "JPEGImages").is_dir() and (root / masks).is_dir():
            return root / "JPEGImages", root / masks
    return None


def detect_layout(root: str | Path) -> str:
    """The layout a data folder holds, by what is in it; never ``auto``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; pass --data-dir")
    if (root / "train").is_dir() or (root / "train.zip").is_file():
        return "carvana"
    if (root / "annotations" / "trimaps").is_dir():
        return "pet"
    if _folders_pair(root) is not None:
        return "folders"
    if _labelme_folder(root) is not None:
        return "labelme"
    raise DataError(f"{root}: no known data layout; expected one of {_layout_help()}; or pass --layout")


EXIF_ORIENTATION = 0x0112


def _read_upright(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """An image turned as its EXIF orientation says: labelme shows and annotates phone photos that way."""
    with _decoding(str(path)), Image.open(path) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    return np.asarray(rgb), (rgb.height, rgb.width)


class SegmentationData:
    """A data set of images and class-index masks in one of the non-Carvana layouts.

    Built by ``open_data``; ``masks`` maps each training id to what ``read_raw`` turns into class indices.
    """

    def __init__(
        self,
        root: Path,
        layout: str,
        classes: list[str],
        ignore_index: int,
        images: dict[str, Path],
        masks: dict[str, Path],
        tests: dict[str, Path],
        read_raw: Callable[[str, Path, tuple[int, int] | None], np.ndarray],
        mask_shape: Callable[[str, Path], tuple[int, int]],
    ):
        self.root = Path(root)
        self.layout = layout
        self.classes = list(classes)
        self.ignore_index = ignore_index
        self._images = images
        self._masks = masks
        self._tests = tests
        self._read_raw = read_raw
        self._mask_shape = mask_shape

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_ids(self) -> list[str]:
        return sorted(set(self._images) & set(self._masks))

    def test_ids(self) -> list[str]:
        return sorted(self._tests)

    def mask_ids(self) -> set[str]:
        return set(self._masks)

    def _path(self, image_id: str, split: str) -> Path:
        files = {"train": self._images, "test": self._tests}[split]
        if image_id not in files:
            raise DataError(f"{self.root}: no {split} image with id {image_id!r}")
        return files[image_id]

    def image_path(self, image_id: str, split: str = "train") -> str:
        return str(self._path(image_id, split))

    def read_image(self, image_id: str, split: str = "train", reduce_to: tuple[int, int] | None = None) -> np.ndarray:
        """RGB uint8 (H, W, 3), whatever the file holds (greyscale, CMYK, RGBA, palette)."""
        return self.read_image_and_shape(image_id, split, reduce_to)[0]

    def read_image_and_shape(self, image_id: str, split: str = "train", reduce_to: tuple[int, int] | None = None):
        path = self._path(image_id, split)
        if self.layout == "labelme":
            return _read_upright(path)
        return _decode_jpeg(path.read_bytes(), str(path), reduce_to)  # any format; JPEGs decode at reduced scale

    def image_shape(self, image_id: str, split: str = "train") -> tuple[int, int]:
        path = self._path(image_id, split)
        if self.layout == "labelme":
            with _decoding(str(path)), Image.open(path) as image:
                turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
                return (image.width, image.height) if turned else (image.height, image.width)
        return _image_shape(path.read_bytes(), str(path))

    def check_masks(self, image_ids: list[str]) -> None:
        missing = sorted(set(image_ids) - set(self._masks))
        if missing:
            raise DataError(
                f"{self.root}: {len(missing)} training image(s) have no mask, e.g. {missing[:3]}; "
                "restore the masks or remove those images"
            )

    def read_mask(self, image_id: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 (H, W) class indices, ignored pixels = ``ignore_index``; values checked against the classes."""
        self.check_masks([image_id])
        source = self._masks[image_id]
        values = self._read_raw(image_id, source, shape)
        return check_mask_values(values, str(source), self.classes, self.ignore_index)

    def _check_sizes(self, image_id: str, shape: tuple[int, int], mask_shape: tuple[int, int]) -> None:
        if shape != tuple(mask_shape):
            raise DataError(
                f"{self.image_path(image_id)}: image is {shape[1]}x{shape[0]} but its mask "
                f"{self._masks[image_id]} is {mask_shape[1]}x{mask_shape[0]}; the mask belongs to another image"
            )

    def check_sample(self, image_id: str) -> None:
        """The size check the loader would meet, from headers (labelme: the JSON's stated size)."""
        self.check_masks([image_id])
        shape = self.image_shape(image_id)
        self._check_sizes(image_id, shape, self._mask_shape(image_id, self._masks[image_id]) or shape)

    def read_sample(self, image_id: str, reduce_to: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        image, full_shape = self.read_image_and_shape(image_id, "train", reduce_to)
        mask = self.read_mask(image_id, full_shape)
        self._check_sizes(image_id, full_shape, mask.shape)
        return image, mask

    def class_pixel_counts(self, image_id: str) -> np.ndarray:
        """int64 (K,): pixels of each class in the image's mask, ignored pixels left out."""
        mask = self.read_mask(image_id)
        kept = mask[mask != self.ignore_index]
        return np.bincount(kept.ravel(), minlength=self.num_classes).astype(np.int64)


# The mask readers are module-level functions and small classes, not closures: the data object travels
# to spawned processes (inference shards, DataLoader workers on macOS and Windows) by pickling.


def _read_index_mask(_image_id: str, path: Path, _shape) -> np.ndarray:
    return decode_index_mask(path)


def _mask_header_shape(_image_id: str, path: Path) -> tuple[int, int]:
    return _image_shape(path.read_bytes(), str(path), "mask")


def _test_images(root: Path, test_images: str | Path | None) -> dict[str, Path]:
    if test_images is not None:
        folder = Path(test_images)
        if not folder.is_dir():
            raise DataError(f"{folder}: test image folder not found")
        return files_by_stem(folder)
    return files_by_stem(root / "test")


def _resolve_classes(classes: str, files: list[Path]) -> list[str] | None:
    if classes:
        return parse_classes(classes)
    for path in files:
        if path.is_file():
            return read_classes_file(path) if path.name != "labels.txt" else read_labelme_labels(path)
    return None


def _open_folders(root, classes, ignore_index, tests) -> SegmentationData:
    images_dir, masks_dir = _folders_pair(root) or (None, None)
    if images_dir is None:
        raise DataError(f"{root}: not the folders layout; expected {LAYOUT_NEEDS['folders']}")
    images, masks = files_by_stem(images_dir), files_by_stem(masks_dir, MASK_EXTENSIONS)
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DataError(
            f"{masks_dir}: {len(orphans)} mask(s) have no image in {images_dir.name}/ with the same stem, "
            f"e.g. {orphans[:3]}; rename or remove them"
        )
    unlabelled = len(set(images) - set(masks))
    if unlabelled:
        log.info(
            "%s: %d image(s) without a mask in %s/ are not training images", images_dir, unlabelled, masks_dir.name
        )
    names = _resolve_classes(classes, [root / "classes.txt"])
    if names is None:
        highest = 0
        for path in masks.values():
            values = decode_index_mask(path)
            values = values[values != ignore_index]
            highest = max(highest, int(values.max()) if values.size else 0)
        names = [f"class_{index}" for index in range(max(highest + 1, 2))]
        log.info(
            "%s: no classes.txt; %d classes from the masks named class_0..class_%d; write classes.txt "
            "(one name a line, background first) or pass --classes to name them",
            root,
            len(names),
            len(names) - 1,
        )
    return SegmentationData(
        root, "folders", names, ignore_index, images, masks, tests,
        _read_index_mask, _mask_header_shape,
    )  # fmt: skip


class _PetTrimaps:
    """Trimap values -> class indices through ``lookup`` (-1: a value no trimap holds)."""

    def __init__(self, lookup: np.ndarray):
        self.lookup = lookup

    def __call__(self, _image_id: str, path: Path, _shape) -> np.ndarray:
        values = decode_index_mask(path)
        mapped = self.lookup[np.clip(values, 0, 255)]
        bad = sorted({int(v) for v in np.unique(values[mapped < 0])})
        if bad:
            raise DataError(f"{path}: trimap value(s) {bad} are not 1 (pet), 2 (background) or 3 (border)")
        return mapped


def _open_pet(root, classes, ignore_index, pet_border, tests) -> SegmentationData:
    if pet_border not in PET_BORDERS:
        raise DataError(f"pet_border must be one of {PET_BORDERS}, got {pet_border!r}")
    images = files_by_stem(root / "images")
    trimaps = files_by_stem(root / "annotations" / "trimaps", (".png",))
    unmatched = len(set(images) ^ set(trimaps))
    if unmatched:
        log.info("%s: %d image(s) or trimap(s) without their pair skipped", root, unmatched)
    common = set(images) & set(trimaps)
    images = {stem: path for stem, path in images.items() if stem in common}
    trimaps = {stem: path for stem, path in trimaps.items() if stem in common}
    rule = ["background", "pet"] + (["border"] if pet_border == "class" else [])
    names = parse_classes(classes) if classes else rule
    if len(names) != len(rule):
        raise DataError(f"--classes {classes!r}: the pet layout with pet_border={pet_border} has {len(rule)} classes")
    lookup = np.full(256, -1, dtype=np.int64)  # trimap value -> class index; -1 marks values no trimap holds
    lookup[PET_TRIMAP_BACKGROUND] = 0
    lookup[PET_TRIMAP_PET] = 1
    lookup[PET_TRIMAP_BORDER] = 2 if pet_border == "class" else ignore_index

    read_trimap = _PetTrimaps(lookup)
    return SegmentationData(root, "pet", names, ignore_index, images, trimaps, tests, read_trimap, _mask_header_shape)


class _LabelmeMasks:
    """labelme JSON files drawn as class indices: labels looked up in the classes, ``__ignore__`` -> ignore."""

    def __init__(self, names: list[str], index_of: dict[str, int], ignore_index: int, images: dict[str, Path]):
        self.names, self.index_of, self.ignore_index, self.images = names, index_of, ignore_index, images

    def class_of(self, label: str, path: Path) -> int:
        if label == LABELME_IGNORE:
            return self.ignore_index
        if label not in self.index_of:
            raise DataError(f"{path}: label {label!r} is not one of the classes {self.names}; add it or rename it")
        return self.index_of[label]

    def read(self, image_id: str, path: Path, shape) -> np.ndarray:
        document = read_labelme_json(path)
        image = self.images[image_id]
        size = shape or _labelme_size(document) or _image_shape(image.read_bytes(), str(image))
        return rasterise_labelme(document, size, lambda label: self.class_of(label, path), str(path))

    def shape(self, _image_id: str, path: Path) -> tuple[int, int] | None:
        """The JSON's stated size, its labels checked on the way (what check_sample can find without drawing)."""
        document = read_labelme_json(path)
        for item in document["shapes"]:
            self.class_of(str(item.get("label", "")), path)
        return _labelme_size(document)


def _open_labelme(root, classes, ignore_index, tests) -> SegmentationData:
    folder = _labelme_folder(root)
    if folder is None:
        raise DataError(f"{root}: not the labelme layout; expected {LAYOUT_NEEDS['labelme']}")
    documents: dict[str, Path] = {}
    images: dict[str, Path] = {}
    beside = files_by_stem(folder)
    for path in sorted(folder.glob("*.json")):
        document = read_labelme_json(path)
        image = folder / str(document.get("imagePath") or "").replace("\\", "/")  # labelme on Windows
        if not is_image_file(image):
            image = beside.get(path.stem)
        if image is None:
            raise DataError(f"{path}: its image {document.get('imagePath')!r} is not beside it; put it there")
        documents[path.stem], images[path.stem] = path, image
    tests = tests or {}
    unlabelled = len(set(beside) - set(documents) - {p.stem for p in images.values()})
    if unlabelled:
        log.info("%s: %d image(s) without a labelme JSON are not training images", folder, unlabelled)
    names = _resolve_classes(classes, [root / "labels.txt", folder / "labels.txt", root / "classes.txt"])
    if names is None:
        labels = {str(s.get("label", "")) for p in documents.values() for s in read_labelme_json(p)["shapes"]}
        names = ["background"] + sorted(labels - {LABELME_IGNORE, LABELME_BACKGROUND, "background"})
        log.info("%s: classes from the labels in the JSON files: %s; write labels.txt to fix their order", root, names)
    index_of = {name: index for index, name in enumerate(names)}
    index_of.setdefault(LABELME_BACKGROUND, 0)

    masks = _LabelmeMasks(names, index_of, ignore_index, images)
    return SegmentationData(root, "labelme", names, ignore_index, images, documents, tests, masks.read, masks.shape)


def _labelme_size(document: dict) -> tuple[int, int] | None:
    height, width = document.get("imageHeight"), document.get("imageWidth")
    return (int(height), int(width)) if height and width else None


def open_data(
    root: str | Path,
    layout: str = "auto",
    classes: str = "",
    ignore_index: int = 255,
    pet_border: str = "ignore",
    mask_source: str = "auto",
    test_images: str | Path | None = None,
) -> "CarvanaData | SegmentationData":
    """The data folder ``root`` read in ``layout`` (``auto``: detected); Carvana exactly as ``CarvanaData``."""
    if layout not in LAYOUTS:
        raise DataError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    root = Path(root)
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "carvana":
        return CarvanaData(root, mask_source)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; pass --data-dir")
    if not 0 <= ignore_index <= 255:
        raise DataError(f"--ignore-index {ignore_index}: must be 0..255 (masks are 8-bit)")
    tests = _test_images(root, test_images)
    if layout == "folders":
        data = _open_folders(root, classes, ignore_index, tests)
    elif layout == "pet":
        data = _open_pet(root, classes, ignore_index, pet_border, tests)
    else:
        data = _open_labelme(root, classes, ignore_index, tests)
    if ignore_index < data.num_classes:
        raise DataError(f"--ignore-index {ignore_index}: it is a class ({data.classes[ignore_index]}); pick 255")
    if not data.train_ids() and not data.test_ids():
        raise DataError(f"{root}: no training or test images found for layout {layout}; {LAYOUT_NEEDS[layout]}")
    return data
