"""The commands' own rules: a mistake on the command line is one line, a short run's warm-up fits it, and
epochs are counted from 1 wherever they are written."""

import logging

import pytest
import torch

import infer
import make_folds
import train
from competition import inspect_data, metrics, synthetic
from competition.checkpoints import load_checkpoint
from competition.config import resolve_config

# (command's main, its name in messages, a command line argparse itself refuses, what the line must name)
MISTAKES = [
    (train.main, "train.py", ["--bogus"], "--bogus"),
    (train.main, "train.py", ["--epochs"], "--epochs"),
    (infer.main, "infer.py", ["--oof", "--image", "x.jpg"], "--image: not allowed with argument --oof"),
    (infer.main, "infer.py", ["--tta", "x"], "x"),
    (make_folds.main, "make_folds.py", ["--nfolds", "5"], "--nfolds"),
    (inspect_data.main, "inspect_data.py", ["--zzz"], "--zzz"),
    (metrics.main, "metrics.py", [], "submission"),
    (synthetic.main, "synthetic.py", ["--cars", "many"], "--cars"),
]


@pytest.mark.parametrize("main, program, argv, named", MISTAKES, ids=[f"{m[1]} {' '.join(m[2])}" for m in MISTAKES])
def test_a_command_line_mistake_is_one_line(main, program, argv, named, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", [program])  # argparse names the program after what was run
    with pytest.raises(SystemExit) as stop:
        main(argv)
    error = capsys.readouterr().err
    assert stop.value.code == 2
    assert error.count("\n") == 1 and error.startswith(f"{program}: error: "), error
    assert named in error and "--help" in error and "usage:" not in error


def test_help_still_shows_the_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        infer.main(["--help"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("usage: ")


def config_of(argv: list[str]):
    return resolve_config(train.build_parser().parse_args(argv))


def test_the_default_warm_up_is_at_most_a_quarter_of_a_short_run(caplog):
    with caplog.at_level(logging.INFO, logger="competition"):
        assert config_of(["--epochs", "1"]).warmup_epochs == 0.25
    assert "warm-up: 0.25 epochs, a quarter of the 1-epoch run (--warmup-epochs sets it)" in caplog.text
    assert config_of(["--epochs", "2"]).warmup_epochs == 0.5
    assert config_of(["--epochs", "4"]).warmup_epochs == 1.0  # the default as it was, from 4 epochs on
    assert config_of([]).warmup_epochs == 1.0
    assert config_of(["--epochs", "1", "--warmup-epochs", "0.5"]).warmup_epochs == 0.5  # asked for: kept


def test_a_warm_up_as_long_as_the_run_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        train.main(["--epochs", "1", "--warmup-epochs", "1", "--out", str(tmp_path / "runs")])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1
    assert "--warmup-epochs 1 is not shorter than the 1-epoch run" in error and "or 0 for none" in error
    settings = tmp_path / "short.toml"
    settings.write_text("epochs = 2\nwarmup_epochs = 3\n")
    with pytest.raises(SystemExit):
        train.main(["--config", str(settings), "--out", str(tmp_path / "runs")])
    assert "short.toml: warmup_epochs 3 is not shorter than the 2-epoch run" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_one_cycle_keeps_its_own_warm_up():
    assert config_of(["--epochs", "1", "--schedule", "onecycle"]).warmup_epochs == 1.0  # unused: not cut, not said


def test_a_format_2_run_with_the_default_warm_up_resumes_with_it(tmp_path):
    from dataclasses import asdict, replace

    from competition.checkpoints import check_resumable

    config = config_of(["--epochs", "2", "--encoder-weights", "none"])
    assert config.warmup_epochs == 0.5
    began = asdict(replace(config, warmup_epochs=1.0))  # format 2 saved the old default
    check_resumable({"format": 2, "config": began}, config, tmp_path / "last.pt")
    assert config.warmup_epochs == 1.0  # the run goes on as it began
    fresh = config_of(["--epochs", "2", "--encoder-weights", "none"])
    with pytest.raises(Exception, match="warmup_epochs=1.0, now 0.5"):  # a format 3 run of 1.0 was asked for it
        check_resumable({"format": 3, "config": began}, fresh, tmp_path / "last.pt")


def test_a_checkpoint_of_format_2_counts_its_epochs_from_1(tmp_path):
    old = tmp_path / "last.pt"
    rows = [{"epoch": 0, "val_dice": 0.5}, {"epoch": 1, "val_dice": 0.6}]
    torch.save({"format": 2, "model": {}, "config": {}, "epoch": 1, "log": rows}, old)
    checkpoint = load_checkpoint(old)
    assert checkpoint["epoch"] == 2 and [row["epoch"] for row in checkpoint["log"]] == [1, 2]


@pytest.mark.parametrize("part", ["truncated-jpeg", "truncated-gif"])
def test_train_py_stops_on_a_file_cut_short_before_its_run_folder(capsys, tmp_path, data_copy, folds_csv, part):
    from competition.carvana import CarvanaData
    from tests.conftest import break_carvana_sample

    victim = CarvanaData(data_copy).train_ids()[-1]  # the last one a loader would reach
    break_carvana_sample(data_copy, victim, part)
    flags = ["--data-dir", str(data_copy), "--folds-csv", str(folds_csv), "--out", str(tmp_path / "runs")]
    model = ["--encoder", "resnet18", "--encoder-weights", "none", "--size", "64x96", "--epochs", "1"]
    with pytest.raises(SystemExit) as stop:
        train.main([*flags, *model, "--device", "cpu", "--quiet"])
    error = capsys.readouterr().err
    name = f"train/{victim}.jpg: the image" if part == "truncated-jpeg" else f"train_masks/{victim}_mask.gif: the mask"
    assert stop.value.code == 2 and error.count("\n") == 1
    assert error.startswith(
        f"train.py: error: 1 of 80 training samples are broken: {name} does not decode (image file is truncated"
    )
    assert not (tmp_path / "runs").exists()  # no config.json, no lock: nothing to clear before the next try
