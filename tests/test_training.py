import argparse
import functools
import itertools
import json
import math
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train
from competition import fold_runner, run_folder, training
from competition.config import TrainConfig, add_config_arguments, config_from, resolve_config
from competition.errors import CheckpointError, ConfigError, ModelError
from competition.fold_runner import train_folds
from competition.losses import build_loss, soft_dice_loss
from competition.models import build_model
from competition.schedules import lr_factor
from competition.training import NonFiniteLossError, accumulate_gradients, train_fold
from tests.conftest import HEIGHT, WIDTH, break_carvana_sample


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return resolve_config(parser.parse_args(argv))


def test_config_layers_defaults_then_file_then_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('encoder = "resnet18"\nepochs = 3\nlr = 1\n')
    config = parse(["--config", str(path), "--epochs", "5", "--no-channels-last"])
    assert (config.encoder, config.epochs, config.lr, config.channels_last) == ("resnet18", 5, 1.0, False)
    assert config.arch == TrainConfig().arch
    path.write_text("epoch = 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['epoch'\] \(did you mean 'epochs'\?\)"):
        parse(["--config", str(path)])
    with pytest.raises(ConfigError, match="multiples of 32"):
        parse(["--size", "1000x1500"])
    with pytest.raises(ConfigError, match="epochs must be int"):
        config_from({"epochs": "many"})
    assert config_from(json.loads(json.dumps(config.__dict__))) == config


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(step, 100, 10) for step in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert factors[100] == pytest.approx(0.0, abs=1e-12)


def test_soft_dice_is_per_image_in_float32():
    targets = torch.zeros(2, 1, 4, 4)
    targets[0, :, :2] = 1
    logits = torch.where(targets > 0, 20.0, -20.0)
    assert soft_dice_loss(logits, targets).item() == pytest.approx(0.0, abs=1e-6)
    half = soft_dice_loss(logits.half(), targets)
    assert half.dtype == torch.float32
    big = torch.full((1, 1, 1280, 1920), 8.0, dtype=torch.float16)
    assert math.isfinite(build_loss("bce_dice")(big, torch.ones_like(big)).item())


@pytest.mark.slow
def test_accumulating_four_batches_of_two_gives_the_gradients_of_one_batch_of_eight():
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18").eval()  # eval: batch norm uses fixed statistics
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    masks = (torch.rand(8, 1, 64, 64) > 0.5).float()
    loss_fn = build_loss("bce_dice")
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def gradients(micro_batches):
        model.zero_grad()
        loss = accumulate_gradients(model, loss_fn, micro_batches, "fp32", scaler)
        return loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    big_loss, big = gradients([(images, masks)])
    small_loss, small = gradients([(images[i : i + 2], masks[i : i + 2]) for i in range(0, 8, 2)])
    assert small_loss.item() == pytest.approx(big_loss.item(), rel=1e-5)
    assert torch.allclose(small, big, rtol=1e-4, atol=1e-7)
    _, halves = gradients([(images[:2], masks[:2])])
    assert not torch.allclose(halves, big, rtol=1e-2), "the test must be able to fail"


@pytest.mark.slow
def test_training_learns_and_writes_its_run_folder(tiny_config):
    tiny_config.epochs = 4
    best = train_fold(tiny_config, "cpu", progress=False)
    run_dir = tiny_config.run_dir()
    for name in ("best.pt", "last.pt", "log.csv", "curves.png", "config.json"):
        assert (run_dir / name).exists(), name
    log = pd.read_csv(run_dir / "log.csv")
    assert log["epoch"].tolist() == [1, 2, 3, 4] and log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    # An all-background guess scores 0 on images with a car, an all-car guess about 0.4.
    assert best["val_dice"] > 0.8 and best["val_dice"] == log["val_dice"].max()
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    assert checkpoint["fold"] == 0 and checkpoint["score"] == pytest.approx(best["val_dice"])
    assert config_from(checkpoint["config"]) == tiny_config
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_same_seed_same_run_and_bf16_autocast_on_cpu(tiny_config, tmp_path):
    tiny_config.epochs, tiny_config.workers = 1, 2  # loader processes, as the demo has
    logs = []
    for name in ("a", "b"):
        tiny_config.out = str(tmp_path / name)
        train_fold(tiny_config, "cpu", progress=False)
        logs.append(pd.read_csv(tiny_config.run_dir() / "log.csv"))
    pd.testing.assert_series_equal(logs[0]["train_loss"], logs[1]["train_loss"])
    pd.testing.assert_series_equal(logs[0]["val_dice"], logs[1]["val_dice"])
    tiny_config.precision, tiny_config.out = "bf16", str(tmp_path / "bf16")
    assert math.isfinite(train_fold(tiny_config, "cpu", progress=False)["train_loss"])


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_after_an_interruption_mid_epoch(tiny_config, monkeypatch):
    tiny_config.epochs = 3
    real = training.accumulate_gradients
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8 + 3:  # epoch 2 (8 steps an epoch), step 3
            raise Interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "accumulate_gradients", interrupted)
    with pytest.raises(Interrupt):
        train_fold(tiny_config, "cpu", progress=False)
    run_dir = tiny_config.run_dir()
    assert pd.read_csv(run_dir / "log.csv")["epoch"].tolist() == [1]
    first_epoch = pd.read_csv(run_dir / "log.csv").iloc[0]
    monkeypatch.setattr(training, "accumulate_gradients", real)
    train_fold(tiny_config, "cpu", resume=True, progress=False)
    log = pd.read_csv(run_dir / "log.csv")
    assert log["epoch"].tolist() == [1, 2, 3]
    assert log.iloc[0]["train_loss"] == first_epoch["train_loss"]
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 3
    tiny_config.out = str(Path(tiny_config.out).parent / "uninterrupted")
    train_fold(tiny_config, "cpu", progress=False)
    uninterrupted = pd.read_csv(tiny_config.run_dir() / "log.csv")
    for column in ("train_loss", "val_loss", "val_dice", "lr"):
        assert log[column].tolist() == uninterrupted[column].tolist(), column


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_message(tiny_config, monkeypatch):
    real = training.accumulate_gradients
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 8 + 5 else loss

    monkeypatch.setattr(training, "accumulate_gradients", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, step 5.*Last good checkpoint: .*last\.pt"):
        train_fold(tiny_config, "cpu", progress=False)
    checkpoint = torch.load(tiny_config.run_dir() / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_line(tiny_config, capsys):
    code, error = run_train([*cli_flags(tiny_config), "--lr", "1e6", "--epochs", "3", "--log-every", "1"], capsys)
    assert code == 2 and ("loss is nan" in error or "loss is inf" in error)
    assert "Lower --lr" in error


@pytest.mark.slow
def test_folds_in_parallel_report_a_failing_fold_without_hiding_the_others(tiny_config):
    tiny_config.epochs = 1
    tiny_config.workers = 1  # a loader process inside a joblib worker (loky's default context cannot start one)
    outcomes = train_folds(tiny_config, [0, 7], ["cpu"], jobs=2)
    by_fold = {outcome.fold: outcome for outcome in outcomes}
    assert by_fold[0].ok and "best val Dice" in by_fold[0].message
    assert not by_fold[7].ok and "fold 7 does not exist" in by_fold[7].message
    assert "ERROR DataError: " in Path(by_fold[7].log).read_text(), "the fold's own log says why"
    assert (tiny_config.run_dir() / "best.pt").exists()


def cli_flags(config) -> list[str]:
    """train.py flags for the tiny run of ``config``."""
    flags = {
        "data-dir": config.data_dir,
        "folds-csv": config.folds_csv,
        "out": config.out,
        "encoder": "resnet18",
        "encoder-weights": "none",
        "size": "64x96",
        "workers": "0",
    }
    return [item for name, value in flags.items() for item in (f"--{name}", value)]


def run_train(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return exit_info.value.code, error


def test_ctrl_c_is_one_line_saying_how_to_go_on(tiny_config, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_fold", interrupted)
    code, error = run_train(cli_flags(tiny_config), capsys)
    assert code == 130
    assert error == "train.py: interrupted; each fold's last.pt is kept: run the same command with --resume to go on\n"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--folds-csv", "missing.csv"], "folds file not found"),
        (["--fold", "9"], "fold 9 does not exist"),
        (["--encoder", "resnet_nope"], "--encoder 'resnet_nope' (did you mean 'resnet50'?)"),
        (["--encoder", "tu-resnet_nope"], "--encoder 'tu-resnet_nope'"),
        (["--arch", "Unet3000"], "--arch 'Unet3000' (did you mean 'Unet'?): choose one of Unet, UnetPlusPlus"),
        (["--loss", "dicee"], "--loss 'dicee' (did you mean 'dice'?): choose one of bce_dice"),
        (["--schedule", "linear"], "--schedule 'linear': choose one of cosine, onecycle"),
        (["--precision", "fp8"], "--precision 'fp8': choose one of auto, bf16, fp16, fp32"),
        (["--mask-source", "png"], "--mask-source 'png': choose one of auto, gif, csv"),
        (["--encoder-weights", "weights_nowhere.pth"], "encoder weights file not found"),
        (["--size", "100x100"], "multiples of 32"),
        (["--size", "big"], "--size 'big' must be HEIGHTxWIDTH"),
        (["--epochs", "-1"], "--epochs must be at least 1, got -1"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--accum-steps", "0"], "--accum-steps must be at least 1"),
        (["--lr", "0"], "--lr must be positive"),
        (["--lr", "nan"], "--lr must be positive, got nan"),
        (["--ema", "1.5"], "--ema must be in [0, 1)"),
        (["--crop", "100"], "--crop must be 0 (off) or a positive multiple of 32"),
        (["--workers", "-2"], "--workers must be 0 or more"),
        (["--arch", "DeepLabV3Plus", "--batch-size", "1"], "needs at least 2 images a batch"),
        (["--folds", "0,x"], "--folds '0,x': comma-separated whole numbers"),
        (["--folds", "0,1,0"], "--folds '0,1,0': [0] given more than once"),
        (["--folds", "0,9"], "has no fold [9]; its folds are [0, 1, 2, 3, 4]"),
        (["--folds", "0,1", "--gpus", "0,1"], "--device cuda:0: no CUDA device here"),
        (["--folds", "0,1", "--jobs", "0"], "--jobs must be at least 1"),
        (["--device", "cuda"], "no CUDA device here"),
    ],
)
def test_bad_input_gives_one_clear_line_and_writes_nothing(tiny_config, capsys, flags, message):
    code, error = run_train(cli_flags(tiny_config) + flags, capsys)
    assert code == 2 and message in error
    assert len([line for line in error.splitlines() if "\r" not in line]) == 1, "one line (besides progress bars)"
    assert not Path(tiny_config.out).exists(), "nothing written"


def test_invalid_toml_and_a_missing_data_folder(tiny_config, tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("epochs = = 3\n")
    code, error = run_train([*cli_flags(tiny_config), "--config", str(tmp_path / "bad.toml")], capsys)
    assert code == 2 and "bad.toml: not valid TOML" in error
    code, error = run_train([*cli_flags(tiny_config), "--data-dir", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "nowhere: data folder not found" in error


def test_debug_shows_the_traceback(tiny_config):
    with pytest.raises(ConfigError, match="--epochs must be at least 1"):
        train.main([*cli_flags(tiny_config), "--epochs", "0", "--debug"])


def test_data_folder_without_masks(tiny_config, tmp_path, capsys):
    import shutil

    data = shutil.copytree(tiny_config.data_dir, tmp_path / "data")
    shutil.rmtree(data / "train_masks")
    (data / "train_masks.csv").unlink()
    code, error = run_train(
        [
            "--data-dir",
            str(data),
            "--folds-csv",
            tiny_config.folds_csv,
            "--encoder-weights",
            "none",
            "--encoder",
            "resnet18",
        ],
        capsys,
    )
    assert code == 2 and "no data layout recognised" in error, error  # a train/ alone is not Carvana's
    assert "train/ holds 80 JPGs" in error and "Carvana (train/ + train_masks/ or train_masks.csv" in error, error


def test_unreadable_weights_file(tmp_path):
    path = tmp_path / "encoder.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"not a PyTorch weights file \(it begins b'not a checkpoint'"):
        build_model("Unet", "resnet18", str(path))
    path.write_bytes(b"PK\x03\x04 a zip archive cut short")
    with pytest.raises(ModelError, match="not a readable weights file .*; it is corrupt or incomplete"):
        build_model("Unet", "resnet18", str(path))


def test_local_encoder_weights_file_loads_into_the_encoder(tmp_path):
    source = build_model("Unet", "resnet18")
    state = {f"module.{k}": v for k, v in source.network.encoder.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(1000, 512)
    torch.save(state, tmp_path / "resnet18.pth")
    loaded = build_model("FPN", "resnet18", str(tmp_path / "resnet18.pth"))
    for name, value in source.network.encoder.state_dict().items():
        assert torch.equal(loaded.network.encoder.state_dict()[name], value), name
    with pytest.raises(ModelError, match="does not fit encoder resnet34"):
        build_model("Unet", "resnet34", str(tmp_path / "resnet18.pth"))


def test_imagenet_without_network_fails_at_once_and_says_what_to_pass(monkeypatch, tmp_path):
    from competition import models

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.perf_counter()
    with pytest.raises(ModelError, match="--encoder-weights /kaggle/input/"):
        build_model("Unet", "resnet18", "imagenet")
    assert time.perf_counter() - started < 20


def test_model_takes_uint8_images_of_any_size():
    model = build_model("Unet", "resnet18").eval()
    images = torch.randint(0, 256, (1, 3, 70, 90), dtype=torch.uint8)
    with torch.no_grad():
        assert model(images).shape == (1, 1, 70, 90)
    assert np.isfinite(model(images).detach().numpy()).all()


@pytest.mark.slow
def test_training_on_full_resolution_crops_validates_at_full_size(tiny_config, monkeypatch):
    tiny_config.crop, tiny_config.epochs, tiny_config.arch = 64, 1, "FPN"
    assert tiny_config.input_size() is None
    shapes = {"train": set(), "validation": set()}
    real_accumulate, real_evaluate = training.accumulate_gradients, training.evaluate

    def accumulate(model, loss_fn, micro_batches, *args):
        shapes["train"] |= {tuple(images.shape[-2:]) for images, _ in micro_batches}
        return real_accumulate(model, loss_fn, micro_batches, *args)

    def evaluate(model, loader, *args):
        shapes["validation"] |= {tuple(masks.shape[-2:]) for _, masks in loader}
        return real_evaluate(model, loader, *args)

    monkeypatch.setattr(training, "accumulate_gradients", accumulate)
    monkeypatch.setattr(training, "evaluate", evaluate)
    best = train_fold(tiny_config, "cpu", progress=False)
    assert shapes == {"train": {(64, 64)}, "validation": {(HEIGHT, WIDTH)}}
    assert 0.0 <= best["val_dice"] <= 1.0 and math.isfinite(best["val_loss"])
    assert torch.load(tiny_config.run_dir() / "best.pt", weights_only=True)["config"]["crop"] == 64


@pytest.mark.slow
def test_train_cli_runs_several_folds_and_reports_each(tiny_config, capsys):
    train.main([*cli_flags(tiny_config), "--epochs", "1", "--folds", "1,2", "--jobs", "2"])  # returns: exit 0
    printed = capsys.readouterr().out
    assert "fold 1: ok: best val Dice" in printed and "fold 2: ok: best val Dice" in printed
    for fold in (1, 2):
        # the driver's progress line, before the outcomes
        progress = re.search(rf"cpu fold {fold}: epoch 1/1, val Dice (\S+), \d+\.\d img/s, best (\S+)\n", printed)
        assert progress and progress[1] == progress[2] and progress.start() < printed.index("fold 1: ok")
        log = (Path(tiny_config.out) / f"fold{fold}" / "train.log").read_text()
        assert f"fold {fold} on cpu (worker process" in log and "best val Dice" in log
        assert f"fold {fold}: projected" in log and "; no time limit" in log


def test_fold_progress_reads_new_epochs_and_skips_rows_that_are_not_whole(tiny_config, capsys):
    from competition.logs import configure

    configure()
    run_dir = tiny_config.run_dir()
    run_dir.mkdir(parents=True)
    (run_dir / "train.log").write_text("12:00:00 fold 0 on cuda:3 (worker process 7)\n")
    header = ",".join(run_folder.LOG_COLUMNS)
    (run_dir / "log.csv").write_text(f"{header}\n1,0.001,0.5,0.4,0.9,0.8,40.0,3.0,0\n")  # an earlier run's row
    progress = fold_runner._FoldProgress(tiny_config, [0, 1])  # fold 1 has no folder yet
    (run_dir / "log.csv").write_text(f"{header}\n1,0.001,0.5,0.4,0.9,0.8,40.0,3.0,0\n2,0.001,0.4,0.3,0.95\n")
    progress._look()  # a row that is not whole (never written so: log.csv is renamed into place) is passed over
    whole = "2,0.001,0.4,0.3,0.97,0.9,41.3,3.0,0"
    (run_dir / "log.csv").write_text(f"{header}\n1,0.001,0.5,0.4,0.9,0.8,40.0,3.0,0\n{whole}\n")
    progress._look()
    progress._look()  # nothing new: nothing said
    printed = [line.split(" ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert printed == ["cuda:3 fold 0: epoch 2/2, val Dice 0.97000, 41.3 img/s, best 0.97000"]


@pytest.mark.slow
def test_fp16_with_loss_scaling_trains_and_checkpoints_finite_weights(tiny_config):
    tiny_config.precision, tiny_config.epochs = "fp16", 1
    best = train_fold(tiny_config, "cpu", progress=False)
    assert math.isfinite(best["train_loss"]) and best["val_dice"] > 0
    checkpoint = torch.load(tiny_config.run_dir() / "last.pt", weights_only=True)
    assert checkpoint["scaler"]["scale"] > 0, "the GradScaler ran and its state is saved for --resume"
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_fp16_steps_skipped_for_overflow_reach_the_log_with_a_warning(tiny_config, monkeypatch, caplog):
    overflowing = functools.partial(torch.amp.GradScaler, init_scale=2.0**60)  # every step of one epoch overflows
    monkeypatch.setattr(torch.amp, "GradScaler", overflowing)
    tiny_config.precision, tiny_config.epochs = "fp16", 1
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        train_fold(tiny_config, "cpu", progress=False)
    assert not [w for w in warned if "lr_scheduler.step()" in str(w.message)], "torch's misordering warning"
    assert pd.read_csv(tiny_config.run_dir() / "log.csv")["skipped_steps"].tolist() == [8]  # 8 steps an epoch
    assert "epoch 1: 8 of 8 optimizer steps skipped: fp16 gradients overflowed" in caplog.text


@pytest.mark.slow
def test_resume_from_a_last_pt_whose_log_has_no_skipped_steps_column(tiny_config, monkeypatch):
    real = training.train_one_epoch

    def stop_in_epoch_2(parts, loader, config, epoch, *args):
        if epoch == 1:
            raise Interrupt
        return real(parts, loader, config, epoch, *args)

    monkeypatch.setattr(training, "train_one_epoch", stop_in_epoch_2)
    with pytest.raises(Interrupt):
        train_fold(tiny_config, "cpu", progress=False)
    last = tiny_config.run_dir() / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    for row in checkpoint["log"]:  # as written before the column was counted
        del row["skipped_steps"]
    torch.save(checkpoint, last)
    monkeypatch.setattr(training, "train_one_epoch", real)
    train_fold(tiny_config, "cpu", resume=True, progress=False)
    log = pd.read_csv(tiny_config.run_dir() / "log.csv")
    assert log["epoch"].tolist() == [1, 2]
    assert math.isnan(log["skipped_steps"][0]) and log["skipped_steps"][1] == 0


@pytest.mark.parametrize(
    "fails_in, settings, advice",
    [
        ("accumulate_gradients", {}, "--batch-size 4 --accum-steps 2"),
        ("accumulate_gradients", {"batch-size": "1"}, "lower --size"),
        ("accumulate_gradients", {"arch": "DeepLabV3Plus", "batch-size": "2"}, "lower --size"),
        ("evaluate", {}, "lower --val-batch-size (now 2)"),
    ],
)
@pytest.mark.slow
def test_out_of_device_memory_names_the_settings_to_lower(tiny_config, capsys, monkeypatch, fails_in, settings, advice):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nlong allocator report")

    monkeypatch.setattr(training, fails_in, out_of_memory)
    flags = cli_flags(tiny_config) + [item for name, value in settings.items() for item in (f"--{name}", value)]
    code, error = run_train(flags, capsys)
    assert code == 2
    assert "CUDA out of memory. Tried to allocate 2.00 GiB." in error and "allocator report" not in error
    assert advice in error and "python -m competition.memory" in error
    assert not (tiny_config.run_dir() / "best.pt").exists()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_a_finished_run_survives_a_rerun_without_resume_byte_for_byte(tiny_config, capsys):
    tiny_config.epochs = 1
    flags = [*cli_flags(tiny_config), "--epochs", "1", "--log-every", "2"]
    train.main(flags)
    before = folder_bytes(Path(tiny_config.out))
    code, error = run_train([*flags, "--lr", "0.5"], capsys)
    assert code == 2 and "already holds a run (best.pt, last.pt); pass --resume" in error and "--overwrite" in error
    assert folder_bytes(Path(tiny_config.out)) == before
    train.main([*flags, "--overwrite", "--lr", "0.5"])  # asked for: trained again
    assert torch.load(tiny_config.run_dir() / "last.pt", weights_only=True)["config"]["lr"] == 0.5
    code, error = run_train([*flags, "--resume", "--overwrite"], capsys)
    assert code == 2 and "not allowed with argument" in error


@pytest.mark.slow
def test_a_refused_resume_writes_nothing(tiny_config, capsys):
    flags = [*cli_flags(tiny_config), "--epochs", "1", "--log-every", "2"]
    train.main(flags)
    before = folder_bytes(Path(tiny_config.out))
    code, error = run_train([*cli_flags(tiny_config), "--epochs", "4", "--resume"], capsys)
    assert code == 2 and "was trained with epochs=1, now 4" in error and "--overwrite" in error
    assert folder_bytes(Path(tiny_config.out)) == before
    train.main([*flags, "--resume", "--workers", "1"])  # where and how fast may change: nothing left to train
    assert json.loads((tiny_config.run_dir() / "config.json").read_text())["workers"] == 1


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_a_pickle_with_code_as_last_pt_is_refused_unread(tiny_config, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_config.run_dir().mkdir(parents=True)
    torch.save({"model": Evil(), "config": {}}, tiny_config.run_dir() / "last.pt")
    code, error = run_train([*cli_flags(tiny_config), "--resume"], capsys)
    assert code == 2 and error.count("\n") == 1
    assert "last.pt: not a weights file of this project: it holds pickled Python objects, refused unread" in error
    assert not (tmp_path / "PWNED").exists()


def test_a_checkpoint_of_another_format_is_refused(tiny_config, capsys):
    from competition.checkpoints import load_checkpoint

    tiny_config.run_dir().mkdir(parents=True)
    torch.save({"format": 99, "model": {}, "config": {}}, tiny_config.run_dir() / "last.pt")
    with pytest.raises(CheckpointError, match="format 99, and this code reads formats 1, 2, 3"):
        load_checkpoint(tiny_config.run_dir() / "last.pt")
    torch.save({"model": {}, "config": {}}, tiny_config.run_dir() / "last.pt")  # format 1: no key
    with pytest.raises(CheckpointError, match="earlier version of this code .*--overwrite"):
        run_folder.inspect_run_dir(tiny_config, resume=True, overwrite=False)


@pytest.mark.parametrize("broken", ["jpeg", "gif", "rle"])
@pytest.mark.slow
def test_broken_training_data_stops_the_run_before_the_first_step(tiny_config, data_copy, monkeypatch, broken):
    from competition.carvana import CarvanaData
    from competition.data import DataError

    data = CarvanaData(data_copy)
    victim = data.train_ids()[-1]  # reached last by the loader
    break_carvana_sample(data_copy, victim, broken)
    if broken == "rle":
        tiny_config.mask_source = "csv"
    tiny_config.data_dir = str(data_copy)
    steps = []
    real = training.accumulate_gradients
    monkeypatch.setattr(training, "accumulate_gradients", lambda *args: steps.append(1) or real(*args))
    with pytest.raises(DataError, match=rf"1 of 80 training samples are broken: .*{victim}"):
        train_fold(tiny_config, "cpu", progress=False)
    assert steps == [] and not tiny_config.run_dir().exists()
    tiny_config.check = False  # --no-check: the loader meets it mid-epoch
    with pytest.raises(DataError, match=victim):
        train_fold(tiny_config, "cpu", progress=False)


@pytest.mark.slow
def test_the_last_micro_batches_of_an_epoch_make_a_smaller_step(tiny_config, monkeypatch):
    assert [len(group) for group in training.micro_batch_groups(range(8), 3)] == [3, 3, 2]
    assert [len(group) for group in training.micro_batch_groups(range(6), 3)] == [3, 3]
    tiny_config.epochs, tiny_config.accum_steps = 1, 3
    steps = []
    real = training.accumulate_gradients

    def recorded(model, loss_fn, micro_batches, *args):
        steps.append(sum(len(images) for images, _ in micro_batches))
        return real(model, loss_fn, micro_batches, *args)

    monkeypatch.setattr(training, "accumulate_gradients", recorded)
    train_fold(tiny_config, "cpu", progress=False)
    assert steps == [24, 24, 16], "64 images, batches of 8, 3 per step: the last 2 batches are one step"


def test_a_smaller_last_step_has_the_gradients_of_its_own_images():
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18").eval()
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    masks = (torch.rand(4, 1, 64, 64) > 0.5).float()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_fn = build_loss("bce_dice")

    def gradients(micro_batches):
        model.zero_grad()
        accumulate_gradients(model, loss_fn, micro_batches, "fp32", scaler)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    leftover = gradients([(images[:2], masks[:2]), (images[2:], masks[2:])])  # 2 of accum_steps=3
    assert torch.allclose(leftover, gradients([(images, masks)]), rtol=1e-4, atol=1e-7)


def test_a_run_folder_in_use_by_another_process_is_refused(tiny_config):
    from competition.files import exclusive_lock

    tiny_config.run_dir().mkdir(parents=True)
    with exclusive_lock(tiny_config.run_dir() / run_folder.LOCK_NAME) as locked:
        assert locked
        with pytest.raises(CheckpointError, match=r"being trained by another process \(pid \d+\)"):
            train_fold(tiny_config, "cpu", progress=False)
    assert not (tiny_config.run_dir() / "last.pt").exists()


def session_processes(session: int) -> list[int]:
    """Live (not zombie) processes of a session, read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_killing_the_folds_process_leaves_no_process_behind(tiny_config, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    command = [sys.executable, "train.py", *cli_flags(tiny_config), "--epochs", "50", "--folds", "0,1", "--jobs", "2"]
    driver = subprocess.Popen(
        command,
        cwd=Path(train.__file__).parent,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        logs = [Path(tiny_config.out) / f"fold{fold}" / "log.csv" for fold in (0, 1)]
        while not all(log.exists() for log in logs):  # both folds well into training
            assert driver.poll() is None and time.monotonic() < deadline, "the folds did not start"
            time.sleep(0.5)
        assert len(session_processes(driver.pid)) >= 3, "the driver and two workers"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 10
        while session_processes(driver.pid) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert session_processes(driver.pid) == [], "workers outlived their parent"
        epochs = [len(pd.read_csv(log)) for log in logs]
        time.sleep(2)
        assert [len(pd.read_csv(log)) for log in logs] == epochs, "nothing trains on"
    finally:
        for pid in session_processes(driver.pid):
            os.kill(pid, signal.SIGKILL)


def test_the_hub_offline_switch_still_exists(monkeypatch, tmp_path):
    """competition.models patches this constant (see _offline_hub_when_unreachable): fail loudly if it moves."""
    import huggingface_hub
    import huggingface_hub.constants as hub

    assert isinstance(hub.HF_HUB_OFFLINE, bool)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(Exception, match="(?i)offline|cannot find|local"):
        huggingface_hub.hf_hub_download("timm/resnet18.a1_in1k", "model.safetensors", cache_dir=str(tmp_path))
    assert time.perf_counter() - started < 5, "offline mode fails at once"


@pytest.mark.slow
def test_kill_9_mid_training_then_resume_gives_the_log_of_an_uninterrupted_run(tiny_config):
    import signal
    import subprocess
    import sys

    flags = [*cli_flags(tiny_config), "--epochs", "3", "--log-every", "2"]
    trainer = subprocess.Popen(
        [sys.executable, "train.py", *flags],
        cwd=Path(train.__file__).parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = tiny_config.run_dir() / "log.csv"
    deadline = time.monotonic() + 120
    while not log.exists():  # epoch 1 is done: the kill lands in epoch 2
        assert trainer.poll() is None and time.monotonic() < deadline, "epoch 1 did not finish"
        time.sleep(0.2)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    assert len(pd.read_csv(log)) < 3, "killed before the end"
    train.main([*flags, "--resume"])
    resumed = pd.read_csv(log)
    tiny_config.out = str(Path(tiny_config.out).parent / "uninterrupted")
    train.main([*cli_flags(tiny_config), "--epochs", "3", "--log-every", "2"])
    uninterrupted = pd.read_csv(tiny_config.run_dir() / "log.csv")
    for column in ("epoch", "train_loss", "val_loss", "val_dice", "lr"):
        assert resumed[column].tolist() == uninterrupted[column].tolist(), column


@pytest.mark.slow
def test_folds_one_at_a_time_run_in_the_driver_and_report_each(tiny_config, capsys):
    train.main([*cli_flags(tiny_config), "--epochs", "1", "--folds", "0,1"])  # one device: one job, in-process
    printed = capsys.readouterr().out
    assert "fold 0: ok: best val Dice" in printed and "fold 1: ok: best val Dice" in printed
    assert "fold 1 on cpu" in (Path(tiny_config.out) / "fold1" / "train.log").read_text()
    assert "fold 0 on cpu" not in (Path(tiny_config.out) / "fold1" / "train.log").read_text()


def test_a_checkpoint_names_its_weights_file_without_needing_it(tiny_config, capsys):
    values = {**tiny_config.__dict__, "encoder_weights": "/nowhere/resnet18.pth"}
    assert config_from(values).encoder_weights == "/nowhere/resnet18.pth", "read back from a checkpoint: accepted"
    code, error = run_train([*cli_flags(tiny_config), "--encoder-weights", "/nowhere/resnet18.pth"], capsys)
    assert code == 2 and "/nowhere/resnet18.pth: encoder weights file not found" in error


@pytest.mark.slow
def test_resume_with_another_split_is_refused(tiny_config, tmp_path):
    from competition.carvana import assign_folds
    from competition.folds import read_folds

    tiny_config.epochs = 1
    train_fold(tiny_config, "cpu", progress=False)
    folds = read_folds(tiny_config.folds_csv)
    other = assign_folds(folds["img"].str.removesuffix(".jpg").tolist(), 5, 7)
    other.to_csv(tmp_path / "other.csv", index=False)
    assert set(other.loc[other["fold"] == 0, "img"]) != set(folds.loc[folds["fold"] == 0, "img"])
    before = folder_bytes(tiny_config.run_dir())
    tiny_config.folds_csv = str(tmp_path / "other.csv")
    with pytest.raises(CheckpointError, match="holds other validation images"):
        train_fold(tiny_config, "cpu", resume=True, progress=False)
    after = folder_bytes(tiny_config.run_dir())
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
