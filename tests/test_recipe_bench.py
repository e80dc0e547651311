"""The recipe bench: its scoring against numpy on masks with an ignore value, and a whole run on a small folder set."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import make_folds
from bench.recipe_bench import class_iou, confusion, main
from competition.config import TrainConfig
from competition.fold_data import open_training_data
from tests.layout_fixtures import make_folders


def test_class_iou_is_the_diagonal_over_the_union_and_nan_where_a_class_is_nowhere():
    matrix = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
    np.testing.assert_allclose(class_iou(matrix), [5 / 8, 3 / 6, np.nan])


def test_the_confusion_counts_labelled_pixels_at_full_resolution(tmp_path):
    root = make_folders(tmp_path / "voc", voc=True)  # VOC's 255 border around every object: left out
    _, data = open_training_data(TrainConfig(data_dir=str(root), layout="folders"))
    image_ids = data.train_ids()[:3]
    shifted = {}  # each image's prediction: its truth with the class index moved by one where labelled

    def predict_truth_shifted(images):
        image_id = image_ids[len(shifted)]
        truth = data.read_mask(image_id)
        wrong = np.where(truth == 255, 0, (truth + 1) % data.num_classes)
        shifted[image_id] = wrong
        return F.one_hot(torch.from_numpy(wrong).long(), data.num_classes).permute(2, 0, 1)[None].float()

    matrix = confusion(predict_truth_shifted, data, image_ids, None, "train", 255)
    expected = np.zeros_like(matrix)
    for image_id in image_ids:
        truth = data.read_mask(image_id)
        labelled = truth != 255
        np.add.at(expected, (truth[labelled], shifted[image_id][labelled]), 1)
    assert (matrix == expected).all() and matrix.trace() == 0 and matrix.sum() > 0


def split_like_camvid(root: Path) -> Path:
    """make_folders' 16 images and masks moved into CamVid's folder pairs: 8 train, 4 val, 4 test with masks."""
    names = sorted(path.stem for path in (root / "images").glob("*.jpg"))
    for split, chosen in (("train", names[:8]), ("val", names[8:12]), ("test", names[12:])):
        (root / split).mkdir(exist_ok=True)
        (root / f"{split}annot").mkdir()
        for name in chosen:
            shutil.move(root / "images" / f"{name}.jpg", root / split / f"{name}.jpg")
            shutil.move(root / "masks" / f"{name}.png", root / f"{split}annot" / f"{name}.png")
    shutil.rmtree(root / "images")
    shutil.rmtree(root / "masks")
    return root


@pytest.mark.slow
def test_a_bench_run_trains_both_and_prints_their_table(tmp_path, capsys):
    root = split_like_camvid(make_folders(tmp_path / "shapes", count=16, tests=0))
    folds = tmp_path / "folds.csv"
    split = ["--split", "train=train,val=val,test=test"]
    make_folds.main(["--data-dir", str(root), *split, "--out", str(folds), "--quiet"])
    shared = ["--data-dir", str(root), *split, "--folds-csv", str(folds), "--size", "64x96", "--epochs", "1"]
    shared += ["--encoder", "resnet18", "--encoder-weights", "none", "--batch-size", "4", "--workers", "0"]
    main(["--work-dir", str(tmp_path / "bench"), "--threads", "1", "--test", "--", *shared])
    table = capsys.readouterr().out
    assert "| class | defaults | plain loop |" in table and "| **mIoU** |" in table and "| training img/s |" in table
    assert (tmp_path / "bench" / "defaults" / "fold0" / "last.pt").is_file()
    rows = [line for line in table.splitlines() if line.startswith(("| box", "| disc", "| square", "| background"))]
    assert len(rows) == 4  # one row a class
    test_table = (tmp_path / "bench" / "test.md").read_text()  # written, not printed
    assert "test: 4 images" in test_table and "test: 4 images" not in table and "validation (fold 0): 4 images" in table
