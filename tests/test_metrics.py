import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from competition.errors import DataError
from competition.metrics import dice_per_image, dice_score, iou_per_image, iou_score, rle_dice, score_submission
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
    perfect = score_submission(truth, truth, (4, 5))
    assert (perfect == 1.0).all()
    submission = truth.copy()
    submission.loc[0, "rle_mask"] = ""
    scores = score_submission(submission, truth, (4, 5))
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
        score_submission(submission.iloc[1:], truth, (4, 5))
    submission.loc[1, "rle_mask"] = "1 2 3"
    with pytest.raises(DataError, match=r"submission: row 3 \(c_02.jpg\): RLE has an odd count"):
        score_submission(submission, truth, (4, 5))


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


# --- any data set: the confusion matrix and its scores ---

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from competition.metrics import confusion_matrix, format_class_table, main, segmentation_scores


def test_confusion_matrix_by_hand_leaves_the_ignore_index_out():
    truth = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 1]])  # rows truth, columns predicted
    assert torch.equal(confusion_matrix(predicted, truth, 3, 255), expected)
    changed = predicted.clone()
    changed[1, 2:] = 1  # predictions where the truth is ignored count nowhere
    assert torch.equal(confusion_matrix(changed, truth, 3, 255), expected)


def test_confusion_matrix_accumulates_over_batches():
    generator = torch.Generator().manual_seed(0)
    truth, predicted = (
        torch.randint(0, 4, (6, 8, 8), generator=generator),
        torch.randint(0, 4, (6, 8, 8), generator=generator),
    )
    parts = confusion_matrix(predicted[:2], truth[:2], 4) + confusion_matrix(predicted[2:], truth[2:], 4)
    assert torch.equal(parts, confusion_matrix(predicted, truth, 4))


def test_scores_by_hand_with_an_absent_class():
    """Class 0: 1 hit, truth 2, predicted 2 -> IoU 1/3, F1 1/2; class 1: 2 hits, truth 2, predicted 3 -> IoU 2/3,
    F1 4/5; class 2: 1 hit, truth 2, predicted 1 -> IoU 1/2, F1 2/3; class 3 in neither: NaN, left out."""
    confusion = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    scores = segmentation_scores(confusion, ["a", "b", "c", "d"])
    np.testing.assert_allclose(scores["per_class"]["iou"][:3], [1 / 3, 2 / 3, 1 / 2])
    np.testing.assert_allclose(scores["per_class"]["f1"][:3], [1 / 2, 4 / 5, 2 / 3])
    assert np.isnan(scores["per_class"]["iou"]["d"])
    assert scores["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(4 / 6)
    table = format_class_table(scores)
    assert "mIoU 0.5000" in table and "33.33%" in table


def test_a_class_in_the_truth_never_predicted_scores_zero():
    scores = segmentation_scores(np.array([[5, 0], [2, 0]]), ["background", "rare"])
    assert scores["per_class"]["iou"]["rare"] == 0 and scores["miou"] == pytest.approx(5 / 7 / 2)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=4, max_size=40), st.lists(st.integers(0, 2), min_size=4, max_size=40))
def test_scores_properties(truth_values, predicted_values):
    size = min(len(truth_values), len(predicted_values))
    truth, predicted = torch.tensor(truth_values[:size]), torch.tensor(predicted_values[:size])
    confusion = confusion_matrix(predicted, truth, 3)
    assert int(confusion.sum()) == size
    scores = segmentation_scores(confusion, ["a", "b", "c"])
    iou, f1 = scores["per_class"]["iou"], scores["per_class"]["f1"]
    assert ((iou <= f1 + 1e-12) | iou.isna()).all()
    perfect = segmentation_scores(confusion_matrix(truth, truth, 3), ["a", "b", "c"])
    assert perfect["miou"] == 1.0 and perfect["pixel_accuracy"] == 1.0


def write_png(path: Path, values, palette: bool = True) -> None:
    image = Image.fromarray(np.array(values, dtype=np.uint8), mode="P" if palette else "L")
    if palette:
        image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    image.save(path)


def test_mask_folders_are_scored_from_the_command_line(tmp_path, capsys):
    (tmp_path / "truth").mkdir()
    (tmp_path / "predicted").mkdir()
    write_png(tmp_path / "truth" / "a.png", [[0, 1], [2, 255]])
    write_png(tmp_path / "predicted" / "a.png", [[0, 1], [1, 2]], palette=False)
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n")
    main([str(tmp_path / "predicted"), str(tmp_path / "truth")])
    out = capsys.readouterr().out
    # background 1/1, cat 1 hit of truth 1 + predicted 2 -> 1/2, dog 0 -> mIoU 0.5; accuracy 2/3
    assert "mIoU 0.5000" in out and "pixel accuracy 0.6667" in out and "cat" in out


def test_a_missing_prediction_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "truth").mkdir()
    (tmp_path / "predicted").mkdir()
    write_png(tmp_path / "truth" / "a.png", [[0, 1]])
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "predicted"), str(tmp_path / "truth"), "--classes", "background,cat"])
    assert exit_info.value.code == 2
    assert "no prediction for 1 truth mask(s), e.g. ['a']" in capsys.readouterr().err


# --- submission CSVs: each truth image once, nothing else, every run inside its mask ---


def three_masks_as_csv(folder: Path) -> Path:
    """A truth CSV of three 4x5 masks (``c_01.jpg``..), written in ``folder``."""
    rows = [f"c_{i:02d}.jpg,{rle_encode(np.random.default_rng(i).random((4, 5)) < 0.5)}" for i in range(1, 4)]
    path = folder / "truth.csv"
    path.write_text("img,rle_mask\n" + "\n".join(rows) + "\n")
    return path


def score_csv(submission: Path, truth: Path, capsys, *flags) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``python -m competition.metrics submission truth *flags``."""
    try:
        main([str(submission), str(truth), *flags])
        code = 0
    except SystemExit as exit:
        code = exit.code
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def test_a_submission_row_repeated_unknown_or_past_the_mask_is_refused_naming_file_row_and_image(tmp_path, capsys):
    truth = three_masks_as_csv(tmp_path)
    lines = truth.read_text().splitlines()
    submission = tmp_path / "s.csv"
    for rows, message in [
        ([*lines, lines[2]], f"{submission}: row 5 repeats c_02.jpg of row 3; each image takes one row"),
        ([*lines, "c_09.jpg,1 2"], f"{submission}: row 5: c_09.jpg is not in the truth {truth}"),
        (
            [*lines[:2], "c_02.jpg,20 2", lines[3]],
            f"{submission}: row 3 (c_02.jpg): RLE has a run past the end of the image (image of 20 pixels)",
        ),
        (lines[:3], f"{submission}: no row for 1 of the 3 images of the truth {truth}, e.g. ['c_03.jpg']"),
    ]:
        submission.write_text("\n".join(rows) + "\n")
        assert score_csv(submission, truth, capsys, "--size", "4x5") == (2, "", f"metrics: error: {message}\n")
    submission.write_text("\n".join(lines) + "\n")
    assert score_csv(submission, truth, capsys, "--size", "4x5")[:2] == (
        0,
        "mean Dice 1.00000 over 3 images (worst 1.00000: c_01.jpg)\n",
    )


def test_the_mask_size_comes_from_size_or_the_truths_images_never_assumed(tmp_path, capsys):
    truth = three_masks_as_csv(tmp_path)
    submission = tmp_path / "s.csv"
    submission.write_text(truth.read_text())
    code, out, error = score_csv(submission, truth, capsys)
    ask = "give the masks' size with --size HEIGHTxWIDTH, or the folder of their images with --data-dir"
    assert (code, out) == (2, "")
    assert (
        error
        == f"metrics: error: {truth}: its RLE rows carry no size and {tmp_path} has no test/ or train/ images; {ask}\n"
    )
    images = tmp_path / "data"
    (images / "test").mkdir(parents=True)
    for index in (1, 2):
        Image.new("RGB", (5, 4)).save(images / "test" / f"c_{index:02d}.jpg")
    code, out, error = score_csv(submission, truth, capsys, "--data-dir", str(images))
    assert (code, error) == (2, f"metrics: error: {truth}: c_03.jpg has no image in {images}/test/ or train/; {ask}\n")
    (images / "train").mkdir()
    Image.new("RGB", (5, 4)).save(images / "train" / "c_03.jpg")
    code, out, error = score_csv(submission, truth, capsys, "--data-dir", str(images))
    assert code == 0 and "mean Dice 1.00000 over 3 images" in out
    assert f"{truth}: the masks' sizes are their images' in {images} (--size gives one size instead)" in out
    Image.new("RGB", (4, 4)).save(images / "train" / "c_03.jpg")  # 16 pixels: c_03's runs go past its end
    code, out, error = score_csv(submission, truth, capsys, "--data-dir", str(images))
    assert code == 2 and f"{submission}: row 4 (c_03.jpg): RLE has a run past the end" in error


# HuBMAP's tables: a row per image, id,encoding (the truth) and id,predicted (the submission), column-major RLE of
# slides whose sizes only their TIFF headers give.
def encode_column_major(mask: np.ndarray) -> str:
    """A plain numpy RLE of the mask read column by column (1-indexed start, length), apart from competition.rle."""
    padded = np.concatenate([[0], mask.T.ravel().astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded)) + 1
    edges[1::2] -= edges[::2]
    return " ".join(map(str, edges))


def decode_column_major(rle: str, height: int, width: int) -> np.ndarray:
    flat = np.zeros(height * width, bool)
    numbers = np.array(rle.split(), dtype=np.int64)
    for start, length in zip(numbers[0::2], numbers[1::2]):
        flat[start - 1 : start - 1 + length] = True
    return flat.reshape(width, height).T


def write_slide_tables(folder: Path, shapes: dict, seed: int) -> tuple[Path, Path, float]:
    """Tiled TIFFs of ``shapes`` (id -> (height, width)) in ``folder/test``, random truth and predicted masks as
    id,encoding and id,predicted tables, and their mean Dice computed by numpy on the masks decoded again."""
    import tifffile

    rng = np.random.default_rng(seed)
    (folder / "test").mkdir(parents=True)
    truth_rows, predicted_rows, dice = [], [], []
    for image_id, (height, width) in shapes.items():
        tifffile.imwrite(folder / "test" / f"{image_id}.tiff", np.zeros((height, width, 3), np.uint8), tile=(16, 16))
        truth = rng.random((height, width)) < rng.uniform(0.05, 0.6)
        predicted = truth ^ (rng.random((height, width)) < rng.uniform(0, 0.4))  # a share of the pixels flipped
        truth_rows.append((image_id, encode_column_major(truth)))
        predicted_rows.append((image_id, encode_column_major(predicted)))
        truth, predicted = (decode_column_major(rows[-1][1], height, width) for rows in (truth_rows, predicted_rows))
        dice.append(2 * (truth & predicted).sum() / (truth.sum() + predicted.sum()))
    pd.DataFrame(truth_rows, columns=["id", "encoding"]).to_csv(folder / "test_masks.csv", index=False)
    pd.DataFrame(predicted_rows[::-1], columns=["id", "predicted"]).to_csv(folder / "submission.csv", index=False)
    return folder / "submission.csv", folder / "test_masks.csv", float(np.mean(dice))


def test_hubmap_tables_score_the_dice_of_numpy_on_odd_sized_slides_read_from_their_headers(
    tmp_path, capsys, monkeypatch
):
    import tifffile

    shapes = {"2f6ecfcdf": (37, 53), "aaa6a05cc": (101, 7), "b9a3865fc": (1, 64), "c68fe75ea": (64, 1)}
    submission, truth, expected = write_slide_tables(tmp_path, shapes, seed=3)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *_, **__: pytest.fail("a slide was decoded"))
    code, out, error = score_csv(submission, truth, capsys)
    assert (code, error) == (0, "")
    assert out.startswith(f"mean Dice {expected:.5f} over 4 images"), out
    assert abs(float(out.split()[2]) - expected) < 1e-5


@pytest.mark.parametrize(
    "rows, message",
    [
        (["id,predicted", "a,1 2", "a,3 1", "b,"], "row 3 repeats a of row 2; each image takes one row"),
        (["id,predicted", "a,1 2", "b,", "ghost,1 1"], "row 4: ghost is not in the truth"),
        (["id,predicted", "a,1 2", "b,20 2"], "row 3 (b): RLE has a run past the end of the image (image of 20"),
        (["id,predicted", "a,1 2"], "no row for 1 of the 2 images of the truth"),
        (["id", "a", "b"], "the header is 'id'; an RLE table has <image>,<rle>"),
        (["id,class,predicted", "a,g,1 2", "b,g,"], "a row per (image, class), but the truth has a row per image"),
    ],
)
def test_a_bad_hubmap_submission_is_one_line_and_exit_2(tmp_path, capsys, rows, message):
    truth, submission = tmp_path / "test_masks.csv", tmp_path / "submission.csv"
    truth.write_text("id,encoding\na,1 2\nb,3 4\n")
    submission.write_text("\n".join(rows) + "\n")
    code, out, error = score_csv(submission, truth, capsys, "--size", "4x5")
    assert (code, out) == (2, "")
    assert error.startswith("metrics: error: ") and message in error and error.count("\n") == 1, error


@pytest.mark.parametrize(
    "truth_rows, message",
    [
        (
            ["id,encoding", "a,1 2", "b,3 4", "a,1 5"],
            "test_masks.csv: row 4 repeats a of row 2; each image takes one row",
        ),
        (["id,encoding"], "test_masks.csv has no rows: nothing to score"),
        (["img,rle_mask"], "test_masks.csv has no rows: nothing to score"),
    ],
)
def test_a_bad_truth_table_is_one_line_and_exit_2(tmp_path, capsys, truth_rows, message):
    truth, submission = tmp_path / "test_masks.csv", tmp_path / "submission.csv"
    truth.write_text("\n".join(truth_rows) + "\n")
    submission.write_text("id,predicted\na,1 2\nb,\n")
    code, out, error = score_csv(submission, truth, capsys, "--size", "4x5")
    assert (code, out) == (2, "")
    assert error.startswith("metrics: error: ") and message in error and error.count("\n") == 1, error
