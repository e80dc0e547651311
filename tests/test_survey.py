"""The pass before training: every mask read once, the same counts on any number of threads, broken samples named."""

import collections
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from competition import survey as survey_module
from competition.carvana import CarvanaData
from competition.errors import DataError
from competition.inspect_data import main as inspect_data
from competition.layouts import open_data
from competition.survey import stored_value_histogram, survey
from tests.conftest import CARVANA_BREAKAGES, break_carvana_sample
from tests.layout_fixtures import FOLDER_BREAKAGES, break_folders_sample, make_folders, make_labelme, make_pet
from tests.shipped_fixtures import make_binary_255, make_camvid


def counting_reads(data, monkeypatch) -> collections.Counter:
    """image id -> how often its mask file was decoded, for this data set object."""
    reads: collections.Counter = collections.Counter()
    real = data._mask

    def counted(image_id, split="train"):
        reads[image_id] += 1
        return real(image_id, split)

    monkeypatch.setattr(data, "_mask", counted)
    return reads


def make_camvid_colours(root):
    """CamVid's folders, masks painted in the colours of a class_dict.csv: decoded through the mask cache."""
    return open_data(make_camvid(root), split="train=train,val=val,test=test")


@pytest.mark.parametrize(
    "make",
    [
        lambda root: open_data(make_folders(root)),
        lambda root: open_data(make_labelme(root)),
        lambda root: open_data(make_pet(root)),
        make_camvid_colours,
    ],
    ids=["folders", "labelme", "pet", "colours"],
)
@pytest.mark.parametrize("threads", [1, 4])
def test_checked_counts_read_each_mask_once_and_equal_the_plain_counts(tmp_path, monkeypatch, make, threads):
    monkeypatch.setenv("CARVANA_WORK_DIR", str(tmp_path / "work"))  # the colour masks' cache
    data = make(tmp_path / "data")
    image_ids = data.train_ids()
    expected = np.stack([data.class_pixel_counts(image_id) for image_id in image_ids])
    shutil.rmtree(tmp_path / "work", ignore_errors=True)  # colours decoded and cached by the threads themselves
    reads = counting_reads(data, monkeypatch)
    counts = survey(data, image_ids, check=True, count=len(image_ids), threads=threads, progress=False)
    assert counts.dtype == np.int64 and counts.shape == (len(image_ids), data.num_classes)
    np.testing.assert_array_equal(counts, expected)  # in the order of image_ids, whatever thread finished first
    assert reads == {image_id: 1 for image_id in image_ids}
    assert not list((tmp_path / "work").rglob("*.partial"))


def test_only_the_first_images_are_counted_and_an_id_given_twice_counts_twice(tmp_path):
    data = open_data(make_folders(tmp_path))
    image_ids = data.train_ids()
    ids = image_ids + image_ids[:1]  # --train-on: a validation image may also be a training one
    counts = survey(data, ids, check=True, count=len(ids), threads=3, progress=False)
    np.testing.assert_array_equal(counts[-1], counts[0])
    first_three = survey(data, ids, check=True, count=3, threads=3, progress=False)
    np.testing.assert_array_equal(first_three, counts[:3])


def test_broken_samples_are_gathered_into_one_error_naming_the_first_three(tmp_path):
    root = make_folders(tmp_path)
    data = open_data(root)
    image_ids = data.train_ids()
    for image_id in image_ids[:4]:
        (root / "masks" / f"{image_id}.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as raised:
        survey(data, image_ids, check=True, count=len(image_ids), threads=3, progress=False)
    said = str(raised.value)
    assert said.startswith(f"4 of {len(image_ids)} training samples are broken: ") and "(and 1 more)" in said
    named = said.split("(and")[0]
    assert all(image_id in named for image_id in image_ids[:3]) and image_ids[3] not in named
    assert "pass --no-check" in said


def test_unchecked_counting_raises_the_first_broken_mask_in_order(tmp_path):
    root = make_folders(tmp_path)
    data = open_data(root)
    image_ids = data.train_ids()
    for image_id in (image_ids[2], image_ids[-1]):
        (root / "masks" / f"{image_id}.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=image_ids[2]) as raised:
        survey(data, image_ids, check=False, count=len(image_ids), threads=4, progress=False)
    assert "training samples are broken" not in str(raised.value)


def test_an_error_drops_the_images_not_yet_started(tmp_path, monkeypatch):
    root = make_folders(tmp_path, count=12)
    data = open_data(root)
    image_ids = data.train_ids()
    (root / "masks" / f"{image_ids[0]}.png").write_bytes(b"not a png")
    reads = counting_reads(data, monkeypatch)
    slowly = data._mask
    monkeypatch.setattr(data, "_mask", lambda *args: time.sleep(0.05) or slowly(*args))
    with pytest.raises(DataError, match=image_ids[0]):
        survey(data, image_ids, check=False, count=len(image_ids), threads=1, progress=False)
    assert sum(reads.values()) <= 4, "the rest were cancelled, not read after the error"  # all 12 if waited for


def test_nothing_asked_reads_nothing(tmp_path, monkeypatch):
    data = open_data(make_folders(tmp_path))
    reads = counting_reads(data, monkeypatch)
    assert survey(data, data.train_ids(), check=False, count=0, progress=False) is None
    assert survey(data, [], check=True, count=0, progress=False) is None
    assert not reads


@pytest.mark.parametrize("mask_source", ["gif", "csv"])
def test_carvana_checked_alone_draws_no_mask_and_still_finds_a_broken_one(data_copy, monkeypatch, mask_source):
    root, data = data_copy, CarvanaData(data_copy, mask_source=mask_source)
    image_ids = data.train_ids()
    decoded = []
    real = data.read_mask
    monkeypatch.setattr(data, "read_mask", lambda *args, **kwargs: decoded.append(args) or real(*args, **kwargs))
    assert survey(data, image_ids, check=True, count=0, threads=2, progress=False) is None
    assert decoded == []  # the GIF decoded to its end but not made 0/1, or the CSV row parsed without drawing it
    victim = image_ids[5]
    break_carvana_sample(root, victim, "gif" if mask_source == "gif" else "rle")
    data = CarvanaData(root, mask_source=mask_source)
    with pytest.raises(DataError, match=rf"^1 of {len(image_ids)} training samples are broken: .*{victim}"):
        survey(data, image_ids, check=True, count=0, threads=2, progress=False)


@pytest.mark.parametrize("archive", ["folders", "zips"])
@pytest.mark.parametrize("mask_source", ["gif", "csv"])
def test_carvana_counts_on_threads_match_one_by_one(request, archive, mask_source, monkeypatch):
    data = CarvanaData(request.getfixturevalue("data_dir" if archive == "folders" else "zip_dir"), mask_source)
    image_ids = data.train_ids()
    expected = np.stack([data.class_pixel_counts(image_id) for image_id in image_ids])
    fresh = CarvanaData(data.root, mask_source)  # nothing parsed or opened yet: the threads race for it
    parses = []
    real = fresh.read_csv
    monkeypatch.setattr(fresh, "read_csv", lambda *args: parses.append(args) or real(*args))
    counts = survey(fresh, image_ids, check=True, count=len(image_ids), threads=4, progress=False)
    np.testing.assert_array_equal(counts, expected)
    height, width = data.image_shape(image_ids[0])
    assert (counts.sum(1) == height * width).all() and (counts[:, 1] > 0).all()
    assert len(parses) == (1 if mask_source == "csv" else 0)  # train_masks.csv parsed once, not by each thread


@pytest.mark.parametrize("threads", [1, 4])
def test_stored_values_are_counted_from_one_read_of_each_mask(tmp_path, threads):
    root = make_binary_255(tmp_path)
    stems = sorted(path.stem for path in (root / "masks").glob("*.png"))
    reads: collections.Counter = collections.Counter()

    def read_stored(stem):
        reads[stem] += 1
        return np.asarray(Image.open(root / "masks" / f"{stem}.png"))

    expected = sum(
        np.bincount(np.asarray(Image.open(root / "masks" / f"{stem}.png")).ravel(), minlength=256) for stem in stems
    )
    histogram = stored_value_histogram(read_stored, stems, threads)
    np.testing.assert_array_equal(histogram, expected)
    assert histogram.dtype == np.int64 and set(np.flatnonzero(histogram)) == {0, 255}
    assert reads == {stem: 1 for stem in stems}


def test_threads_are_the_cores_up_to_a_cap(monkeypatch):
    monkeypatch.setattr(survey_module.os, "cpu_count", lambda: 64)
    assert survey_module.survey_threads() == survey_module.MAX_THREADS
    monkeypatch.setattr(survey_module.os, "cpu_count", lambda: None)
    assert survey_module.survey_threads() == 1


def test_a_fold_set_up_on_another_layout_reads_each_mask_once(tmp_path, monkeypatch):
    from competition.fold_data import open_training_data, set_up_fold
    from make_folds import main as make_folds
    from tests.conftest import small_config

    root = make_folders(tmp_path / "data")
    folds = tmp_path / "folds.csv"
    make_folds(["--data-dir", str(root), "--n-folds", "2", "--group-regex", r"^(.+)_\d+$", "--out", str(folds)])
    config = replace(small_config(root, folds, tmp_path / "run", class_weights="inverse"), batch_size=2)
    config, data = open_training_data(config)
    reads = counting_reads(data, monkeypatch)
    fold = set_up_fold(config, data, torch.device("cpu"), progress=False)
    assert reads == {image_id: 1 for image_id in data.train_ids()}  # checked, counted and weighed from one read
    assert len(fold.config.class_weight_values.split(",")) == data.num_classes


def assert_found_by_the_check_and_inspect_data(data, flags: list[str], victim: str, capsys) -> str:
    """The pre-check stops on the broken sample in one line naming it, counted or not; inspect_data lists the same
    line as its one problem and exits 1. Returns that line."""
    image_ids = data.train_ids()
    for count in (0, len(image_ids)):  # checked alone (Carvana's default), and counted (--class-weights)
        with pytest.raises(
            DataError, match=rf"^1 of {len(image_ids)} training samples are broken: .*{victim}"
        ) as caught:
            survey(data, image_ids, check=True, count=count, threads=2, progress=False)
        assert "\n" not in str(caught.value)
    assert inspect_data([*flags, "--quiet"]) == 1
    listed = capsys.readouterr().out.split("problems (1):\n")[1].strip()
    assert victim in listed and listed in str(caught.value)
    return listed


@pytest.mark.parametrize("part", CARVANA_BREAKAGES)
def test_every_broken_carvana_copy_stops_the_check_and_is_listed_by_inspect_data(data_copy, capsys, part):
    victim = CarvanaData(data_copy).train_ids()[5]
    break_carvana_sample(data_copy, victim, part)
    source = CARVANA_BREAKAGES[part]
    data = CarvanaData(data_copy, mask_source=source)
    listed = assert_found_by_the_check_and_inspect_data(
        data, ["--data-dir", str(data_copy), "--mask-source", source], victim, capsys
    )
    if part.startswith("truncated"):  # the file named inside the data folder, and the fix
        name = (
            f"train/{victim}.jpg: the image" if part == "truncated-jpeg" else f"train_masks/{victim}_mask.gif: the mask"
        )
        assert listed.startswith(f"{name} does not decode (image file is truncated")
        assert listed.endswith("replace it, or remove the sample")


@pytest.mark.parametrize("part", FOLDER_BREAKAGES)
def test_every_broken_folders_copy_stops_the_check_and_is_listed_by_inspect_data(tmp_path, capsys, part):
    root = make_folders(tmp_path / "data")
    victim = "scene1_2"
    break_folders_sample(root, victim, part)
    listed = assert_found_by_the_check_and_inspect_data(open_data(root), ["--data-dir", str(root)], victim, capsys)
    assert listed.startswith("images/" if part in ("truncated-jpeg", "mask-size") else "masks/")


def test_no_module_lets_pillow_load_truncated_images():
    from PIL import ImageFile

    import competition.inspect_data  # every layout and the checks imported
    import competition.training  # noqa: F401

    assert not ImageFile.LOAD_TRUNCATED_IMAGES
