import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from competition import synthetic
from competition.data import CarvanaData, car_id_of
from competition.rle import rle_decode
from competition.synthetic import BODY, GLASS, LIGHTS, PART_PALETTE, PARTS, VIEWS, WHEELS, generate, generate_parts
from tests.conftest import HEIGHT, WIDTH


def test_writes_the_full_competition_layout(data_dir):
    for name in (
        "train",
        "train_masks",
        "test",
        "train_masks.csv",
        "metadata.csv",
        "sample_submission.csv",
        "test_masks.csv",
        "contact_sheet.png",
    ):
        assert (data_dir / name).exists(), name
    train = sorted(p.name for p in (data_dir / "train").iterdir())
    masks = sorted(p.name for p in (data_dir / "train_masks").iterdir())
    assert masks == [name.replace(".jpg", "_mask.gif") for name in train]
    cars = {car_id_of(name.removesuffix(".jpg")) for name in train}
    assert all(len(car) == 12 and int(car, 16) >= 0 for car in cars)
    assert sorted(name[-6:-4] for name in train if name.startswith(next(iter(cars)))) == [
        f"{v:02d}" for v in range(1, VIEWS + 1)
    ]
    metadata = pd.read_csv(data_dir / "metadata.csv")
    assert list(metadata.columns) == ["id", "year", "make", "model", "trim1", "trim2"]
    test_cars = {
        car_id_of(name.removesuffix(".jpg")) for name in pd.read_csv(data_dir / "sample_submission.csv")["img"]
    }
    assert set(metadata["id"]) == cars | test_cars and not cars & test_cars


def test_masks_are_exact_images_and_truth_csvs_agree(data_dir):
    data = CarvanaData(data_dir)
    train_csv = pd.read_csv(data_dir / "train_masks.csv", keep_default_na=False)
    for img, rle in zip(train_csv["img"][::5], train_csv["rle_mask"][::5]):
        image_id = img.removesuffix(".jpg")
        mask = data.read_mask(image_id)
        np.testing.assert_array_equal(rle_decode(rle, (HEIGHT, WIDTH)), mask)
        assert 0.05 < mask.mean() < 0.8, "a car fills part of the frame, never none or all of it"
    truth = pd.read_csv(data_dir / "test_masks.csv", keep_default_na=False)
    sample = pd.read_csv(data_dir / "sample_submission.csv", keep_default_na=False)
    assert truth["img"].tolist() == sample["img"].tolist() == [f"{i}.jpg" for i in data.test_ids()]
    assert all(rle_decode(rle, (HEIGHT, WIDTH)).any() for rle in truth["rle_mask"])


def test_car_differs_from_background_and_views_of_one_car_differ(data_dir):
    data = CarvanaData(data_dir)
    ids = data.train_ids()[:VIEWS]
    images = [data.read_image(i).astype(np.float32) for i in ids]
    masks = [data.read_mask(i) for i in ids]
    assert not np.array_equal(masks[0], masks[4]), "the car turns between views"
    assert len({int(m.sum()) for m in masks}) > 8
    for image in images:
        assert image.std() > 5


def test_deterministic_for_a_seed(tmp_path):
    a = generate(tmp_path / "a", cars=1, test_cars=0, width=96, height=64, seed=7, jobs=1)
    b = generate(tmp_path / "b", cars=1, test_cars=0, width=96, height=64, seed=7, jobs=1)
    c = generate(tmp_path / "c", cars=1, test_cars=0, width=96, height=64, seed=8, jobs=1)
    assert (a / "train_masks.csv").read_bytes() == (b / "train_masks.csv").read_bytes()
    names = sorted(p.name for p in (a / "train").iterdir())
    assert all((a / "train" / n).read_bytes() == (b / "train" / n).read_bytes() for n in names)
    assert (a / "train_masks.csv").read_bytes() != (c / "train_masks.csv").read_bytes()


def test_zip_layout_is_what_kaggle_ships(zip_dir):
    names = {p.name for p in zip_dir.iterdir()}
    assert {
        "train.zip",
        "train_masks.zip",
        "test.zip",
        "train_masks.csv.zip",
        "metadata.csv.zip",
        "sample_submission.csv.zip",
    } <= names
    assert not {"train", "test", "train_masks"} & names
    assert not any(name.endswith(".partial") for name in names)


# --- multi-class parts layout (python -m competition.synthetic --parts) ---

PARTS_SIZE = {"cars": 2, "test_cars": 1, "width": 96, "height": 64, "seed": 3, "jobs": 1}


@pytest.fixture(scope="module")
def parts_dir(tmp_path_factory):
    """2 training cars and 1 test car at 96x64, labelled by part."""
    return generate_parts(tmp_path_factory.mktemp("parts"), **PARTS_SIZE)


def _stems(folder: Path, suffix: str) -> list[str]:
    assert all(p.suffix == suffix for p in folder.iterdir()), folder
    return sorted(p.stem for p in folder.iterdir())


def _parts_masks(folder: Path) -> dict[str, np.ndarray]:
    masks = {}
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as png:
            assert png.mode == "P", path
            masks[path.stem] = np.asarray(png)
    return masks


def test_parts_layout_has_images_masks_classes_and_test_truth(parts_dir):
    assert sorted(p.name for p in parts_dir.iterdir()) == ["classes.txt", "images", "masks", "test", "test_masks"]
    assert (parts_dir / "classes.txt").read_text() == "background\nbody\nglass\nwheels\nlights\n"
    train = _stems(parts_dir / "images", ".jpg")
    test = _stems(parts_dir / "test", ".jpg")
    assert train == _stems(parts_dir / "masks", ".png") and len(train) == 2 * VIEWS
    assert test == _stems(parts_dir / "test_masks", ".png") and len(test) == VIEWS
    assert not {car_id_of(i) for i in train} & {car_id_of(i) for i in test}
    with Image.open(parts_dir / "masks" / f"{train[0]}.png") as png:
        assert png.getpalette()[: 3 * len(PART_PALETTE)] == [v for colour in PART_PALETTE for v in colour]


def test_parts_masks_hold_every_class_and_lights_are_small(parts_dir):
    masks = {**_parts_masks(parts_dir / "masks"), **_parts_masks(parts_dir / "test_masks")}
    counts = np.zeros(len(PARTS), dtype=np.int64)
    for mask in masks.values():
        assert mask.shape == (PARTS_SIZE["height"], PARTS_SIZE["width"]) and mask.max() < len(PARTS)
        counts += np.bincount(mask.ravel(), minlength=len(PARTS))
    shares = counts / counts.sum()
    assert (counts > 0).all(), dict(zip(PARTS, counts))
    assert 0 < shares[LIGHTS] < 0.05 and shares[LIGHTS] < shares[[BODY, GLASS, WHEELS]].min()
    assert sum(bool((m == LIGHTS).any()) for m in masks.values()) >= len(masks) // 2, "lamps seen in most views"


def test_parts_are_the_carvana_cars_split_into_parts(parts_dir, tmp_path):
    """Same seed and size: same car ids and JPEG bytes, and car pixels == non-background part pixels."""
    carvana = generate(tmp_path / "carvana", **PARTS_SIZE)
    data = CarvanaData(carvana)
    parts = {**_parts_masks(parts_dir / "masks"), **_parts_masks(parts_dir / "test_masks")}
    assert sorted(parts) == sorted(data.train_ids() + data.test_ids())
    test_truth = pd.read_csv(carvana / "test_masks.csv", keep_default_na=False)
    binary = {img.removesuffix(".jpg"): rle_decode(rle, (64, 96)) for img, rle in test_truth.itertuples(index=False)}
    binary.update({image_id: data.read_mask(image_id) for image_id in data.train_ids()})
    for image_id, mask in parts.items():
        np.testing.assert_array_equal(binary[image_id], (mask > 0).astype(np.uint8), err_msg=image_id)
    for image_id in data.train_ids()[::7]:
        assert (carvana / "train" / f"{image_id}.jpg").read_bytes() == (
            parts_dir / "images" / f"{image_id}.jpg"
        ).read_bytes()


def test_parts_same_seed_same_bytes_and_rerun_replaces(parts_dir, tmp_path):
    again = generate_parts(tmp_path / "again", **PARTS_SIZE)
    (again / "masks" / "stale.png").write_bytes(b"left from an earlier run")
    generate_parts(again, **PARTS_SIZE)
    assert _tree_digest(again) == _tree_digest(parts_dir)
    other = generate_parts(tmp_path / "other", **{**PARTS_SIZE, "seed": 4})
    assert _tree_digest(other) != _tree_digest(parts_dir)
    assert not list(again.rglob("*.partial"))


def test_parts_command_line_defaults_and_refusals(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(synthetic, "generate_parts", lambda *args: calls.append(args) or Path(args[0]))
    synthetic.main(["--parts"])
    assert calls == [("input-parts", 8, 2, 240, 160, 0, -1)]
    with pytest.raises(SystemExit):
        synthetic.main(["--parts", "--zip", "--out", str(tmp_path)])


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def test_carvana_output_unchanged_by_the_parts_mode(tmp_path):
    """Every file of a tiny Carvana set (folders), hashed with the code before the parts mode (e766ab5); with
    these pinned versions of OpenCV and Pillow (their JPEG/GIF/PNG encoders write the bytes)."""
    out = generate(tmp_path / "c", cars=2, test_cars=1, width=96, height=64, seed=3, jobs=1)
    assert len([p for p in out.rglob("*") if p.is_file()]) == 85
    assert _tree_digest(out) == "e4dce96732e218eee76db7a7e237e5b87f2210119f7dd169880a593c5c075f66"
