"""Masks from a per-class RLE table (the rle-table layout): both pixel orders, the three heads, file-name and stem
ids, every malformed row stopped with its line, and the decoding checked against an independent numpy decoder."""

import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

import make_folds
import train
from competition.errors import ConfigError, DataError
from competition.inspect_data import describe
from competition.layouts import open_data
from competition.mask_values import pack_labels
from competition.rle import rle_decode, rle_encode, rle_encode_numpy
from competition.survey import survey

ROOT = Path(__file__).resolve().parent.parent
SEVERSTAL = {"rle_columns": "ImageId,ClassId,EncodedPixels", "rle_order": "column"}
RELATIVE_FIX = (  # what a row refused as out of order is told when it reads as SIIM-ACR's relative runs
    "fix the row; if its starts count from the end of the previous run (a relative RLE, as SIIM-ACR's train-rle.csv "
    "writes), rewrite them as absolute 1-indexed pixel numbers: --masks-csv reads those"
)


def numpy_decode(rle: str, shape: tuple[int, int], order: str) -> np.ndarray:
    """The reference: every run's pixels set one at a time, pixel p at (p // width, p % width) row-major or
    (p % height, p // height) column-major."""
    height, width = shape
    mask = np.zeros(shape, dtype=np.uint8)
    numbers = [int(number) for number in rle.split()]
    for start, length in zip(numbers[0::2], numbers[1::2]):
        for pixel in range(start - 1, start - 1 + length):
            row, column = (pixel // width, pixel % width) if order == "row" else (pixel % height, pixel // height)
            mask[row, column] = 1
    return mask


def encode(mask: np.ndarray, order: str) -> str:
    """A mask's RLE in ``order``: column-major numbering is the row-major numbering of the transpose."""
    return rle_encode_numpy(mask.T if order == "column" else mask)


def make_table(
    root: Path,
    masks: dict[str, np.ndarray],
    names: list[str],
    order: str = "row",
    columns: tuple[str, ...] = ("id", "class", "segmentation"),
    id_suffix: str = "",
    empty: str = "",
    extra_rows: list[tuple] = (),
) -> Path:
    """``train/<id>.png`` (grey, the mask's size) and ``train.csv``: a row per image and class (``masks``: id ->
    (K, H, W) 0/1), an absent class's cell ``empty``; ids written with ``id_suffix`` (``.png``: file names)."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    rows = []
    for image_id, planes in masks.items():
        Image.fromarray(np.full(planes.shape[1:], 128, np.uint8)).save(root / "train" / f"{image_id}.png")
        for name, plane in zip(names, planes):
            rle = encode(plane, order) if plane.any() else empty
            rows.append((image_id + id_suffix, name, rle)[:: 1 if len(columns) == 3 else 2])
    rows += list(extra_rows)
    pd.DataFrame(rows, columns=list(columns)).to_csv(root / "train.csv", index=False)
    return root


def boxes(count: int, shape=(12, 20), classes: int = 3, seed: int = 0, overlap: bool = False) -> dict[str, np.ndarray]:
    """id -> (classes, H, W) masks of one box per class (some classes absent), apart unless ``overlap``."""
    rng = np.random.default_rng(seed)
    masks = {}
    for index in range(count):
        planes = np.zeros((classes, *shape), np.uint8)
        for k in range(classes):
            if rng.random() < 0.25 and index:  # the first image holds every class
                continue
            top = int(rng.integers(0, shape[0] - 3))
            left = k * (shape[1] // classes) if not overlap else int(rng.integers(0, 4))
            planes[k, top : top + 3, left : left + 4] = 1
        masks[f"case{index // 2}_slice_{index:04d}"] = planes
    return masks


def index_mask(planes: np.ndarray) -> np.ndarray:
    return (np.argmax(planes, axis=0) + 1) * planes.any(axis=0)


# --- decoding: the numba RLE against the numpy reference, both orders ---

shapes = st.tuples(st.integers(1, 30), st.integers(1, 40))
masks = shapes.flatmap(lambda shape: arrays(np.uint8, shape, elements=st.integers(0, 1)))


@settings(max_examples=200, deadline=None)
@given(masks, st.sampled_from(["row", "column"]))
def test_decoding_matches_an_independent_numpy_decoder_in_both_orders(mask, order):
    rle = encode(mask, order)
    decoded = rle_decode(rle, mask.shape, order)
    np.testing.assert_array_equal(decoded, numpy_decode(rle, mask.shape, order))
    np.testing.assert_array_equal(decoded, mask)
    assert decoded.flags.c_contiguous


def test_column_major_numbers_pixels_down_each_column():
    np.testing.assert_array_equal(rle_decode("2 2", (3, 2), "column"), [[0, 0], [1, 0], [1, 0]])
    np.testing.assert_array_equal(rle_decode("2 2", (3, 2), "row"), [[0, 1], [1, 0], [0, 0]])


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3).flatmap(
        lambda k: st.lists(arrays(np.uint8, (k, 7, 9), elements=st.integers(0, 1)), min_size=1, max_size=3)
    ),
    st.sampled_from(["row", "column"]),
)
def test_a_multilabel_table_decodes_as_the_numpy_reference_packs_it(images, order):
    names = ["large_bowel", "small_bowel", "stomach"][: images[0].shape[0]]
    with tempfile.TemporaryDirectory() as folder:
        root = make_table(Path(folder), {f"s{i}": planes for i, planes in enumerate(images)}, names, order)
        data = open_data(root, masks_csv="train.csv", rle_order=order, head="multilabel", classes=",".join(names))
        frame = pd.read_csv(root / "train.csv", keep_default_na=False)
        for index, planes in enumerate(images):
            rows = frame[frame["id"] == f"s{index}"]
            reference = [numpy_decode(rle, planes.shape[1:], order) for rle in rows["segmentation"]]
            np.testing.assert_array_equal(data.read_mask(f"s{index}"), pack_labels(np.stack(reference)))


# --- the three heads ---


@pytest.mark.parametrize("order", ["row", "column"])
def test_several_classes_make_index_masks_background_zero(tmp_path, order):
    masks = boxes(4)
    root = make_table(tmp_path, masks, ["stomach", "large_bowel", "small_bowel"], order)
    data = open_data(root, masks_csv="train.csv", rle_order=order)
    assert data.layout == "rle-table" and not data.multilabel
    assert data.classes == ["background", "large_bowel", "small_bowel", "stomach"]  # sorted names
    for image_id, planes in masks.items():
        expected = index_mask(planes[[1, 2, 0]])  # class k of the sorted names is value k + 1
        np.testing.assert_array_equal(data.read_mask(image_id), expected)
        np.testing.assert_array_equal(data.read_sample(image_id)[1], expected)


def test_one_class_makes_binary_masks_and_a_table_without_classes_too(tmp_path):
    masks = {image_id: planes[:1] for image_id, planes in boxes(3).items()}
    data = open_data(make_table(tmp_path / "a", masks, ["ship"]), masks_csv="train.csv")
    assert data.classes == ["background", "ship"]
    columns = ("ImageId", "EncodedPixels")
    data = open_data(make_table(tmp_path / "b", masks, ["ship"], columns=columns), masks_csv="train.csv",
                     rle_columns="ImageId,EncodedPixels")  # fmt: skip
    assert data.classes == ["background", "foreground"]
    for image_id, planes in masks.items():
        np.testing.assert_array_equal(data.read_mask(image_id), planes[0])


def test_multilabel_packs_overlapping_classes_bit_k_for_class_k(tmp_path):
    masks = boxes(4, overlap=True)
    names = ["stomach", "large_bowel", "small_bowel"]
    root = make_table(tmp_path, masks, names)
    data = open_data(root, masks_csv="train.csv", head="multilabel", classes=",".join(names))
    assert data.multilabel and data.classes == names and data.num_classes == 3
    for image_id, planes in masks.items():
        np.testing.assert_array_equal(data.read_mask(image_id), pack_labels(planes))
        np.testing.assert_array_equal(data.class_pixel_counts(image_id), planes.reshape(3, -1).sum(axis=1))
    counted = survey(data, data.train_ids(), check=True, count=4, progress=False)  # the pre-check's counts too
    np.testing.assert_array_equal(counted, [planes.reshape(3, -1).sum(axis=1) for planes in masks.values()])
    lines = describe(data, None, progress=False)[0]  # inspect_data: each class's share of all the pixels
    assert (
        f"masks: row-major RLE rows of {root / 'train.csv'}, bit k of a pixel for class k (--head multilabel)" in lines
    )
    shares = sum(planes.reshape(3, -1).sum(axis=1) for planes in masks.values()) / (4 * 12 * 20)
    assert "classes (3), share of the labelled pixels each covers (classes may overlap):" in lines
    assert [f"  {k:3d} {name:<20} {100 * share:7.3f}%" for k, (name, share) in enumerate(zip(names, shares))] == [
        line for line in lines if line.startswith("    ")
    ]


def test_overlapping_classes_with_a_softmax_head_name_both_rows_and_the_head(tmp_path):
    masks = {"a": np.zeros((2, 6, 8), np.uint8)}
    masks["a"][0, 1:3, 1:4] = masks["a"][1, 2:4, 2:5] = 1
    root = make_table(tmp_path, masks, ["x", "y"])
    data = open_data(root, masks_csv="train.csv")
    expected = (
        f"{root / 'train.csv'}: lines 2 and 3 (image a): classes x and y overlap, and a softmax gives each pixel one "
        "class: pass --head multilabel (a sigmoid channel per class)"
    )
    with pytest.raises(DataError) as error:
        data.read_mask("a")
    assert str(error.value) == expected
    with pytest.raises(DataError) as error:  # make_folds' counts from the runs alone: a few shared pixels too
        data.class_pixel_counts("a")
    assert str(error.value) == expected


# --- ids, classes, empty cells ---


def test_severstal_file_name_ids_and_class_numbers(tmp_path):
    masks = boxes(3, shape=(16, 40), classes=4)
    root = make_table(tmp_path, masks, ["1", "2", "3", "4"], "column", ("ImageId", "ClassId", "EncodedPixels"), ".png")
    data = open_data(root, masks_csv="train.csv", **SEVERSTAL)
    assert data.classes == ["background", "1", "2", "3", "4"] and data.train_ids() == sorted(masks)
    named = open_data(root, masks_csv="train.csv", classes="background,pits,inclusion,scratches,patches", **SEVERSTAL)
    assert named.classes[1:] == ["pits", "inclusion", "scratches", "patches"]  # ClassId 1..4 numbers them
    for image_id, planes in masks.items():
        np.testing.assert_array_equal(data.read_mask(image_id), index_mask(planes))
        np.testing.assert_array_equal(named.read_mask(image_id), index_mask(planes))


def test_numeric_classes_sort_as_numbers(tmp_path):
    masks = {"a": np.zeros((3, 4, 5), np.uint8)}
    root = make_table(tmp_path, masks, ["10", "9", "2"])
    assert open_data(root, masks_csv="train.csv").classes == ["background", "2", "9", "10"]


@pytest.mark.parametrize("empty", ["", "-1", "NaN"])
def test_an_empty_cell_and_a_missing_row_are_empty_masks(tmp_path, empty, caplog):
    masks = boxes(3)
    root = make_table(tmp_path, masks, ["a", "b", "c"], empty=empty)
    Image.fromarray(np.zeros((12, 20), np.uint8)).save(root / "train" / "unlisted.png")  # no row at all
    with caplog.at_level(logging.INFO, logger="competition.layouts"):
        data = open_data(root, masks_csv="train.csv")
    assert "unlisted" in data.train_ids() and not data.read_mask("unlisted").any()
    assert "1 image(s) have no row in train.csv: their masks are empty" in caplog.text
    for image_id, planes in masks.items():
        np.testing.assert_array_equal(data.read_mask(image_id), index_mask(planes))


def test_an_id_without_an_image_is_left_out_and_said(tmp_path, caplog):
    root = make_table(tmp_path, boxes(2), ["a", "b", "c"], extra_rows=[("gone", "a", "1 3")])
    with caplog.at_level(logging.WARNING, logger="competition.layouts"):
        data = open_data(root, masks_csv="train.csv")
    assert "gone" not in data.train_ids() and len(data.train_ids()) == 2
    assert "1 id(s) have no image in" in caplog.text and "'gone'" in caplog.text


def test_a_table_whose_ids_name_no_image_stops(tmp_path):
    root = make_table(tmp_path, boxes(2), ["a", "b", "c"])
    (root / "other").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "other" / "x.png")
    with pytest.raises(DataError, match=r"train.csv: none of its 2 ids names an image in .*other \(e.g. 'case0_"):
        open_data(root, masks_csv="train.csv", images="other")


def test_images_come_from_the_folder_images_names(tmp_path):
    masks = boxes(2)
    root = make_table(tmp_path, masks, ["a", "b", "c"])
    (root / "train").rename(root / "scans")
    data = open_data(root, masks_csv=str(root / "train.csv"), images="scans")  # an absolute --masks-csv too
    assert data.train_ids() == sorted(masks)


# --- the real competitions' quirks (rows synthesised in each format: Kaggle's files may not be redistributed) ---


def test_a_header_with_a_space_after_its_commas_is_read_by_its_names(tmp_path):
    """SIIM-ACR's train-rle.csv: header ``ImageId, EncodedPixels``, cells `` -1`` (empty) and `` 5 3`` (as
    srivatsav09/pneumothorax-detection-unet keeps the competition's file)."""
    (tmp_path / "train").mkdir()
    for image_id in ("1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090", "1.2.276.0.7230010.3.1.4.1"):
        Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "train" / f"{image_id}.png")
    (tmp_path / "train-rle.csv").write_text(
        "ImageId, EncodedPixels\n1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090, -1\n"
        "1.2.276.0.7230010.3.1.4.1, 5 3\n1.2.276.0.7230010.3.1.4.1, 13 2\n"
    )
    data = open_data(tmp_path, masks_csv="train-rle.csv", rle_columns="ImageId,EncodedPixels", rle_order="column")
    assert not data.read_mask("1.2.276.0.7230010.3.1.4.8323329.5597.1517875188.959090").any()
    expected = numpy_decode("5 3", (4, 6), "column") | numpy_decode("13 2", (4, 6), "column")  # two rows, one image
    np.testing.assert_array_equal(data.read_mask("1.2.276.0.7230010.3.1.4.1"), expected)


def test_a_relative_rle_row_is_refused_with_what_it_reads_as(tmp_path):
    """SIIM-ACR's train-rle.csv counts each start from the end of the previous run: ``5 2 4 2`` is pixels 6-7 and
    12-13 there, out of order as absolute runs."""
    root = make_table(tmp_path, boxes(2), ["a", "b", "c"], extra_rows=[("case0_slice_0001", "b", "5 2 4 2")])
    with pytest.raises(DataError) as error:
        open_data(root, masks_csv="train.csv").read_mask("case0_slice_0001")
    assert str(error.value).endswith("RLE has runs out of order or overlapping (image of 240 pixels); " + RELATIVE_FIX)


def test_uw_madison_scans_in_case_and_day_folders_are_named_by_their_row_ids(tmp_path):
    """UW-Madison's train/case55/case55_day0/scans/slice_0078_266_266_1.50_1.50.png (width, then height), 16-bit,
    is row case55_day0_slice_0078 (the paths of Hengyi-Luo/UW-Madison_GI_Tract_Image_Segmentation's splits)."""
    rows, expected = [], {}
    for case, width, height in ((55, 26, 26), (49, 36, 31)):
        scans = tmp_path / "train" / f"case{case}" / f"case{case}_day0" / "scans"
        scans.mkdir(parents=True)
        Image.fromarray(np.zeros((height, width), np.uint16)).save(scans / f"slice_0078_{width}_{height}_1.50_1.50.png")
        planes = np.zeros((2, height, width), np.uint8)
        planes[0, 2:9, 3:7] = planes[1, 5:12, 4:20] = 1  # overlapping organs
        expected[f"case{case}_day0_slice_0078"] = planes
        rows += [
            (f"case{case}_day0_slice_0078", name, rle_encode(plane))
            for name, plane in zip(["bowel", "stomach"], planes)
        ]
    pd.DataFrame(rows, columns=["id", "class", "segmentation"]).to_csv(tmp_path / "train.csv", index=False)
    data = open_data(tmp_path, masks_csv="train.csv", head="multilabel")
    assert data.train_ids() == sorted(expected)
    for image_id, planes in expected.items():
        np.testing.assert_array_equal(data.read_mask(image_id), pack_labels(planes))


def test_ids_of_image_and_class_in_one_column_say_to_split_it(tmp_path):
    """Severstal's first train.csv: ``ImageId_ClassId,EncodedPixels`` (``0002cc93b.jpg_1``), as
    khornlund/severstal-steel-defect-detection's pseudo.csv keeps the format."""
    root = make_table(tmp_path, boxes(2), ["1", "2", "3"], "column", ("ImageId_ClassId", "EncodedPixels"))
    frame = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    names = [f"{image_id}.png_{k}" for image_id in boxes(2) for k in (1, 2, 3)]
    frame.assign(ImageId_ClassId=names).to_csv(root / "train.csv", index=False)
    with pytest.raises(DataError, match=r"its ids are <image>_<class> \(e.g. 'case0_slice_0000.png_1', as Severstal"):
        open_data(root, masks_csv="train.csv", rle_columns="ImageId_ClassId,EncodedPixels", rle_order="column")


def test_numbered_classes_are_names_not_positions(tmp_path):
    """Classes 1,3,4 (a Severstal excerpt without ClassId 2): a row of class 2 is no class, never class 3."""
    root = make_table(tmp_path, boxes(2, classes=3), ["1", "3", "4"], extra_rows=[("case0_slice_0000", "2", "1 2")])
    with pytest.raises(DataError, match=r"line 8: class '2' is none of the classes \(1, 3, 4\)"):
        open_data(root, masks_csv="train.csv", classes="background,1,3,4")


# --- bad input: one line naming the file and the row ---


@pytest.mark.parametrize(
    "rle, message",
    [
        ("1 3 7", "RLE has an odd count of numbers; it must be start/length pairs (image of 240 pixels)"),
        ("1 a", "RLE has a character that is not a digit or a space (image of 240 pixels)"),
        ("1 0", "RLE has a run of length zero (image of 240 pixels)"),
        ("1 -2", "RLE has a character that is not a digit or a space (image of 240 pixels)"),
        ("5 3 2 2", "RLE has runs out of order or overlapping (image of 240 pixels)"),
        ("5 3 6 2", "RLE has runs out of order or overlapping (image of 240 pixels)"),
        ("230 20", "RLE has a run past the end of the image (image of 240 pixels)"),
    ],
)
def test_a_malformed_run_names_the_file_and_its_line(tmp_path, rle, message):
    root = make_table(tmp_path, boxes(2), ["a", "b", "c"], extra_rows=[("case0_slice_0001", "b", rle)])
    data = open_data(root, masks_csv="train.csv")
    with pytest.raises(DataError) as error:
        data.read_mask("case0_slice_0001")
    fix = RELATIVE_FIX if "out of order" in message else "fix the row"  # these two read as relative runs too
    assert str(error.value) == f"{root / 'train.csv'}: line 8 (image case0_slice_0001): {message}; {fix}"
    problems = survey_problems(data)
    assert len(problems) == 1 and problems[0].startswith("train.csv: line 8 (image case0_slice_0001")


def survey_problems(data) -> list[str]:
    """inspect_data's problems: the pre-check's lines."""
    return [problem for problem in describe(data, None, progress=False)[1] if "line" in problem]


def test_an_unknown_class_stops_at_open_with_its_line(tmp_path):
    root = make_table(tmp_path, boxes(2), ["a", "b", "c"], extra_rows=[("case0_slice_0001", "liver", "1 2")])
    with pytest.raises(DataError) as error:
        open_data(root, masks_csv="train.csv", classes="background,a,b,c")
    assert str(error.value) == (
        f"{root / 'train.csv'}: line 8: class 'liver' is none of the classes (a, b, c) nor their number 1..3; fix "
        "the row, or name every class with --classes (background first, unless --head multilabel: its classes "
        "overlap and have no background)"
    )
    with pytest.raises(DataError, match="line 8: class '4' is none of the classes"):  # past the classes' numbers
        make_table(tmp_path, boxes(2), ["1", "2", "3"], extra_rows=[("case0_slice_0001", "4", "1 2")])
        open_data(tmp_path, masks_csv="train.csv", classes="background,a,b,c")


def test_a_table_without_the_named_columns_says_which_to_name(tmp_path):
    root = make_table(tmp_path, boxes(2), ["1", "2", "3"], columns=("ImageId", "ClassId", "EncodedPixels"))
    with pytest.raises(DataError) as error:
        open_data(root, masks_csv="train.csv")
    assert str(error.value) == (
        f"{root / 'train.csv'}: no column id, class, segmentation (its columns: ImageId, ClassId, EncodedPixels); "
        "name the id, class and RLE columns with --rle-columns, e.g. --rle-columns ImageId,ClassId,EncodedPixels"
    )
    with pytest.raises(ConfigError, match="--rle-columns 'ImageId': name the id, class and RLE columns"):
        open_data(root, masks_csv="train.csv", rle_columns="ImageId")


def test_the_layout_needs_its_table_and_the_table_its_layout(tmp_path):
    root = make_table(tmp_path, boxes(2), ["a", "b", "c"])
    with pytest.raises(ConfigError, match="--layout rle-table reads masks from a table: name it with --masks-csv"):
        open_data(root, layout="rle-table")
    with pytest.raises(ConfigError, match="--masks-csv is for the rle-table layout; --layout folders reads its own"):
        open_data(root, layout="folders", masks_csv="train.csv")
    with pytest.raises(DataError, match="--masks-csv nothere.csv: not found"):
        open_data(root, masks_csv="nothere.csv")
    with pytest.raises(ConfigError, match="--masks is for image/mask folders"):
        open_data(root, masks_csv="train.csv", masks="gt")
    with pytest.raises(ConfigError, match="--rle-columns and --rle-order describe the table --masks-csv names"):
        open_data(root, images="train", masks="train", rle_order="column")


@pytest.mark.parametrize("head", ["auto", "multilabel"])
def test_make_folds_stratifies_by_the_table_classes(tmp_path, head):
    masks = boxes(8, overlap=head == "multilabel")
    root = make_table(tmp_path / "d", masks, ["a", "b", "c"])
    folds = tmp_path / "folds.csv"
    flags = ["--data-dir", str(root), "--masks-csv", "train.csv", "--head", head, "--n-folds", "2"]
    make_folds.main([*flags, "--group-regex", r"^(case\d+)_", "--out", str(folds), "--quiet"])
    written = pd.read_csv(folds)
    assert sorted(written["img"]) == sorted(masks) and set(written["fold"]) == {0, 1}
    assert (written.groupby("group")["fold"].nunique() == 1).all()


def test_what_the_layout_cannot_read_is_said(tmp_path):
    root = make_table(tmp_path, boxes(2), ["a", "b", "c"])
    with pytest.raises(DataError, match=r"scans: no such folder; the images of --masks-csv are in train/, or name"):
        open_data(root, masks_csv="train.csv", images="scans")
    with pytest.raises(ConfigError, match=r"--split with --masks-csv takes lists of ids \(a .txt file per split"):
        open_data(root, masks_csv="train.csv", split="train=train,val=train")
    many = {"x": np.zeros((8, 4, 4), np.uint8)}
    make_table(tmp_path, many, [f"c{k}" for k in range(8)])
    with pytest.raises(DataError, match="train.csv: 8 classes; --head multilabel holds at most 7"):
        open_data(root, masks_csv="train.csv", head="multilabel")


def test_train_stops_on_a_malformed_row_before_the_first_step(tmp_path, capsys):
    root = make_table(tmp_path / "d", boxes(6), ["a", "b", "c"], extra_rows=[("case0_slice_0001", "b", "1 3 7")])
    folds = tmp_path / "folds.csv"
    ids = sorted(boxes(6))
    pd.DataFrame({"img": ids, "group": ids, "fold": [0, 1] * 3}).to_csv(folds, index=False)
    with pytest.raises(SystemExit) as stop:
        train.main(
            ["--data-dir", str(root), "--masks-csv", "train.csv", "--folds-csv", str(folds), "--out",
             str(tmp_path / "run"), "--size", "full", "--epochs", "1", "--batch-size", "2", "--workers", "0",
             "--encoder-weights", "none", "--device", "cpu", "--quiet"]
        )  # fmt: skip
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1 and "Traceback" not in error, error
    assert "train.csv: line 20 (image case0_slice_0001): RLE has an odd count of numbers" in error


@pytest.mark.slow
def test_train_py_refuses_an_unknown_class_in_one_line(tmp_path):
    root = make_table(tmp_path / "d", boxes(2), ["a", "b", "c"], extra_rows=[("case0_slice_0001", "z", "1 2")])
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--data-dir", str(root), "--masks-csv", "train.csv", "--classes",
         "background,a,b,c", "--out", str(tmp_path / "run"), "--device", "cpu"],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "train.csv: line 8: class 'z' is none of the classes (a, b, c)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_class_numbers_are_never_positions_when_the_class_names_are_numbers():
    from competition.rle_table import class_index

    assert class_index("2", ["crack", "scratch"]) == 1  # Severstal's ClassId: the 1-based position
    assert class_index("3", ["1", "3", "4"]) == 1  # by name
    assert class_index("2", ["1", "3", "4"]) is None  # not the second class, "3"
