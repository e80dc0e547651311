"""The learning-rate range test: its schedule, smoothing and suggestion as pure functions, and a run on the
synthetic fold that is the same for a seed, stops when the loss blows up and writes its curve."""

import math

import numpy as np
import pandas as pd
import pytest

from competition.lr_find import BLOW_UP, blown_up, centred, main, range_test, rate_schedule, smooth, suggest


def test_rates_grow_by_one_factor_from_start_to_end():
    rates = rate_schedule(1e-7, 1.0, 71)
    assert rates[0] == pytest.approx(1e-7) and rates[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(rates[1:] / rates[:-1], 10 ** (7 / 70))


def test_smoothing_is_bias_corrected():
    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)  # no pull towards 0 at the start
    assert smooth([1.0, 3.0], beta=0.5) == pytest.approx([1.0, (0.25 * 1 + 0.5 * 3) / 0.75])


def test_the_finished_curve_is_smoothed_without_lag():
    line = [float(step) for step in range(10)]
    assert centred(line)[2:-2] == pytest.approx(line[2:-2])  # a moving average would trail by ~its window
    assert centred([0.0, 3.0, 0.0, 3.0, 0.0]) == pytest.approx([1.0, 1.5, 1.2, 1.5, 1.0])


def test_the_suggestion_is_the_steepest_descent_before_the_lowest_loss():
    rates = rate_schedule(1e-6, 1.0, 121)
    steepest = 1e-3
    losses = [2.0 - math.tanh(2 * math.log10(rate / steepest)) for rate in rates]  # falls fastest at 1e-3
    losses = [loss if rate < 0.1 else loss + 50 * (rate - 0.1) for rate, loss in zip(rates, losses)]  # the blow-up
    assert suggest(list(rates), losses) == pytest.approx(steepest, rel=0.13)  # within a step of the schedule
    assert suggest([1e-5, 1e-4, 1e-3], [3.0, 1.0, 2.0]) == pytest.approx(1e-5)  # too short: a tenth of the lowest's


def test_a_blow_up_is_a_loss_far_above_its_lowest_after_the_first_steps():
    assert not blown_up([1.0] * 5 + [100.0])  # among the first, noisy steps
    assert not blown_up([1.0] * 11 + [BLOW_UP * 0.99])
    assert blown_up([1.0] * 11 + [BLOW_UP * 1.01])


@pytest.mark.slow
def test_the_range_test_is_the_same_for_a_seed_and_stops_at_the_blow_up(tiny_config):
    first = range_test(tiny_config, "cpu", 24, 1e-5, 10.0, progress=False)
    again = range_test(tiny_config, "cpu", 24, 1e-5, 10.0, progress=False)
    assert first.losses == again.losses and first.suggestion == again.suggestion
    assert first.rates == list(rate_schedule(1e-5, 10.0, 24)[: len(first.rates)])
    assert 1e-5 <= first.suggestion <= 10.0
    stopped = len(first.losses) < 24
    assert stopped == (not math.isfinite(first.losses[-1]) or blown_up(smooth(first.losses))), first.losses


@pytest.mark.slow
def test_the_command_writes_the_curve_and_prints_the_rate(tiny_config, tmp_path, capsys):
    flags = [
        "--data-dir", tiny_config.data_dir, "--folds-csv", tiny_config.folds_csv, "--out", str(tmp_path / "run"),
        "--encoder", "resnet18", "--encoder-weights", "none", "--size", "64x96", "--batch-size", "8",
        "--workers", "0", "--quiet",
    ]  # fmt: skip
    main([*flags, "--steps", "12", "--start-lr", "1e-5", "--end-lr", "1e-1"])
    printed = capsys.readouterr().out
    assert printed.startswith("suggested lr: ") and "train with --lr" in printed
    table = pd.read_csv(tmp_path / "run" / "fold0" / "lr_find.csv")
    assert list(table.columns) == ["lr", "loss", "smoothed_loss"] and 2 <= len(table) <= 12
    assert (tmp_path / "run" / "fold0" / "lr_find.png").stat().st_size > 1000
    assert not (tmp_path / "run" / "fold0" / "last.pt").exists()  # nothing of a training run is written
    with pytest.raises(SystemExit) as stop:
        main([*flags, "--start-lr", "1", "--end-lr", "0.1"])
    assert stop.value.code == 2 and "need 0 < start < end" in capsys.readouterr().err


@pytest.mark.slow
def test_train_lr_auto_trains_at_the_suggested_rate_and_resumes_at_it(tiny_config, tmp_path, caplog):
    import logging

    import torch

    import train

    out = tmp_path / "auto"
    flags = [
        "--data-dir", tiny_config.data_dir, "--folds-csv", tiny_config.folds_csv, "--out", str(out),
        "--encoder", "resnet18", "--encoder-weights", "none", "--size", "64x96", "--batch-size", "8",
        "--workers", "0", "--epochs", "1", "--lr", "auto",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="competition"):
        train.main(flags)
    rate = torch.load(out / "fold0" / "last.pt", weights_only=True)["config"]["lr"]
    assert 1e-7 <= rate <= 1.0 and rate == float(f"{rate:.2g}") and (out / "lr_find.png").is_file()
    assert f"--lr auto: {rate:.2g}, from the range test on fold 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="competition"):
        train.main([*flags, "--resume"])  # no second test: the rate last.pt was trained at
    assert f"--lr auto: {rate:.2g}, the rate" in caplog.text and "range test on fold" not in caplog.text


def test_lr_auto_is_train_pys_alone(capsys):
    from competition import memory

    with pytest.raises(SystemExit) as stop:
        main(["--lr", "auto"])
    assert stop.value.code == 2 and "--lr auto is train.py's" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        memory.main(["--lr", "fast"])
    assert stop.value.code == 2 and "--lr: invalid rate_or_auto value: 'fast'" in capsys.readouterr().err
