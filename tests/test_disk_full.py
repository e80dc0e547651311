"""A full disk while training saves: one line saying what is kept, the run folder whole at one epoch, and --resume
going on exactly; the warning of little room before training."""

import errno
import io
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import train
from competition import files, run_folder
from competition.errors import DiskFullError
from competition.files import tagged_partial_path, write_all_then_rename
from competition.training import build_parts
from tests.conftest import small_config
from tests.test_training import cli_flags, run_train

# What torch.save (C++, caffe2's inline_container.cc) raises at the write after the one that found no room.
TORCH_WRITE_FAILED = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def test_a_failed_write_removes_every_temporary_file_and_leaves_the_targets_as_they_were(tmp_path):
    (tmp_path / "last.pt").write_text("epoch 1")

    def no_room(path):
        path.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    writes = [(tmp_path / "last.pt", lambda path: path.write_text("epoch 2")), (tmp_path / "log.csv", no_room)]
    with pytest.raises(OSError) as raised:
        write_all_then_rename(writes, "epoch2")
    assert raised.value.errno == errno.ENOSPC
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.pt"]
    assert (tmp_path / "last.pt").read_text() == "epoch 1"


@pytest.mark.parametrize("free, full", [(0, True), (10 * files.NEARLY_FULL_BYTES, False)])
def test_torch_saves_failed_write_is_a_full_disk_only_when_the_disk_is_full(tmp_path, monkeypatch, free, full):
    usage = shutil.disk_usage(tmp_path)._replace(free=free)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)

    def torch_save(path):
        path.write_bytes(b"PK\x03\x04")
        raise RuntimeError(TORCH_WRITE_FAILED)

    with pytest.raises(OSError if full else RuntimeError) as raised:
        write_all_then_rename([(tmp_path / "best.pt", torch_save)], "epoch1")
    assert (raised.value.errno == errno.ENOSPC) if full else str(raised.value) == TORCH_WRITE_FAILED
    assert not tagged_partial_path(tmp_path / "best.pt", "epoch1").exists()


def test_the_claim_of_a_resumed_run_finishes_an_epoch_interrupted_after_last_pt(tmp_path):
    for name, text in {"best.pt": "1", "last.pt": "3", "log.csv": "1 2", "curves.png": "1 2"}.items():
        (tmp_path / name).write_text(text)
    for name, text in {"best.pt": "3", "log.csv": "1 2 3", "curves.png": "1 2 3"}.items():
        tagged_partial_path(tmp_path / name, "epoch3").write_text(text)  # renamed before a crash: last.pt
    tagged_partial_path(tmp_path / "last.pt", "epoch4").write_text("half")  # the next epoch, not committed
    (tmp_path / "config.json.partial").write_text("half")
    run_folder.finish_interrupted_commit(tmp_path, committed_epoch=3)
    assert {path.name: path.read_text() for path in tmp_path.iterdir()} == {
        "best.pt": "3",
        "last.pt": "3",
        "log.csv": "1 2 3",
        "curves.png": "1 2 3",
    }


def test_no_room_for_config_json_is_one_line(tiny_config, monkeypatch):
    def no_room(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_room)
    claim = run_folder.claim_run_folder(tiny_config, resume=False, overwrite=False, split="x")
    with (
        pytest.raises(DiskFullError, match=r"fold0: no space left on its device to write config\.json \(.* free\)"),
        claim,
    ):
        pass
    assert not list(tiny_config.run_dir().glob("*.partial"))


def test_little_room_for_checkpoints_is_warned_of_with_the_figures(tiny_config, monkeypatch, caplog):
    parts = build_parts(tiny_config, torch.device("cpu"), "fp32", steps_per_epoch=8)
    parts.forward(torch.zeros(2, 3, 64, 96)).mean().backward()
    parts.optimizer.step()  # AdamW makes its moments at the first step
    saved = io.BytesIO()
    torch.save({"model": parts.model.state_dict(), **parts.training_state()}, saved)
    assert parts.checkpoint_bytes() == pytest.approx(saved.tell(), rel=0.01)
    size = parts.checkpoint_bytes()
    run_dir = tiny_config.run_dir()
    run_dir.mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="competition")
    for free in (3 * size, 2 * size + 1):
        usage = shutil.disk_usage(run_dir)._replace(free=free)
        monkeypatch.setattr(shutil, "disk_usage", lambda path, usage=usage: usage)
        run_folder.warn_if_little_room(run_dir, size)
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert caplog.records[0].getMessage() == (
        f"{run_dir}: {files.format_bytes(2 * size + 1)} free on its device, room for 2 checkpoint(s) of about "
        f"{files.format_bytes(size)}; each epoch writes its last.pt and best.pt beside the old ones, so training may "
        "stop for want of space: free some, or train into another --out"
    )


class Killed(BaseException):
    """A crash between two renames: nothing runs after it, as after a kill -9."""


class FullDisk:
    """A disk that has no room when the file ``at`` = (name, epoch) is written: as torch.save says it (a RuntimeError
    from C++) for checkpoints, as Python's writes say it (OSError ENOSPC) for log.csv and curves.png."""

    def __init__(self, monkeypatch):
        self.at: tuple[str, int] | None = None
        self.full = False
        save, usage = torch.save, shutil.disk_usage
        log, curves = getattr(run_folder, "write_log_csv", None), getattr(run_folder, "plot_curves", None)
        monkeypatch.setattr(
            torch, "save", lambda payload, path: self.write(path, payload.get("epoch"), save, payload, path)
        )
        monkeypatch.setattr(
            shutil, "disk_usage", lambda path: usage(path)._replace(free=0) if self.full else usage(path)
        )
        # raising=False: 3eb034a, which this test fails on, writes log.csv otherwise (its torch.save fails first)
        monkeypatch.setattr(
            run_folder,
            "write_log_csv",
            lambda rows, path: self.write(path, rows[-1]["epoch"], log, rows, path),
            raising=False,
        )
        monkeypatch.setattr(
            run_folder,
            "plot_curves",
            lambda rows, path, *names: self.write(path, rows[-1]["epoch"], curves, rows, path, *names),
        )

    def write(self, path, epoch: int, real_write, *args):
        if self.at is None or not Path(path).name.startswith(f"{self.at[0]}.") or epoch != self.at[1]:
            return real_write(*args)
        self.full = True
        Path(path).write_bytes(b"half")
        if self.at[0].endswith(".pt"):
            raise RuntimeError(TORCH_WRITE_FAILED)
        raise OSError(errno.ENOSPC, "No space left on device")


def assert_whole(run_dir: Path) -> None:
    """The run folder holds one epoch: log.csv's last is last.pt's; best.pt's is the best of those logged."""
    assert not list(run_dir.glob("*.partial"))
    log = pd.read_csv(run_dir / "log.csv")
    last = torch.load(run_dir / "last.pt", weights_only=True)
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert [row["epoch"] for row in last["log"]] == log["epoch"].tolist() and last["epoch"] == log["epoch"].iloc[-1]
    assert best["epoch"] == log["epoch"][log["val_dice"].idxmax()]


@pytest.mark.slow
def test_a_full_disk_at_each_point_of_an_epochs_save_then_resume_gives_the_uninterrupted_run(
    data_dir, folds_csv, tmp_path, monkeypatch, capsys
):
    flags = ["--epochs", "2", "--log-every", "2", "--quiet"]
    uninterrupted = small_config(data_dir, folds_csv, tmp_path / "uninterrupted")
    train.main([*cli_flags(uninterrupted), *flags])
    config = small_config(data_dir, folds_csv, tmp_path / "run")
    run_dir, command = config.run_dir(), [*cli_flags(config), *flags]
    disk = FullDisk(monkeypatch)
    kept = "last.pt and log.csv hold epoch 1, best.pt epoch 1"
    for file, epoch, says_kept in [
        ("last.pt", 1, "no epoch is saved yet"),
        ("best.pt", 2, kept),  # epoch 2 improves on epoch 1 (asserted below)
        ("last.pt", 2, kept),
        ("log.csv", 2, kept),
        ("curves.png", 2, kept),
    ]:
        disk.at, disk.full = (file, epoch), False
        code, error = run_train([*command, "--resume"], capsys)
        assert code == 2
        assert error == (
            f"train.py: error: {run_dir}: no space left on its device to save epoch {epoch} (0 B free): {says_kept}; "
            f"once there is room, the same command with --resume goes on from epoch {epoch}\n"
        ), file
        if epoch == 1:
            assert sorted(path.name for path in run_dir.iterdir()) == [".lock", "config.json"]
        else:
            assert_whole(run_dir)
    disk.at = None
    replace = files.os.replace

    def crash_after_last_pt(source, target):
        if Path(source).name == "log.csv.epoch2.partial":
            raise Killed
        replace(source, target)

    monkeypatch.setattr(files.os, "replace", crash_after_last_pt)
    with pytest.raises(Killed):
        train.main([*command, "--resume"])
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 2  # renamed: the epoch is saved
    assert pd.read_csv(run_dir / "log.csv")["epoch"].tolist() == [1]
    assert torch.load(run_dir / "best.pt", weights_only=True)["epoch"] == 1, "never an epoch log.csv does not list"
    monkeypatch.setattr(files.os, "replace", replace)
    train.main([*command, "--resume"])  # the run is done: the claim finishes the interrupted save
    assert_whole(run_dir)
    resumed, expected = (pd.read_csv(folder / "log.csv") for folder in (run_dir, uninterrupted.run_dir()))
    assert expected["val_dice"].tolist()[1] > expected["val_dice"].tolist()[0], "best.pt is written in epoch 2"
    for column in ("epoch", "train_loss", "val_loss", "val_dice", "lr"):
        assert resumed[column].tolist() == expected[column].tolist(), column
    best, expected_best = (
        torch.load(folder / "best.pt", weights_only=True) for folder in (run_dir, uninterrupted.run_dir())
    )
    assert best["epoch"] == expected_best["epoch"] == 2
    assert all(torch.equal(best["model"][name], expected_best["model"][name]) for name in expected_best["model"])
