"""The data layouts beyond Carvana: each reader on a tiny fixture, classes, the ignore index, and refusals."""

import json
import logging

import numpy as np
import pytest
from PIL import Image, ImageDraw

from competition.errors import DataError
from competition.layouts import LAYOUT_CHOICES, detect_layout, open_data, read_index_mask
from tests.layout_fixtures import _scene, make_folders, make_labelme, make_pet


@pytest.mark.parametrize("palette", [True, False], ids=["palette", "greyscale"])
def test_folders_read_class_indices_as_stored(tmp_path, palette):
    root = make_folders(tmp_path, palette=palette)
    data = open_data(root)
    assert data.layout == "folders" and data.classes == ["background", "box", "disc", "square"]
    assert len(data.train_ids()) == 8 and len(data.test_ids()) == 2
    image, mask = data.read_sample("scene0_1")
    assert image.shape == (64, 96, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(mask, _scene(0)[1])  # the indices themselves, not a colour conversion
    assert set(np.unique(mask)) == {0, 1, 2, 3}


def test_voc_names_and_its_border_are_the_ignore_index(tmp_path):
    root = make_folders(tmp_path, voc=True)
    data = open_data(root)
    assert detect_layout(root) == "folders" and data.ignore_index == 255
    mask = data.read_mask("scene0_1")
    assert 255 in mask
    counts = data.class_pixel_counts("scene0_1")
    assert counts.sum() == (mask != 255).sum() and len(counts) == 4


def test_labelme_shapes_in_file_order_and_ignore(tmp_path):
    root = make_labelme(tmp_path)
    data = open_data(root)
    assert data.layout == "labelme" and data.classes == ["_background_", "box", "disc", "square"]
    assert len(data.train_ids()) == 8 and len(data.test_ids()) == 2
    document = json.loads((root / "scene0_1.json").read_text())
    (bx, by), _ = document["shapes"][0]["points"]
    mask = data.read_mask("scene0_1")
    assert mask[int(by) + 8, int(bx) + 8] == 3  # the square, drawn after the box, wins
    assert mask[int(by) + 18, int(bx) + 25] == 1  # the box elsewhere
    assert (mask[-3:] == 255).all()  # the __ignore__ strip
    cx, cy = np.mean(document["shapes"][1]["points"], axis=0)
    assert mask[round(cy), round(cx)] == 2


def test_labelme_classes_from_the_json_labels_without_labels_txt(tmp_path):
    data = open_data(make_labelme(tmp_path, labels_file=False))
    assert data.classes == ["_background_", "box", "disc", "square"]


def test_labelme_label_outside_the_classes_names_the_file(tmp_path):
    root = make_labelme(tmp_path)
    (root / "labels.txt").write_text("__ignore__\n_background_\nbox\ndisc\n")
    with pytest.raises(DataError, match=r"scene0_1.json: label 'square' is not a class"):
        open_data(root).read_mask("scene0_1")


@pytest.mark.parametrize(
    "held, forced, needs",
    [
        ("folders", "labelme", "labelme JSON files"),
        ("folders", "pet", "images/ + annotations/trimaps/"),
        ("labelme", "folders", "images/ + masks/"),
        ("labelme", "pet", "images/ + annotations/trimaps/"),
        ("pet", "labelme", "labelme JSON files"),
        ("pet", "folders", "images/ + masks/"),
        (None, "labelme", "labelme JSON files"),
    ],
)
def test_a_forced_layout_that_does_not_match_says_what_it_needs_not_to_force_one(tmp_path, held, forced, needs):
    import shutil

    root = tmp_path / "data"
    root.mkdir()
    if held:
        {"folders": make_folders, "labelme": make_labelme, "pet": make_pet}[held](root)
        shutil.rmtree(root / "test")  # no test images either: nothing at all as the forced layout
    with pytest.raises(DataError) as error:
        open_data(root, layout=forced)
    message = str(error.value)
    assert f"no images found as --layout {forced}: it needs " in message and needs in message
    assert "Force one" not in message
    if held:
        assert f"(read as the {held} layout: --layout {held}, or auto)" in message
        assert {"folders": "images/, masks/", "labelme": "scene0_1.json", "pet": "annotations/, images/"}[
            held
        ] in message
    else:
        assert message.endswith("found nothing")


LABELME_ORDER = "__ignore__\n_background_\nsquare\ndisc\nbox\n"  # labelme's labels.txt, not alphabetical


def _labelme2voc_mask(tmp_path, image_id: str) -> np.ndarray:
    """The mask labelme2voc writes with LABELME_ORDER: each class its line's number less one (_background_ 0,
    square 1, disc 2, box 3), __ignore__ -1, which its uint8 PNG stores as 255; drawn as the fixture draws it."""
    alphabetical = open_data(make_labelme(tmp_path / "alphabetical")).read_mask(image_id)  # box 1, disc 2, square 3
    lookup = np.arange(256, dtype=np.uint8)
    lookup[[1, 2, 3]] = [3, 2, 1]
    return lookup[alphabetical]


def test_labelme_labels_txt_one_folder_up_numbers_the_classes_as_labelme(tmp_path, caplog):
    """labelme's example as shipped: data_annotated/*.json, labels.txt one level up."""
    root = make_labelme(tmp_path / "example" / "data_annotated", labels_file=False)
    (tmp_path / "example" / "labels.txt").write_text(LABELME_ORDER)
    with caplog.at_level(logging.INFO, logger="competition"):
        data = open_data(root)
    assert data.classes == ["_background_", "square", "disc", "box"]
    assert data.classes.index("box") == 3  # its line in labels.txt, less one (__ignore__ is -1)
    assert "labels.txt (one folder up)" in caplog.text and not [r for r in caplog.records if r.levelname == "WARNING"]
    for image_id in ("scene0_1", "scene1_2"):  # scene0_1 holds the square (drawn over the box) and the ignore strip
        np.testing.assert_array_equal(data.read_mask(image_id), _labelme2voc_mask(tmp_path, image_id))


@pytest.mark.parametrize(
    "text", [LABELME_ORDER, "_background_\nsquare\ndisc\nbox\n"], ids=["labels.txt", "labelme2voc class_names.txt"]
)
def test_labelme_labels_flag_takes_labelme_and_labelme2voc_files_and_is_saved(tmp_path, text):
    from competition.config import config_from
    from competition.fold_data import open_training_data

    root = make_labelme(tmp_path / "data", labels_file=False)
    (tmp_path / "names").mkdir()
    (tmp_path / "names" / "class_names.txt").write_text(text)
    config, data = open_training_data(config_from({"data_dir": str(root), "labels": "../names/class_names.txt"}))
    assert data.classes == ["_background_", "square", "disc", "box"]
    np.testing.assert_array_equal(data.read_mask("scene0_1"), _labelme2voc_mask(tmp_path, "scene0_1"))
    # The run's saved settings (classes resolved, --labels kept) read the folder again, as infer.py does.
    assert config.classes == "_background_,square,disc,box" and config.labels == "../names/class_names.txt"
    assert open_training_data(config)[1].classes == data.classes
    # --classes wins, as a checkpoint's resolved classes do where its labels file is not (or is another folder)
    assert open_data(root, classes="_background_,box,disc,square", labels="nowhere.txt").classes[1] == "box"
    assert open_data(make_folders(tmp_path / "folders"), classes="a,b,c,d", labels="nowhere.txt").classes[0] == "a"


def test_labelme_without_a_labels_file_warns_that_the_indices_differ_and_names_the_flag(tmp_path, caplog):
    root = make_labelme(tmp_path / "data_annotated", labels_file=False)
    with caplog.at_level(logging.WARNING, logger="competition"):
        open_data(root)
    [record] = caplog.records
    message = record.getMessage()
    assert "--labels" in message and "will differ from labelme's" in message and str(tmp_path) in message


def test_labelme_labels_flag_refusals(tmp_path):
    from competition.errors import ConfigError

    root = make_labelme(tmp_path / "data", labels_file=False)
    with pytest.raises(DataError, match=r"--labels nowhere.txt: labels file not found"):
        open_data(root, labels="nowhere.txt")
    (root / "bad.txt").write_text("__ignore__\nbox\n_background_\n")
    with pytest.raises(DataError, match=r"bad.txt: _background_ is class 0 in labelme2voc: list it first"):
        open_data(root, labels="bad.txt")
    with pytest.raises(ConfigError, match=r"--labels is for labelme JSON files"):
        open_data(make_folders(tmp_path / "folders"), labels="bad.txt")


@pytest.mark.parametrize(
    "border, classes, value", [("ignore", ["background", "pet"], 255), ("class", ["background", "pet", "border"], 2)]
)
def test_pet_trimaps_by_the_documented_rule(tmp_path, border, classes, value):
    root = make_pet(tmp_path)
    data = open_data(root, pet_border=border)
    assert data.layout == "pet" and data.classes == classes
    assert "._Abyssinian_1" not in data.train_ids() and len(data.train_ids()) == 8
    trimap = np.asarray(Image.open(root / "annotations" / "trimaps" / "Abyssinian_1.png"))
    mask = data.read_mask("Abyssinian_1")
    assert (mask[trimap == 1] == 1).all() and (mask[trimap == 2] == 0).all() and (mask[trimap == 3] == value).all()
    assert all(data.read_image(image_id).shape[2] == 3 for image_id in data.train_ids())  # greyscale, CMYK -> RGB
    shapes = {data.image_shape(image_id) for image_id in data.train_ids()}
    assert len(shapes) > 1  # images of several sizes, as downloaded


def test_every_layout_is_detected(tmp_path, data_dir):
    assert detect_layout(data_dir) == "carvana"
    assert detect_layout(make_folders(tmp_path / "f")) == "folders"
    assert detect_layout(make_labelme(tmp_path / "l")) == "labelme"
    assert detect_layout(make_pet(tmp_path / "p")) == "pet"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data layout recognised"):
        detect_layout(tmp_path / "empty")
    (tmp_path / "r" / "train").mkdir(parents=True)  # the rle-table layout: never detected, its table is named
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "r" / "train" / "x.png")
    (tmp_path / "r" / "train.csv").write_text("id,class,segmentation\nx,a,1 2\n")
    for layout in LAYOUT_CHOICES[1:]:  # and each forced by name
        root = {"carvana": data_dir, "folders": tmp_path / "f", "labelme": tmp_path / "l", "pet": tmp_path / "p"}
        table = {"masks_csv": "train.csv"} if layout == "rle-table" else {}
        assert open_data({**root, "rle-table": tmp_path / "r"}[layout], layout=layout, **table).layout == layout


def test_a_mask_value_outside_the_classes_stops_with_file_value_and_classes(tmp_path):
    root = make_folders(tmp_path)
    (root / "classes.txt").write_text("background\nbox\ndisc\n")  # no "square": value 3 is unknown
    with pytest.raises(
        DataError, match=r"scene0_1.png: mask value\(s\) \[3\] are neither a class \(0..2: background, box, disc\)"
    ):
        open_data(root).read_mask("scene0_1")


def test_classes_flag_overrides_the_file(tmp_path):
    root = make_folders(tmp_path)
    assert open_data(root, classes="bg,a,b,c").classes == ["bg", "a", "b", "c"]
    with pytest.raises(DataError, match="at least two classes"):
        open_data(root, classes="bg")


def test_classes_from_the_masks_when_none_are_named(tmp_path, caplog):
    root = make_folders(tmp_path, classes_file=False)
    with caplog.at_level(logging.WARNING):
        data = open_data(root)
    assert data.classes == ["class_0", "class_1", "class_2", "class_3"] and "classes.txt" in caplog.text


def test_rgb_masks_are_refused(tmp_path):
    root = make_folders(tmp_path)
    Image.open(root / "masks" / "scene0_1.png").convert("RGB").save(root / "masks" / "scene0_1.png")
    with pytest.raises(DataError, match="masks must hold class indices"):
        open_data(root).read_mask("scene0_1")


def test_a_mask_of_another_size_stops_with_both_sizes(tmp_path):
    root = make_folders(tmp_path)
    Image.open(root / "masks" / "scene0_1.png").resize((48, 32)).save(root / "masks" / "scene0_1.png")
    with pytest.raises(DataError, match="image is 96x64 but its mask .* is 48x32"):
        open_data(root).read_sample("scene0_1")


def test_two_images_with_one_stem_are_refused(tmp_path):
    root = make_folders(tmp_path)
    Image.open(root / "images" / "scene0_1.jpg").save(root / "images" / "scene0_1.png")
    with pytest.raises(DataError, match="scene0_1.jpg and scene0_1.png share a name"):
        open_data(root)


def test_sixteen_bit_greyscale_masks_keep_their_values(tmp_path):
    path = tmp_path / "mask.png"
    Image.fromarray(np.array([[0, 1], [2, 3]], dtype=np.uint16)).save(path)
    np.testing.assert_array_equal(read_index_mask(path.read_bytes(), str(path)), [[0, 1], [2, 3]])


def test_images_flag_replaces_the_test_folder(tmp_path):
    root = make_folders(tmp_path / "data")
    other = make_folders(tmp_path / "other", count=0, tests=3) / "test"
    assert len(open_data(root, test_images=other).test_ids()) == 3


def test_labelme_lines_points_and_mask_shapes_as_labelme_draws_them():
    import base64
    import io

    from competition.labelme import draw_shape

    canvas = Image.new("L", (40, 30), 0)
    draw_shape(canvas, {"label": "a", "shape_type": "linestrip", "points": [[5, 15], [35, 15]]}, 1, "x.json")
    draw_shape(canvas, {"label": "a", "shape_type": "point", "points": [[20, 4]]}, 2, "x.json")
    patch = io.BytesIO()
    Image.fromarray(np.full((3, 4), 255, dtype=np.uint8)).save(patch, format="PNG")
    mask_shape = {
        "label": "a",
        "shape_type": "mask",
        "points": [[1, 25], [5, 28]],
        "mask": base64.b64encode(patch.getvalue()),
    }
    draw_shape(canvas, mask_shape, 3, "x.json")
    pixels = np.asarray(canvas)
    assert (pixels[11:20, 10] == 1).all() and pixels[9, 10] == 0  # 10 px wide, centred on the line
    assert pixels[4, 20] == 2 and pixels[4, 25] == 2 and pixels[4, 26] == 0  # a disc of radius 5
    assert (pixels[25:28, 1:5] == 3).all() and pixels[28, 1] == 0
    with pytest.raises(DataError, match="is a line with 1 point"):
        draw_shape(canvas, {"label": "a", "shape_type": "line", "points": [[1, 1]]}, 1, "x.json")


def test_labelme_linestrip_turns_with_rounded_joints_as_labelme_draws_them():
    from competition.labelme import draw_shape

    bend = [[3, 3], [25, 5], [5, 25]]
    canvas = Image.new("L", (30, 30), 0)
    draw_shape(canvas, {"label": "a", "shape_type": "linestrip", "points": bend}, 1, "x.json")
    rounded, notched = Image.new("L", (30, 30), 0), Image.new("L", (30, 30), 0)
    ImageDraw.Draw(rounded).line([tuple(point) for point in bend], fill=1, width=10, joint="curve")
    ImageDraw.Draw(notched).line([tuple(point) for point in bend], fill=1, width=10)
    assert (np.asarray(rounded) != np.asarray(notched)).sum() > 10  # the joint is what differs
    assert np.array_equal(np.asarray(canvas), np.asarray(rounded))


def test_labelme_images_are_turned_by_their_exif_orientation(tmp_path):
    root = make_labelme(tmp_path)
    image = Image.open(root / "scene0_1.jpg")
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways: shown turned a quarter
    image.transpose(Image.Transpose.ROTATE_90).save(root / "scene0_1.jpg", exif=exif)
    data = open_data(root)
    assert data.image_shape("scene0_1") == (64, 96)
    picture, mask = data.read_sample("scene0_1")
    assert picture.shape == (64, 96, 3) and mask.shape == (64, 96)
