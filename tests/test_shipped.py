"""Data sets as they ship: each row of the README's table "your data -> the commands" run with its own flags
on a fixture of its form (inspect -> folds -> train -> infer), and each form's rules and refusals."""

import io
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from competition.errors import ConfigError, DataError
from competition.inspect_data import main as inspect_data
from competition.layouts import open_data, suffix_hint
from competition.mask_values import binary_values, parse_mask_values, value_lookup
from competition.metrics import main as score
from competition.metrics import score_test_masks
from competition.splits import parse_split, read_id_list
from infer import main as infer
from make_folds import main as make_folds
from tests.layout_fixtures import _name, _scene, make_folders, make_pet
from tests.shipped_fixtures import (
    CITYSCAPES_IDS,
    CLASSES,
    FORMS,
    SEGNET_CLASSES,
    jpeg_bytes,
    make_absent_class,
    make_ade20k,
    make_binary_255,
    make_camvid,
    make_cityscapes,
    make_jpeg_masks,
    make_named_folders,
    make_voc_lists,
)
from train import main as train

README = Path(__file__).resolve().parent.parent / "README.md"
CITYSCAPES_CLASSES = (
    "road,sidewalk,building,wall,fence,pole,traffic light,traffic sign,vegetation,terrain,sky,person,rider,car,"
    "truck,bus,train,motorcycle,bicycle"
)
TRAIN_FLAGS = ["--encoder", "resnet18", "--encoder-weights", "none", "--workers", "0", "--quiet", "--batch-size", "4"]


# What inspect_data must say of each form's fixture (beside the layout and the problems).
INSPECTED = {
    "folders named their own way": "images: 8 labelled, 0 test",  # its test images: infer.py --test-images
    "an official split as id lists": "split: train 6, val 2, test 0",
    "one folder pair per split, colour-coded masks": "masks: colours of",
    "one folder pair per split, index masks with a void value": "ignore index 11: 3.125% of all pixels",
    "binary masks 0/255": "masks: stored values 0=background, 255=foreground",
    "0 is unlabelled, the classes from 1": "masks: stored values 1=background, 2=box, 3=disc, 4=square",
    "16-bit greyscale or RGBA images": "I;16",
    "JPEG masks": "masks: stored values 0=background, 255=foreground",
    "Cityscapes as downloaded": "masks: stored values 7=road, 8=sidewalk",
}


@pytest.fixture(autouse=True)
def work_dir(tmp_path, monkeypatch):
    """Colour masks are decoded into <work dir>/cache/: a folder of the test's, not of the checkout."""
    monkeypatch.setenv("CARVANA_WORK_DIR", str(tmp_path / "work"))
    return tmp_path / "work"


def readme_rows() -> dict[str, tuple[list[str], list[str]]]:
    """The README table's rows: your data -> (data flags, infer.py flags), each the first code span of its cell."""
    text = README.read_text()
    table = text[text.index("| your data | looks like |") :].split("\n\n")[0].splitlines()[2:]
    rows = {}
    for line in table:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        spans = [re.findall(r"`([^`]*)`", cell) for cell in cells[2:4]]
        rows[cells[0]] = tuple(span[0].split() if span else [] for span in spans)
    return rows


def test_every_readme_row_has_a_fixture():
    assert set(readme_rows()) == set(FORMS)


@pytest.mark.slow
@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_form_runs_through_the_readme_commands(form, tmp_path, capsys, caplog):
    data_flags, infer_flags = readme_rows()[form]
    data_flags = [str(README.parent / flag) if flag.startswith("configs/") else flag for flag in data_flags]
    root = FORMS[form](tmp_path / "data")
    data = ["--data-dir", str(root), *data_flags]
    code = inspect_data([*data, "--quiet"])
    report = capsys.readouterr().out
    assert "layout: folders" in report and ("problems: none found" in report) == (code == 0)
    assert INSPECTED.get(form, "masks: class indices") in report, report
    if form == "Cityscapes as downloaded":
        assert "any other stored value: the ignore index (--unknown-values ignore)" in report
    if "255=foreground" in INSPECTED.get(form, ""):  # 255 is a class value there, not the ignore index
        assert "ignore index: none (255 is the stored value of class 'foreground')" in report, report
    folds = tmp_path / "folds.csv"
    make_folds([*data, "--n-folds", "2", "--out", str(folds), "--quiet"])
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="competition"):
        train([*data, "--folds-csv", str(folds), "--out", str(run), "--size", "64x96", "--epochs", "1", *TRAIN_FLAGS])
    config = torch.load(run / "fold0" / "best.pt", weights_only=True)["config"]
    masks, scored = tmp_path / "masks", tmp_path / "oof"
    out = ["--out-dir", str(scored)] if "--oof" in infer_flags else ["--out", str(masks)]
    infer(["--checkpoints", str(run), "--workers", "0", "--quiet", *out, *infer_flags])
    if "--oof" in infer_flags:  # no test images: fold 0 (the official val split) scored
        assert len(pd.read_csv(scored / "oof.csv")) == 2
    else:
        assert len(list(masks.glob("*.png"))) == 2
    if form == "one folder pair per split, colour-coded masks":  # testannot/ scores the masks, read as in training
        score([str(masks), *data])
        assert re.search(r"mIoU \d\.\d{4}", capsys.readouterr().out)
    expected_classes = {
        "binary masks 0/255": "background,foreground",
        "JPEG masks": "background,foreground",
        "a class no mask holds": "background,box,disc,square,wheel",
        "Cityscapes as downloaded": CITYSCAPES_CLASSES,
        "one folder pair per split, index masks with a void value": SEGNET_CLASSES,
    }.get(form, "background,box,disc,square")
    assert config["classes"] == expected_classes
    if form == "a class no mask holds":
        assert code == 1 and "'wheel' is in no mask" in report and "'wheel' is in no mask" in caplog.text
    if form.startswith("16-bit"):
        assert config["in_channels"] == 1
    if "split" in form or form.startswith("Cityscapes"):  # fold 0 validates on exactly the official val images
        written = pd.read_csv(folds)
        val = [f"frankfurt_{index:06d}_000019" for index in (6, 7)] if form.startswith("Cityscapes") else None
        assert sorted(written.loc[written["fold"] == 0, "img"]) == (val or sorted(_name(index) for index in (6, 7)))
        assert set(written["split"]) == {"train", "val"}


def test_named_folders_match_masks_by_suffix_and_list_strays(tmp_path, caplog):
    root = make_named_folders(tmp_path)
    with caplog.at_level(logging.WARNING, logger="competition"):
        data = open_data(root, images="img", masks="gt", mask_suffix="_mask")
    assert data.train_ids() == sorted(_name(index) for index in range(8))
    assert "1 mask(s) without an image" in caplog.text and "stray" in caplog.text
    assert np.array_equal(data.read_mask(_name(3)), _scene(3)[1])
    with pytest.raises(ConfigError, match="--images and --masks go together"):
        open_data(root, images="img")
    with pytest.raises(DataError, match="--masks .*nothing: folder not found"):
        open_data(root, images="img", masks="nothing")


def test_voc_id_lists_split_the_masked_images(tmp_path):
    data = open_data(
        make_voc_lists(tmp_path), split="train=ImageSets/Segmentation/train.txt,val=ImageSets/Segmentation/val.txt"
    )
    assert len(data.train_ids()) == 8 and "2008_000001" not in data.train_ids()  # the detection image
    assert sorted(image_id for image_id, name in data.splits.items() if name == "val") == [_name(6), _name(7)]
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("nosuchimage\n")
    with pytest.raises(DataError, match="val.txt: 1 of its 1 id"):
        open_data(tmp_path, split="train=ImageSets/Segmentation/train.txt,val=ImageSets/Segmentation/val.txt")


def test_camvid_folders_and_colours(tmp_path, work_dir):
    root = make_camvid(tmp_path)
    data = open_data(root, split="train=train,val=val,test=test")
    assert data.classes == ["background", "box", "disc", "square"]
    assert data.test_ids() == [_name(20), _name(21)] and len(data.train_ids()) == 8
    assert np.array_equal(data.read_mask(_name(6)), _scene(6)[1]) and data.splits[_name(6)] == "val"
    # a colour outside the table: the file, where and which colour; or the ignore index when asked
    path = root / "trainannot" / f"{_name(0)}.png"
    painted = np.asarray(Image.open(path)).copy()
    painted[5, 7] = (1, 2, 3)
    Image.fromarray(painted).save(path)
    with pytest.raises(DataError, match=r"trainannot/scene0_1.png.*x=?7.*y=?5.*\(1, 2, 3\)"):
        open_data(root, split="train=train,val=val,test=test").read_mask(_name(0))
    ignored = open_data(root, split="train=train,val=val,test=test", unknown_colors="ignore").read_mask(_name(0))
    assert ignored[5, 7] == 255
    assert len(list((tmp_path / "work" / "cache" / "masks").glob("*.png"))) >= 2  # decoded once, kept


def test_binary_masks_in_two_values_are_read_and_said(tmp_path, caplog):
    root = make_binary_255(tmp_path)
    with caplog.at_level(logging.INFO, logger="competition"):
        data = open_data(root)
    assert data.classes == ["background", "foreground"] and data.mask_values == [0, 255]
    assert "masks hold {0, 255}: 0 is the background, 255 the foreground" in caplog.text
    assert set(np.unique(data.read_mask(_name(0)))) == {0, 1}
    # two classes named: the same reading; values given outright
    assert open_data(root, classes="sky,bird").mask_values == [0, 255]
    assert open_data(root, mask_values="0,255").read_mask(_name(0)).max() == 1
    with pytest.raises(DataError, match=r"mask value\(s\) \[255\] are neither a class's value"):
        open_data(root, mask_values="0,38", ignore_index=254).read_mask(_name(0))


def test_absent_class_is_named_and_strict_stops(tmp_path, capsys):
    root = make_absent_class(tmp_path)
    folds = tmp_path / "folds.csv"
    make_folds(["--data-dir", str(root), "--n-folds", "2", "--out", str(folds), "--quiet"])
    with pytest.raises(SystemExit) as stop:
        train(
            [
                "--data-dir",
                str(root),
                "--folds-csv",
                str(folds),
                "--out",
                str(tmp_path / "run"),
                "--strict",
                "--size",
                "64x96",
                "--epochs",
                "1",
                *TRAIN_FLAGS,
            ]
        )
    assert stop.value.code == 2 and "'wheel' is in no mask" in capsys.readouterr().err


def test_jpeg_masks_are_refused_unless_snapped(tmp_path):
    root = make_jpeg_masks(tmp_path)
    with pytest.raises(DataError, match="a JPEG mask .*--snap-mask-values"):
        open_data(root)
    data = open_data(root, snap_mask_values=True)
    assert data.mask_values == [0, 255]
    truth = (_scene(2)[1] == 2).astype(np.uint8)
    assert (data.read_mask(_name(2)) == truth).mean() > 0.99


def test_inspect_reports_and_reaches_the_errors(tmp_path, capsys):
    root = make_folders(tmp_path / "voc", voc=True)
    assert inspect_data(["--data-dir", str(root), "--quiet"]) == 0
    report = capsys.readouterr().out
    assert "layout: folders" in report and "8 labelled, 2 test" in report and "ignore index 255:" in report
    assert re.search(r"1 box\s+\d+\.\d+%", report)
    with pytest.raises(SystemExit) as stop:
        inspect_data(["--data-dir", str(make_jpeg_masks(tmp_path / "jpeg")), "--quiet"])
    assert stop.value.code == 2 and "JPEG mask" in capsys.readouterr().err


def test_split_and_value_rules_by_hand():
    assert parse_split("train=a,val=b:c") == {"train": "a", "val": "b:c"}
    for bad in ("train", "train=a,train=b", "train=a.txt,val=b", "train=a,tst=b"):
        with pytest.raises(ConfigError):
            parse_split(bad)
    assert parse_mask_values("0, 255") == [0, 255]
    for bad in ("0", "0,0", "0,256", "a,b"):
        with pytest.raises(DataError):
            parse_mask_values(bad)
    histogram = np.zeros(256, dtype=np.int64)
    histogram[[0, 1, 254, 255]] = [90, 3, 4, 50]
    assert binary_values([0, 255], False, histogram) == [0, 255]
    assert binary_values([0, 1, 255], False, histogram) is None
    assert binary_values([0, 1, 254, 255], True, histogram) == [0, 255]  # snapped: the two most common
    lookup, known = value_lookup([0, 255], 2, 255, snap=False)
    assert lookup[255] == 1 and lookup[0] == 0 and not known[7]
    lookup, known = value_lookup([0, 255], 2, 255, snap=True)
    assert lookup[[0, 127, 128, 200, 255]].tolist() == [0, 0, 1, 1, 1] and known.all()
    lookup, _ = value_lookup(None, 3, 255, snap=True)  # indices 0..2; 255 stays ignored when not a class value
    assert lookup[[0, 1, 2, 9, 255]].tolist() == [0, 1, 2, 2, 255]


def test_split_lists_take_the_first_word(tmp_path):
    listing = tmp_path / "trainval.txt"
    listing.write_text("# Oxford-IIIT Pet\nAbyssinian_100 1 1 1\n\nbeagle_2 13 2 1\n")
    assert read_id_list(listing) == ["Abyssinian_100", "beagle_2"]


def test_lossy_mask_bytes_smear(tmp_path):
    """The fixture's JPEG masks really are lossy (else the snapping test would prove nothing)."""
    mask = np.where(_scene(2)[1] == 2, 255, 0).astype(np.uint8)
    with Image.open(io.BytesIO(jpeg_bytes(mask))) as image:
        assert len(np.unique(np.asarray(image))) > 2


def test_train_on_official_splits_holds_nothing_out(tmp_path, caplog):
    root = make_voc_lists(tmp_path / "voc")
    split = "train=ImageSets/Segmentation/train.txt,val=ImageSets/Segmentation/val.txt"
    run = tmp_path / "final"
    flags = ["--data-dir", str(root), "--out", str(run), "--size", "64x96", *TRAIN_FLAGS]
    with caplog.at_level(logging.WARNING, logger="competition"):
        train([*flags, "--split", split, "--train-on", "train,val", "--epochs", "2"])  # no folds file needed
    assert "not held out" in caplog.text and "best.pt is the last epoch" in caplog.text
    best = torch.load(run / "fold0" / "best.pt", weights_only=True)
    assert best["epoch"] == 2 and best["config"]["train_on"] == "train,val"  # the second (last) epoch
    last = torch.load(run / "fold0" / "last.pt", weights_only=True)
    assert all(torch.equal(best["model"][name], weights) for name, weights in last["model"].items())
    with pytest.raises(SystemExit):  # nothing is out of fold
        infer(["--oof", "--checkpoints", str(run), "--out-dir", str(tmp_path / "oof"), "--quiet"])
    with pytest.raises(SystemExit):  # no split to train on
        train([*flags, "--train-on", "train", "--overwrite"])


def test_colour_table_named_by_flag_in_camvid_text_form(tmp_path):
    root = make_camvid(tmp_path)
    (root / "class_dict.csv").unlink()
    (root / "tables").mkdir()
    (root / "tables" / "camvid.txt").write_text(
        "0 0 0\tbackground\n220 40 40\tbox\n40 60 220\tdisc\n40 200 60\tsquare\n"
    )
    with pytest.raises(DataError, match="the mask is RGB.*--colors"):
        open_data(root, split="train=train,val=val").read_mask(_name(0))
    data = open_data(root, split="train=train,val=val", colors="tables/camvid.txt")
    assert data.classes == ["background", "box", "disc", "square"]
    assert np.array_equal(data.read_mask(_name(3)), _scene(3)[1])


def test_inspect_carvana(data_dir, capsys):
    assert inspect_data(["--data-dir", str(data_dir), "--quiet"]) == 0
    report = capsys.readouterr().out
    assert "layout: carvana" in report and "background, car" in report


def test_cityscapes_city_folders_and_both_suffixes(tmp_path, caplog):
    """leftImg8bit/<split>/<city>/<id>_leftImg8bit.png with gtFine/<split>/<city>/<id>_gtFine_labelTrainIds.png."""
    for split, indices in (("train", range(6)), ("val", range(6, 8))):
        for index in indices:
            city = ("aachen", "bremen")[index % 2]
            image, mask = _scene(index)
            for folder, name, array in (
                ("leftImg8bit", "leftImg8bit", image),
                ("gtFine", "gtFine_labelTrainIds", mask),
            ):
                (tmp_path / folder / split / city).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(tmp_path / folder / split / city / f"{_name(index)}_{name}.png")
    Image.fromarray(_scene(0)[1]).save(tmp_path / "gtFine" / "train" / "aachen" / "scene0_1_gtFine_color.png")
    split = "train=leftImg8bit/train:gtFine/train,val=leftImg8bit/val:gtFine/val"
    with caplog.at_level(logging.INFO, logger="competition"):
        data = open_data(
            tmp_path, split=split, image_suffix="_leftImg8bit", mask_suffix="_gtFine_labelTrainIds", classes="a,b,c,d"
        )
    assert data.train_ids() == sorted(_name(index) for index in range(8))
    assert np.array_equal(data.read_mask(_name(7)), _scene(7)[1]) and data.splits[_name(7)] == "val"
    # the download's other files beside the masks: said once as a note, not warned of as masks without an image
    assert "1 file(s) named after a mask's id but not *_gtFine_labelTrainIds are not read as masks" in caplog.text
    assert "scene0_1_gtFine_color" in caplog.text and "without an image" not in caplog.text
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_a_mask_missing_its_suffix_is_still_warned_of(tmp_path, caplog):
    root = make_folders(tmp_path)
    for path in sorted((root / "masks").glob("*.png"))[1:]:
        path.rename(path.with_name(f"{path.stem}_mask.png"))
    with caplog.at_level(logging.INFO, logger="competition"):
        data = open_data(root, mask_suffix="_mask")
    assert "scene0_1" not in data.train_ids() and len(data.train_ids()) == 7
    warned = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert any("1 mask(s) without an image" in line and "scene0_1" in line for line in warned), warned


def cityscapes_settings() -> dict:
    import tomllib

    return tomllib.loads((README.parent / "configs" / "cityscapes.toml").read_text())


def test_cityscapes_label_ids_keep_the_19_classes_and_ignore_the_other_ids(tmp_path):
    root = make_cityscapes(tmp_path)
    data = open_data(root, **cityscapes_settings())
    assert data.classes == CITYSCAPES_CLASSES.split(",") and data.num_classes == 19
    assert [data.splits[image_id] for image_id in data.train_ids()] == ["train"] * 6 + ["val"] * 2
    assert data.test_ids() == ["berlin_000020_000019", "berlin_000021_000019"]
    image_id = data.train_ids()[0]
    stored = np.asarray(Image.open(root / "gtFine" / "train" / "aachen" / f"{image_id}_gtFine_labelIds.png"))
    mask = data.read_mask(image_id)
    trained_on = {name: data.classes.index(name) for name in ("road", "sky", "car", "person", "traffic sign")}
    for stored_name, class_name in (("road", "road"), ("sky", "sky"), ("box", "car"), ("disc", "person")):
        assert (mask[stored == CITYSCAPES_IDS[stored_name]] == trained_on[class_name]).all()
    for ignored_id in (0, 1, 3):  # unlabeled, ego vehicle, out of roi
        assert (stored == ignored_id).any() and (mask[stored == ignored_id] == 255).all()
    settings = {**cityscapes_settings(), "unknown_values": "error"}  # each unlisted id refused, with the fix
    with pytest.raises(DataError, match=r"mask value\(s\) \[0, 1, 3\] .*--unknown-values ignore"):
        open_data(root, **settings).read_mask(image_id)


def test_cityscapes_without_its_config_is_named_with_the_config_to_pass(tmp_path):
    root = make_cityscapes(tmp_path)
    for layout in ("auto", "folders"):
        with pytest.raises(DataError, match=r"looks like Cityscapes .*: pass --config configs/cityscapes.toml"):
            open_data(root, layout=layout)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data layout recognised") as raised:
        open_data(tmp_path / "empty")
    assert "Cityscapes" not in str(raised.value)


def test_suffix_hints_name_the_flag_and_every_kind_of_file_beside_an_image():
    assert suffix_hint(["a", "b"], ["a_mask", "b_mask"]) == "; their names differ by a suffix: pass --mask-suffix _mask"
    several = suffix_hint(["x"], ["x_gtFine_color", "x_gtFine_instanceIds", "x_gtFine_labelIds"])
    assert "one of _gtFine_color, _gtFine_instanceIds, _gtFine_labelIds" in several and "--mask-suffix" in several
    assert suffix_hint(["a_leftImg8bit"], ["a"]) == "; their names differ by a suffix: pass --image-suffix _leftImg8bit"
    assert "a mask is named as its image" in suffix_hint(["a"], ["b"])


def test_a_wrong_mask_suffix_on_cityscapes_names_the_suffixes_there(tmp_path):
    settings = {**cityscapes_settings(), "mask_suffix": "_gtFine_labelTrainIds"}  # not in the download
    with pytest.raises(DataError, match=r"none of its 6 image\(s\) has a mask .*_gtFine_labelIds to an image's"):
        open_data(make_cityscapes(tmp_path), **settings)


def test_inspect_class_shares_add_up_to_100_percent_and_the_ignored_share_is_apart(tmp_path, capsys):
    root = make_folders(tmp_path, voc=True)  # VOC's 255 outline: about a tenth of the pixels ignored
    assert inspect_data(["--data-dir", str(root), "--quiet"]) == 0
    report = capsys.readouterr().out
    shares = [float(share) for share in re.findall(r"^\s+\d+ \S+\s+([\d.]+)%$", report, re.MULTILINE)]
    assert len(shares) == 4 and abs(sum(shares) - 100) < 0.01, report
    ignored = float(
        re.search(r"^ignore index 255: ([\d.]+)% of all pixels, left out of the shares above$", report, re.MULTILINE)[1]
    )
    assert 1 < ignored < 50, report


def test_inspect_says_the_share_ignored_when_the_ignore_index_is_a_class_value(tmp_path, capsys):
    root = make_folders(tmp_path)  # values 0..3; only 0 and 3 named, 3 also the stored ignore index
    flags = ["--data-dir", str(root), "--classes", "background,square", "--mask-values", "0,3", "--quiet"]
    inspect_data([*flags, "--ignore-index", "3", "--unknown-values", "ignore"])
    report = capsys.readouterr().out
    assert "any other stored value: the ignore index (--unknown-values ignore)" in report
    share = float(re.search(r"ignored \(stored values no class keeps\): ([\d.]+)% of all pixels; 3 is", report)[1])
    assert share > 10, report  # the box and the disc
    assert "ignore index: none" not in report


def test_unknown_values_ignored_for_class_indices_and_refused_for_colour_masks(tmp_path):
    root = make_folders(tmp_path / "indices")
    path = root / "masks" / "scene0_1.png"
    mask = np.asarray(Image.open(path)).copy()
    mask[0, :5] = 9  # no class of the four
    Image.fromarray(mask, mode="L").save(path)
    with pytest.raises(DataError, match=r"mask value\(s\) \[9\].*--unknown-values ignore"):
        open_data(root).read_mask("scene0_1")
    read = open_data(root, unknown_values="ignore").read_mask("scene0_1")
    assert (read[0, :5] == 255).all() and np.array_equal(read[1:], mask[1:])
    with pytest.raises(ConfigError, match="--unknown-values is for masks of stored values.*--unknown-colors ignore"):
        open_data(make_camvid(tmp_path / "colours"), split="train=train,val=val,test=test", unknown_values="ignore")
    with pytest.raises(ConfigError, match="--unknown-values is for image/mask folders"):
        open_data(make_pet(tmp_path / "pet"), unknown_values="ignore")


def test_unknown_values_ignored_only_where_the_classes_values_are_known(tmp_path):
    root = make_binary_255(tmp_path)  # 0/255 masks: read as indices, 255 (the foreground) would be ignored
    with pytest.raises(ConfigError, match="--unknown-values ignore needs each class's stored value"):
        open_data(root, unknown_values="ignore")
    with pytest.raises(ConfigError, match="--unknown-values ignore needs"):
        open_data(root, classes="background,foreground", unknown_values="ignore")
    data = open_data(root, mask_values="0,255", unknown_values="ignore")
    mask = data.read_mask(data.train_ids()[0])
    assert set(np.unique(mask)) == {0, 1}, "the foreground kept"
    with pytest.raises(ConfigError, match="--snap-mask-values maps every stored value to a class"):
        open_data(make_folders(tmp_path / "snap"), snap_mask_values=True, unknown_values="ignore")


def test_value_lookup_with_unknown_values_ignored():
    lookup, known = value_lookup([7, 26], 2, 255, snap=False, unknown="ignore")
    assert known.all() and lookup[7] == 0 and lookup[26] == 1 and lookup[0] == lookup[33] == lookup[255] == 255
    lookup, known = value_lookup([7, 26], 2, 255, snap=False)
    assert known.sum() == 3 and not known[0] and known[255]


def test_ignore_index_below_the_classes_reads_them_from_one(tmp_path):
    root = make_ade20k(tmp_path)
    data = open_data(root, split="train=images/training,val=images/validation", masks="annotations", ignore_index=0)
    assert data.classes == list(CLASSES) and data.mask_values == [1, 2, 3, 4] and data.ignore_index == 255
    expected = _scene(6)[1].copy()
    expected[:4] = 255
    assert np.array_equal(data.read_mask(_name(6)), expected)
    with pytest.raises(DataError, match=r"mask value\(s\) \[4\] are neither"):  # without it: stored as indices
        open_data(root, split="train=images/training,val=images/validation", masks="annotations").read_mask(_name(6))


def test_names_that_differ_by_a_suffix_are_named(tmp_path):
    root = make_named_folders(tmp_path)
    with pytest.raises(DataError, match="none of its 8 image.*pass --mask-suffix _mask"):
        open_data(root, images="img", masks="gt")
    with pytest.raises(DataError, match="pass --mask-suffix _mask"):
        open_data(root, images="img", masks="gt", mask_suffix="mask")


def test_inspect_lists_an_unreadable_image(tmp_path, capsys):
    root = make_folders(tmp_path)
    (root / "images" / f"{_name(1)}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    assert inspect_data(["--data-dir", str(root), "--quiet"]) == 1
    report = capsys.readouterr().out
    assert f"{_name(1)}.jpg: the image does not decode" in report


def test_pet_official_lists_and_scoring_the_test_trimaps(tmp_path, capsys):
    root = make_pet(tmp_path / "pet")
    ids = sorted(path.stem for path in (root / "images").glob("*.jpg") if not path.name.startswith("._"))
    (root / "annotations" / "trainval.txt").write_text("".join(f"{image_id} 1 1 1\n" for image_id in ids[:6]))
    (root / "annotations" / "test.txt").write_text("".join(f"{image_id} 1 1 1\n" for image_id in ids[6:]))
    split = "train=annotations/trainval.txt,test=annotations/test.txt"
    data = open_data(root, split=split)
    assert data.train_ids() == ids[:6] and data.test_ids() == ids[6:] == data.test_mask_ids()
    predicted = tmp_path / "predicted"
    predicted.mkdir()
    for image_id in ids[6:]:  # a perfect prediction but for the border (ignored) and one flipped pixel
        mask = data.read_mask(image_id)
        mask = np.where(mask == 255, 0, mask).astype(np.uint8)
        mask[0, 0] = 1 - mask[0, 0]
        Image.fromarray(mask).save(predicted / f"{image_id}.png")
    scores = score_test_masks(predicted, data)
    assert scores["images"] == 2 and 0.99 < scores["miou"] < 1.0
    score([str(predicted), "--data-dir", str(root), "--split", split])
    assert "background" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        score([str(predicted), "--data-dir", str(root)])  # no test split: no test masks


def test_the_value_and_colour_flags_reach_the_data_from_the_command_line(tmp_path, capsys):
    camvid = make_camvid(tmp_path / "camvid")
    (camvid / "class_dict.csv").rename(camvid / "camvid.csv")
    painted = camvid / "trainannot" / f"{_name(0)}.png"
    colours = np.asarray(Image.open(painted)).copy()
    colours[0, 0] = (9, 9, 9)
    Image.fromarray(colours).save(painted)
    flags = ["--data-dir", str(camvid), "--split", "train=train,val=val,test=test", "--colors", "camvid.csv", "--quiet"]
    assert inspect_data(flags) == 1 and "(9, 9, 9)" in capsys.readouterr().out
    assert inspect_data([*flags, "--unknown-colors", "ignore"]) == 0
    binary = make_binary_255(tmp_path / "binary")
    assert inspect_data(["--data-dir", str(binary), "--mask-values", "0,255", "--quiet"]) == 0
    assert "stored values 0=background, 255=foreground" in capsys.readouterr().out
    named = make_named_folders(tmp_path / "named")
    for image in (named / "img").iterdir():
        image.rename(image.with_name(f"{image.stem}_rgb{image.suffix}"))
    flags = ["--data-dir", str(named), "--images", "img", "--masks", "gt", "--mask-suffix", "_mask", "--quiet"]
    assert inspect_data([*flags, "--image-suffix", "_rgb"]) == 0
    assert "8 labelled" in capsys.readouterr().out


def test_splits_that_reuse_names_keep_their_own_masks(tmp_path):
    root = make_camvid(tmp_path)
    for folder in ("test", "testannot"):  # the test split numbered like the training one
        for index, path in zip(range(2), sorted((root / folder).iterdir())):
            path.rename(path.with_name(f"{_name(index)}.png" if folder == "testannot" else f"{_name(index)}.jpg"))
    data = open_data(root, split="train=train,val=val,test=test")
    assert np.array_equal(data.read_mask(_name(0)), _scene(0)[1])  # the training mask, not the test one
    assert np.array_equal(data.read_mask(_name(0), split="test"), _scene(20)[1])
    assert data.test_mask_ids() == [_name(0), _name(1)]


def test_test_images_flag_wins_over_a_test_list(tmp_path):
    root = make_pet(tmp_path / "pet")
    ids = sorted(path.stem for path in (root / "images").glob("*.jpg") if not path.name.startswith("._"))
    (root / "annotations" / "trainval.txt").write_text("\n".join(ids[:6]))
    (root / "annotations" / "test.txt").write_text("\n".join(ids[6:]))
    split = "train=annotations/trainval.txt,test=annotations/test.txt"
    data = open_data(root, split=split, test_images=root / "test")
    assert data.test_ids() == sorted(path.stem for path in (root / "test").glob("*.jpg"))
    assert data.train_ids() == ids[:6]  # the test list's images still train nowhere


def test_snapping_keeps_a_smeared_ignore_border_ignored():
    lookup, _ = value_lookup(list(range(21)), 21, 255, snap=True)
    assert lookup[[0, 20, 21, 100, 137, 138, 240, 254, 255]].tolist() == [0, 20, 20, 20, 20, 255, 255, 255, 255]


def test_resume_after_values_were_found_in_the_masks(tmp_path):
    root = make_binary_255(tmp_path / "binary")
    folds = tmp_path / "folds.csv"
    make_folds(["--data-dir", str(root), "--n-folds", "2", "--out", str(folds), "--quiet"])
    flags = ["--data-dir", str(root), "--folds-csv", str(folds), "--out", str(tmp_path / "run"), "--size", "64x96"]
    train([*flags, "--epochs", "1", *TRAIN_FLAGS])
    train([*flags, "--epochs", "1", "--resume", *TRAIN_FLAGS])  # mask_values 0,255 were resolved, not given
    saved = torch.load(tmp_path / "run" / "fold0" / "last.pt", weights_only=True)["config"]
    assert saved["mask_values"] == "0,255" and saved["classes"] == "background,foreground"


def test_carvana_refuses_the_split_settings_in_one_line(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        score([str(tmp_path), "--data-dir", str(data_dir)])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and "no test image has a mask" in error and "infer.py --oof" in error
    with pytest.raises(SystemExit) as stop:
        train(["--data-dir", str(data_dir), "--out", str(tmp_path / "run"), "--train-on", "train", *TRAIN_FLAGS])
    assert stop.value.code == 2 and "--train-on names official splits" in capsys.readouterr().err
