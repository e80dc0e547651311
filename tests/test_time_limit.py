"""--time-limit in training: the projection, the stop after the last epoch that fits, and --resume after it."""

import json
import logging
import re
import time
import types
from dataclasses import asdict, replace

import pandas as pd
import pytest
import torch

import train
from competition import training
from competition.config import TrainConfig, resolve_config
from competition.epoch_budget import EpochBudget, known_epoch_seconds
from competition.training import FoldResult, train_fold, train_fold_within
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
        "fold 0: projected 10m40s for the 4 epoch(s) to train (2m40s an epoch, from 0.4 img/s over 1m20s: training "
        "only, validation adds to each epoch); time limit 6m40s, 5m20s left: it does not fit" in caplog.text
    )
    assert caplog.text.count("projected") == 1, "the measured first epoch agrees: not said again"
    assert "fold 0: about 2 of the 4 epoch(s) to train fit in the time limit 6m40s; training will stop" in caplog.text
    assert (
        "fold 0: stopped by the time limit 6m40s with 2 of 4 epochs done (the next would take about 2m40s, 1m20s are "
        "left); last.pt, best.pt and log.csv are saved: run the same command with --resume in a new session to "
        "train the other 2" in caplog.text
    )
    run_dir = tiny_config.run_dir()
    assert pd.read_csv(run_dir / "log.csv")["epoch"].tolist() == [1, 2]
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 2 and (run_dir / "best.pt").exists()

    # fold 1's turn comes now, 1m20s left: fold 0's 2m40s epochs say that none of its epochs fits
    sibling = replace(tiny_config, fold=1)
    not_started = "the time limit 6m40s leaves 1m20s, an epoch takes about 2m40s"
    assert train_fold_within(sibling, deadline, "cpu", progress=False) == FoldResult(None, 0, 4, not_started)
    assert not sibling.run_dir().exists()

    # fold 0 resumed in a new session with 1m20s left: not started, its files as they were
    written = {path.name: path.stat().st_mtime_ns for path in run_dir.iterdir()}
    result = train_fold_within(tiny_config, ManualDeadline(400.0, 0.0, now=320.0), "cpu", resume=True, progress=False)
    assert (result.best["epoch"], result.epochs_done, result.not_started) == (2, 2, not_started)
    assert {path.name: path.stat().st_mtime_ns for path in run_dir.iterdir()} == written

    monkeypatch.setattr(training, "accumulate_gradients", real)
    caplog.clear()
    tiny_config.time_limit = "1h"  # a new session, a new limit: not a change that refuses the resume
    train_fold(tiny_config, "cpu", resume=True, progress=False)
    assert pd.read_csv(run_dir / "log.csv")["epoch"].tolist() == [1, 2, 3, 4]
    assert "for the 2 epoch(s) to train" in caplog.text and "it fits" in caplog.text
    assert "stopped by the time limit" not in caplog.text


@pytest.mark.slow
def test_a_first_epoch_longer_with_validation_than_projected_is_warned_of_when_it_ends(
    tiny_config, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="competition")
    tiny_config.epochs, tiny_config.time_limit = 3, "700s"
    deadline = ManualDeadline(700.0, started=0.0)
    real_step, real_evaluate = training.accumulate_gradients, training.evaluate

    def twenty_seconds_a_step(*args, **kwargs):  # 8 steps: 2m40s of training an epoch
        deadline.now += 20.0
        return real_step(*args, **kwargs)

    def validation_of_200_seconds(*args, **kwargs):  # 6m00s an epoch in all
        deadline.now += 200.0
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "accumulate_gradients", twenty_seconds_a_step)
    monkeypatch.setattr(training, "evaluate", validation_of_200_seconds)
    result = train_fold_within(tiny_config, deadline, "cpu", progress=False)
    assert (result.epochs_done, result.not_started) == (1, "")
    assert "(2m40s an epoch, from 0.4 img/s over 1m20s: training only, validation adds to each epoch)" in caplog.text
    assert "fold 0: projected 8m00s for the 3 epoch(s)" in caplog.text and "10m20s left: it fits" in caplog.text
    assert (
        "fold 0: projected 18m00s for the 3 epoch(s) to train (6m00s an epoch, from the first epoch, validation "
        "included); time limit 11m40s, 5m40s left: it does not fit" in caplog.text
    )
    assert "fold 0: about 1 of the 3 epoch(s) to train fit in the time limit 11m40s" in caplog.text
    assert "with 1 of 3 epochs done (the next would take about 6m00s, 5m40s are left)" in caplog.text


def settings_of(config, fold: int) -> str:
    """The config.json train.py writes for ``fold`` of the tiny run."""
    args = train.build_parser().parse_args([*cli_flags(config), "--fold", str(fold)])
    return json.dumps(asdict(resolve_config(args)))


def test_the_epoch_length_is_read_from_the_logs_of_folds_with_the_same_settings(tiny_config):
    out = tiny_config.run_dir().parent
    same = settings_of(tiny_config, 0)
    for fold, seconds, settings in [(0, 90.5, same), (1, 300.0, "{}"), (2, "", same)]:
        (out / f"fold{fold}").mkdir(parents=True)
        (out / f"fold{fold}" / "config.json").write_text(settings)
        (out / f"fold{fold}" / "log.csv").write_text(f"epoch,seconds\n0,{seconds}\n")
    (out / "fold3").mkdir()  # begun, no epoch logged yet
    config = resolve_config(train.build_parser().parse_args([*cli_flags(tiny_config), "--fold", "4"]))
    assert known_epoch_seconds(config) == 90.5  # fold 1's other settings and fold 2's broken log left out
    assert known_epoch_seconds(replace(config, batch_size=2)) == 0.0


def test_a_fold_saved_before_its_config_named_the_rules_settings_still_tells_the_epoch_length(tiny_config):
    out = tiny_config.run_dir().parent
    saved = json.loads(settings_of(tiny_config, 0))
    del saved["recipe_applied"]  # a config.json of before the field
    (out / "fold0").mkdir(parents=True)
    (out / "fold0" / "config.json").write_text(json.dumps(saved))
    (out / "fold0" / "log.csv").write_text("epoch,seconds\n0,42.0\n")
    config = resolve_config(train.build_parser().parse_args([*cli_flags(tiny_config), "--fold", "1"]))
    assert known_epoch_seconds(replace(config, recipe_applied="lr,schedule")) == 42.0


def test_a_fold_whose_turn_comes_with_less_than_an_epoch_left_is_not_started(tiny_config, capsys):
    fold0 = tiny_config.run_dir()
    fold0.mkdir(parents=True)
    (fold0 / "config.json").write_text(settings_of(tiny_config, 0))
    (fold0 / "log.csv").write_text("epoch,seconds\n0,3000.0\n1,3600.0\n")  # an epoch of an hour
    train.main([*cli_flags(tiny_config), "--folds", "1", "--time-limit", "30m"])  # returns: exit 0
    printed = capsys.readouterr().err
    left = r"(29m5\ds|30m00s)"  # the worker's start takes a moment of the 30 minutes
    stopped = rf"fold 1: stopped by the time limit: not started: the time limit 30m00s leaves {left}, an epoch takes"
    assert re.search(stopped + " about 1h00m", printed)
    assert "--folds 1 --resume" in printed
    assert sorted(path.name for path in (fold0.parent / "fold1").iterdir()) == ["train.log"]


@pytest.mark.parametrize("value", ["11:30", "1d", "0s", "0m", "-5m"])
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
    assert (
        code == 2 and "fold 0: not started: the time limit 30m00s had passed (--time-limit 30m); nothing was " in error
    )
    assert not (tiny_config.run_dir() / "last.pt").exists()


def budget_on(deadline: ManualDeadline, epochs: int, time_limit: str, known_epoch: float = 0.0):
    """An EpochBudget of a 64-image epoch on ``deadline``, the epoch loop driven by the test."""
    config = TrainConfig(epochs=epochs, time_limit=time_limit)
    return EpochBudget(deadline, config, first_epoch=0, images_per_epoch=64, known_epoch=known_epoch)


def test_a_first_epoch_that_passes_the_limit_is_said_to_have_passed_it_never_to_fit(caplog):
    caplog.set_level(logging.INFO, logger="competition")
    deadline = ManualDeadline(10.0, started=0.0)
    budget = budget_on(deadline, 2, "10s")
    assert budget.begin(0)
    deadline.now = 48.0  # nothing known of an epoch's length before it: it is not refused, and takes 48 s
    budget.end()
    assert not budget.begin(1) and budget.not_started == ""
    assert [record.getMessage() for record in caplog.records] == [
        (
            "fold 0: --time-limit 10s was passed: epoch 1 took 48s; last.pt is kept: run the same command with --resume "
            "in a new session to train the other 1"
        )
    ]


def test_an_epoch_known_not_to_fit_is_said_before_it_starts(caplog):
    caplog.set_level(logging.INFO, logger="competition")
    deadline = ManualDeadline(60.0, started=0.0)
    budget = budget_on(deadline, 3, "1m")
    assert budget.begin(0)
    deadline.now = 48.0
    budget.end()
    assert not budget.begin(1)
    assert [record.getMessage() for record in caplog.records] == [
        (
            "fold 0: projected 2m24s for the 3 epoch(s) to train (48s an epoch, from the first epoch, validation "
            "included); time limit 1m00s, 12s left: it does not fit"
        ),
        (
            "fold 0: about 1 of the 3 epoch(s) to train fit in the time limit 1m00s; training will stop after them, with "
            "last.pt saved: run the same command with --resume in a new session to train the rest"
        ),
        (
            "fold 0: stopped by the time limit 1m00s with 1 of 3 epochs done (the next would take about 48s, 12s are "
            "left); last.pt, best.pt and log.csv are saved: run the same command with --resume in a new session to "
            "train the other 2"
        ),
    ]
    known = budget_on(ManualDeadline(10.0, started=0.0), 2, "10s", known_epoch=48.0)  # from a sibling fold's log
    assert not known.begin(0) and known.not_started == "the time limit 10s leaves 10s, an epoch takes about 48s"


def test_a_projection_that_not_even_the_epoch_under_way_fits_claims_no_epoch(caplog):
    caplog.set_level(logging.INFO, logger="competition")
    deadline = ManualDeadline(100.0, started=0.0)
    budget = budget_on(deadline, 2, "100s")
    assert budget.begin(0)
    deadline.now = 80.0
    budget.during(images_done=32)  # 0.4 img/s: 2m40s an epoch, past the limit before the first ends
    deadline.now = 160.0
    budget.end()
    assert not budget.begin(1)
    assert [record.getMessage() for record in caplog.records][1:] == [
        "fold 0: epoch 1 is projected to end past the time limit 1m40s; it is finished and saved, then training stops",
        (
            "fold 0: --time-limit 100s was passed: epoch 1 took 2m40s; last.pt is kept: run the same command with "
            "--resume in a new session to train the other 1"
        ),
    ]


@pytest.mark.slow
def test_training_whose_first_epoch_passes_the_limit_says_so_and_resume_goes_on(tiny_config, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="competition")
    tiny_config.epochs, tiny_config.time_limit = 2, "10s"
    deadline = ManualDeadline(10.0, started=0.0)
    real = training.accumulate_gradients

    def six_seconds_a_step(*args, **kwargs):  # 8 steps: 48 s an epoch
        deadline.now += 6.0
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "accumulate_gradients", six_seconds_a_step)
    result = train_fold_within(tiny_config, deadline, "cpu", progress=False)
    assert (result.epochs_done, result.epochs, result.not_started) == (1, 2, "")
    assert (
        "fold 0: --time-limit 10s was passed: epoch 1 took 48s; last.pt is kept: run the same command with --resume "
        "in a new session to train the other 1" in caplog.text
    )
    assert "fit in" not in caplog.text and "projected" not in caplog.text and "stopped by" not in caplog.text
    assert torch.load(tiny_config.run_dir() / "last.pt", weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_a_fold_stopped_by_the_time_limit_says_resume_writes_its_averaged_weights(tiny_config, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="competition")
    tiny_config.epochs, tiny_config.time_limit, tiny_config.average_top = 3, "200s", 2
    deadline = ManualDeadline(200.0, started=0.0)
    real = training.accumulate_gradients

    def twenty_seconds_a_step(*args, **kwargs):  # 8 steps: 160 s an epoch, one fits
        deadline.now += 20.0
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "accumulate_gradients", twenty_seconds_a_step)
    assert train_fold_within(tiny_config, deadline, "cpu", progress=False).epochs_done == 1
    assert not (tiny_config.run_dir() / "averaged.pt").exists()
    assert (
        "fold 0: 1 of 3 epochs done, so no averaged.pt yet; --resume finishes the epochs and writes averaged.pt"
        in caplog.text
    )
