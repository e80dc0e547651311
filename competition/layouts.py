"""Data layouts beyond Carvana: image/mask folders (VOC's names too), labelme JSON and Oxford-IIIT Pet trimaps."""

import base64
import io
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from competition.data import CarvanaData, _decoding, _image_shape, decode_image_and_shape
from competition.errors import DataError

logger = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112  # the EXIF tag of a photo's orientation
LAYOUTS = ("auto", "carvana", "folders", "labelme", "pet")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".gif")
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


def files_by_stem(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    """stem -> file of the given extensions in ``folder`` (macOS ``._`` shadow files left out); a stem
    given twice (``a.jpg`` and ``a.png``) is refused, since it would be unclear which one is meant."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in extensions or path.name.startswith("._") or not path.is_file():
            continue
        if path.stem in found:
            raise DataError(f"{folder}: {found[path.stem].name} and {path.name} share a name; keep one of them")
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


def read_index_mask(data: bytes, source: str) -> np.ndarray:
    """A mask file -> its class indices (H, W) uint8, read as stored: palette ('P') indices or greyscale values,
    never through an RGB conversion (which would turn indices into colours)."""
    with _decoding(source, "mask"), Image.open(io.BytesIO(data)) as image:
        mode = image.mode
        if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA"):
            raise DataError(
                f"{source}: the mask is {mode}; masks must hold class indices (a palette or greyscale PNG), not colours"
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

    def __init__(self, root: Path, images: dict[str, Path], classes: list[str], ignore_index: int, test: dict):
        self.root = root
        self.images = images
        self.test_images = test
        self.classes = classes
        self.ignore_index = ignore_index

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
        return decode_image_and_shape(path.read_bytes(), str(path), reduce_to)

    def image_shape(self, image_id: str, split: str = "train") -> tuple[int, int]:
        path = self._image_file(image_id, split)
        return _image_shape(path.read_bytes(), str(path))

    def _mask(self, image_id: str) -> tuple[np.ndarray, str]:
        """(the mask's class indices before checking, the file they came from)."""
        raise NotImplementedError

    def mask_source(self, image_id: str) -> str:
        raise NotImplementedError

    def read_mask(self, image_id: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 (H, W) class indices, the ignore index for pixels left out; a value that is neither stops."""
        mask, source = self._mask(image_id)
        self._check_values(mask, source)
        return mask

    def _check_values(self, mask: np.ndarray, source: str) -> None:
        counts = np.bincount(mask.ravel(), minlength=256)
        counts[self.ignore_index] = 0
        bad = np.flatnonzero(counts[self.num_classes :]) + self.num_classes
        if bad.size:
            raise DataError(
                f"{source}: mask value(s) {bad[:5].tolist()} are neither a class (0..{self.num_classes - 1}: "
                f"{', '.join(self.classes)}) nor the ignore index {self.ignore_index}; name the classes in "
                "classes.txt or --classes, or fix the mask"
            )

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
        counts = np.bincount(self.read_mask(image_id).ravel(), minlength=256).astype(np.int64)
        return counts[: self.num_classes]


class FolderData(SegmentationData):
    """``images/`` + ``masks/`` (or VOC's ``JPEGImages/`` + ``SegmentationClass[PNG]/``), same stems."""

    layout = "folders"

    def __init__(self, root: Path, classes: str, ignore_index: int, test_images: Path | None):
        self.root, self.ignore_index = root, ignore_index  # the mask scan below needs them
        image_folder, mask_folder = next(
            ((root / a, root / b) for a, b in FOLDER_PAIRS if (root / a).is_dir() and (root / b).is_dir()),
            (root / "images", root / "masks"),
        )
        images = files_by_stem(image_folder, IMAGE_EXTENSIONS)
        self.masks = files_by_stem(mask_folder, MASK_EXTENSIONS)
        unmasked = sorted(set(images) - set(self.masks))
        if unmasked:  # VOC's JPEGImages holds the detection images too: only the masked ones are for segmentation
            logger.info("%s: %d image(s) without a mask in %s are left out", image_folder, len(unmasked), mask_folder)
        orphans = sorted(set(self.masks) - set(images))
        if orphans:
            logger.warning("%s: %d mask(s) without an image, e.g. %s", mask_folder, len(orphans), orphans[:3])
        images = {stem: path for stem, path in images.items() if stem in self.masks}
        test = files_by_stem(test_images or root / "test", IMAGE_EXTENSIONS)
        names = _classes_from(root, classes, ("classes.txt",)) or self._classes_from_masks(images)
        super().__init__(root, images, names, ignore_index, test)

    def _classes_from_masks(self, images: dict) -> list[str]:
        """No class names given: as many classes as the largest mask value says, named by number."""
        largest = 0
        for stem in images:
            mask, _ = self._mask(stem)
            values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
            values = values[values != self.ignore_index]
            largest = max(largest, int(values.max(initial=0)))
        names = [f"class_{index}" for index in range(max(largest + 1, 2))]
        logger.warning(
            "%s: no classes.txt or --classes: %d classes from the mask values, named class_0..class_%d; "
            "name them in classes.txt (one a line, background first)",
            self.root,
            len(names),
            len(names) - 1,
        )
        return names

    def mask_source(self, image_id: str) -> str:
        return str(self.masks[image_id])

    def _mask(self, image_id: str) -> tuple[np.ndarray, str]:
        path = self.masks[image_id]
        return read_index_mask(path.read_bytes(), str(path)), str(path)


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

    def _mask(self, image_id: str) -> tuple[np.ndarray, str]:
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
            array = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
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

    def _mask(self, image_id: str) -> tuple[np.ndarray, str]:
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
        return np.asarray(canvas, dtype=np.uint8), source


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
    raise DataError(f"{root}: no data layout recognised. {LAYOUT_HELP}")


def open_data(
    root: str | Path,
    layout: str = "auto",
    classes: str = "",
    ignore_index: int = 255,
    pet_border: str = "ignore",
    mask_source: str = "auto",
    test_images: str | Path | None = None,
):
    """The data folder ``root`` read as ``layout`` (``auto``: recognised by what it holds)."""
    root = Path(root)
    layout = detect_layout(root) if layout == "auto" else layout
    test_folder = Path(test_images) if test_images else None
    if layout == "carvana":
        return CarvanaData(root, mask_source, test_images=test_folder)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found. {LAYOUT_HELP}")
    if layout == "folders":
        data = FolderData(root, classes, ignore_index, test_folder)
    elif layout == "pet":
        data = PetData(root, classes, ignore_index, pet_border, test_folder)
    elif layout == "labelme":
        data = LabelmeData(root, classes, ignore_index, test_folder)
    else:
        raise DataError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if not data.images and not data.test_images:
        raise DataError(f"{root}: no images found as the {layout} layout. {LAYOUT_HELP}")
    if test_folder is not None and not data.test_images:
        raise DataError(f"--images {test_folder}: no images there ({', '.join(IMAGE_EXTENSIONS)})")
    if data.ignore_index < data.num_classes:
        raise DataError(f"--ignore-index {data.ignore_index} is one of the {data.num_classes} classes; use 255")
    return data
