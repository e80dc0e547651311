import base64
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from competition.data import CarvanaData
from competition.errors import DataError
from competition.layouts import (
    LAYOUTS,
    SegmentationData,
    detect_layout,
    open_data,
    parse_classes,
    rasterise_labelme,
    read_labelme_labels,
)
from tests.layout_fixtures import (
    COUNT,
    FOLDER_CLASSES,
    HEIGHT,
    PET_SIZES,
    WIDTH,
    class_mask,
    labelme_document,
    labelme_truth,
    make_folders,
    make_labelme,
    make_pet,
    pet_id,
    pet_trimap,
    sample_id,
)

LOGGER = "competition.layouts"


@pytest.mark.parametrize("palette", [True, False])
def test_folders_read_class_indices_from_palette_and_greyscale_masks(tmp_path, palette):
    data = open_data(make_folders(tmp_path, palette=palette))
    assert isinstance(data, SegmentationData) and data.layout == "folders"
    assert data.classes == FOLDER_CLASSES and data.num_classes == 3 and data.ignore_index == 255
    assert data.train_ids() == sorted(sample_id(i) for i in range(COUNT)) and data.test_ids() == ["t_0", "t_1"]
    mask = data.read_mask(sample_id(0))
    assert mask.dtype == np.uint8 and mask.shape == (HEIGHT, WIDTH)
    # hand-checked: image 0's square spans rows 8..27, cols 8..35; its disc is centred on (42, 66), radius 12
    assert mask[8, 8] == 1 and mask[27, 35] == 1 and mask[7, 8] == 0 and mask[8, 36] == 0
    assert mask[42, 66] == 2 and mask[42, 54] == 2 and mask[42, 53] == 0 and mask[0, 0] == 0
    np.testing.assert_array_equal(mask, class_mask(0))
    image, sample_mask = data.read_sample(sample_id(3))
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(sample_mask, class_mask(3))
    assert data.image_shape("t_1", "test") == (HEIGHT, WIDTH) and data.read_image("t_0", "test").shape[2] == 3
    counts = data.class_pixel_counts(sample_id(0))
    assert counts.dtype == np.int64 and counts.tolist() == [HEIGHT * WIDTH - 20 * 28 - 441, 20 * 28, 441]
    data.check_masks(data.train_ids())
    data.check_sample(sample_id(0))


def test_voc_names_keep_the_255_border_as_ignore(tmp_path):
    root = make_folders(tmp_path, voc=True)
    assert detect_layout(root) == "folders"
    data = open_data(root)
    mask = data.read_mask(sample_id(0))
    assert mask[7, 8] == 255 and mask[8, 7] == 255 and mask[28, 20] == 255 and mask[8, 8] == 1
    assert mask[7, 7] == 0  # the ring is 4-connected: the diagonal corner stays background
    ring = 2 * 20 + 2 * 28
    counts = data.class_pixel_counts(sample_id(0))
    assert counts.sum() == HEIGHT * WIDTH - ring and counts[1] == 20 * 28
    (root / "SegmentationClass").rename(root / "SegmentationClassPNG")
    assert open_data(root).read_mask(sample_id(0))[7, 8] == 255


def test_folders_without_classes_file_count_the_classes_in_the_masks(tmp_path, caplog):
    root = make_folders(tmp_path, classes_file=False, voc=True)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = open_data(root)
    assert data.classes == ["class_0", "class_1", "class_2"]  # 255 is the ignore index, not a class
    assert "classes.txt" in caplog.text


def test_classes_flag_overrides_classes_txt(tmp_path):
    root = make_folders(tmp_path)
    assert open_data(root, classes="bg, box ,ball").classes == ["bg", "box", "ball"]
    (root / "classes.txt").write_text("\nbackground\n\nsquare\ndisc\n\n")
    assert open_data(root).classes == FOLDER_CLASSES
    with pytest.raises(DataError, match="at least two"):
        parse_classes("background")
    with pytest.raises(DataError, match="twice"):
        parse_classes("a,b,a")


def test_a_mask_value_outside_the_classes_names_file_values_and_classes(tmp_path):
    data = open_data(make_folders(tmp_path), classes="background,square")
    with pytest.raises(DataError, match=rf"{sample_id(0)}\.png: mask value\(s\) 2 .*\['background', 'square'\]"):
        data.read_mask(sample_id(0))
    with pytest.raises(DataError, match="value"):
        data.class_pixel_counts(sample_id(0))


def test_a_colour_mask_is_refused(tmp_path):
    root = make_folders(tmp_path)
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(root / "masks" / f"{sample_id(1)}.png")
    data = open_data(root)
    with pytest.raises(DataError, match=rf"{sample_id(1)}\.png: the mask is RGB; masks must hold class indices"):
        data.read_mask(sample_id(1))


def test_sixteen_bit_masks_are_read_as_indices(tmp_path):
    root = make_folders(tmp_path)
    Image.fromarray(class_mask(2).astype(np.uint16)).save(root / "masks" / f"{sample_id(2)}.png")
    np.testing.assert_array_equal(open_data(root).read_mask(sample_id(2)), class_mask(2))


def test_a_mask_of_another_size_names_both_sizes(tmp_path):
    root = make_folders(tmp_path)
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(root / "masks" / f"{sample_id(4)}.png")
    data = open_data(root)
    with pytest.raises(DataError, match="image is 96x64 but its mask .* is 48x32"):
        data.check_sample(sample_id(4))
    with pytest.raises(DataError, match="image is 96x64 but its mask .* is 48x32"):
        data.read_sample(sample_id(4))


def test_duplicate_stems_and_orphan_masks_stop(tmp_path):
    root = make_folders(tmp_path)
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(root / "images" / f"{sample_id(0)}.png")
    with pytest.raises(DataError, match=f"{sample_id(0)}.jpg and {sample_id(0)}.png share the id"):
        open_data(root)
    (root / "images" / f"{sample_id(0)}.png").unlink()
    (root / "images" / f"{sample_id(5)}.jpg").unlink()
    with pytest.raises(DataError, match=r"1 mask\(s\) have no image"):
        open_data(root)


def test_images_without_masks_are_not_training_images(tmp_path, caplog):
    root = make_folders(tmp_path)
    (root / "masks" / f"{sample_id(5)}.png").unlink()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = open_data(root)
    assert len(data.train_ids()) == COUNT - 1 and "1 image(s) without a mask" in caplog.text
    with pytest.raises(DataError, match="have no mask"):
        data.check_masks([sample_id(5)])


def test_test_images_from_another_folder(tmp_path):
    root = make_folders(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(other / "new.png")
    data = open_data(root, test_images=other)
    assert data.test_ids() == ["new"] and data.image_shape("new", "test") == (10, 12)
    with pytest.raises(DataError, match="not found"):
        open_data(root, test_images=tmp_path / "missing")


def test_labelme_later_shapes_cover_earlier_and_ignore_shapes_are_ignored(tmp_path, caplog):
    root = make_labelme(tmp_path)
    assert detect_layout(root) == "labelme"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = open_data(root)
    assert "1 image(s) without a labelme JSON" in caplog.text and "classes from the labels" in caplog.text
    assert data.layout == "labelme" and data.classes == ["background", "cat", "dog"]
    assert data.train_ids() == sorted(sample_id(i) for i in range(COUNT)) and data.test_ids() == ["t_0", "t_1"]
    mask = data.read_mask(sample_id(0))
    # hand-checked: cat polygon rows 10..40 x cols 10..50, then dog rectangle rows 30..55 x cols 40..80 over
    # it, then __ignore__ rows 50..60 x cols 70..90 over the dog
    assert mask[5, 5] == 0 and mask[20, 20] == 1 and mask[10, 10] == 1 and mask[40, 50] == 2
    assert mask[35, 45] == 2 and mask[35, 30] == 1 and mask[45, 60] == 2 and mask[55, 75] == 255
    assert mask[58, 85] == 255 and mask[61, 85] == 0
    for index in range(COUNT):
        np.testing.assert_array_equal(data.read_mask(sample_id(index)), labelme_truth(index))
    assert data.class_pixel_counts(sample_id(0)).sum() == HEIGHT * WIDTH - 11 * 21
    image, _ = data.read_sample(sample_id(1))
    assert image.shape == (HEIGHT, WIDTH, 3)
    data.check_sample(sample_id(1))


def test_labels_txt_orders_the_labelme_classes_and_classes_flag_overrides_it(tmp_path):
    root = make_labelme(tmp_path, labels_txt=True)
    data = open_data(root)
    assert data.classes == ["background", "dog", "cat"]
    mask = data.read_mask(sample_id(0))
    assert mask[20, 20] == 2 and mask[35, 45] == 1 and mask[55, 75] == 255
    assert open_data(root, classes="background,cat,dog").read_mask(sample_id(0))[20, 20] == 1
    with pytest.raises(DataError, match=rf"{sample_id(0)}\.json: label 'dog' is not one of the classes"):
        open_data(root, classes="background,cat").read_mask(sample_id(0))
    with pytest.raises(DataError, match="label 'dog' is not one of the classes"):
        open_data(root, classes="background,cat").check_sample(sample_id(0))  # found without drawing
    labels = tmp_path / "labels.txt"
    labels.write_text("__ignore__\n_background_\na\n\nb\n")
    assert read_labelme_labels(labels) == ["background", "a", "b"]


def test_labelme_other_shape_types_and_the_mask_shape(tmp_path):
    box = np.zeros((4, 6), np.uint8)
    box[1:3, 2:5] = 255
    png = io.BytesIO()
    Image.fromarray(box).save(png, format="PNG")
    document = {
        "shapes": [
            {"label": "a", "points": [[20, 20], [23, 24]], "shape_type": "circle"},  # radius 5
            {"label": "b", "points": [[0, 0]], "shape_type": "point"},
            {"label": "a", "points": [[0, 40], [40, 40]], "shape_type": "line"},
            {"label": "b", "points": [[50.7, 3.2], [55, 6]], "shape_type": "mask", "mask": base64.b64encode(
                png.getvalue()).decode()},
        ]
    }  # fmt: skip
    mask = rasterise_labelme(document, (HEIGHT, WIDTH), {"a": 1, "b": 2}.__getitem__, "x.json")
    assert mask[20, 25] == 1 and mask[20, 26] == 0 and mask[0, 0] == 2 and mask[0, 5] == 2
    assert mask[40, 20] == 1 and (mask[30:, 20] == 1).sum() == 10  # labelme's lines are 10 pixels wide
    assert mask[4, 52] == 2 and mask[4, 54] == 2 and mask[4, 55] == 0 and mask[3, 52] == 0
    with pytest.raises(DataError, match="x.json: shape 'a' is a polygon with 2 point"):
        rasterise_labelme({"shapes": [{"label": "a", "points": [[0, 0], [1, 1]]}]}, (8, 8), lambda _: 1, "x.json")


@pytest.mark.parametrize(
    ("shape", "inside", "outside"),
    [
        ({"shape_type": "linestrip", "points": [[10, 10], [80, 10], [80, 50]]}, [(10, 40), (40, 80)], [(40, 60)]),
        ({"shape_type": "rectangle", "points": [[60, 40], [20, 10]]}, [(10, 20), (40, 60)], [(41, 60), (9, 20)]),
    ],
)
def test_labelme_linestrip_and_a_rectangle_drawn_from_its_far_corner(shape, inside, outside):
    mask = rasterise_labelme({"shapes": [{"label": "a", **shape}]}, (HEIGHT, WIDTH), lambda _: 1, "x.json")
    assert all(mask[r, c] == 1 for r, c in inside) and all(mask[r, c] == 0 for r, c in outside)


def test_labelme_json_in_a_sub_folder(tmp_path):
    root = make_labelme(tmp_path)
    nested = tmp_path / "project"
    nested.mkdir()
    root.rename(nested / "annotated")
    assert detect_layout(nested) == "labelme"
    assert len(open_data(nested).train_ids()) == COUNT
    document = labelme_document(0)
    assert json.loads((nested / "annotated" / f"{sample_id(0)}.json").read_text())["shapes"] == document["shapes"]


@pytest.mark.parametrize("border, classes, value", [("ignore", ["background", "pet"], 255), ("class", None, 2)])
def test_pet_trimaps_both_border_rules(tmp_path, caplog, border, classes, value):
    root = make_pet(tmp_path)
    assert detect_layout(root) == "pet"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = open_data(root, pet_border=border)
    assert "1 image(s) or trimap(s) without their pair" in caplog.text
    assert data.classes == (classes or ["background", "pet", "border"])
    assert data.train_ids() == sorted(pet_id(i) for i in range(COUNT))  # no ._*, .mat, lone trimap
    mask = data.read_mask(pet_id(0))
    # hand-checked: pet disc centred on (42, 66), radius 12; its 4-connected border one pixel outside
    assert mask[0, 0] == 0 and mask[42, 66] == 1 and mask[42, 54] == 1 and mask[42, 53] == value
    assert mask[30, 66] == 1 and mask[29, 66] == value and mask[28, 66] == 0
    trimap = pet_trimap(0)
    np.testing.assert_array_equal(mask == 0, trimap == 2)
    np.testing.assert_array_equal(mask == value, trimap == 3)
    for index in (1, 2):  # greyscale and CMYK files, in the other two sizes
        image, sample_mask = data.read_sample(pet_id(index))
        assert image.shape == (*PET_SIZES[index], 3) and image.dtype == np.uint8
        assert sample_mask.shape == PET_SIZES[index] and (sample_mask == 1).sum() == (pet_trimap(index) == 1).sum()
    counts = data.class_pixel_counts(pet_id(0))
    assert len(counts) == data.num_classes and counts[1] == (trimap == 1).sum()


def test_pet_custom_ignore_index_and_class_count(tmp_path):
    root = make_pet(tmp_path)
    data = open_data(root, ignore_index=200)
    assert data.read_mask(pet_id(0))[29, 66] == 200
    with pytest.raises(DataError, match="has 2 classes"):
        open_data(root, classes="a,b,c")
    Image.fromarray(np.full((HEIGHT, WIDTH), 7, np.uint8)).save(root / "annotations" / "trimaps" / f"{pet_id(1)}.png")
    with pytest.raises(DataError, match=rf"{pet_id(1)}\.png: trimap value\(s\) \[7\]"):
        data.read_mask(pet_id(1))


def test_detect_layout_for_each_and_none(tmp_path, data_dir):
    assert detect_layout(data_dir) == "carvana"
    assert detect_layout(make_folders(tmp_path)) == "folders"
    assert detect_layout(make_folders(tmp_path, voc=True)) == "folders"
    assert detect_layout(make_labelme(tmp_path)) == "labelme"
    assert detect_layout(make_pet(tmp_path)) == "pet"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no known data layout") as raised:
        detect_layout(empty)
    for layout in ("carvana", "folders", "labelme", "pet", "annotations/trimaps", "JPEGImages"):
        assert layout in str(raised.value)


def test_every_layout_opens(tmp_path, data_dir):
    roots = {"folders": make_folders(tmp_path), "labelme": make_labelme(tmp_path), "pet": make_pet(tmp_path)}
    for layout in LAYOUTS:
        if layout == "auto":
            for expected, root in roots.items():
                assert open_data(root, layout).layout == expected
        elif layout == "carvana":
            data = open_data(data_dir, layout)
            assert isinstance(data, CarvanaData) and data.layout == "carvana"
            assert data.classes == ["background", "car"] and data.num_classes == 2 and data.ignore_index is None
            image_id = data.train_ids()[0]
            counts = data.class_pixel_counts(image_id)
            assert (
                counts.dtype == np.int64 and counts.tolist() == np.bincount(data.read_mask(image_id).ravel()).tolist()
            )
        else:
            data = open_data(roots[layout], layout)
            assert data.layout == layout and len(data.train_ids()) == COUNT
    with pytest.raises(DataError, match="--layout 'coco'"):
        open_data(roots["pet"], "coco")
    with pytest.raises(DataError, match="not the folders layout"):
        open_data(roots["pet"], "folders")
    with pytest.raises(DataError, match="must be 0..255"):
        open_data(roots["pet"], ignore_index=300)
    with pytest.raises(DataError, match="it is a class"):
        open_data(roots["pet"], ignore_index=1)


def test_each_layout_survives_pickling_for_spawned_workers(tmp_path):
    import pickle

    for root in (make_folders(tmp_path), make_labelme(tmp_path), make_pet(tmp_path)):
        data = open_data(root)
        copy = pickle.loads(pickle.dumps(data))
        image_id = data.train_ids()[0]
        np.testing.assert_array_equal(copy.read_mask(image_id), data.read_mask(image_id))
        copy.check_sample(image_id)


def test_labelme_photos_are_turned_by_their_exif_orientation(tmp_path):
    root = make_labelme(tmp_path)
    upright = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    upright[:10] = 255  # a white band along the top of the picture as labelme shows it
    stored = Image.fromarray(np.rot90(upright, 1).copy())  # the camera stored it turned: EXIF 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(root / f"{sample_id(0)}.jpg", exif=exif, quality=95)
    data = open_data(root)
    image, mask = data.read_sample(sample_id(0))
    assert mask.shape == (HEIGHT, WIDTH) and data.image_shape(sample_id(0)) == (HEIGHT, WIDTH)
    assert image[:8].mean() > 200 and image[12:].mean() < 50
    data.check_sample(sample_id(0))
