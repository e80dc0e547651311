"""Shared fixtures: one small synthetic Carvana data set, as folders and as the competition's zips."""

import contextlib
import shutil
import tempfile
from dataclasses import dataclass

import pytest
import torch

from competition.clock import Deadline
from competition.shards import cpu_shard_threads
from competition.synthetic import generate
from tests.layout_fixtures import cut_short

WIDTH, HEIGHT = 192, 128


@dataclass
class ManualDeadline(Deadline):
    """A deadline on a clock that moves only when the test moves it."""

    now: float = 0.0

    def elapsed(self) -> float:
        return self.now


@contextlib.contextmanager
def threads_of_cpu_shards(count: int = 2):
    """torch threads as each of ``count`` CPU shards has them (``shards.cpu_shard_threads``), for a one-device run
    compared byte for byte with ``--devices cpu,cpu``: PyTorch's CPU kernels may round a near tie the other way
    with another thread count (on a 2-core AMD EPYC, 1 pixel in 2 of 32 softmax masks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_shard_threads(count))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def threads_as_cpu_shards():
    """The test's one-device runs take the threads of a shard of ``--devices cpu,cpu`` (``threads_of_cpu_shards``)."""
    with threads_of_cpu_shards():
        yield


@pytest.fixture(autouse=True)
def torch_threads_kept():
    """Each test leaves torch's CPU threads as it found them: code meant for a worker process (a shard's
    set_num_threads) run in this one once made a later test's losses differ in the last digits."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


# The broken copies of a Carvana sample break_carvana_sample makes, with the mask source that reads each.
CARVANA_BREAKAGES = {
    "jpeg": "gif",
    "gif": "gif",
    "rle": "csv",
    "truncated-jpeg": "gif",
    "truncated-gif": "gif",
    "mask-size": "gif",
    "no-mask": "gif",
    "rle-character": "csv",
    "rle-past-end": "csv",
}


def break_carvana_sample(root, image_id: str, part: str) -> None:
    """Damage one sample of a Carvana folder copy as ``part`` (a key of CARVANA_BREAKAGES) says: its ``jpeg`` or
    ``gif`` mask replaced by garbage or ``truncated-``, a mask of another size (``mask-size``) or none
    (``no-mask``), or its train_masks.csv row: ``rle`` (runs that overlap), a letter among the numbers, a run
    past the image's last pixel."""
    from PIL import Image

    image, mask = root / "train" / f"{image_id}.jpg", root / "train_masks" / f"{image_id}_mask.gif"
    if part == "jpeg":
        image.write_bytes(b"not a jpeg")
    elif part == "gif":
        mask.write_bytes(b"GIF89a broken")
    elif part in ("truncated-jpeg", "truncated-gif"):
        cut_short(image if part == "truncated-jpeg" else mask)
    elif part == "mask-size":
        Image.new("P", (WIDTH - 2, HEIGHT)).save(mask)
    elif part == "no-mask":
        mask.unlink()
    else:
        import pandas as pd

        rows = {"rle": "1 2 3", "rle-character": "1 2 3 x", "rle-past-end": f"{WIDTH * HEIGHT - 1} 5"}
        frame = pd.read_csv(root / "train_masks.csv")
        frame.loc[frame["img"] == f"{image_id}.jpg", "rle_mask"] = rows[part]
        frame.to_csv(root / "train_masks.csv", index=False)


@pytest.fixture(scope="session")
def folds_csv(data_dir, tmp_path_factory):
    """5 car-grouped folds of data_dir: 64 training and 16 validation images per fold."""
    from competition.carvana import CarvanaData, assign_folds

    path = tmp_path_factory.mktemp("folds") / "folds.csv"
    assign_folds(CarvanaData(data_dir).train_ids(), 5, 42).to_csv(path, index=False)
    return path


def small_config(data_dir, folds_csv, out, **settings):
    """A training run that takes seconds on a CPU: resnet18 from scratch on 64x96 inputs."""
    from competition.config import TrainConfig

    return TrainConfig(
        data_dir=str(data_dir),
        folds_csv=str(folds_csv),
        out=str(out),
        encoder="resnet18",
        encoder_weights="none",
        size="64x96",
        batch_size=8,
        lr=2e-3,
        warmup_epochs=0.2,
        workers=0,
        **settings,
    )


@pytest.fixture
def tiny_config(data_dir, folds_csv, tmp_path):
    return small_config(data_dir, folds_csv, tmp_path / "run", epochs=2, log_every=2)


@pytest.fixture(scope="session")
def trained_run(data_dir, folds_csv, tmp_path_factory):
    """Folds 0 and 1 trained for a few epochs, shared by the inference tests (read-only)."""
    from competition.training import train_fold

    out = tmp_path_factory.mktemp("trained") / "run"
    for fold in (0, 1):
        train_fold(small_config(data_dir, folds_csv, out, fold=fold, epochs=3), "cpu", progress=False)
    return out


def pytest_collection_modifyitems(items):
    """Tests that need the trained run (tens of seconds to make, once) belong to the slow tier."""
    for item in items:
        if "trained_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


_lowest_free_disk: dict = {}  # bytes and the test after which they were seen


def pytest_runtest_logfinish(nodeid, location):
    """The free disk where the tests write, after each test (one statvfs call): CI once ran out of it."""
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < _lowest_free_disk.get("bytes", float("inf")):
        _lowest_free_disk.update(bytes=free, after=nodeid)


def pytest_terminal_summary(terminalreporter):
    if _lowest_free_disk:
        terminalreporter.write_line(
            f"lowest free disk in {tempfile.gettempdir()}: {_lowest_free_disk['bytes'] / 1e9:.1f} GB, "
            f"after {_lowest_free_disk['after']}"
        )
