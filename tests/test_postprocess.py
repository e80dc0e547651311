"""Post-processing per class: the rules against an independent count (cv2), the tuning search raising the out-of-fold
score of a set of mostly empty images and agreeing with the rules it chose, postprocess.json and its refusal; a
sample submission's rows and columns; per-class RLE tables scored against numpy."""

import json

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench import tune_bench
from competition import metrics
from competition.errors import ConfigError, DataError
from competition.mask_values import unpack_labels
from competition.postprocess import (
    ClassRule,
    OutOfFoldStore,
    PostProcess,
    clean_index_mask,
    read_postprocess,
    tune,
    write_postprocess,
)
from competition.rle import rle_encode
from competition.submission import SampleRows


def cv2_component_rule(mask: np.ndarray, min_area: int, min_total: int) -> np.ndarray:
    """The rule computed another way: OpenCV's 8-connected components and their statistics."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    kept = np.zeros(mask.shape, dtype=bool)
    for label in range(1, count):
        if stats[label, cv2.CC_STAT_AREA] >= min_area:
            kept |= labels == label
    return kept if kept.sum() >= min_total else np.zeros_like(kept)


def test_rules_match_opencv_components_on_random_masks():
    rng = np.random.default_rng(7)
    for _ in range(20):
        height, width = (int(side) for side in rng.integers(5, 60, 2))
        probabilities = np.stack([cv2.blur(rng.random((height, width)).astype(np.float32), (3, 3)) for _ in range(3)])
        rules = tuple(
            ClassRule(f"c{k}", float(rng.uniform(0.4, 0.6)), int(rng.integers(0, 12)), int(rng.integers(0, 40)))
            for k in range(3)
        )
        packed = PostProcess("multilabel", rules).mask(probabilities)
        for channel, rule, mask in zip(probabilities, rules, unpack_labels(packed, len(rules))):
            expected = cv2_component_rule(channel > rule.threshold, rule.min_area, rule.min_total)
            np.testing.assert_array_equal(mask, expected)
            np.testing.assert_array_equal(PostProcess("binary", (rule,)).mask(channel[None]), expected)


def test_softmax_rules_turn_small_components_into_background():
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[0:4, 0:4] = 1  # 16 px of class 1
    mask[8, 8] = 1  # a 1 px speck of class 1
    mask[6:8, 0:2] = 2  # 4 px of class 2: under its min total
    rules = (ClassRule("a", None, 2, 0), ClassRule("b", None, 0, 5))
    cleaned = clean_index_mask(mask, rules)
    expected = mask.copy()
    expected[8, 8], expected[6:8, 0:2] = 0, 0
    np.testing.assert_array_equal(cleaned, expected)
    probabilities = np.stack([(mask == k).astype(np.float32) for k in range(3)])
    np.testing.assert_array_equal(PostProcess("softmax", rules).mask(probabilities), expected)


def specks_fixture(images: int = 120, size: int = 48, seed: int = 3):
    """Binary out-of-fold probabilities: a true square on a fifth of the images, predicted well, and small
    false-positive specks (2x2, p = 0.7) on every image; the rest of the images empty."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((images, size, size), dtype=np.uint8)
    probabilities = np.full((images, 1, size, size), 0.05, dtype=np.float32)
    for index in range(images):
        if index % 5 == 0:
            row, col = rng.integers(0, size - 16, 2)
            truth[index, row : row + 16, col : col + 16] = 1
            probabilities[index, 0, row : row + 16, col : col + 16] = 0.9
        for _ in range(3):
            row, col = rng.integers(0, size - 2, 2)
            if not truth[index, row : row + 2, col : col + 2].any():
                probabilities[index, 0, row : row + 2, col : col + 2] = 0.7
    return probabilities, truth


def dice_of(predicted: np.ndarray, truth: np.ndarray) -> float:
    total = predicted.sum() + truth.sum()
    return 1.0 if total == 0 else 2 * np.logical_and(predicted, truth).sum() / total


def test_tuning_removes_specks_on_empty_images_and_scores_its_own_choice():
    probabilities, truth = specks_fixture()
    store = OutOfFoldStore("binary", 1, 255)
    store.add(probabilities, truth)
    postprocess, table = tune(store, ["car"], 0.5)
    (rule,) = postprocess.rules
    row = table.iloc[0]
    assert row["tuned"] > row["untuned"] + 0.3 and rule.min_area > 4
    # the search's scores are the rules applied image by image (quantised as the store keeps them)
    quantised = np.rint(probabilities * 255) / 255
    untuned = np.mean([dice_of(image[0] > 0.5, true) for image, true in zip(quantised, truth)])
    tuned = np.mean([dice_of(postprocess.mask(image) == 1, true) for image, true in zip(quantised, truth)])
    assert row["untuned"] == pytest.approx(untuned) and row["tuned"] == pytest.approx(tuned)


def test_a_class_never_predicted_scores_its_empty_images():
    probabilities, truth = specks_fixture(images=10)
    store = OutOfFoldStore("binary", 1, 255)
    store.add(probabilities * 0, truth)  # nothing above any threshold
    _, table = tune(store, ["car"], 0.5)
    assert table.iloc[0]["untuned"] == table.iloc[0]["tuned"] == 0.8  # 8 of the 10 images are empty: Dice 1 there


def test_a_tuning_file_of_other_classes_is_one_line(tmp_path):
    path = tmp_path / "postprocess.json"
    rules = PostProcess("multilabel", (ClassRule("car", 0.4, 10, 0), ClassRule("glass", 0.6, 0, 50)))
    write_postprocess(path, rules, {"images": 3}, [])
    assert read_postprocess(path, "multilabel", ["car", "glass"]) == rules
    with pytest.raises(ConfigError) as error:
        read_postprocess(path, "multilabel", ["car", "shadow"])
    assert str(error.value) == (
        f"{path}: tuned for the classes car,glass (multilabel head), but the checkpoints predict car,shadow "
        "(multilabel head); run `python infer.py --oof --tune` for these checkpoints again, or pass --no-postprocess"
    )
    path.write_text(json.dumps({"head": "binary"}))
    with pytest.raises(DataError, match="not a post-processing file of infer.py --oof --tune"):
        read_postprocess(path, "binary", ["car"])


class ListedTestImages:
    def __init__(self, ids):
        self.ids = ids

    def test_ids(self):
        return self.ids


@pytest.mark.parametrize(
    "header, lines",
    [
        ("id,class,predicted", ["b,stomach,", "b,bowel,", "a,stomach,", "a,bowel,"]),
        ("ImageId_ClassId,EncodedPixels", ["b.jpg_2,", "b.jpg_1,", "a.jpg_2,", "a.jpg_1,"]),
        ("ImageId,EncodedPixels,ClassId", ["b.png,,1", "b.png,,2", "a.png,,1", "a.png,,2"]),
    ],
)
def test_sample_rows_follow_the_sample_and_its_columns(tmp_path, header, lines):
    sample = tmp_path / "sample.csv"
    sample.write_text("\n".join([header, *lines]) + "\n")
    rows = SampleRows(sample, ["stomach", "bowel"], multilabel=True)
    assert rows.order(ListedTestImages(["a", "b", "unlisted"])) == ["b", "a"]
    packed = np.zeros((4, 5), dtype=np.uint8)
    packed[1, 1:3] = 1  # stomach
    packed[2:4, 2] |= 2  # bowel, overlapping nothing
    written = dict(rows.rows("a", packed))
    by_class = {rows.channels[int(name)]: rle for name, rle in written.items()}
    assert by_class == {0: rle_encode(packed & 1), 1: rle_encode((packed >> 1) & 1)}
    assert sorted(written) == ["2", "3"]


def test_sample_rows_refusals_are_one_line(tmp_path):
    sample = tmp_path / "sample.csv"
    sample.write_text("id,predicted,extra\na,,\n")
    with pytest.raises(DataError, match="the header is 'id,predicted,extra'; an RLE table has"):
        SampleRows(sample, ["car"], multilabel=False)
    sample.write_text("id,class,predicted\na,car,\na,boat,\n")
    with pytest.raises(DataError, match=r"row 3: class 'boat' is none of the run's classes car nor their number 1..1"):
        SampleRows(sample, ["car"], multilabel=False)
    sample.write_text("id,class,predicted\na,car,\nghost,car,\n")
    with pytest.raises(DataError, match=r"lists 1 image\(s\) with no file among the 1 test images, e.g. \['ghost'\]"):
        SampleRows(sample, ["car"], multilabel=False).order(ListedTestImages(["a"]))


def test_metrics_reads_the_sizes_of_uw_madison_scans_by_their_row_ids(tmp_path, capsys):
    """UW-Madison's train/ as shipped (caseN/caseN_dayD/scans/slice_SSSS_W_H_1.50_1.50.png): each mask its scan's
    size, found by the row id (Hengyi-Luo/UW-Madison_GI_Tract_Image_Segmentation's splits list such paths)."""
    for case, width, height in ((1, 3, 2), (2, 4, 5)):
        scans = tmp_path / "train" / f"case{case}" / f"case{case}_day0" / "scans"
        scans.mkdir(parents=True)
        Image.fromarray(np.zeros((height, width), np.uint16)).save(scans / f"slice_0001_{width}_{height}_1.50_1.50.png")
    truth = tmp_path / "train.csv"
    truth.write_text("id,class,segmentation\ncase1_day0_slice_0001,stomach,1 6\ncase2_day0_slice_0001,stomach,7 14\n")
    submission = tmp_path / "sub.csv"
    submission.write_text("id,class,predicted\ncase1_day0_slice_0001,stomach,1 3\ncase2_day0_slice_0001,stomach,7 14\n")
    metrics.main([str(submission), str(truth)])  # 7 14 runs past the first scan's 6 pixels: sizes are per scan
    assert capsys.readouterr().out.startswith(f"mean Dice {(2 * 3 / 9 + 1) / 2:.5f} over 2 (image, class) pairs")


def test_sample_rows_of_numbered_classes_map_each_by_its_number(tmp_path):
    """Severstal's sample (ImageId,ClassId,EncodedPixels, ClassId 1..4) for a run whose classes are named 1,3,4 (a
    table without ClassId 2): class 3's rows take class 3's mask, and a ClassId 2 row is no class of the run."""
    sample = tmp_path / "sample.csv"
    sample.write_text("ImageId,ClassId,EncodedPixels\na.jpg,1,1 409600\na.jpg,3,1 409600\na.jpg,4,1 409600\n")
    assert SampleRows(sample, ["1", "3", "4"], multilabel=True, order="column").channels == [0, 1, 2]
    sample.write_text("ImageId,ClassId,EncodedPixels\na.jpg,1,1 409600\na.jpg,2,1 409600\na.jpg,3,1 409600\n")
    with pytest.raises(DataError, match=r"row 3: class '2' is none of the run's classes 1,3,4; predict with"):
        SampleRows(sample, ["1", "3", "4"], multilabel=True, order="column")
    assert SampleRows(sample, ["pits", "inclusion", "scratches"], multilabel=True).channels == [0, 1, 2]


def numpy_rle(mask: np.ndarray, order: str) -> str:
    """Kaggle's RLE written another way: 1-based starts and lengths of the runs of the flattened mask."""
    flat = np.concatenate([[0], mask.ravel(order="F" if order == "column" else "C").astype(np.int8), [0]])
    changes = np.flatnonzero(np.diff(flat)) + 1
    return " ".join(f"{start} {end - start}" for start, end in zip(changes[::2], changes[1::2]))


@pytest.mark.parametrize("order", ["row", "column"])
def test_class_tables_score_the_mean_dice_of_numpy(tmp_path, order):
    rng = np.random.default_rng(11)
    classes = ["large_bowel", "small_bowel", "stomach"]
    truth_rows, predicted_rows, expected = [], [], []
    shapes = {}
    for index in range(12):
        image = f"case{index}_day{index % 3}_slice_{index:04d}"
        shapes[image] = tuple(int(side) for side in rng.integers(3, 30, 2))
        for name in classes:
            true = rng.random(shapes[image]) < rng.choice([0, 0.2, 0.5])
            predicted = rng.random(shapes[image]) < rng.choice([0, 0.3])
            if true.any() or rng.random() < 0.5:  # an absent truth row is an empty mask
                truth_rows.append((image, name, numpy_rle(true, order)))
            predicted_rows.append((image, name, numpy_rle(predicted, order)))
            expected.append(dice_of(predicted, true))
    pd.DataFrame(truth_rows, columns=["id", "class", "segmentation"]).to_csv(tmp_path / "truth.csv", index=False)
    pd.DataFrame(predicted_rows, columns=["id", "class", "predicted"]).to_csv(tmp_path / "sub.csv", index=False)
    scores = metrics.score_class_tables(tmp_path / "sub.csv", tmp_path / "truth.csv", lambda image: shapes[image])
    assert scores.mean() == pytest.approx(np.mean(expected)) and len(scores) == 36
    true_pair = next(row[:2] for row in truth_rows if row[2])
    short = [row for row in predicted_rows if row[:2] != true_pair]
    pd.DataFrame(short, columns=["id", "class", "predicted"]).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(DataError, match=r"no row for 1 \(image, class\) pair\(s\) with a true mask"):
        metrics.score_class_tables(tmp_path / "short.csv", tmp_path / "truth.csv", lambda image: shapes[image])


def test_the_tuning_bench_runs_small_and_tuning_gains(capsys):
    tune_bench.main(["--images", "40", "--size", "64"])
    printed = capsys.readouterr().out
    assert "tuning search: 40 images 64x64, 3 classes in" in printed and "load average" in printed
    table = [line.split() for line in printed.splitlines()[1:4]]
    assert [row[0] for row in table] == ["common", "rare", "rarest"]
    assert all(float(row[2]) > float(row[1]) for row in table), "the search beats threshold 0.5 without areas"


def test_metrics_command_scores_per_class_tables(tmp_path, capsys):
    truth = tmp_path / "truth.csv"
    truth.write_text("ImageId,ClassId,EncodedPixels\na.jpg,1,1 4\na.jpg,2,\nb.jpg,1,\n")
    submission = tmp_path / "sub.csv"
    submission.write_text("ImageId_ClassId,EncodedPixels\na.jpg_1,1 2\na.jpg_2,\nb.jpg_1,\nb.jpg_2,3 1\n")
    metrics.main([str(submission), str(truth), "--size", "2x3"])
    # a_1: 2*2/(2+4); a_2: empty/empty 1; b_1: 1; b_2: predicted where nothing is true 0
    expected = (2 * 2 / 6 + 1 + 1 + 0) / 4
    assert capsys.readouterr().out == (
        f"mean Dice {expected:.5f} over 4 (image, class) pairs of 2 images; per class: 1 {(2 / 3 + 1) / 2:.5f}, "
        "2 0.50000\n"
    )
    (tmp_path / "bad.csv").write_text("a,b,c,d\n1,2,3,4\n")
    with pytest.raises(SystemExit) as exit_info:
        metrics.main([str(submission), str(tmp_path / "bad.csv"), "--size", "2x3"])
    assert exit_info.value.code == 2
    assert "bad.csv: the header is 'a,b,c,d'; an RLE table has" in capsys.readouterr().err


def test_a_sample_class_that_is_a_number_but_none_of_the_numbered_classes_is_one_line(tmp_path):
    sample = tmp_path / "sample.csv"
    sample.write_text("ImageId,ClassId,EncodedPixels\na.png,3,\na.png,2,\n")
    with pytest.raises(DataError, match="row 3: class '2' is none of the run's classes 1,3,4"):
        SampleRows(sample, ["1", "3", "4"], multilabel=True)


def test_sample_rows_of_one_row_per_image_take_the_runs_one_class_column_major(tmp_path):
    """HuBMAP's sample_submission.csv (id,predicted): each image's row is the one class's mask, flattened
    column-major with order="column"; a run of several classes cannot fill such rows."""
    sample = tmp_path / "sample.csv"
    sample.write_text("id,predicted\nb,\na,\n")
    rows = SampleRows(sample, ["glomerulus"], multilabel=False, order="column")
    assert rows.order(ListedTestImages(["a", "b"])) == ["b", "a"]
    mask = np.zeros((3, 4), np.uint8)
    mask[0, 1:4] = 1  # row-major: 2 3; column-major: pixels 4, 7 and 10
    assert rows.rows("a", mask) == [("1", "4 1 7 1 10 1")]
    with pytest.raises(DataError, match="holds a row per image, one mask each, but the run predicts 2 classes"):
        SampleRows(sample, ["car", "glass"], multilabel=False)
