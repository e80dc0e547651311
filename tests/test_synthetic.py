import numpy as np
import pandas as pd

from competition.carvana import CarvanaData, car_id_of
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


# --- the multi-class parts set ---


def test_parts_set_in_the_folder_layout(tmp_path):
    import numpy as np
    from PIL import Image

    from competition.layouts import open_data
    from competition.synthetic import PARTS, generate, generate_parts

    out = generate_parts(tmp_path / "parts", cars=2, test_cars=1, width=192, height=128, seed=3, jobs=1)
    data = open_data(out)
    assert data.layout == "folders" and data.classes == list(PARTS)
    assert len(data.train_ids()) == 32 and len(data.test_ids()) == 16
    assert sorted(p.stem for p in (out / "test_masks").iterdir()) == data.test_ids()
    with Image.open(out / "masks" / f"{data.train_ids()[0]}.png") as mask:
        assert mask.mode == "P"
    counts = sum(data.class_pixel_counts(image_id) for image_id in data.train_ids())
    shares = counts / counts.sum()
    assert (counts > 0).all() and shares[PARTS.index("lights")] < 0.02  # every part, the lights a small one
    # the same cars as the Carvana set of the same seed: a car pixel there is a part here
    carvana = generate(tmp_path / "carvana", cars=2, test_cars=1, width=192, height=128, seed=3, jobs=1)
    from competition.carvana import CarvanaData

    binary = CarvanaData(carvana)
    for image_id in data.train_ids()[:4]:
        np.testing.assert_array_equal(data.read_mask(image_id) > 0, binary.read_mask(image_id) == 1)


def test_parts_set_is_deterministic(tmp_path):
    from competition.synthetic import generate_parts

    first = generate_parts(tmp_path / "a", cars=1, test_cars=0, width=96, height=64, seed=5, jobs=1)
    second = generate_parts(tmp_path / "b", cars=1, test_cars=0, width=96, height=64, seed=5, jobs=1)
    for path in sorted(first.rglob("*.*")):
        assert path.read_bytes() == (second / path.relative_to(first)).read_bytes(), path
