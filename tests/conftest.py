"""Shared fixtures: one small synthetic Carvana data set, as folders and as the competition's zips."""

import shutil

import pytest

from competition.synthetic import generate

WIDTH, HEIGHT = 192, 128


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """5 training cars and 2 test cars at 192x128, as folders."""
    return generate(tmp_path_factory.mktemp("carvana"), cars=5, test_cars=2, width=WIDTH, height=HEIGHT, seed=1, jobs=1)


@pytest.fixture(scope="session")
def zip_dir(tmp_path_factory):
    """The same data set as data_dir, written as the competition's zip archives."""
    return generate(
        tmp_path_factory.mktemp("carvana_zip"),
        cars=5,
        test_cars=2,
        width=WIDTH,
        height=HEIGHT,
        seed=1,
        as_zip=True,
        jobs=1,
    )


@pytest.fixture
def data_copy(data_dir, tmp_path):
    """A private copy of data_dir that a test may damage."""
    return shutil.copytree(data_dir, tmp_path / "data")
