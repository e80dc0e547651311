"""Tiny data folders in each layout the project reads, with shapes a model learns in an epoch or two.

Images are named ``<group>_<n>`` (groups of two), so ``--group-regex '^(.+)_\\d+$'`` groups them.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HEIGHT, WIDTH = 64, 96
COLOURS = {1: (220, 40, 40), 2: (40, 60, 220), 3: (40, 200, 60)}  # the colour each class is painted in


def _scene(index: int, height: int = HEIGHT, width: int = WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, class-index mask): a red box (class 1) and a blue disc (class 2) placed by ``index``, and a
    small green square (class 3, the rare one) in every third image."""
    rng = np.random.default_rng(index)
    image = Image.new("RGB", (width, height), (150, 150, 150))
    mask = Image.new("L", (width, height), 0)
    shapes = [(1, "box"), (2, "disc")] + ([(3, "square")] if index % 3 == 0 else [])
    for value, kind in shapes:
        x, y = int(rng.integers(4, width - 36)), int(rng.integers(4, height - 28))
        box = {"box": (x, y, x + 30, y + 22), "disc": (x, y, x + 24, y + 24), "square": (x, y, x + 8, y + 8)}[kind]
        for canvas, fill in ((image, COLOURS[value]), (mask, value)):
            draw = ImageDraw.Draw(canvas)
            (draw.ellipse if kind == "disc" else draw.rectangle)(box, fill=fill)
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, size=(height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8), np.asarray(mask)


def _save_mask(mask: np.ndarray, path: Path, palette: bool) -> None:
    image = Image.fromarray(mask, mode="P" if palette else "L")
    if palette:
        image.putpalette([0, 0, 0, 220, 40, 40, 40, 60, 220, 40, 200, 60] + [255, 255, 255] * 252)
    image.save(path)


def _name(index: int) -> str:
    return f"scene{index // 2}_{index % 2 + 1}"


def make_folders(
    root: Path, palette: bool = True, voc: bool = False, count: int = 8, classes_file: bool = True, tests: int = 2
) -> Path:
    """``images/`` + ``masks/`` (or VOC's ``JPEGImages/`` + ``SegmentationClass/``, objects outlined with the
    ignore index 255 as VOC does), ``classes.txt`` (background, box, disc, square), ``test/``."""
    root = Path(root)
    image_folder, mask_folder = ("JPEGImages", "SegmentationClass") if voc else ("images", "masks")
    (root / image_folder).mkdir(parents=True, exist_ok=True)
    (root / mask_folder).mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(exist_ok=True)
    for index in range(count):
        image, mask = _scene(index)
        Image.fromarray(image).save(root / image_folder / f"{_name(index)}.jpg", quality=95)
        if voc:  # a 1-pixel border of 255 around every object
            grown = np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(3)))
            mask = np.where((grown != mask) & (mask == 0), 255, mask).astype(np.uint8)
        _save_mask(mask, root / mask_folder / f"{_name(index)}.png", palette)
    for index in range(count, count + tests):
        Image.fromarray(_scene(index)[0]).save(root / "test" / f"{_name(index)}.jpg", quality=95)
    if classes_file:
        (root / "classes.txt").write_text("background\nbox\ndisc\nsquare\n")
    return root


def _rectangle(box) -> list[list[float]]:
    x0, y0, x1, y1 = box
    return [[x0, y0], [x1, y1]]


def make_labelme(root: Path, count: int = 8, labels_file: bool = True, tests: int = 2) -> Path:
    """labelme JSON files beside their JPEGs: a ``box`` rectangle, a ``disc`` polygon (an octagon), a small
    ``square`` in every third image, and an ``__ignore__`` strip along the bottom; labels.txt in labelme's form."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(exist_ok=True)
    for index in range(count + tests):
        rng = np.random.default_rng(100 + index)
        image = Image.new("RGB", (WIDTH, HEIGHT), (150, 150, 150))
        draw = ImageDraw.Draw(image)
        bx, by = int(rng.integers(4, 40)), int(rng.integers(4, 30))
        cx, cy = int(rng.integers(56, 80)), int(rng.integers(16, 40))
        octagon = [[cx + 12 * np.cos(a), cy + 12 * np.sin(a)] for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)]
        draw.rectangle((bx, by, bx + 30, by + 22), fill=COLOURS[1])
        draw.polygon([tuple(point) for point in octagon], fill=COLOURS[2])
        shapes = [
            {"label": "box", "points": _rectangle((bx, by, bx + 30, by + 22)), "shape_type": "rectangle"},
            {"label": "disc", "points": octagon, "shape_type": "polygon"},
        ]
        if index % 3 == 0:
            draw.rectangle((bx + 4, by + 4, bx + 12, by + 12), fill=COLOURS[3])  # over the box: drawn later, wins
            shapes.append(
                {"label": "square", "points": _rectangle((bx + 4, by + 4, bx + 12, by + 12)), "shape_type": "rectangle"}
            )
        shapes.append(
            {
                "label": "__ignore__",
                "points": _rectangle((0, HEIGHT - 4, WIDTH - 1, HEIGHT - 1)),
                "shape_type": "rectangle",
            }
        )
        folder = root / "test" if index >= count else root
        Image.fromarray(np.asarray(image)).save(folder / f"{_name(index)}.jpg", quality=95)
        if index < count:
            document = {
                "version": "5.4.1",
                "flags": {},
                "shapes": shapes,
                "imagePath": f"{_name(index)}.jpg",
                "imageData": None,
                "imageHeight": HEIGHT,
                "imageWidth": WIDTH,
            }
            (root / f"{_name(index)}.json").write_text(json.dumps(document))
    if labels_file:
        (root / "labels.txt").write_text("__ignore__\n_background_\nbox\ndisc\nsquare\n")
    return root


PET_SIZES = ((64, 96), (72, 80), (64, 96), (56, 88))  # (height, width): the real images differ in size


def make_pet(root: Path, count: int = 8, tests: int = 2) -> Path:
    """Oxford-IIIT Pet as downloaded: ``images/<Breed>_<n>.jpg`` and ``annotations/trimaps/<same>.png`` (1 pet,
    2 background, 3 border), with the download's stray ``._`` and ``.mat`` files; ``test/``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "trimaps").mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(exist_ok=True)
    breeds = ("Abyssinian", "beagle")
    for index in range(count + tests):
        height, width = PET_SIZES[index % len(PET_SIZES)]
        rng = np.random.default_rng(200 + index)
        image = Image.new("RGB", (width, height), (90, 130, 90))
        trimap = Image.new("L", (width, height), 2)
        x, y = int(rng.integers(6, width - 40)), int(rng.integers(6, height - 40))
        ImageDraw.Draw(image).ellipse((x, y, x + 34, y + 34), fill=(200, 150, 90))
        ImageDraw.Draw(trimap).ellipse((x - 2, y - 2, x + 36, y + 36), fill=3)
        ImageDraw.Draw(trimap).ellipse((x + 2, y + 2, x + 32, y + 32), fill=1)
        name = f"{breeds[index % 2]}_{index // 2 + 1}"
        if index >= count:
            image.save(root / "test" / f"{name}.jpg", quality=95)
            continue
        mode = {0: "L", 1: "CMYK"}.get(index, "RGB")  # the download holds a few greyscale and CMYK JPEGs
        image.convert(mode).save(root / "images" / f"{name}.jpg", quality=95)
        trimap.save(root / "annotations" / "trimaps" / f"{name}.png")
    (root / "images" / "._Abyssinian_1.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "images" / "Abyssinian_100.mat").write_bytes(b"MATLAB 5.0")
    return root


def cut_short(path: Path) -> None:
    """Keep the first half of a file, as an interrupted copy or download leaves it: its header still reads."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


FOLDER_BREAKAGES = ("truncated-jpeg", "truncated-png", "truncated-gif", "mask-size")


def break_folders_sample(root: Path, image_id: str, part: str) -> None:
    """Damage one sample of a ``make_folders`` copy as ``part`` (one of FOLDER_BREAKAGES) says: its JPEG or PNG
    mask cut short (the header still reads), its mask saved as a GIF and cut short, or a mask of another size."""
    image, mask = root / "images" / f"{image_id}.jpg", root / "masks" / f"{image_id}.png"
    if part == "truncated-gif":
        with Image.open(mask) as stored:
            stored.save(mask.with_suffix(".gif"))
        mask.unlink()
        mask = mask.with_suffix(".gif")
    if part == "mask-size":
        _save_mask(np.zeros((HEIGHT, WIDTH - 2), dtype=np.uint8), mask, palette=True)
    else:
        cut_short(image if part == "truncated-jpeg" else mask)
