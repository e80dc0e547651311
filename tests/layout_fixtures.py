"""Tiny data folders in each non-Carvana layout, for the layout tests and end-to-end runs."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 64, 96
COUNT = 8
GROUPS = ("alpha", "beta", "gamma", "delta")
PET_BREEDS = ("Abyssinian", "beagle")
PET_SIZES = ((64, 96), (72, 80), (56, 104))  # the real set's images differ in size
FOLDER_CLASSES = ["background", "square", "disc"]
PALETTE = [0, 0, 0, 200, 40, 40, 40, 40, 200] + [0, 0, 0] * 252 + [255, 255, 255]


def sample_id(index: int, groups: tuple[str, ...] = GROUPS) -> str:
    """``<group>_<n>``: image ``index`` in groups taken in turn, so ``^(.+)_\\d+$`` finds the group."""
    return f"{groups[index % len(groups)]}_{index // len(groups) + 1}"


def square_box(index: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right), exclusive ends, of image ``index``'s square: the same place, shifted a little."""
    top, left = 8 + index % 3, 8 + index % 4
    return top, left, top + 20, left + 28


def disc_inside(index: int, shape: tuple[int, int] = (HEIGHT, WIDTH)) -> np.ndarray:
    """bool (H, W): image ``index``'s disc, near the bottom right."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    centre_row, centre_col = shape[0] - 22 + index % 3, shape[1] - 30 - index % 4
    return (rows - centre_row) ** 2 + (cols - centre_col) ** 2 <= 12**2


def class_mask(index: int) -> np.ndarray:
    """uint8 (H, W): 0 background, 1 the square, 2 the disc."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    top, left, bottom, right = square_box(index)
    mask[top:bottom, left:right] = 1
    mask[disc_inside(index)] = 2
    return mask


def render_image(mask: np.ndarray, seed: int) -> np.ndarray:
    """RGB uint8: grey noise with each class in its own colour, so a model can learn it."""
    rng = np.random.default_rng(seed)
    image = rng.integers(90, 140, (*mask.shape, 3)).astype(np.uint8)
    image[mask == 1] = (200, 40, 40)
    image[mask == 2] = (40, 40, 200)
    return image


def _ring(inside: np.ndarray) -> np.ndarray:
    """The one-pixel outer border of a region (VOC's and the trimaps' uncertain edge)."""
    grown = inside.copy()
    grown[1:] |= inside[:-1]
    grown[:-1] |= inside[1:]
    grown[:, 1:] |= inside[:, :-1]
    grown[:, :-1] |= inside[:, 1:]
    return grown & ~inside


def save_mask(mask: np.ndarray, path: Path, palette: bool) -> None:
    """Class indices as a palette PNG (VOC's way) or a greyscale one; the pixel values are the indices either way."""
    image = Image.fromarray(mask, "P" if palette else "L")
    if palette:
        image.putpalette(PALETTE)
    image.save(path)


def make_folders(
    tmp_path: Path, palette: bool = True, voc: bool = False, classes_file: bool = True, count: int = COUNT
) -> Path:
    """``images/`` + ``masks/`` (or VOC's ``JPEGImages/`` + ``SegmentationClass/`` with a 255 border round
    each square), ``classes.txt`` (background, square, disc) and two ``test/`` images. Returns the folder."""
    root = Path(tmp_path) / ("voc" if voc else "folders")
    images = root / ("JPEGImages" if voc else "images")
    masks = root / ("SegmentationClass" if voc else "masks")
    for folder in (images, masks, root / "test"):
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        mask = class_mask(index)
        Image.fromarray(render_image(mask, index)).save(images / f"{sample_id(index)}.jpg", quality=95)
        if voc:
            mask[_ring(mask == 1)] = 255
        save_mask(mask, masks / f"{sample_id(index)}.png", palette)
    for index in range(2):
        Image.fromarray(render_image(class_mask(index + count), 100 + index)).save(root / "test" / f"t_{index}.jpg")
    if classes_file:
        (root / "classes.txt").write_text("\n".join(FOLDER_CLASSES) + "\n\n")
    return root


LABELME_CLASSES = ["background", "cat", "dog"]


def labelme_document(index: int) -> dict:
    """A cat polygon, a dog rectangle drawn over part of it, and an ``__ignore__`` box over part of the dog."""
    shift = index % 3
    return {
        "version": "5.2.1",
        "flags": {},
        "shapes": [
            {"label": "cat", "points": [[10 + shift, 10], [50 + shift, 10], [50 + shift, 40], [10 + shift, 40]],
             "group_id": None, "shape_type": "polygon", "flags": {}},
            {"label": "dog", "points": [[40 + shift, 30], [80 + shift, 55]],
             "group_id": None, "shape_type": "rectangle", "flags": {}},
            {"label": "__ignore__", "points": [[70 + shift, 50], [90 + shift, 60]],
             "group_id": None, "shape_type": "rectangle", "flags": {}},
        ],
        "imagePath": f"{sample_id(index)}.jpg",
        "imageData": None,
        "imageHeight": HEIGHT,
        "imageWidth": WIDTH,
    }  # fmt: skip


def labelme_truth(index: int, ignore_index: int = 255) -> np.ndarray:
    """What ``labelme_document(index)`` rasterises to, worked by hand (rectangles and this polygon include
    their edge pixels)."""
    shift = index % 3
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[10:41, 10 + shift : 51 + shift] = 1
    mask[30:56, 40 + shift : 81 + shift] = 2
    mask[50:61, 70 + shift : 91 + shift] = ignore_index
    return mask


def make_labelme(tmp_path: Path, labels_txt: bool = False, count: int = COUNT) -> Path:
    """labelme JSON beside ``count`` JPEGs, one more JPEG without a JSON, two ``test/`` images; with ``labels_txt``
    a labelme ``labels.txt`` ordering the classes background, dog, cat."""
    root = Path(tmp_path) / "labelme"
    (root / "test").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        truth = labelme_truth(index, 0)
        image = render_image(np.where(truth == 0, 0, truth), index)
        Image.fromarray(image).save(root / f"{sample_id(index)}.jpg", quality=95)
        (root / f"{sample_id(index)}.json").write_text(json.dumps(labelme_document(index), indent=1))
    Image.fromarray(render_image(labelme_truth(0, 0), 50)).save(root / "unlabelled.jpg")
    for index in range(2):
        Image.fromarray(render_image(labelme_truth(index, 0), 60 + index)).save(root / "test" / f"t_{index}.jpg")
    if labels_txt:
        (root / "labels.txt").write_text("__ignore__\n_background_\ndog\ncat\n")
    return root


def pet_id(index: int) -> str:
    """``<breed>_<n>`` as the real files are named, breeds in turn."""
    return sample_id(index, PET_BREEDS)


def pet_trimap(index: int) -> np.ndarray:
    """uint8 trimap of image ``index`` (one of ``PET_SIZES``): 2 background, 1 the pet (a disc), 3 its
    one-pixel border."""
    shape = PET_SIZES[index % len(PET_SIZES)]
    inside = disc_inside(index, shape)
    trimap = np.full(shape, 2, np.uint8)
    trimap[inside] = 1
    trimap[_ring(inside)] = 3
    return trimap


def make_pet(tmp_path: Path, count: int = COUNT) -> Path:
    """Oxford-IIIT Pet as downloaded: ``images/*.jpg`` (one greyscale, one CMYK), ``._*`` AppleDouble and
    ``.mat`` clutter, ``annotations/trimaps/*.png``, one trimap without its image; two ``test/`` images."""
    root = Path(tmp_path) / "pet"
    images, trimaps = root / "images", root / "annotations" / "trimaps"
    for folder in (images, trimaps, root / "test"):
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        trimap = pet_trimap(index)
        image = Image.fromarray(render_image(np.where(trimap == 1, 2, 0).astype(np.uint8), index))
        if index == 1:
            image = image.convert("L")
        elif index == 2:
            image = image.convert("CMYK")
        image.save(images / f"{pet_id(index)}.jpg", quality=95)
        Image.fromarray(trimap, "L").save(trimaps / f"{pet_id(index)}.png")
        (trimaps / f"._{pet_id(index)}.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (images / "._Abyssinian_1.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (images / "Abyssinian_100.mat").write_bytes(b"MATLAB 5.0")
    Image.fromarray(pet_trimap(9), "L").save(trimaps / "Abyssinian_99.png")
    for index in range(2):
        image = render_image(np.where(pet_trimap(index) == 1, 2, 0).astype(np.uint8), 70 + index)
        Image.fromarray(image).save(root / "test" / f"t_{index}.jpg")
    return root
