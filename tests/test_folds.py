import subprocess
import sys

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from competition.data import DataError
from competition.errors import ConfigError
from competition.folds import assign_folds, read_folds


def image_ids(n_cars: int, views: int = 16) -> list[str]:
    return [f"car{car:04d}_{view:02d}" for car in range(n_cars) for view in range(1, views + 1)]


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.integers(2, 8), st.integers(0, 10_000))
def test_no_car_crosses_folds_and_folds_differ_by_at_most_one_car(n_cars, n_folds, seed):
    if n_cars < n_folds:
        with pytest.raises(ConfigError, match="cannot fill"):
            assign_folds(image_ids(n_cars), n_folds, seed)
        return
    folds = assign_folds(image_ids(n_cars), n_folds, seed)
    assert (folds.groupby("car_id")["fold"].nunique() == 1).all()
    cars_per_fold = folds.groupby("fold")["car_id"].nunique()
    assert sorted(cars_per_fold.index) == list(range(n_folds))
    assert cars_per_fold.max() - cars_per_fold.min() <= 1


def test_deterministic_for_a_seed_and_independent_of_input_order():
    ids = image_ids(23)
    first = assign_folds(ids, 5, 42)
    pd.testing.assert_frame_equal(first, assign_folds(list(reversed(ids)), 5, 42))
    assert not first["fold"].equals(assign_folds(ids, 5, 43)["fold"])


def test_stratified_folds_spread_each_make():
    ids = image_ids(20)
    strata = {f"car{car:04d}": ["BMW", "Ford"][car % 2] for car in range(20)}
    folds = assign_folds(ids, 5, 0, strata)
    assert (folds.groupby("car_id")["fold"].nunique() == 1).all()
    folds["make"] = folds["car_id"].map(strata)
    assert (folds.groupby("fold")["make"].nunique() == 2).all()


def run_make_folds(*args):
    return subprocess.run([sys.executable, "make_folds.py", *args], check=False, capture_output=True, text=True)


@pytest.mark.slow
def test_make_folds_writes_the_same_file_on_rerun(data_dir, tmp_path):
    outputs = []
    for name in ("a.csv", "b.csv"):
        result = run_make_folds(
            "--data-dir", str(data_dir), "--n-folds", "5", "--seed", "42", "--out", str(tmp_path / name)
        )
        assert result.returncode == 0, result.stderr
        assert "cars" in result.stdout and "5 folds" in result.stdout
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    folds = read_folds(tmp_path / "a.csv")
    assert len(folds) == 80 and folds.groupby("fold")["car_id"].nunique().tolist() == [1] * 5


@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")  # 5 cars, most makes only once
@pytest.mark.slow
def test_make_folds_stratified_by_make(data_dir, tmp_path):
    """The folds are StratifiedGroupKFold's over the cars' makes (sorted car ids, the seed), written
    byte-identically on a rerun."""
    from sklearn.model_selection import StratifiedGroupKFold

    from competition.data import CarvanaData, car_id_of

    flags = ("--data-dir", str(data_dir), "--n-folds", "2", "--stratify", "make", "--seed", "42")
    outputs = []
    for name in ("a.csv", "b.csv"):
        result = run_make_folds(*flags, "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    folds = read_folds(tmp_path / "a.csv")
    assert (tmp_path / "a.csv").read_text().splitlines()[0] == "img,car_id,fold"
    assert list(folds.columns) == ["img", "car_id", "fold", "group", "image_id"]
    fold_of_car = folds.groupby("car_id")["fold"].unique()
    assert (fold_of_car.map(len) == 1).all()  # every car in exactly one fold
    fold_of_car = fold_of_car.map(lambda values: int(values[0])).to_dict()
    metadata = pd.read_csv(data_dir / "metadata.csv", dtype={"id": str})  # training and test cars
    make_of_car = dict(zip(metadata["id"], metadata["make"]))
    car_ids = sorted({car_id_of(image_id) for image_id in CarvanaData(data_dir).train_ids()})
    assert sorted(fold_of_car) == car_ids and len(car_ids) == 5
    assert len(folds) == 16 * len(car_ids)
    assert set(fold_of_car.values()) == {0, 1}  # both folds hold cars
    splitter = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=42)
    labels = [make_of_car[car_id] for car_id in car_ids]
    expected = {}
    for fold, (_, held_out) in enumerate(splitter.split(car_ids, labels, groups=car_ids)):
        expected.update({car_ids[index]: fold for index in held_out})
    assert fold_of_car == expected
    for make in set(labels):  # a make with two or more cars (here Ford) is split across both folds
        cars = [car_id for car_id in car_ids if make_of_car[car_id] == make]
        if len(cars) >= 2:
            assert {fold_of_car[car_id] for car_id in cars} == {0, 1}, make
    assert labels.count("Ford") == 2  # the fixture's data: the check above is not vacuous


@pytest.mark.slow
def test_make_folds_reports_bad_input(tmp_path):
    result = run_make_folds("--data-dir", str(tmp_path / "missing"))
    assert result.returncode == 2 and "data folder not found" in result.stderr and "Traceback" not in result.stderr


def test_read_folds_rejects_a_car_in_two_folds(tmp_path):
    path = tmp_path / "folds.csv"
    pd.DataFrame({"img": ["a_01.jpg", "a_02.jpg"], "car_id": ["a", "a"], "fold": [0, 1]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="more than one fold"):
        read_folds(path)
    with pytest.raises(DataError, match="not found"):
        read_folds(tmp_path / "none.csv")


@pytest.mark.slow
def test_make_folds_never_replaces_other_folds_unasked(data_dir, tmp_path):
    out = tmp_path / "folds.csv"
    common = ["--data-dir", str(data_dir), "--n-folds", "5", "--out", str(out)]
    assert run_make_folds(*common, "--seed", "42").returncode == 0
    first = out.read_bytes()
    assert run_make_folds(*common, "--seed", "42").returncode == 0, "the same folds again: nothing to refuse"
    result = run_make_folds(*common, "--seed", "7")
    assert result.returncode == 2 and "holds other folds" in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr and out.read_bytes() == first
    assert run_make_folds(*common, "--seed", "7", "--overwrite").returncode == 0
    assert out.read_bytes() != first


def test_make_folds_out_as_a_folder_is_one_line(data_dir, tmp_path):
    result = run_make_folds("--data-dir", str(data_dir), "--out", str(tmp_path))
    assert result.returncode == 2 and "is a folder; name the folds file" in result.stderr
    assert "Traceback" not in result.stderr


PINNED_CARVANA = (
    "img,car_id,fold\ncar00_01.jpg,car00,0\ncar00_02.jpg,car00,0\ncar01_01.jpg,car01,1\ncar01_02.jpg,car01,1\n"
    "car02_01.jpg,car02,1\ncar02_02.jpg,car02,1\ncar03_01.jpg,car03,0\ncar03_02.jpg,car03,0\ncar04_01.jpg,car04,0\n"
    "car04_02.jpg,car04,0\ncar05_01.jpg,car05,2\ncar05_02.jpg,car05,2\ncar06_01.jpg,car06,2\ncar06_02.jpg,car06,2\n"
)


def test_carvana_folds_byte_for_byte_as_before_the_group_work():
    ids = [f"car{car:02d}_{view:02d}" for car in range(7) for view in (1, 2)]
    assert assign_folds(ids, 3, 42).to_csv(index=False) == PINNED_CARVANA


def test_group_regex_errors_name_the_id_and_the_regex():
    from competition.folds import group_of_images

    assert group_of_images(["Abyssinian_12", "beagle_3"], r"^(.+)_\d+$") == {
        "Abyssinian_12": "Abyssinian",
        "beagle_3": "beagle",
    }
    assert group_of_images(["a", "b"]) == {"a": "a", "b": "b"}
    with pytest.raises(ConfigError, match="no capture group"):
        group_of_images(["a_1"], r"_\d+$")
    with pytest.raises(ConfigError, match="'oddname'.*|.*oddname"):
        group_of_images(["a_1", "oddname"], r"^(.+)_\d+$")


def test_rarest_class_label_and_merging():
    import numpy as np

    from competition.folds import group_class_labels, merge_rare_labels

    presence = {"a_1": np.array([1, 1, 0], bool), "a_2": np.array([1, 0, 1], bool), "b_1": np.array([1, 1, 0], bool)}
    labels = group_class_labels({"a_1": "a", "a_2": "a", "b_1": "b"}, presence)
    assert labels == {"a": "2", "b": "1"}  # class 2 is in one image, class 1 in two
    assert merge_rare_labels({"x": "1", "y": "1", "z": "2"}, 2) == {"x": "1", "y": "1", "z": "1"}
    assert merge_rare_labels({"x": "1", "y": "2", "z": "3", "w": "4"}, 2) == dict.fromkeys("xyzw", "merged")


def test_every_fold_gets_the_rare_class_and_groups_never_cross():
    import numpy as np

    from competition.folds import assign_group_folds

    ids = [f"g{group:02d}_{view}" for group in range(30) for view in range(3)]
    presence = {
        image_id: np.array([1, 1, image_id.startswith(("g00", "g07", "g13", "g21", "g28"))], bool) for image_id in ids
    }
    for seed in range(5):
        folds = assign_group_folds(ids, 5, seed, r"^(.+)_\d+$", presence)
        assert (folds.groupby("group")["fold"].nunique() == 1).all()
        rare_folds = {fold for img, fold in zip(folds["img"], folds["fold"]) if presence[img][2]}
        assert rare_folds == set(range(5))
        pd.testing.assert_frame_equal(folds, assign_group_folds(list(reversed(ids)), 5, seed, r"^(.+)_\d+$", presence))


def test_make_folds_on_pet_groups_by_breed_and_reads_back(tmp_path):
    from tests.layout_fixtures import make_pet

    out = tmp_path / "folds.csv"
    result = run_make_folds(
        "--data-dir", str(make_pet(tmp_path)), "--n-folds", "2", "--group-regex", r"^(.+)_\d+$", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    folds = read_folds(out)
    assert list(folds.columns[:3]) == ["img", "group", "fold"] and set(folds["group"]) == {"Abyssinian", "beagle"}
    assert (folds["image_id"] == folds["img"]).all() and "pet" in result.stdout + result.stderr
    bad = run_make_folds("--data-dir", str(tmp_path / "pet"), "--group-regex", r"_\d+$", "--out", str(out))
    assert bad.returncode == 2 and "no capture group" in bad.stderr and "Traceback" not in bad.stderr
