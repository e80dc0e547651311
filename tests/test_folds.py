import subprocess
import sys

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from competition.carvana import assign_folds
from competition.data import DataError
from competition.errors import ConfigError
from competition.folds import read_folds


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

    from competition.carvana import CarvanaData, car_id_of

    flags = ("--data-dir", str(data_dir), "--n-folds", "2", "--stratify", "make", "--seed", "42")
    outputs = []
    for name in ("a.csv", "b.csv"):
        result = run_make_folds(*flags, "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    folds = read_folds(tmp_path / "a.csv")
    assert list(folds.columns) == ["img", "car_id", "fold", "group"]  # group: the car, as in other layouts
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


# --- any other layout: groups from a regex, folds stratified by the classes the images hold ---

import numpy as np

from competition.folds import assign_group_folds, groups_of, rarest_class_labels


def test_group_regex_takes_its_first_capture_group():
    groups = groups_of(["Abyssinian_1", "Abyssinian_12", "great_pyrenees_3"], r"^(.+)_\d+$")
    assert groups == {"Abyssinian_1": "Abyssinian", "Abyssinian_12": "Abyssinian", "great_pyrenees_3": "great_pyrenees"}
    assert groups_of(["a", "b"], None) == {"a": "a", "b": "b"}  # each image alone


@pytest.mark.parametrize(
    "pattern, message",
    [(r"^.+_\d+$", "needs a capture group"), (r"^(x)_\d+$", "does not match image 'a_1'"), (r"(", "not a regular")],
)
def test_bad_group_regexes_are_one_line(pattern, message):
    with pytest.raises(ConfigError, match=message):
        groups_of(["a_1"], pattern)


def presence_of(image_ids, rare_every: int) -> dict:
    """Classes: 0 background and 1 everywhere, 2 (rare) in every ``rare_every``-th image."""
    return {image_id: np.array([True, True, index % rare_every == 0]) for index, image_id in enumerate(image_ids)}


def test_every_fold_validates_on_the_rare_class():
    image_ids = [f"g{group:02d}_{view}" for group in range(20) for view in range(2)]
    groups = groups_of(image_ids, r"^(.+)_\d+$")
    presence = presence_of(image_ids, rare_every=8)  # 5 images, in 5 groups, hold class 2
    folds = assign_group_folds(groups, 5, seed=0, presence=presence)
    assert list(folds.columns) == ["img", "group", "fold"]
    holding = folds[[bool(presence[image_id][2]) for image_id in folds["img"]]]
    assert sorted(holding["fold"]) == [0, 1, 2, 3, 4]  # one rare image in each fold
    assert (folds.groupby("group")["fold"].nunique() == 1).all()


def test_rarest_class_labels_merge_labels_too_few_for_the_folds():
    groups = {f"i{index}": f"i{index}" for index in range(10)}
    presence = {f"i{index}": np.array([True, index < 6, index >= 8]) for index in range(10)}
    labels = rarest_class_labels(groups, presence, n_folds=3)
    # class 1 alone in 6 groups keeps its label; class 2 (2 groups) and background only (2) are too few for 3 folds
    assert labels["i0"] == "1" and labels["i6"] == "few" and labels["i9"] == "few"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=6, max_size=40), st.integers(0, 3), st.booleans())
def test_groups_never_cross_folds_and_order_does_not_matter(group_numbers, seed, stratified):
    image_ids = [f"g{group}_{index}" for index, group in enumerate(group_numbers)]
    groups = groups_of(image_ids, r"^(g\d+)_")
    if len(set(groups.values())) < 2:
        return
    presence = presence_of(image_ids, rare_every=3) if stratified else None
    folds = assign_group_folds(groups, 2, seed, presence)
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    shuffled = dict(reversed(list(groups.items())))
    again = assign_group_folds(shuffled, 2, seed, dict(reversed(list(presence.items()))) if presence else None)
    assert folds.equals(again)


def test_make_folds_on_each_layout(tmp_path):
    from make_folds import main as make_folds_main
    from tests.layout_fixtures import make_folders, make_labelme, make_pet

    roots = {
        "folders": make_folders(tmp_path / "folders"),
        "labelme": make_labelme(tmp_path / "labelme"),
        "pet": make_pet(tmp_path / "pet"),
    }
    for layout, root in roots.items():
        out = tmp_path / f"{layout}.csv"
        make_folds_main(["--data-dir", str(root), "--n-folds", "2", "--group-regex", r"^(.+)_\d+$", "--out", str(out)])
        folds = read_folds(out)
        assert list(folds.columns) == ["img", "group", "fold"] and len(folds) == 8, layout
        assert (folds.groupby("group")["fold"].nunique() == 1).all() and set(folds["fold"]) == {0, 1}


def test_too_few_groups_suggest_only_a_fix_that_works():
    with pytest.raises(ConfigError, match=r"^1 cars cannot fill 2 folds; folds need two cars at least$"):
        assign_folds(image_ids(1), 2, seed=0)
    with pytest.raises(ConfigError, match=r"3 cars cannot fill 5 folds; use --n-folds 3 or fewer$"):
        assign_folds(image_ids(3), 5, seed=0)
    one_group = {f"p0{index}": "p0" for index in range(4)}
    with pytest.raises(ConfigError, match=r"^1 groups cannot fill 2 folds; use a --group-regex that makes more"):
        assign_group_folds(one_group, 2, seed=0)


@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")  # some makes have one car
def test_carvana_folds_are_those_make_folds_wrote_before_the_layout_registry(tmp_path):
    """The same images and seed give the same Carvana folds file, byte for byte, as make_folds.py wrote before
    Carvana became a registered layout (sha256 taken then, on ``competition.synthetic --cars 24``'s ids)."""
    import hashlib

    from competition.synthetic import generate
    from make_folds import main as make_folds_main

    root = generate(tmp_path / "data", cars=24, test_cars=1, width=192, height=128, jobs=1)
    written_before = {
        (): "e78f1dc53eb64ceb18d678a162eb975bf322deada0dffe540cc7aca07858863f",
        ("--stratify", "make"): "9f37a61fba7dab553b0e4ae66d62e2df5368aae669dd00e4e7e4527f50839dff",
    }
    for flags, digest in written_before.items():
        out = tmp_path / f"folds{len(flags)}.csv"
        make_folds_main(["--data-dir", str(root), "--n-folds", "5", "--seed", "42", "--out", str(out), *flags])
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest


def _many_classes(root, count: int) -> list[str]:
    """The folders fixture (classes 0..3 in its masks) with ``count`` classes named, the rest in no mask."""
    from tests.layout_fixtures import make_folders

    names = ["background", "box", "disc", "square"] + [f"a_class_of_a_long_name_{index}" for index in range(4, count)]
    make_folders(root)
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    return names


@pytest.mark.parametrize("count", [21, 40])
def test_the_fold_summary_fits_100_columns_however_many_classes(tmp_path, caplog, count):
    import logging

    from make_folds import main as make_folds

    names = _many_classes(tmp_path / "data", count)
    with caplog.at_level(logging.INFO, logger="competition"):
        make_folds(["--data-dir", str(tmp_path / "data"), "--n-folds", "4", "--out", str(tmp_path / "f.csv")])
    text = next(record.getMessage() for record in caplog.records if "groups" in record.getMessage())
    assert max(len(line) for line in text.splitlines()) <= 100, text
    assert all(name in text for name in names)  # every class's count is still there, one class a row


def test_the_classes_no_training_mask_holds_are_one_warning(caplog):
    import logging

    import numpy as np

    from competition.data_checks import report_absent_classes

    names = ["background"] + [f"class_{index}" for index in range(1, 21)]
    train = np.array([100] * 7 + [0] * 14)
    val = np.array([10] * 7 + [5] + [0] * 13)
    with caplog.at_level(logging.WARNING, logger="competition"):
        report_absent_classes(names, train, val, False, logging.getLogger("competition.fold_data").warning)
    assert len(caplog.records) == 1, caplog.text
    message = caplog.records[0].getMessage()
    assert message.startswith("14 of the 21 classes have 0 of the 700 training pixels")
    assert all(f"{index} 'class_{index}'" in message for index in range(7, 21))
    assert "7 'class_7' (5 pixels) is only in validation" in message
    with pytest.raises(DataError, match="14 of the 21 classes"):
        report_absent_classes(names, train, val, True, logging.getLogger("competition.fold_data").warning)


def test_a_multilabel_set_is_stratified_by_its_class_0_too(monkeypatch):
    from types import SimpleNamespace

    from competition import folds

    image_ids = [f"g{group:02d}" for group in range(20)]  # class 0 (rare) in 5 groups, class 1 in every one
    presence = {image_id: np.array([index % 4 == 0, True]) for index, image_id in enumerate(image_ids)}
    monkeypatch.setattr(folds, "class_presence", lambda data, ids, progress: presence)
    data = SimpleNamespace(train_ids=lambda: image_ids, splits=None, classes=["rare", "common"], multilabel=True)
    for seed in range(4):
        table, _ = folds.group_folds(data, 5, seed, r"^(g\d+)$", None, True, False)
        assert table.groupby("fold")["with rare"].sum().tolist() == [1] * 5


def test_the_class_balanced_sampler_weighs_a_multilabel_set_s_class_0():
    from types import SimpleNamespace

    from competition.fold_data import sampler_counts
    from competition.sampling import class_balanced_weights

    counts = np.array([[9, 0], [0, 5], [0, 7], [0, 3]])  # the first image holds class 0 alone, the rarest
    weights = class_balanced_weights(sampler_counts(SimpleNamespace(multilabel=True), counts, None))
    assert weights[0] > 1 and weights[0] == weights.max()
    assert class_balanced_weights(sampler_counts(SimpleNamespace(multilabel=False), counts, None))[0] == 1
