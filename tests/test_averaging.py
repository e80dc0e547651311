"""Checkpoint averaging: --average-top's kept epochs and averaged.pt, --swa-epochs' swa.pt, batch norm recomputed on
training images, their scores beside best.pt's, and infer.py --weights."""

import copy
import errno
import logging
import math

import pandas as pd
import pytest
import torch
from torch.optim.swa_utils import update_bn

import infer
import train
from competition import run_folder, training
from competition.averaging import average_states, epochs_text, keep_top, recompute_batch_norm
from competition.checkpoints import load_checkpoint
from competition.errors import DiskFullError
from competition.files import tagged_partial_path
from tests.conftest import small_config
from tests.test_inference import run_infer
from tests.test_training import cli_flags, run_train


def test_the_average_is_the_mean_of_each_floating_tensor_and_copies_the_others():
    generator = torch.Generator().manual_seed(0)
    states = [
        {
            "conv.weight": torch.randn(4, 3, generator=generator),
            "half.weight": torch.randn(5, generator=generator).half(),
            "bn.running_mean": torch.randn(4, generator=generator),
            "bn.num_batches_tracked": torch.tensor(10 * (index + 1)),
        }
        for index in range(3)
    ]
    averaged = average_states(states)
    for name in ("conv.weight", "bn.running_mean"):
        by_hand = (states[0][name] + states[1][name] + states[2][name]) / 3
        assert averaged[name].dtype == torch.float32
        assert torch.allclose(averaged[name], by_hand, atol=1e-7), name
    by_hand = ((states[0]["half.weight"].double() + states[1]["half.weight"] + states[2]["half.weight"]) / 3).half()
    assert averaged["half.weight"].dtype == torch.float16 and torch.equal(averaged["half.weight"], by_hand)
    assert averaged["bn.num_batches_tracked"].dtype == torch.int64
    assert averaged["bn.num_batches_tracked"].item() == 10, "copied from the first state, not averaged"


def test_batch_norm_statistics_are_recomputed_as_update_bn_makes_them():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    model[1].running_mean.fill_(7.0)  # the average of other weights' statistics: not these weights' own
    model[1].running_var.fill_(9.0)
    images = [torch.randint(0, 255, (2, 3, 8, 8)).float() for _ in range(3)]
    expected = copy.deepcopy(model)
    update_bn(images, expected)
    model.eval()
    recompute_batch_norm(model, [(batch, None) for batch in images])
    assert not model.training, "left in the mode it was in"
    assert not torch.allclose(model[1].running_mean, torch.full((4,), 7.0))
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(model[1], name), getattr(expected[1], name)), name
    mean_of_batches = torch.stack([model[0](batch).mean((0, 2, 3)) for batch in images]).mean(0)
    assert torch.allclose(model[1].running_mean, mean_of_batches, atol=1e-4), "an equal-weight mean of the batches"


def test_the_top_k_kept_over_a_sequence_of_scores():
    scores = [0.5, 0.7, 0.6, 0.9, 0.7, math.nan, 0.95]
    kept, seen = [], []
    for epoch, score in enumerate(scores, start=1):
        kept = keep_top(kept, epoch, score, 3)
        seen.append([epoch for epoch, _ in kept])
    assert seen == [[1], [2, 1], [2, 3, 1], [4, 2, 3], [4, 2, 5], [4, 2, 5], [7, 4, 2]]  # a tie keeps the earlier
    assert keep_top([], 1, 0.5, 0) == []
    assert keep_top([(1, math.nan)], 2, 0.1, 1) == [(2, 0.1)], "NaN ranks below every score"
    assert epochs_text([8, 10, 9]) == "8-10" and epochs_text([5, 8, 7]) == "5, 7, 8" and epochs_text([2, 3]) == "2, 3"


def test_the_claim_renames_an_interrupted_epochs_kept_weights_and_removes_those_no_longer_kept(tmp_path):
    last = {"epoch": 3, "kept_epochs": [[3, 0.9], [1, 0.8]]}
    for name in ("top_epoch1.pt", "top_epoch2.pt"):  # epoch 3 displaced epoch 2: a crash before its removal
        (tmp_path / name).write_text(name)
    tagged_partial_path(tmp_path / "top_epoch3.pt", "epoch3").write_text("3")  # a crash after last.pt's rename
    tagged_partial_path(tmp_path / "top_epoch4.pt", "epoch4").write_text("half")  # an epoch never saved
    (tmp_path / "averaged.pt.partial").write_text("half")
    run_folder.finish_interrupted_commit(tmp_path, committed_epoch=3)
    run_folder.remove_unkept(tmp_path, last)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["top_epoch1.pt", "top_epoch3.pt"]
    assert run_folder.COMMIT_ORDER.index(run_folder.KEPT_SLOT) == run_folder.COMMIT_ORDER.index("best.pt") - 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--average-top", "-1"], "--average-top must be 0 (off) or more, got -1"),
        (["--swa-epochs", "-2"], "--swa-epochs must be 0 (off) or more, got -2"),
        (["--average-top", "4"], "--average-top 4: more epochs than the run's 3 (--epochs); give at most 3"),
        (["--swa-epochs", "5"], "--swa-epochs 5: more epochs than the run's 3 (--epochs); give at most 3"),
        (
            ["--average-top", "2", "--ema", "0.99"],
            "--average-top and --ema 0.99: both average the weights; give one of them (--ema 0 turns EMA off)",
        ),
        (
            ["--swa-epochs", "2", "--ema", "0.99"],
            "--swa-epochs and --ema 0.99: both average the weights; give one of them (--ema 0 turns EMA off)",
        ),
    ],
)
def test_averaging_flags_out_of_range_are_one_line(tiny_config, capsys, flags, message):
    code, error = run_train([*cli_flags(tiny_config), "--epochs", "3", *flags], capsys)
    assert (code, error) == (2, f"train.py: error: {message}\n")
    assert not tiny_config.run_dir().exists()


def test_infer_without_the_asked_weights_names_the_fold_folder_and_the_flag(tmp_path, capsys):
    for fold in (0, 1):
        (tmp_path / f"fold{fold}").mkdir()
        (tmp_path / f"fold{fold}" / "best.pt").write_bytes(b"")
    (tmp_path / "fold0" / "swa.pt").write_bytes(b"")
    error = run_infer(["--oof", "--weights", "swa", "--checkpoints", str(tmp_path)], capsys)
    assert error == (
        f"infer.py: error: {tmp_path / 'fold1'}: no swa.pt (--weights swa); train.py writes it with --swa-epochs N "
        "(e.g. --swa-epochs 3): train the fold again with it, or leave --weights out\n"
    )
    error = run_infer(["--weights", "averaged", "--checkpoints", str(tmp_path / "fold0" / "best.pt")], capsys)
    assert error == (
        f"infer.py: error: --weights averaged picks averaged.pt in run folders, and {tmp_path / 'fold0' / 'best.pt'} "
        "is a checkpoint file: give its run folder, or leave --weights out\n"
    )


AVERAGING = ["--epochs", "3", "--average-top", "2", "--swa-epochs", "2", "--log-every", "2", "--quiet"]


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def averaged_run(data_dir, folds_csv, tmp_path_factory):
    """Fold 0 trained for 3 epochs with --average-top 2 --swa-epochs 2, by train.py; its log lines kept."""
    config = small_config(data_dir, folds_csv, tmp_path_factory.mktemp("averaged") / "run")
    lines = Lines()
    logging.getLogger("competition.training").addHandler(lines)  # train.py sets the handlers of "competition"
    try:
        train.main([*cli_flags(config), *AVERAGING[:-1]])  # not --quiet: the scores' line is information
    finally:
        logging.getLogger("competition.training").removeHandler(lines)
    config.lines = lines.lines
    return config


@pytest.mark.slow
def test_training_writes_the_averages_and_their_scores_beside_best_pt(averaged_run, caplog):
    run_dir = averaged_run.run_dir()
    log = pd.read_csv(run_dir / "log.csv")
    last = load_checkpoint(run_dir / "last.pt")
    top = log.sort_values(["val_dice", "epoch"], ascending=[False, True])["epoch"].tolist()[:2]
    assert [epoch for epoch, _ in last["kept_epochs"]] == top
    assert sorted(path.name for path in run_dir.glob("top_epoch*.pt")) == [f"top_epoch{e}.pt" for e in sorted(top)]
    averaged, swa = load_checkpoint(run_dir / "averaged.pt"), load_checkpoint(run_dir / "swa.pt")
    assert averaged["averaged_epochs"] == sorted(top) and swa["averaged_epochs"] == [2, 3]
    assert averaged["config"] == load_checkpoint(run_dir / "best.pt")["config"]
    kept = [load_checkpoint(run_dir / f"top_epoch{epoch}.pt")["model"] for epoch in top]
    plain = average_states(kept)
    weight = next(name for name in plain if name.endswith("conv1.weight"))
    assert torch.allclose(averaged["model"][weight], plain[weight])
    statistic = next(name for name in plain if name.endswith("running_mean"))
    assert not torch.allclose(averaged["model"][statistic], plain[statistic]), "batch norm recomputed"
    scores = pd.read_csv(run_dir / "averaged.csv")
    assert scores["weights"].tolist() == ["best.pt", "averaged.pt", "swa.pt"]
    assert scores["val_dice"].iloc[0] == log["val_dice"].max()
    assert scores["val_dice"].iloc[1] == pytest.approx(averaged["score"])
    assert scores["epochs"].astype(str).tolist() == [str(top[0]), " ".join(map(str, sorted(top))), "2 3"]
    assert (
        f"fold 0: val Dice best.pt {scores['val_dice'][0]:.5f} (epoch {top[0]}), averaged.pt (top 2: epochs "
        f"{epochs_text(top)}) {scores['val_dice'][1]:.5f}, swa.pt (epochs 2, 3) {scores['val_dice'][2]:.5f}"
    ) in averaged_run.lines


@pytest.mark.slow
def test_infer_scores_the_averaged_weights_out_of_fold(averaged_run, data_dir, tmp_path, capsys):
    common = ["--oof", "--checkpoints", averaged_run.out, "--data-dir", str(data_dir), "--workers", "0"]
    infer.main([*common, "--weights", "averaged", "--out-dir", str(tmp_path / "averaged")])
    assert str(averaged_run.run_dir() / "averaged.pt") in capsys.readouterr().out
    scores = pd.read_csv(tmp_path / "averaged" / "oof.csv")
    expected = pd.read_csv(averaged_run.run_dir() / "averaged.csv").set_index("weights")
    assert scores["dice_0.50"].mean() == pytest.approx(expected.loc["averaged.pt", "val_dice"], abs=1e-4)
    infer.main([*common, "--weights", "swa", "--out-dir", str(tmp_path / "swa")])
    assert str(averaged_run.run_dir() / "swa.pt") in capsys.readouterr().out


@pytest.mark.slow
def test_a_resumed_run_keeps_its_top_k_and_averages_as_an_uninterrupted_one(averaged_run, tmp_path, monkeypatch):
    config = small_config(averaged_run.data_dir, averaged_run.folds_csv, tmp_path / "run")
    real, calls = training.accumulate_gradients, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8 * 2 + 3:  # epoch 3 (8 steps an epoch), step 3
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "accumulate_gradients", interrupted)
    with pytest.raises(SystemExit):
        train.main([*cli_flags(config), *AVERAGING])
    monkeypatch.setattr(training, "accumulate_gradients", real)
    run_dir = config.run_dir()
    assert not (run_dir / "averaged.pt").exists() and len(list(run_dir.glob("top_epoch*.pt"))) == 2
    train.main([*cli_flags(config), *AVERAGING, "--resume"])
    expected_dir = averaged_run.run_dir()
    names = sorted(path.name for path in expected_dir.glob("top_epoch*.pt")) + ["averaged.pt", "swa.pt"]
    assert sorted(path.name for path in run_dir.glob("top_epoch*.pt")) == names[:-2]
    for name in names:
        resumed, expected = load_checkpoint(run_dir / name)["model"], load_checkpoint(expected_dir / name)["model"]
        assert all(torch.equal(resumed[key], expected[key]) for key in expected), name
    assert (run_dir / "averaged.csv").read_text() == (expected_dir / "averaged.csv").read_text()


def test_no_room_for_the_averaged_weights_is_one_line_and_leaves_no_temporary_file(tmp_path):
    def no_room(path):
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as raised:
        training._write_averaged(tmp_path / "averaged.pt", no_room)
    assert str(raised.value) == (
        f"{tmp_path}: no space left on its device to write averaged.pt ({run_folder.free_space(tmp_path)} free); "
        "every epoch is saved: once there is room, the same command with --resume writes it"
    )
    assert list(tmp_path.iterdir()) == []
