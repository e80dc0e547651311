"""--time-limit in training: the projection, the stop after the last epoch that fits, and --resume after it."""

import logging
import time
import types

import pandas as pd
import pytest
import torch

import train
from competition import training
from competition.training import train_fold, train_fold_within
from tests.conftest import ManualDeadline
from tests.test_training import cli_flags, run_train


@pytest.mark.slow
def test_training_stops_after_the_last_epoch_that_fits_and_resume_trains_the_rest(tiny_config, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="competition")
    tiny_config.epochs, tiny_config.time_limit = 4, "400s"
    deadline = ManualDeadline(400.0, started=0.0)
    real = training.accumulate_gradients

    def twenty_seconds_a_step(*args, **kwargs):  # 8 steps: 160 s an epoch
        deadline.now += 20.0
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "accumulate_gradients", twenty_seconds_a_step)
    result = train_fold_within(tiny_config, deadline, "cpu", progress=False)
    assert (result.epochs_done, result.epochs, result.finished) == (2, 4, False)
    # projected at the log sync point past a minute (step 4, 80 s): 32 images in 80 s, 64 an epoch
    assert (
        "fold 0: projected 10m40s for the 4 epoch(s) to train (2m40s an epoch, from 0.4 img/s over 1m20s); "
        "time limit 6m40s, 5m20s left: it does not fit" in caplog.text
    )
    assert "fold 0: about 2 of the 4 epoch(s) to train fit in the time limit 6m40s; training will stop" in caplog.text
    assert (
        "fold 0: stopped by the time limit 6m40s with 2 of 4 epochs done (the next would take about 2m40s, 1m20s are "
        "left); last.pt, best.pt and log.csv are saved: run the same command with --resume in a new session to "
        "train the other 2" in caplog.text
    )
    run_dir = tiny_config.run_dir()
    assert pd.read_csv(run_dir / "log.csv")["epoch"].tolist() == [0, 1]
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1 and (run_dir / "best.pt").exists()

    monkeypatch.setattr(training, "accumulate_gradients", real)
    caplog.clear()
    tiny_config.time_limit = "1h"  # a new session, a new limit: not a change that refuses the resume
    train_fold(tiny_config, "cpu", resume=True, progress=False)
    assert pd.read_csv(run_dir / "log.csv")["epoch"].tolist() == [0, 1, 2, 3]
    assert "for the 2 epoch(s) to train" in caplog.text and "it fits" in caplog.text
    assert "stopped by the time limit" not in caplog.text


@pytest.mark.parametrize("value", ["11:30", "1d", "0s"])
def test_a_bad_time_limit_gives_one_line_naming_the_flag(tiny_config, capsys, value):
    code, error = run_train([*cli_flags(tiny_config), "--time-limit", value], capsys)
    assert code == 2
    assert error.startswith(f"train.py: error: --time-limit {value!r}") and error.count("\n") == 1
    assert not tiny_config.run_dir().exists()


@pytest.mark.slow
def test_the_projection_is_logged_with_a_limit_that_fits(tiny_config, capsys):
    train.main([*cli_flags(tiny_config), "--epochs", "1", "--time-limit", "2h"])
    printed = capsys.readouterr()
    assert "fold 0: projected" in printed.out and "for the 1 epoch(s) to train" in printed.out
    assert "time limit 2h00m" in printed.out and "left: it fits" in printed.out
    assert "WARNING" not in printed.err


def started_an_hour_ago(monkeypatch):
    """train.py's start moved an hour back, as if set-up had taken that long."""
    real = time.monotonic
    monkeypatch.setattr(train, "time", types.SimpleNamespace(monotonic=lambda: real() - 3600))


def test_folds_not_started_by_the_time_limit_are_reported_for_resume(tiny_config, capsys, monkeypatch):
    started_an_hour_ago(monkeypatch)
    train.main([*cli_flags(tiny_config), "--folds", "0,1", "--time-limit", "30m"])  # returns: exit 0
    printed = capsys.readouterr()
    for fold in (0, 1):
        assert f"fold {fold}: stopped by the time limit: not started: the time limit 30m00s had passed" in printed.err
        assert not (tiny_config.run_dir().parent / f"fold{fold}" / "last.pt").exists()
    assert "fold(s) [0, 1] stopped by --time-limit" in printed.err and "--folds 0,1 --resume" in printed.err


def test_one_fold_past_its_limit_before_the_first_epoch_stops_with_one_line(tiny_config, capsys, monkeypatch):
    started_an_hour_ago(monkeypatch)
    code, error = run_train([*cli_flags(tiny_config), "--time-limit", "30m"], capsys)
    assert code == 2 and "the --time-limit 30m had passed before the first epoch; nothing was trained" in error
    assert not (tiny_config.run_dir() / "last.pt").exists()
