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


def test_make_folds_stratified_by_make(data_dir, tmp_path):
    result = run_make_folds(
        "--data-dir", str(data_dir), "--n-folds", "2", "--stratify", "make", "--out", str(tmp_path / "f.csv")
    )
    assert result.returncode == 0, result.stderr
    assert "makes" in result.stdout


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
