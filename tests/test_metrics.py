import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from competition.errors import DataError
from competition.metrics import (
    confusion_matrix,
    dice_per_image,
    dice_score,
    format_class_table,
    iou_per_image,
    iou_score,
    main,
    rle_dice,
    score_submission,
    segmentation_scores,
)
from competition.rle import rle_encode


def test_dice_and_iou_on_hand_computed_cases():
    a = np.array([[1, 1, 0, 0]])
    b = np.array([[0, 1, 1, 0]])
    assert dice_score(a, b) == pytest.approx(2 * 1 / 4)
    assert iou_score(a, b) == pytest.approx(1 / 3)
    assert dice_score(a, a) == 1.0 and iou_score(a, a) == 1.0
    assert dice_score(a, np.zeros_like(a)) == 0.0
    empty = np.zeros((2, 2))
    assert dice_score(empty, empty) == 1.0 and iou_score(empty, empty) == 1.0
    with pytest.raises(ValueError, match="shape"):
        dice_score(a, np.zeros((2, 2)))


def test_torch_batched_versions_agree_with_numpy():
    rng = np.random.default_rng(0)
    predicted = rng.random((6, 1, 9, 11)) < 0.4
    truth = rng.random((6, 1, 9, 11)) < 0.5
    predicted[0] = truth[0] = False
    dice = dice_per_image(torch.from_numpy(predicted), torch.from_numpy(truth))
    iou = iou_per_image(torch.from_numpy(predicted), torch.from_numpy(truth))
    assert dice.shape == iou.shape == (6,) and dice[0] == 1.0
    np.testing.assert_allclose(dice.numpy(), [dice_score(p, t) for p, t in zip(predicted, truth)], rtol=1e-6)
    np.testing.assert_allclose(iou.numpy(), [iou_score(p, t) for p, t in zip(predicted, truth)], rtol=1e-6)


def test_dice_on_runs_equals_dice_on_decoded_masks():
    rng = np.random.default_rng(1)
    for _ in range(50):
        a, b = rng.random((2, 13, 17)) < rng.random()
        assert rle_dice(rle_encode(a), rle_encode(b), a.size) == pytest.approx(dice_score(a, b))


@pytest.mark.slow
def test_score_submission_and_cli(tmp_path):
    masks = {f"c_{i:02d}.jpg": (np.random.default_rng(i).random((4, 5)) < 0.5) for i in range(1, 4)}
    truth = pd.DataFrame({"img": list(masks), "rle_mask": [rle_encode(m) for m in masks.values()]})
    perfect = score_submission(truth, truth, 20)
    assert (perfect == 1.0).all()
    submission = truth.copy()
    submission.loc[0, "rle_mask"] = ""
    scores = score_submission(submission, truth, 20)
    assert scores.iloc[0] == 0.0 and scores.iloc[1:].eq(1.0).all()
    submission.to_csv(tmp_path / "s.csv", index=False)
    truth.to_csv(tmp_path / "t.csv", index=False)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "competition.metrics",
            str(tmp_path / "s.csv"),
            str(tmp_path / "t.csv"),
            "--size",
            "5x4",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and f"mean Dice {2 / 3:.5f}" in result.stdout
    with pytest.raises(DataError, match="no row"):
        score_submission(submission.iloc[1:], truth, 20)
    submission.loc[1, "rle_mask"] = "1 2 3"
    with pytest.raises(DataError, match="c_02.jpg: RLE has an odd count"):
        score_submission(submission, truth, 20)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            arrays(np.bool_, (n, 7), elements=st.booleans()), arrays(np.bool_, (n, 7), elements=st.booleans())
        )
    )
)
def test_dice_and_iou_properties(pair):
    a, b = pair
    dice, iou = dice_score(a, b), iou_score(a, b)
    assert 0.0 <= dice <= 1.0 and dice == dice_score(b, a)
    assert (dice == 1.0) == bool(np.array_equal(a, b))
    assert dice == pytest.approx(2 * iou / (1 + iou))
    assert rle_dice(rle_encode(a), rle_encode(b), a.size) == pytest.approx(dice)


# multi-class: confusion matrix, scores, the PNG-folder scorer


def test_confusion_matrix_by_hand():
    truth = torch.tensor([[0, 0, 1], [1, 2, 2]])
    predicted = torch.tensor([[0, 1, 1], [2, 2, 0]])
    expected = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1]])
    matrix = confusion_matrix(predicted, truth, 3)
    assert matrix.dtype == torch.int64 and torch.equal(matrix, expected)
    assert torch.equal(confusion_matrix(predicted[None], truth[None], 3), expected)


def test_confusion_matrix_excludes_ignore_pixels_and_rejects_unknown_truth():
    truth = torch.tensor([[0, 255, 1], [1, 255, 2]])
    predicted = torch.tensor([[0, 1, 1], [2, 2, 0]])
    matrix = confusion_matrix(predicted, truth, 3)
    assert int(matrix.sum()) == 4
    changed = predicted.clone()
    changed[truth == 255] = 0
    assert torch.equal(confusion_matrix(changed, truth, 3), matrix)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(predicted, torch.tensor([[0, 3, 1], [1, 0, 2]]), 3)


def test_confusion_matrix_accumulates_over_batches():
    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 4, (6, 5, 7), generator=generator)
    predicted = torch.randint(0, 4, (6, 5, 7), generator=generator)
    whole = confusion_matrix(predicted, truth, 4)
    summed = confusion_matrix(predicted[:2], truth[:2], 4) + confusion_matrix(predicted[2:], truth[2:], 4)
    assert torch.equal(whole, summed)


def test_segmentation_scores_by_hand_with_an_absent_class():
    # rows truth, columns predicted; class 3 absent from both -> NaN, left out of the means
    confusion = torch.tensor([[3, 1, 0, 0], [0, 2, 2, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    scores = segmentation_scores(confusion, ["bg", "a", "b", "c"])
    per_class = scores["per_class"]
    assert list(per_class.columns) == ["iou", "f1", "truth_share"]
    assert per_class.loc["bg", "iou"] == pytest.approx(3 / 4)
    assert per_class.loc["a", "iou"] == pytest.approx(2 / 5)
    assert per_class.loc["b", "iou"] == 0.0  # predicted, never true: counts as 0
    assert np.isnan(per_class.loc["c", "iou"]) and np.isnan(per_class.loc["c", "f1"])
    assert scores["miou"] == pytest.approx((3 / 4 + 2 / 5 + 0) / 3)
    assert per_class.loc["bg", "f1"] == pytest.approx(6 / 7)
    assert per_class.loc["a", "f1"] == pytest.approx(4 / 7)
    assert scores["macro_f1"] == pytest.approx((6 / 7 + 4 / 7 + 0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 8)
    assert per_class["truth_share"].tolist() == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert torch.equal(scores["confusion"], confusion)
    table = format_class_table(scores)
    assert "n/a" in table and "mIoU 0.3833" in table and "50.00%" in table


def test_format_class_table_shows_a_small_class():
    confusion = torch.tensor([[9967, 0], [0, 33]])
    table = format_class_table(segmentation_scores(confusion, ["wall", "sofa"]))
    assert "sofa" in table and "0.33%" in table


def test_dice_per_image_with_valid_mask():
    predicted = torch.tensor([[1, 1, 0, 0]])
    truth = torch.tensor([[1, 0, 0, 1]])
    assert torch.equal(dice_per_image(predicted, truth), dice_per_image(predicted, truth, valid=None))
    assert dice_per_image(predicted, truth).item() == pytest.approx(0.5)
    valid = torch.tensor([[True, False, True, False]])
    assert dice_per_image(predicted, truth, valid).item() == pytest.approx(1.0)


@settings(max_examples=40, deadline=None)
@given(
    arrays(np.int64, (3, 4, 5), elements=st.sampled_from([0, 1, 2, 255])),
    arrays(np.int64, (3, 4, 5), elements=st.integers(0, 2)),
)
def test_scores_properties(truth, predicted):
    truth, predicted = torch.from_numpy(truth), torch.from_numpy(predicted)
    matrix = confusion_matrix(predicted, truth, 3)
    assert int(matrix.sum()) == int((truth != 255).sum())
    per_class = segmentation_scores(matrix, ["a", "b", "c"])["per_class"]
    present = per_class.dropna()
    assert (present["iou"] <= present["f1"] + 1e-12).all()
    perfect = torch.where(truth == 255, torch.zeros_like(truth), truth)
    scores = segmentation_scores(confusion_matrix(perfect, truth, 3), ["a", "b", "c"])
    if (truth != 255).any():
        assert scores["miou"] == pytest.approx(1.0) and scores["pixel_accuracy"] == pytest.approx(1.0)


def _save_png(path, values, mode):
    image = Image.fromarray(np.asarray(values, dtype=np.uint8), mode="L")
    if mode == "P":
        image = image.convert("P")
        image.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [255, 255, 255] * 253)
    image.save(path)


@pytest.mark.parametrize("mode", ["P", "L"])
def test_png_folder_cli_end_to_end(tmp_path, capsys, mode):
    predictions, truths = tmp_path / "pred", tmp_path / "data" / "masks"
    predictions.mkdir()
    truths.mkdir(parents=True)
    (tmp_path / "data" / "classes.txt").write_text("background\nbody\nglass\n")
    truth = [[0, 1, 2], [0, 255, 2]]
    _save_png(truths / "car_01.png", truth, mode)
    _save_png(predictions / "car_01.png", [[0, 1, 1], [0, 0, 2]], mode)
    assert Image.open(predictions / "car_01.png").mode == mode
    main([str(predictions), str(truths)])
    out = capsys.readouterr().out
    # truth 0,1,2,0,2 vs predicted 0,1,1,0,2: IoU bg 1, body 1/2, glass 1/2
    assert "mIoU 0.6667" in out and "pixel accuracy 0.8000" in out and "glass" in out
    main([str(predictions), str(truths), "--classes", "a,b,c"])
    assert "\nb " in capsys.readouterr().out

    _save_png(truths / "car_02.png", truth, mode)
    with pytest.raises(SystemExit) as stopped:
        main([str(predictions), str(truths)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "car_02" in error and len(error.splitlines()) == 1


def test_png_folder_cli_size_mismatch_and_default_classes(tmp_path, capsys):
    predictions, truths = tmp_path / "pred", tmp_path / "truth"
    predictions.mkdir()
    truths.mkdir()
    _save_png(truths / "x.png", [[0, 3], [3, 0]], "L")
    _save_png(predictions / "x.png", [[0, 3], [3, 0]], "L")
    main([str(predictions), str(truths)])
    out = capsys.readouterr().out
    assert "class_3" in out and "mIoU 1.0000" in out
    _save_png(predictions / "x.png", [[0, 3, 0]], "L")
    with pytest.raises(SystemExit) as stopped:
        main([str(predictions), str(truths)])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "x.png" in error and "size" in error and len(error.splitlines()) == 1
