"""--tensorboard: the event files of a tiny run read back (steps, epochs, images, confusion matrix, hyperparameters),
a resumed run without duplicate steps, and the one line when the package is missing."""

import errno
import logging
import shutil
import sys

import pandas as pd
import pytest
import torch

from competition import training
from competition.board import Board
from competition.config import TrainConfig
from competition.training import train_fold
from make_folds import main as make_folds
from tests.test_training import Interrupt, cli_flags, run_train
from train import main as train

STEPS = 8  # a tiny run's optimizer steps an epoch: 64 training images, batches of 8


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The tensorboard package (requirements-tensorboard.txt, installed by `make test`) is imported by the tests that
# train: the test of its absence runs without it.
def read_events(run_dir):
    """Every event of the run folder as TensorBoard shows them: later sessions' purges applied, nothing sampled."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def steps(events, tag: str) -> list[int]:
    return [event.step for event in events.Scalars(tag)]


def hparams_written(run_dir) -> int:
    """How many times the settings were written, over all of the folder's event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sum(
        value.tag == "_hparams_/session_start_info"
        for path in run_dir.glob("events.out.tfevents.*")
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
    )


def assert_complete(run_dir, epochs: int):
    """Each step's loss and rate once, each epoch's log.csv columns and images once at the epoch's last step."""
    events = read_events(run_dir)
    every_step, epoch_ends = list(range(1, epochs * STEPS + 1)), [STEPS * (epoch + 1) for epoch in range(epochs)]
    assert steps(events, "train/loss") == every_step and steps(events, "train/lr") == every_step
    log = pd.read_csv(run_dir / "log.csv")
    for column in log.columns.drop("epoch"):
        tag = f"iou/{column.removeprefix('iou_')}" if column.startswith("iou_") else f"epoch/{column}"
        if log[column].notna().all():
            assert steps(events, tag) == epoch_ends, tag
    images = [tag for tag in events.Tags()["images"] if tag.startswith("images/")]
    assert len(images) == 4
    for tag in images:
        assert [image.step for image in events.Images(tag)] == epoch_ends, tag
    return events


@pytest.mark.slow
def test_a_binary_run_resumed_mid_epoch_and_from_an_earlier_last_pt_logs_each_step_once(tiny_config, monkeypatch):
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    tiny_config.tensorboard = True
    run_dir = tiny_config.run_dir()
    real_step, real_log_epoch = training.accumulate_gradients, training._log_epoch
    calls = {"steps": 0}

    def interrupted(*args, **kwargs):
        calls["steps"] += 1
        if calls["steps"] == STEPS + 5:  # epoch 2, step 5: steps 9 to 12 (log_every 2) are in the event file
            raise Interrupt
        return real_step(*args, **kwargs)

    def keep_epoch_1(config, epoch, row):
        real_log_epoch(config, epoch, row)
        if epoch == 0:
            shutil.copy(run_dir / "last.pt", run_dir.parent / "epoch1.pt")

    monkeypatch.setattr(training, "accumulate_gradients", interrupted)
    monkeypatch.setattr(training, "_log_epoch", keep_epoch_1)
    with pytest.raises(Interrupt):
        train_fold(tiny_config, "cpu", progress=False)
    assert steps(read_events(run_dir), "train/loss") == list(range(1, STEPS + 5))
    monkeypatch.setattr(training, "accumulate_gradients", real_step)
    train_fold(tiny_config, "cpu", resume=True, progress=False)
    assert_complete(run_dir, 2)
    shutil.copy(run_dir.parent / "epoch1.pt", run_dir / "last.pt")  # a run resumed from an earlier checkpoint
    train_fold(tiny_config, "cpu", resume=True, progress=False)
    events = assert_complete(run_dir, 2)
    assert events.Tags()["images"] == [tag for tag in events.Tags()["images"] if tag.startswith("images/")]
    width = 3 * 96 + 2 * 4  # photo, truth and prediction at the 64x96 inputs, 4 pixels apart
    assert {(image.height, image.width) for image in events.Images(events.Tags()["images"][0])} == {(64, width)}
    log = pd.read_csv(run_dir / "log.csv")
    assert [event.value for event in events.Scalars("epoch/val_loss")] == pytest.approx(log["val_loss"].tolist())
    assert events.Scalars("best/val_dice")[-1].value == pytest.approx(log["val_dice"].max())
    # the settings once (resumes do not write them again), with the best score as their metric
    assert hparams_written(run_dir) == 1
    content = events.PluginTagToContent("hparams")
    session = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["epochs"].number_value == 2 and session.hparams["encoder"].string_value == "resnet18"
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [metric.name.tag for metric in experiment.metric_infos] == ["best/val_dice"]


@pytest.mark.slow
def test_multi_class_runs_draw_the_confusion_matrix_and_per_class_iou(tmp_path):
    from competition.synthetic import PARTS, generate_parts

    data = generate_parts(tmp_path / "parts", cars=3, test_cars=1, width=144, height=96, seed=0, jobs=1)
    folds = tmp_path / "folds.csv"
    make_folds(["--data-dir", str(data), "--n-folds", "3", "--group-regex", r"^(.+)_\d+$", "--out", str(folds)])
    run = tmp_path / "run"
    flags = ["--data-dir", str(data), "--folds-csv", str(folds), "--out", str(run), "--size", "96x160", "--quiet"]
    flags += ["--encoder", "resnet18", "--encoder-weights", "none", "--workers", "0", "--batch-size", "4"]
    train([*flags, "--epochs", "1", "--tensorboard"])
    train([*flags, "--epochs", "2", "--tensorboard", "--overwrite"])  # a fresh start drops the first run's events
    events = read_events(run / "fold0")
    steps_per_epoch = len(events.Scalars("train/loss")) // 2
    epoch_ends = [steps_per_epoch, 2 * steps_per_epoch]
    assert steps(events, "train/loss") == list(range(1, 2 * steps_per_epoch + 1))
    assert [image.step for image in events.Images("confusion")] == epoch_ends
    for name in PARTS:
        assert steps(events, f"iou/{name}") == epoch_ends
    assert steps(events, "best/val_miou") == epoch_ends
    assert len([tag for tag in events.Tags()["images"] if tag.startswith("images/")]) == 4


def test_tensorboard_without_its_package_is_one_line_before_any_work(tiny_config, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    code, error = run_train([*cli_flags(tiny_config), "--tensorboard"], capsys)
    assert code == 2
    assert error == (
        "train.py: error: --tensorboard: the tensorboard package is not installed; pip install -r "
        "requirements-tensorboard.txt (or leave --tensorboard off)\n"
    )
    assert not tiny_config.run_dir().exists()


class FullDiskWriter:
    """A SummaryWriter whose disk is full: each write raises what TensorBoard's writer thread hands back."""

    log_dir = "runs/x/fold0"

    def __init__(self):
        self.writes = 0

    def add_scalar(self, *args):
        self.writes += 1
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_stops_the_event_files_not_the_run(caplog):
    writer = FullDiskWriter()
    board = Board(writer, TrainConfig(log_every=1), steps_per_epoch=4, precision="fp32", images=[], best=0.0)
    with caplog.at_level(logging.WARNING, logger="competition"):
        board.step(0, 0, torch.tensor(0.5), 1e-3)
        board.step(0, 1, torch.tensor(0.4), 1e-3)
        board.epoch(0, {"epoch": 1, "val_dice": 0.5}, None, torch.nn.Identity())
    assert writer.writes == 1 and board.writer is None  # nothing written after the first refusal
    assert "runs/x/fold0: no space left for TensorBoard's event files: none are written from here on" in caplog.text
    other = Board(FullDiskWriter(), TrainConfig(log_every=1), 4, "fp32", [], 0.0)
    other.writer.add_scalar = lambda *args: (_ for _ in ()).throw(OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(PermissionError):  # any other fault keeps its traceback
        other.step(0, 0, torch.tensor(0.5), 1e-3)
