"""competition.metrics reads truth mask folders as training reads masks: each score checked against a plain
numpy scorer written here, on random masks."""

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from competition.config import config_from
from competition.logs import LOGGER_NAME
from competition.metrics import main, score_mask_folders

SIZES = ((20, 30), (17, 23), (25, 19))  # (height, width) of each image: the scorer pairs files, not one shape


@pytest.fixture(autouse=True)
def forget_log_streams():
    """main() points the project's log at the test's captured stdout, which closes as the test ends."""
    yield
    for handler in list(logging.getLogger(LOGGER_NAME).handlers):
        logging.getLogger(LOGGER_NAME).removeHandler(handler)


def numpy_scores(pairs, num_classes: int, ignore: int) -> tuple[float, np.ndarray]:
    """(mIoU, IoU per class, NaN where a class is in neither) of (predicted, true class) pairs, by hand."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for predicted, truth in pairs:
        labelled = truth != ignore
        codes = truth[labelled].astype(np.int64) * num_classes + predicted[labelled]
        confusion += np.bincount(codes, minlength=num_classes**2).reshape(num_classes, num_classes)
    hits = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - hits
    iou = np.full(num_classes, np.nan)
    iou[union > 0] = hits[union > 0] / union[union > 0]
    return float(np.nanmean(iou)), iou


def write_mask(path: Path, values: np.ndarray, palette: bool = False) -> None:
    """A mask PNG as stored: greyscale (or a palette, as infer.py writes predictions), RGB for a 3-D array."""
    image = Image.fromarray(values, mode="P" if palette else None)
    if palette:
        image.putpalette(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8).tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def make_folders(tmp_path: Path, stored_truth, num_classes: int, seed: int = 0) -> tuple[Path, Path, list]:
    """(predicted folder, truth folder, [(predicted classes, true stored values)]): one truth mask per size in
    SIZES from ``stored_truth(rng, shape)``, and predictions of random classes 0..num_classes-1."""
    rng = np.random.default_rng(seed)
    predicted_dir, truth_dir = tmp_path / "predicted", tmp_path / "data" / "truth"
    pairs = []
    for number, shape in enumerate(SIZES):
        truth = stored_truth(rng, shape)
        predicted = rng.integers(0, num_classes, shape, dtype=np.uint8)
        write_mask(truth_dir / f"img_{number}.png", truth)
        write_mask(predicted_dir / f"img_{number}.png", predicted, palette=True)
        pairs.append((predicted, truth))
    return predicted_dir, truth_dir, pairs


def assert_scores_match(scores: dict, pairs, num_classes: int, ignore: int) -> None:
    miou, iou = numpy_scores(pairs, num_classes, ignore)
    assert scores["miou"] == pytest.approx(miou, abs=1e-6)
    np.testing.assert_allclose(scores["per_class"]["iou"].to_numpy(), iou, atol=1e-6, equal_nan=True)


def test_0_255_truth_without_flags_scores_255_as_the_foreground(tmp_path, capsys):
    predicted_dir, truth_dir, pairs = make_folders(
        tmp_path, lambda rng, shape: np.where(rng.random(shape) < 0.4, 255, 0).astype(np.uint8), 2
    )
    scores = score_mask_folders(predicted_dir, truth_dir)
    assert list(scores["per_class"].index) == ["background", "foreground"]
    assert_scores_match(scores, [(p, t // 255) for p, t in pairs], 2, ignore=255)
    assert scores["per_class"]["truth_share"]["foreground"] > 0.3  # scored, not ignored
    main([str(predicted_dir), str(truth_dir)])
    out = capsys.readouterr().out
    assert "masks hold {0, 255}: 0 is the background, 255 the foreground" in out
    assert f"mIoU {scores['miou']:.4f}" in out


def test_0_1_truth(tmp_path):
    predicted_dir, truth_dir, pairs = make_folders(
        tmp_path, lambda rng, shape: (rng.random(shape) < 0.3).astype(np.uint8), 2, seed=1
    )
    scores = score_mask_folders(predicted_dir, truth_dir)
    assert_scores_match(scores, pairs, 2, ignore=255)


def void_truth(rng, shape):
    """CamVid's index masks: classes 0..10, and 11 the void pixels."""
    return rng.integers(0, 12, shape, dtype=np.uint8)


CAMVID_CLASSES = ",".join(f"c{index}" for index in range(11))


def test_index_truth_with_a_void_value_by_flag_and_by_the_record(tmp_path, capsys, caplog):
    predicted_dir, truth_dir, pairs = make_folders(tmp_path, void_truth, 11, seed=2)
    by_flag = score_mask_folders(predicted_dir, truth_dir, ignore_index=11)
    assert len(by_flag["per_class"]) == 11  # 11 the void, not a twelfth class
    assert_scores_match(by_flag, pairs, 11, ignore=11)
    config = asdict(config_from({"classes": CAMVID_CLASSES, "ignore_index": 11}))
    record = {"checkpoints": [], "tta": [], "threshold": 0.5, "config": config}
    (predicted_dir / "predicted-by.json").write_text(json.dumps(record))
    by_record = score_mask_folders(predicted_dir, truth_dir)
    assert list(by_record["per_class"].index) == CAMVID_CLASSES.split(",")
    assert_scores_match(by_record, pairs, 11, ignore=11)
    assert f"from {predicted_dir / 'predicted-by.json'}" in caplog.text
    main([str(predicted_dir), str(truth_dir)])
    assert f"mIoU {by_record['miou']:.4f}" in capsys.readouterr().out


def test_a_record_without_config_reads_the_first_checkpoints(tmp_path, caplog):
    predicted_dir, truth_dir, pairs = make_folders(tmp_path, void_truth, 11, seed=3)
    checkpoint = tmp_path / "best.pt"
    config = asdict(config_from({"classes": CAMVID_CLASSES, "ignore_index": 11}))
    torch.save({"format": 2, "model": {}, "config": config}, checkpoint)
    record = {"checkpoints": [{"path": str(checkpoint), "size": 1, "mtime_ns": 1}], "tta": [], "threshold": 0.5}
    (predicted_dir / "predicted-by.json").write_text(json.dumps(record))
    scores = score_mask_folders(predicted_dir, truth_dir)
    assert_scores_match(scores, pairs, 11, ignore=11)
    assert f"from {checkpoint}" in caplog.text
    twelve = [f"k{index}" for index in range(12)]
    flagged = score_mask_folders(predicted_dir, truth_dir, classes=twelve, ignore_index=255)
    assert len(flagged["per_class"]) == 12  # flags win over the record: 11 is a class again
    assert_scores_match(flagged, pairs, 12, ignore=255)


def test_colour_truth_with_a_class_dict_beside_the_truth_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CARVANA_WORK_DIR", str(tmp_path / "work"))  # the decoded-mask cache
    table = {(0, 0, 0): 0, (128, 64, 128): 1, (0, 0, 192): 2, (255, 255, 255): 255}  # the last is __ignore__
    colours = np.array(list(table), dtype=np.uint8)
    meaning = np.array(list(table.values()), dtype=np.uint8)
    drawn = []

    def painted(rng, shape):
        rows = rng.integers(0, len(colours), shape)
        drawn.append(meaning[rows])
        return colours[rows]

    predicted_dir, truth_dir, pairs = make_folders(tmp_path, painted, 3, seed=4)
    (truth_dir.parent / "class_dict.csv").write_text(
        "name,r,g,b\nsky,0,0,0\nroad,128,64,128\ncar,0,0,192\n__ignore__,255,255,255\n"
    )
    scores = score_mask_folders(predicted_dir, truth_dir)
    assert list(scores["per_class"].index) == ["sky", "road", "car"]
    assert_scores_match(scores, [(p, classes) for (p, _), classes in zip(pairs, drawn)], 3, ignore=255)


def test_mask_values_flag_is_honoured(tmp_path, capsys):
    """0 background, 255 foreground and 7 the pixels left out: no two-valued rule can find that alone."""
    predicted_dir, truth_dir, pairs = make_folders(
        tmp_path, lambda rng, shape: rng.choice(np.array([0, 255, 7], dtype=np.uint8), shape), 2, seed=5
    )
    classes = [(p, np.select([t == 0, t == 255], [0, 1], 7)) for p, t in pairs]
    scores = score_mask_folders(predicted_dir, truth_dir, ignore_index=7, mask_values="0,255")
    assert_scores_match(scores, classes, 2, ignore=7)
    main([str(predicted_dir), str(truth_dir), "--mask-values", "0,255", "--ignore-index", "7"])
    assert f"mIoU {scores['miou']:.4f}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:  # without the flag the 255s would be read as class indices: refused
        main([str(predicted_dir), str(truth_dir), "--ignore-index", "7", "--classes", "background,foreground"])
    assert stop.value.code == 2 and "[255]" in capsys.readouterr().err


def test_predictions_of_another_size_are_refused_with_both_sizes(tmp_path, capsys):
    predicted_dir, truth_dir, _ = make_folders(tmp_path, lambda rng, shape: rng.integers(0, 2, shape, np.uint8), 2)
    write_mask(predicted_dir / "img_1.png", np.zeros((17, 24), dtype=np.uint8), palette=True)
    with pytest.raises(SystemExit) as stop:
        main([str(predicted_dir), str(truth_dir)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{predicted_dir / 'img_1.png'}: 24x17" in err and f"{truth_dir / 'img_1.png'} is 23x17" in err


def test_a_truth_value_no_class_means_is_one_line_naming_the_file_and_value(tmp_path, capsys):
    predicted_dir, truth_dir, _ = make_folders(tmp_path, lambda rng, shape: rng.integers(0, 3, shape, np.uint8), 2)
    with pytest.raises(SystemExit) as stop:
        main([str(predicted_dir), str(truth_dir), "--classes", "background,cat"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"{truth_dir / 'img_0.png'}: mask value(s) [2]" in err


def test_the_records_colour_table_is_found_in_the_training_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CARVANA_WORK_DIR", str(tmp_path / "work"))
    colours = np.array([(0, 0, 0), (128, 64, 128), (0, 0, 192)], dtype=np.uint8)
    drawn = []

    def painted(rng, shape):
        drawn.append(rng.integers(0, 3, shape).astype(np.uint8))
        return colours[drawn[-1]]

    predicted_dir, truth_dir, pairs = make_folders(tmp_path, painted, 3, seed=6)
    (tmp_path / "train" / "tables").mkdir(parents=True)
    (tmp_path / "train" / "tables" / "camvid.csv").write_text("sky,0,0,0\nroad,128,64,128\ncar,0,0,192\n")
    config = asdict(config_from({"data_dir": str(tmp_path / "train"), "colors": "tables/camvid.csv"}))
    config["classes"] = "sky,road,car"  # as training saves it, resolved from the table
    record = {"checkpoints": [], "tta": [], "threshold": 0.5, "config": config}
    (predicted_dir / "predicted-by.json").write_text(json.dumps(record))
    scores = score_mask_folders(predicted_dir, truth_dir)
    assert list(scores["per_class"].index) == ["sky", "road", "car"]
    assert_scores_match(scores, [(p, classes) for (p, _), classes in zip(pairs, drawn)], 3, ignore=255)


def test_trimaps_scored_for_a_model_trained_on_oxford_pet(tmp_path):
    """Trimaps store 1 pet, 2 background, 3 border: the record's layout says so, the border left out."""
    predicted_dir, truth_dir, pairs = make_folders(tmp_path, lambda rng, shape: rng.integers(1, 4, shape, np.uint8), 2)
    config = asdict(config_from({"layout": "pet", "classes": "background,pet"}))
    record = {"checkpoints": [], "tta": [], "threshold": 0.5, "config": config}
    (predicted_dir / "predicted-by.json").write_text(json.dumps(record))
    scores = score_mask_folders(predicted_dir, truth_dir)
    classes = [(p, np.select([t == 2, t == 1], [0, 1], 3)) for p, t in pairs]
    assert_scores_match(scores, classes, 2, ignore=3)
