"""The labelme layout: labelme JSON files beside their images, each shape drawn as labelme draws it."""

import base64
import io
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from competition.data import _decoding, image_to_array
from competition.errors import DataError
from competition.segmentation_data import (
    IMAGE_EXTENSIONS,
    SegmentationData,
    files_by_stem,
    parse_classes,
    read_class_names,
)
from competition.splits import resolve

logger = logging.getLogger("competition.layouts")

EXIF_ORIENTATION = 0x0112  # the EXIF tag of a photo's orientation
IGNORE_NAME, BACKGROUND_NAME = "__ignore__", "_background_"  # labelme's names: the ignore index, class 0


class LabelmeData(SegmentationData):
    """labelme JSON files beside their images: each shape drawn in file order, later over earlier.

    Rasterised here with Pillow rather than with labelme's own ``shapes_to_label``: the labelme package
    installs PyQt5 and imports Qt at start-up, which a headless notebook or CI machine does not have."""

    layout = "labelme"
    needs = "labelme JSON files (*.json) beside their images"

    @staticmethod
    def detect(root: Path) -> bool:
        return any(path.suffix == ".json" and not path.name.startswith("._") for path in root.iterdir())

    @classmethod
    def read(cls, root: Path, test_folder: Path | None, options: dict) -> "LabelmeData":
        return cls(root, options["classes"], options["ignore_index"], test_folder, options.get("labels", ""))

    def __init__(self, root: Path, classes: str, ignore_index: int, test_images: Path | None, labels: str = ""):
        self.annotations = {path.stem: path for path in sorted(root.glob("*.json")) if not path.name.startswith("._")}
        images = files_by_stem(root, IMAGE_EXTENSIONS)
        unlabelled = sorted(set(images) - set(self.annotations))
        if unlabelled:
            logger.info("%s: %d image(s) without a labelme JSON are not training images", root, len(unlabelled))
        images = {stem: path for stem, path in images.items() if stem in self.annotations}
        missing = sorted(set(self.annotations) - set(images))
        if missing:
            logger.warning("%s: %d labelme JSON(s) without their image, e.g. %s", root, len(missing), missing[:3])
        names, self.labels_file = labelme_classes(root, classes, labels)
        if not names and images:
            found = sorted({shape["label"] for stem in images for shape in self._shapes(stem)} - {IGNORE_NAME})
            names = [BACKGROUND_NAME] + [label for label in found if label != BACKGROUND_NAME]
            logger.warning(
                "%s: no labels.txt here or in %s: classes from the JSON files' labels, %s first, then in "
                "alphabetical order: %s; their indices will differ from labelme's (labelme2voc numbers the classes "
                "in its labels.txt's order): pass --labels FILE, labelme's labels.txt or labelme2voc's class_names.txt",
                root,
                root.parent,
                BACKGROUND_NAME,
                ", ".join(names),
            )
        names = names or [BACKGROUND_NAME]  # no image: nothing is read, and open() says what the folder lacks
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
        index = {name: value for value, name in enumerate(self.classes)} | {IGNORE_NAME: self.ignore_index}
        source = str(self.annotations[image_id])
        canvas = Image.new("L", (width, height), 0)
        for shape in self._shapes(image_id):
            label = shape.get("label")
            if label not in index:
                raise DataError(
                    f"{source}: label {label!r} is not a class ({', '.join(self.classes)}); add it to "
                    f"{self.labels_file or 'labels.txt'}, or name the classes with --labels FILE or --classes"
                )
            draw_shape(canvas, shape, index[label], source)
        return np.array(canvas, dtype=np.uint8), source  # a writable copy, as every other layout gives


def labelme_classes(root: Path, classes: str, labels: str) -> tuple[list[str] | None, str]:
    """(the class names, the file they came from): ``--classes``; else ``--labels FILE``; else ``labels.txt`` or
    ``classes.txt`` beside the JSON files; else ``labels.txt`` one folder up, where labelme's own example keeps it
    (``data_annotated/`` beside ``labels.txt``); else (None, ""). A labels file is labelme's ``labels.txt``
    (``__ignore__``, the ignore index, then ``_background_``, class 0, then the classes) or labelme2voc's
    ``class_names.txt`` (``_background_``, then the classes): the classes are numbered as labelme2voc numbers
    them. ``--classes`` wins: a run's saved settings give back the classes its labels file named, which then
    need not be on the machine that predicts."""
    if classes:
        return parse_classes(classes), ""
    path = _labels_path(root, labels) if labels else None
    if path is not None:
        if not path.is_file():
            raise DataError(
                f"--labels {labels}: labels file not found (relative to --data-dir {root}, or to the current folder)"
            )
        return read_labels_file(path), str(path)
    for place in (root / "labels.txt", root / "classes.txt", root.parent / "labels.txt"):
        if place.is_file():
            names = read_labels_file(place)
            if place.parent != root:
                logger.info("%s: classes from %s (one folder up): %s", root, place, ", ".join(names))
            return names, str(place)
    return None, ""


def _labels_path(root: Path, labels: str) -> Path:
    """``--labels``: relative to the data folder (as --colors is), else to the current folder, or absolute."""
    path = resolve(root, labels)
    return path if path.is_file() or not Path(labels).expanduser().is_file() else Path(labels).expanduser()


def read_labels_file(path: Path) -> list[str]:
    """The class names of labelme's ``labels.txt`` or labelme2voc's ``class_names.txt``, in labelme2voc's order
    (``__ignore__`` left out: it names the ignore index), checked: two at least, none twice, ``_background_``
    (when named) first, as labelme2voc requires."""
    names = read_class_names(path)
    if len(names) < 2:
        raise DataError(f"{path}: name at least two classes, one a line, background first")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"{path}: {repeated} listed more than once")
    if BACKGROUND_NAME in names and names[0] != BACKGROUND_NAME:
        raise DataError(f"{path}: {BACKGROUND_NAME} is class 0 in labelme2voc: list it first (after __ignore__)")
    return names


LABELME_LINE_WIDTH, LABELME_POINT_RADIUS = 10, 5  # as labelme's own shape_to_mask draws lines and points


def draw_shape(canvas: Image.Image, shape: dict, value: int, source: str) -> None:
    """One labelme shape filled with ``value``, as labelme's own conversion draws it: polygon, rectangle, circle
    (centre, a point on the rim), line and linestrip (10 px wide), point (a disc of radius 5), each filled and
    outlined as labelme's shape_to_mask draws it (the outline adds edge pixels a fill alone leaves out), and labelme 5's
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
        draw.polygon(points, fill=value, outline=value)
    elif kind == "rectangle" and len(points) == 2:
        (x0, y0), (x1, y1) = points
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=value, outline=value)
    elif kind == "circle" and len(points) == 2:
        (cx, cy), (px, py) = points
        radius = ((px - cx) ** 2 + (py - cy) ** 2) ** 0.5
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=value, outline=value)
    elif kind in ("line", "linestrip") and len(points) >= 2:
        # labelme (since 7.0, June 2026) rounds a linestrip's joints, so that a wide line has no notch at a turn
        draw.line(points, fill=value, width=LABELME_LINE_WIDTH, joint="curve" if kind == "linestrip" else None)
    elif kind == "point" and len(points) == 1:
        (cx, cy), radius = points[0], LABELME_POINT_RADIUS
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=value, outline=value)
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
