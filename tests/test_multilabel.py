"""The multilabel head (--head multilabel): targets, loss, per-channel probabilities and TTA, packed masks, the
writers, scores per class, the refusals, and a tiny folder data set end to end."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from infer import main as infer
from make_folds import main as make_folds
from train import main as train

LABELS = ("box", "disc", "dot")  # box and disc overlap; dot lies inside the box, in every other image
TRAIN_FLAGS = ["--encoder", "resnet18", "--encoder-weights", "none", "--workers", "0", "--quiet", "--batch-size", "4"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def label_scene(index: int, height: int = 64, width: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, packed mask): a red box (bit 0), a blue disc (bit 1) over part of it, a green dot (bit 2) in
    the box of every other image; a 1-pixel ignored (255) frame around the disc."""
    rng = np.random.default_rng(index)
    image = Image.new("RGB", (width, height), (150, 150, 150))
    layers = [Image.new("L", (width, height), 0) for _ in LABELS]
    x, y = int(rng.integers(4, width - 50)), int(rng.integers(4, height - 36))
    shapes = [("rectangle", (x, y, x + 34, y + 26), (220, 40, 40)), ("ellipse", (x + 16, y + 8, x + 44, y + 32), (40, 60, 220))]
    if index % 2 == 0:
        shapes.append(("rectangle", (x + 3, y + 3, x + 10, y + 10), (40, 200, 60)))
    for layer, (kind, box, colour) in zip(layers, shapes):
        getattr(ImageDraw.Draw(image), kind)(box, fill=colour)
        getattr(ImageDraw.Draw(layer), kind)(box, fill=1)
    from competition.mask_values import pack_labels

    packed = pack_labels(np.stack([np.asarray(layer) for layer in layers]))
    disc = np.asarray(layers[1]).astype(bool)
    frame = np.zeros_like(disc)
    frame[1:-1, 1:-1] = disc[1:-1, 1:-1] & ~(disc[:-2, 1:-1] & disc[2:, 1:-1] & disc[1:-1, :-2] & disc[1:-1, 2:])
    packed[frame] = 255
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, size=(height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8), packed


def make_label_folders(root, count: int = 8, tests: int = 2, classes_file: bool = True):
    """images/ + masks/ (greyscale PNGs of packed bits), classes.txt (box, disc, dot), test/ and test_masks/."""
    for folder in ("images", "masks", "test", "test_masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(count + tests):
        image, packed = label_scene(index)
        name = f"scene{index // 2}_{index % 2 + 1}"
        images, masks = ("images", "masks") if index < count else ("test", "test_masks")
        Image.fromarray(image).save(root / images / f"{name}.png")
        Image.fromarray(packed, mode="L").save(root / masks / f"{name}.png")
    if classes_file:
        (root / "classes.txt").write_text("\n".join(LABELS) + "\n")
    return root


@pytest.mark.slow
def test_a_multilabel_folder_trains_and_predicts_packed_masks(tmp_path):
    root = make_label_folders(tmp_path / "data")
    folds = tmp_path / "folds.csv"
    head = ["--head", "multilabel"]
    make_folds(["--data-dir", str(root), "--n-folds", "2", "--group-regex", r"^(.+)_\d+$", "--out", str(folds), *head])
    run = tmp_path / "run"
    flags = ["--data-dir", str(root), "--folds-csv", str(folds), "--out", str(run), "--fold", "0", "--size", "64x96"]
    train([*flags, "--epochs", "2", "--lr", "2e-3", *head, *TRAIN_FLAGS])
    log = pd.read_csv(run / "fold0" / "log.csv")
    expected = {"val_dice", "val_miou"} | {f"{score}_{name}" for score in ("dice", "iou") for name in LABELS}
    assert expected <= set(log.columns) and log["val_dice"].between(0, 1).all()
    checkpoint = torch.load(run / "fold0" / "best.pt", weights_only=True)
    assert checkpoint["config"]["head"] == "multilabel" and checkpoint["config"]["classes"] == ",".join(LABELS)
    masks = tmp_path / "masks"
    infer(["--tta", "--checkpoints", str(run), "--out", str(masks), "--overlays", "--workers", "0"])
    assert sorted(path.stem for path in masks.glob("*.png")) == ["scene4_1", "scene4_2"]
    with Image.open(masks / "scene4_1.png") as mask:
        values = np.asarray(mask)
        assert mask.mode == "L" and mask.size == (96, 64) and values.max() < 1 << len(LABELS)
    assert len(list((masks / "overlays").glob("*.png"))) == 2
    infer(["--oof", "--checkpoints", str(run), "--out-dir", str(tmp_path / "oof"), "--workers", "0"])
    oof = pd.read_csv(tmp_path / "oof" / "oof.csv")
    assert {"dice", "dice_plain", *(f"dice_{name}" for name in LABELS)} <= set(oof.columns)
    rows = tmp_path / "rows.csv"
    infer(["--checkpoints", str(run), "--out", str(rows), "--format", "rle-csv", "--workers", "0"])
    names = pd.read_csv(rows)["ImageId_ClassId"].tolist()
    assert names == [f"scene4_{image}_{label}" for image in (1, 2) for label in (1, 2, 3)]
