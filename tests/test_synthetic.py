import numpy as np
import pandas as pd

from competition.data import CarvanaData, car_id_of
from competition.rle import rle_decode
from competition.synthetic import VIEWS, generate
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
