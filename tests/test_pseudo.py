"""Pseudo-labels: the confidence rule, the folder competition.pseudo writes, and train.py --pseudo adding its test
images to every fold's training set alone, their unconfident pixels ignored by the losses."""

import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from competition import pseudo
from competition.checkpoints import check_resumable
from competition.config import TrainConfig
from competition.errors import ConfigError, DataError
from competition.fold_data import fold_ids, open_training_data, set_up_fold
from competition.mask_values import class_pixels
from competition.postprocess import FILE_NAME, ClassRule, PostProcess, write_postprocess
from competition.pseudo_data import IGNORE_VALUE, MANIFEST_NAME, PseudoLabelledSet, PseudoLabels, read_pseudo_labels
from competition.segmentation_data import read_index_mask
from competition.submission import predicted_by
from competition.training import build_parts
from competition.writers import encode_mask_png, palette
from tests.conftest import HEIGHT, WIDTH, small_config
from tests.test_refusals import refused

UNSURE_COLUMNS = WIDTH // 4  # the fake ensemble's unconfident strip: a quarter of each image


def probabilities(*pixels) -> torch.Tensor:
    """(1, C, 1, P) probabilities of P pixels, each given as its C channels."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, len(pixels[0]), 1, len(pixels))


def test_binary_pixels_are_kept_by_max_p_or_1_minus_p_and_labelled_by_the_threshold():
    masks = pseudo.confident_masks(probabilities([0.05], [0.3], [0.7], [0.95], [0.9]), 0.9)
    assert masks.tolist() == [[[0, IGNORE_VALUE, IGNORE_VALUE, 1, 1]]]
    tuned = pseudo.confident_masks(probabilities([0.05], [0.92], [0.95], [0.08]), 0.9, thresholds=[0.93])
    assert tuned.tolist() == [[[0, IGNORE_VALUE, 1, 0]]]  # 0.92: confident, but a 0 by the tuned threshold
    low = pseudo.confident_masks(probabilities([0.05], [0.08], [0.95]), 0.9, thresholds=[0.06])
    assert low.tolist() == [[[0, IGNORE_VALUE, 1]]]  # 0.08: confidently not the class, but a 1 by the threshold


def test_softmax_pixels_are_kept_by_their_top_probability():
    masks = pseudo.confident_masks(probabilities([0.9, 0.05, 0.05], [0.4, 0.5, 0.1], [0.02, 0.03, 0.95]), 0.9)
    assert masks.tolist() == [[[0, IGNORE_VALUE, 2]]]


def test_multilabel_pixels_are_kept_when_every_class_is_confident_as_packed_bits():
    pixels = [0.95, 0.02, 0.99], [0.95, 0.5, 0.99], [0.01, 0.02, 0.03], [0.95, 0.97, 0.02]
    masks = pseudo.confident_masks(probabilities(*pixels), 0.9, multilabel=True)
    assert masks.tolist() == [[[0b101, IGNORE_VALUE, 0, 0b011]]]
    tuned = pseudo.confident_masks(probabilities([0.95, 0.96, 0.02]), 0.9, thresholds=[0.5, 0.97, 0.5], multilabel=True)
    assert tuned.tolist() == [[[IGNORE_VALUE]]]  # class 1 at 0.96: confident, but below its threshold
    assert class_pixels(np.array([[0b101, IGNORE_VALUE, 0, 0b011]], np.uint8), 3, True).tolist() == [2, 1, 1]
    assert class_pixels(np.array([[2, IGNORE_VALUE, 0, 2]], np.uint8), 3, False).tolist() == [1, 0, 2]


@pytest.mark.parametrize("multilabel, mode", [(True, "L"), (False, "P")])
def test_kept_masks_are_greyscale_bits_for_multilabel_and_palette_indices_else(tmp_path, multilabel, mode):
    import io

    from PIL import Image

    mask = np.array(
        [[0b101, IGNORE_VALUE, 0], [0b011, 0b111, 0b001]] if multilabel else [[2, 255, 0], [1, 1, 0]], np.uint8
    )
    _, png = pseudo.PseudoSink(tmp_path, ["car", "glass", "shadow"], multilabel, 0.5).encode("a", mask)
    assert Image.open(io.BytesIO(png)).mode == mode
    np.testing.assert_array_equal(read_index_mask(png, "a.png"), mask)  # as train.py --pseudo reads it


class HalfSureEnsemble:
    """The interface of an Ensemble the prediction stream uses, without a model: the batches alternate between
    confident images (0.97 foreground but a strip of 0.5 a quarter wide) and unconfident ones (0.6 everywhere)."""

    tta, in_channels, device = (), 3, torch.device("cpu")

    def __init__(self):
        self.members, self.input_sizes, self.batches = [], {"full": None}, 0

    def probabilities(self, images: dict, output_size) -> torch.Tensor:
        count = images["full"].shape[0]
        self.batches += 1
        if self.batches % 2 == 0:
            return torch.full((count, 1, *output_size), 0.6)
        sure = torch.full((count, 1, *output_size), 0.97)
        sure[..., :UNSURE_COLUMNS] = 0.5
        return sure


def write_half_sure(data_dir: Path, out: Path, classes=("background", "car"), ensemble=None) -> dict:
    """Pseudo-labels of data_dir's 32 test images by HalfSureEnsemble (or ``ensemble``) in batches of 4: 16 kept."""
    data = open_training_data(small_config(data_dir, "unused.csv", out.parent / "run"))[1]
    settings = {
        "checkpoints": ["fake"],
        "tta": [],
        "classes": list(classes),
        "head": "binary",
        "data_dir": str(Path(data_dir).resolve()),
        "test_images": None,
        "rule": {"confidence": 0.9, "min_kept": 0.7, "thresholds": None, "postprocess": None, "ignore_value": 255},
    }
    ensemble = ensemble or HalfSureEnsemble()
    return pseudo.write_pseudo_labels(ensemble, data, out, settings, batch_size=4, workers=0, progress=False)


def test_the_folder_holds_the_kept_images_masks_and_a_manifest_of_their_pixels(data_dir, tmp_path):
    out = tmp_path / "pseudo"
    manifest = write_half_sure(data_dir, out)
    pixels = HEIGHT * WIDTH
    assert manifest["predicted"] == {"images": 32, "pixels": 32 * pixels, "confident_pixels": 16 * pixels * 3 // 4}
    assert manifest["kept"] == {
        "images": 16,
        "pixels": 16 * pixels,
        "kept_pixels": 16 * pixels * 3 // 4,
        "ignored": 16 * pixels // 4,
    }
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest
    written = sorted(path.stem for path in out.glob("*.png"))
    assert written == sorted(image["id"] for image in manifest["images"]) and len(written) == 16
    mask = read_index_mask((out / f"{written[0]}.png").read_bytes(), "mask")
    assert mask.shape == (HEIGHT, WIDTH)
    assert (mask[:, :UNSURE_COLUMNS] == IGNORE_VALUE).all() and (mask[:, UNSURE_COLUMNS:] == 1).all()
    assert manifest["images"][0]["class_pixels"] == [0, pixels * 3 // 4]
    assert not list(tmp_path.glob("*.partial"))


class FailingEnsemble(HalfSureEnsemble):
    def probabilities(self, images: dict, output_size) -> torch.Tensor:
        if self.batches == 3:
            raise RuntimeError("the device fell off the bus")
        return super().probabilities(images, output_size)


def test_a_failed_run_leaves_no_folder_and_the_folder_before_untouched(data_dir, tmp_path):
    out = tmp_path / "pseudo"
    with pytest.raises(RuntimeError, match="fell off"):
        write_half_sure(data_dir, out, ensemble=FailingEnsemble())
    assert not out.exists() and not list(tmp_path.glob("pseudo*"))
    before = write_half_sure(data_dir, out)
    with pytest.raises(RuntimeError, match="fell off"):
        write_half_sure(data_dir, out, ensemble=FailingEnsemble())
    assert json.loads((out / MANIFEST_NAME).read_text()) == before and len(list(out.glob("*.png"))) == 16
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pseudo"]


def tuned_file(folder: Path, head: str, rules: dict) -> Path:
    """A postprocess.json as infer.py --oof --tune writes it (competition.postprocess's own writer)."""
    path = folder / FILE_NAME
    chosen = tuple(ClassRule(name, threshold, 9, 0) for name, threshold in rules.items())
    checkpoints = predicted_by([folder / "fold0" / "best.pt"], (), 0.5)["checkpoints"]
    write_postprocess(path, PostProcess(head, chosen), {"images": 1, "tta": []}, checkpoints)
    return path


def test_a_tuning_file_gives_the_thresholds_of_the_models_classes(tmp_path):
    carvana, paths = TrainConfig(), [tmp_path / "fold0" / "best.pt"]
    paths[0].parent.mkdir()
    paths[0].write_bytes(b"weights")
    assert pseudo.tuned_thresholds(paths, (), carvana) == (None, None)  # none there: 0.5
    path = tuned_file(tmp_path, "binary", {"car": 0.35})
    assert pseudo.tuned_thresholds(paths, (), carvana) == ([0.35], str(path))
    tuned_file(tmp_path, "binary", {"road": 0.35})
    with pytest.raises(ConfigError, match="tuned for the classes road .binary head., but the checkpoints predict car"):
        pseudo.tuned_thresholds(paths, (), carvana)
    softmax = TrainConfig(classes="background,road,sky")
    assert pseudo.tuned_thresholds(paths, (), softmax) == (None, None)  # the top class
    labels = TrainConfig(classes="car,glass", head="multilabel")
    path.write_text(json.dumps({"classes": {"glass": {"threshold": 0.6}, "car": {}}}))
    with pytest.raises(DataError, match="not a post-processing file of infer.py --oof --tune"):
        pseudo.tuned_thresholds(paths, (), labels)
    tuned_file(tmp_path, "multilabel", {"car": 0.4, "glass": 0.6})
    assert pseudo.tuned_thresholds(paths, (), labels)[0] == [0.4, 0.6]


def test_a_tuning_file_of_other_checkpoints_is_one_line(tmp_path):
    carvana, paths = TrainConfig(), [tmp_path / "fold0" / "best.pt"]
    paths[0].parent.mkdir()
    paths[0].write_bytes(b"weights")
    path = tuned_file(tmp_path, "binary", {"car": 0.35})
    averaged = tmp_path / "fold0" / "averaged.pt"
    averaged.write_bytes(b"other weights")
    message = f"{path}: tuned on other checkpoints: run infer.py --oof --tune again, or pass --no-postprocess"
    with pytest.raises(ConfigError) as error:
        pseudo.tuned_thresholds([averaged], (), carvana)  # --weights averaged: not what was tuned
    assert str(error.value) == message
    paths[0].write_bytes(b"weights retrained")  # the same file, rewritten by a run with --overwrite
    with pytest.raises(ConfigError, match="tuned on other checkpoints"):
        pseudo.tuned_thresholds(paths, (), carvana)
    tuned_file(tmp_path, "binary", {"car": 0.35})  # tuned again on the retrained file
    copied = tmp_path / "dataset" / "run"  # the run uploaded as a Kaggle dataset: new paths, new times
    shutil.copytree(tmp_path / "fold0", copied / "fold0")
    shutil.copy(path, copied / path.name)
    os.utime(copied / "fold0" / "best.pt", ns=(1, 1))
    assert pseudo.tuned_thresholds([copied / "fold0" / "best.pt"], (), carvana)[0] == [0.35]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--confidence", "0.3"], "--confidence 0.3: a probability in [0.5, 1]"),
        (["--min-kept", "1.5"], "--min-kept 1.5: a share of an image's pixels in [0, 1]"),
    ],
)
def test_out_of_range_flags_are_one_line(flags, message, tmp_path, capsys):
    error = refused(pseudo.main, ["--checkpoints", str(tmp_path), "--out", str(tmp_path / "p"), *flags], capsys)
    assert message in error


def test_an_existing_folder_is_refused_without_overwrite_and_a_foreign_one_always(data_dir, tmp_path, capsys):
    out = tmp_path / "pseudo"
    write_half_sure(data_dir, out)
    capsys.readouterr()  # its lines (a handler an earlier command set up may say it lost its stream)
    argv = ["--checkpoints", str(tmp_path / "no-run"), "--out", str(out)]
    assert "the folder exists; pass --overwrite" in refused(pseudo.main, argv, capsys)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.png").write_bytes(b"mine")
    argv = ["--checkpoints", str(tmp_path / "no-run"), "--out", str(foreign), "--overwrite"]
    assert f"no {MANIFEST_NAME}, so it is not a pseudo-label folder" in refused(pseudo.main, argv, capsys)
    assert (foreign / "holiday.png").read_bytes() == b"mine"
    # a pseudo-label folder passes the check with --overwrite (then the missing run is the line)
    argv = ["--checkpoints", str(tmp_path / "no-run"), "--out", str(out), "--overwrite"]
    assert "no such checkpoint file or run folder" in refused(pseudo.main, argv, capsys)
    assert (out / MANIFEST_NAME).is_file()


def test_pseudo_labels_join_the_training_images_alone(data_dir, folds_csv, tmp_path):
    out = tmp_path / "pseudo"
    write_half_sure(data_dir, out)
    plain = small_config(data_dir, folds_csv, tmp_path / "run", check=False)
    config, data = open_training_data(replace(plain, pseudo=str(out)))
    with_pseudo = set_up_fold(config, data, torch.device("cpu"), progress=False)
    without = set_up_fold(*open_training_data(plain), torch.device("cpu"), progress=False)
    train_ids, val_ids = fold_ids(plain, data)
    assert isinstance(with_pseudo.train_loader.dataset, PseudoLabelledSet)
    assert len(with_pseudo.train_loader.dataset) == len(train_ids) + 16 == len(without.train_loader.dataset) + 16
    assert with_pseudo.train_loader.dataset.image_ids == train_ids  # the labelled ones, then the pseudo-labelled
    assert with_pseudo.val_loader.dataset.image_ids == without.val_loader.dataset.image_ids == val_ids
    assert with_pseudo.split == without.split
    image, mask = with_pseudo.train_loader.dataset[len(train_ids)]  # the first pseudo-labelled image, at 64x96
    assert image.shape == (3, 64, 96) and mask.shape == (1, 64, 96)
    assert set(mask.unique().tolist()) == {1.0, float(IGNORE_VALUE)}


def test_the_log_says_how_many_images_and_pixels_are_used(data_dir, folds_csv, tmp_path, caplog):
    out = tmp_path / "pseudo"
    write_half_sure(data_dir, out)
    config, data = open_training_data(small_config(data_dir, folds_csv, tmp_path / "run", pseudo=str(out)))
    with caplog.at_level("INFO"):
        set_up_fold(replace(config, check=False), data, torch.device("cpu"), progress=False)
    pixels = 16 * HEIGHT * WIDTH
    expected = f"pseudo-labels: 16 images, {pixels * 3 // 4} of {pixels} pixels (75.0%) used, from {out}"
    assert expected in caplog.messages


def test_pseudo_labels_of_other_classes_are_one_line(data_dir, folds_csv, tmp_path, capsys):
    out = tmp_path / "pseudo"
    write_half_sure(data_dir, out, classes=("background", "road"))
    capsys.readouterr()
    run = ["--data-dir", str(data_dir), "--folds-csv", str(folds_csv), "--out", str(tmp_path / "run")]
    argv = [*run, "--pseudo", str(out), "--encoder-weights", "none", "--device", "cpu", "--no-check"]
    error = refused(train.main, argv, capsys)
    assert f"--pseudo {out}: its labels are of the classes background,road (head binary), this run's are " in error
    assert "background,car (head binary)" in error
    assert "--pseudo" in refused(train.main, [*run, "--pseudo", str(tmp_path / "none"), "--device", "cpu"], capsys)


def test_validation_images_are_never_pseudo_labelled(data_dir, folds_csv, tmp_path):
    out = tmp_path / "pseudo"
    manifest = write_half_sure(data_dir, out)
    config, data = open_training_data(small_config(data_dir, folds_csv, tmp_path / "run", pseudo=str(out)))
    validation = fold_ids(config, data)[1]
    kept = manifest["images"][0]["id"]
    (out / f"{kept}.png").rename(out / f"{validation[0]}.png")
    manifest["images"][0]["id"] = validation[0]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=f"1 of its images are fold 0's validation images, e.g. \\['{validation[0]}'"):
        read_pseudo_labels(config, data, validation)


class TwoByThreeImages:
    """Test images of 2x3 pixels, the one thing PseudoLabels reads of a data set."""

    def read_image_and_shape(self, image_id: str, split: str, reduce_to=None):
        return np.zeros((2, 3, 3), np.uint8), (2, 3)

    def image_path(self, image_id: str, split: str) -> str:
        return f"test/{image_id}.png"


def test_unconfident_pixels_are_read_as_the_runs_ignore_index_and_a_mask_of_another_size_is_one_line(tmp_path):
    (tmp_path / "a.png").write_bytes(encode_mask_png(np.array([[0, 255, 2], [1, 1, 255]], np.uint8), palette(3)))
    (tmp_path / "b.png").write_bytes(encode_mask_png(np.zeros((3, 2), np.uint8), palette(3)))
    labels = PseudoLabels(tmp_path, TwoByThreeImages(), ["a", "b"], np.zeros((2, 3)), 12, 8, ignore_value=11)
    assert labels.read_sample(0)[1].tolist() == [[0, 11, 2], [1, 1, 11]]  # CamVid's void 11: the run ignores 11
    with pytest.raises(DataError, match="the pseudo-label is 2x3, its image test/b.png 3x2"):
        labels.read_sample(1)


def test_the_losses_ignore_unconfident_pixels(tmp_path):
    """Carvana labels every pixel, so its loss had no ignore index: with --pseudo it has 255."""
    for classes, targets in (
        ("", torch.tensor([[[[1.0, 0.0, 255.0, 255.0]]]])),
        ("background,road,sky", torch.tensor([[[2, 0, 255, 255]]])),
    ):
        config = TrainConfig(classes=classes, pseudo=str(tmp_path), encoder="resnet18", encoder_weights="none")
        loss = build_parts(config, torch.device("cpu"), "fp32", 1).loss_fn
        channels = config.output_channels()
        logits = torch.randn(1, channels, 1, 4)
        changed = logits.clone()
        changed[..., 2:] = torch.randn(1, channels, 1, 2) * 10  # only where the label is 255
        assert torch.isfinite(loss(logits, targets))
        assert torch.allclose(loss(logits, targets), loss(changed, targets))


def test_pseudo_labels_are_a_setting_a_resumed_run_keeps(tmp_path):
    saved = TrainConfig(pseudo="")
    with pytest.raises(ConfigError, match="pseudo=''"):
        check_resumable({"format": 3, "config": asdict(saved)}, replace(saved, pseudo="p"), tmp_path / "last.pt")


@pytest.mark.slow
def test_a_run_pseudo_labels_the_test_set_and_trains_again_with_it(trained_run, data_dir, folds_csv, tmp_path, caplog):
    out = tmp_path / "pseudo"
    pseudo.main(
        [
            "--checkpoints",
            str(trained_run),
            "--out",
            str(out),
            "--workers",
            "0",
            "--confidence",
            "0.6",
            "--min-kept",
            "0.3",
        ]
    )
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["classes"] == ["background", "car"] and manifest["checkpoints"][0].endswith("fold0/best.pt")
    assert manifest["rule"]["confidence"] == 0.6 and manifest["kept"]["images"] == len(list(out.glob("*.png"))) > 0
    run = tmp_path / "run"
    argv = ["--data-dir", str(data_dir), "--folds-csv", str(folds_csv), "--out", str(run), "--device", "cpu"]
    small = ["--encoder", "resnet18", "--encoder-weights", "none", "--size", "64x96", "--workers", "0", "--epochs", "1"]
    with caplog.at_level("INFO"):
        train.main([*argv, *small, "--batch-size", "8", "--pseudo", str(out)])
    kept = manifest["kept"]
    used = f"pseudo-labels: {kept['images']} images, {kept['kept_pixels']} of {kept['pixels']} pixels"
    assert any(message.startswith(used) for message in caplog.messages)
    checkpoint = torch.load(run / "fold0" / "best.pt", weights_only=True)
    assert checkpoint["config"]["pseudo"] == str(out)
