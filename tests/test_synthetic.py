import numpy as np
import pandas as pd
import pytest

from competition.carvana import CarvanaData, car_id_of
from competition.folds import groups_of
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


# --- the multi-label set: overlapping labels in a per-class RLE table ---

ML_WIDTH, ML_HEIGHT = 192, 128


@pytest.fixture(scope="module")
def multilabel_dir(tmp_path_factory):
    """3 training cars and 2 test cars with overlapping labels, at 192x128."""
    from competition.synthetic import generate_multilabel

    out = tmp_path_factory.mktemp("multilabel")
    return generate_multilabel(out, cars=3, test_cars=2, width=ML_WIDTH, height=ML_HEIGHT, seed=2, jobs=1)


def decode_row_major(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """An independent reading of UW-Madison's cells: 1-indexed ``start length`` pairs over the row-major pixels,
    in order, inside the image, not touching; an empty cell is an empty mask."""
    flat = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    numbers = [int(token) for token in rle.split(" ")] if rle else []
    assert len(numbers) % 2 == 0
    end = 0
    for start, length in zip(numbers[0::2], numbers[1::2]):
        assert start > end + 1 or end == 0 and start >= 1, "runs in order and apart"
        assert length >= 1 and start - 1 + length <= flat.size
        flat[start - 1 : start - 1 + length] = 1
        end = start - 1 + length
    return flat.reshape(shape)


def read_table(path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, dtype=str)


def labels_by_image(table: pd.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    masks: dict[str, dict[str, np.ndarray]] = {}
    for image_id, name, rle in table.itertuples(index=False):
        masks.setdefault(image_id, {})[name] = decode_row_major(rle, (ML_HEIGHT, ML_WIDTH))
    return masks


def test_multilabel_tables_hold_one_row_per_image_and_label(multilabel_dir):
    from competition.synthetic import LABELS

    train = read_table(multilabel_dir / "train.csv")
    assert list(train.columns) == ["id", "class", "segmentation"]
    train_ids = sorted(path.stem for path in (multilabel_dir / "train").glob("*.jpg"))
    assert len(train_ids) == 3 * VIEWS
    assert list(zip(train["id"], train["class"])) == [(i, name) for i in train_ids for name in LABELS]
    # Carvana's <car>_<NN> ids: make multilabel's make_folds.py --group-regex keeps a car's 16 views in one fold
    groups = groups_of(train_ids, r"^(.+)_\d+$")
    assert set(groups.values()) == {car_id_of(i) for i in train_ids} and len(set(groups.values())) == 3
    sample = read_table(multilabel_dir / "sample_submission.csv")
    truth = read_table(multilabel_dir / "test_masks.csv")
    test_ids = sorted(path.stem for path in (multilabel_dir / "test").glob("*.jpg"))
    assert list(sample.columns) == ["id", "class", "predicted"] and (sample["predicted"] == "").all()
    assert list(truth.columns) == list(train.columns)
    pairs = [(i, name) for i in test_ids for name in LABELS]
    assert list(zip(sample["id"], sample["class"])) == list(zip(truth["id"], truth["class"])) == pairs
    assert not set(train_ids) & set(test_ids)


def test_multilabel_labels_overlap_and_the_shadow_is_absent_from_most_images(multilabel_dir):
    for table in ("train.csv", "test_masks.csv"):
        masks = labels_by_image(read_table(multilabel_dir / table))
        car = np.stack([m["car"] for m in masks.values()]).astype(bool)
        glass = np.stack([m["glass"] for m in masks.values()]).astype(bool)
        shadow = np.stack([m["shadow"] for m in masks.values()]).astype(bool)
        assert car.any(axis=(1, 2)).all() and glass.any(axis=(1, 2)).all()
        assert not (glass & ~car).any() and (car & ~glass).any(axis=(1, 2)).all(), "the windows lie inside the car"
        with_shadow = shadow.any(axis=(1, 2))
        assert 0 < with_shadow.sum() < 0.5 * len(masks), f"{table}: the rare class, in some images, not most"
        lit = shadow[with_shadow]
        assert (lit & car[with_shadow]).any(axis=(1, 2)).all(), "the shadow overlaps the car's lower edge"
        assert (lit & ~car[with_shadow]).sum() > 4 * (lit & car[with_shadow]).sum(), "mostly on the floor"
        assert shadow.mean() < glass.mean() < car.mean()


def test_multilabel_cars_are_the_carvana_sets_and_photos_of_unlit_views_too(multilabel_dir, tmp_path):
    carvana = CarvanaData(
        generate(tmp_path / "c", cars=3, test_cars=2, width=ML_WIDTH, height=ML_HEIGHT, seed=2, jobs=1)
    )
    masks = labels_by_image(read_table(multilabel_dir / "train.csv"))
    unlit = [i for i, m in masks.items() if not m["shadow"].any()]
    for image_id in unlit[:3] + [i for i in masks if i not in unlit][:3]:
        np.testing.assert_array_equal(masks[image_id]["car"], carvana.read_mask(image_id))
    name = f"{unlit[0]}.jpg"
    assert (multilabel_dir / "train" / name).read_bytes() == (tmp_path / "c" / "train" / name).read_bytes()


def test_the_shadow_label_is_where_the_lamp_darkens_the_floor():
    import cv2

    from competition.synthetic import make_car, render_scene

    car = make_car(np.random.default_rng(5))
    plain, mask, none = render_scene(car, 0.4, ML_WIDTH, ML_HEIGHT, np.random.default_rng(1), studio_seed=7)
    lit, lit_mask, shadow = render_scene(
        car, 0.4, ML_WIDTH, ML_HEIGHT, np.random.default_rng(1), studio_seed=7, spotlight=(0.6, 1.0)
    )
    assert none is None and np.array_equal(mask, lit_mask)
    floor = (shadow == 1) & (mask == 0)
    assert floor.sum() > 500
    assert lit[floor].mean() < 0.7 * plain[floor].mean()
    near = cv2.dilate(shadow, np.ones((9, 9), np.uint8)).astype(bool)
    np.testing.assert_array_equal(lit[~near], plain[~near])


def test_multilabel_set_is_deterministic(tmp_path):
    from competition.synthetic import generate_multilabel

    def make(name, seed):
        return generate_multilabel(tmp_path / name, cars=1, test_cars=1, width=96, height=64, seed=seed, jobs=1)

    first, second, other = make("a", 4), make("b", 4), make("c", 5)
    for path in sorted(p for p in first.rglob("*") if p.is_file()):
        assert path.read_bytes() == (second / path.relative_to(first)).read_bytes(), path
    assert (first / "train.csv").read_bytes() != (other / "train.csv").read_bytes()


def test_multilabel_command_line(tmp_path, capsys):
    from competition.synthetic import main

    out = tmp_path / "ml"
    main(["--multilabel", "--out", str(out), "--cars", "1", "--test-cars", "1", "--width", "96", "--height", "64"])
    assert capsys.readouterr().out.strip() == (
        f"wrote 16 training and 16 test images (96x64) labelled car, glass, shadow (overlapping) as per-class "
        f"RLE rows in {out}/train.csv"
    )
    assert {p.name for p in out.iterdir()} == {"train", "test", "train.csv", "sample_submission.csv", "test_masks.csv"}
    assert len(read_table(out / "train.csv")) == 16 * 3
    for refused in (["--multilabel", "--zip"], ["--multilabel", "--parts"]):
        with pytest.raises(SystemExit) as stop:
            main([*refused, "--out", str(tmp_path / "no")])
        assert stop.value.code == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and ("--zip is for the Carvana format" in error or "not allowed with" in error)
