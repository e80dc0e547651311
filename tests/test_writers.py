"""One prediction stream, every writer: PNG masks and per-class RLE rows on several devices, stopped by the clock,
resumed after a killed worker; out-of-fold scores, masks and worst overlays of a multi-class model."""

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import infer
from competition.errors import ConfigError
from competition.inference import Ensemble, find_checkpoints, load_member, write_predictions
from competition.layouts import open_data
from competition.logs import configure
from competition.metrics import score_mask_folders
from competition.out_of_fold import out_of_fold
from competition.rle import rle_decode
from competition.synthetic import generate_parts
from competition.writers import Output
from make_folds import main as make_folds
from tests.test_cluster import ray_installed
from tests.test_cluster import run as run_command
from tests.test_inference import run_infer, thirty_seconds_a_batch
from tests.test_shards import session_processes
from train import main as train

TRAIN_FLAGS = ["--encoder", "resnet18", "--encoder-weights", "none", "--workers", "0", "--quiet", "--batch-size", "4"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(the synthetic car-parts data set: 32 training and 32 test images of 144x96, 5 classes; its folds file;
    a run of fold 0, one epoch at 64x96)."""
    root = tmp_path_factory.mktemp("parts")
    data = generate_parts(root / "data", cars=2, test_cars=2, width=144, height=96, seed=1, jobs=1)
    folds = root / "folds.csv"
    make_folds(["--data-dir", str(data), "--n-folds", "2", "--group-regex", r"^(.+)_\d+$", "--out", str(folds)])
    run = root / "run"
    flags = ["--data-dir", str(data), "--folds-csv", str(folds), "--out", str(run), "--fold", "0"]
    train([*flags, "--size", "64x96", "--epochs", "1", *TRAIN_FLAGS])
    return data, folds, run


def masks_of(folder: Path) -> dict[str, bytes]:
    """Every PNG under ``folder`` (masks and overlays) by its path inside it, as bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*.png"))}


@pytest.mark.slow
@pytest.mark.usefixtures("threads_as_cpu_shards")
def test_png_masks_on_two_cpu_devices_are_the_files_of_one_device(parts, tmp_path, capfd, caplog):
    data, _, run = parts
    common = ["--checkpoints", str(run), "--tta", "--workers", "0", "--batch-size", "2", "--overlays"]
    infer.main([*common, "--out", str(tmp_path / "one")])
    infer.main([*common, "--out", str(tmp_path / "two"), "--devices", "cpu,cpu"])
    one, two = masks_of(tmp_path / "one"), masks_of(tmp_path / "two")
    assert len(one) == 2 * 32 and one == two
    printed = capfd.readouterr().out
    assert "32 test images to predict (0 kept from an interrupted run) in 2 shard(s) on 2 x cpu" in printed
    assert "cpu shard 2/2: 16 test images on cpu" in printed and "32 palette PNG masks" in printed
    # scored with no flags: the classes come from the record infer.py left beside the masks
    caplog.set_level(logging.INFO, logger="competition")
    scores = score_mask_folders(tmp_path / "two", data / "test_masks")
    assert f"5 classes (background, body, glass, wheels, lights) from {tmp_path / 'two' / 'predicted-by.json'}" in (
        caplog.text
    )
    truth = {path.stem: np.asarray(Image.open(path)) for path in (data / "test_masks").glob("*.png")}
    predicted = {stem: np.asarray(Image.open(tmp_path / "two" / f"{stem}.png")) for stem in truth}
    matrix = sum(numpy_confusion(predicted[stem], truth[stem], 5, 255) for stem in truth).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    assert scores["miou"] == pytest.approx(np.mean(np.diag(matrix)[union > 0] / union[union > 0]), abs=1e-6)


@pytest.mark.slow
@pytest.mark.usefixtures("threads_as_cpu_shards")
def test_per_class_rle_rows_stopped_by_the_clock_and_resumed_are_the_uninterrupted_file(
    parts, tmp_path, monkeypatch, caplog, capsys
):
    caplog.set_level(logging.INFO, logger="competition")
    data, _, run = parts
    deadline = thirty_seconds_a_batch(monkeypatch)
    members = [load_member(path, torch.device("cpu")) for path in find_checkpoints([run])]
    out = tmp_path / "parts.csv"
    output = Output("rle-csv", str(out), 5, "column")
    settings = {"workers": 0, "progress": False, "deadline": deadline}
    assert write_predictions(Ensemble(members, ("hflip",)), open_data(data), output, **settings) is None
    # batches of 4 at 0, 30 and 60 s; 12 images of 4 rows each kept
    assert not out.exists() and len((tmp_path / "parts.csv.partial").read_text().splitlines()) == 1 + 12 * 4
    assert f"{out}: stopped by the time limit 1m35s at a batch boundary: 12 of the 32 test images" in caplog.text
    monkeypatch.undo()
    common = ["--checkpoints", str(run), "--tta", "--workers", "0", "--format", "rle-csv", "--rle-order", "column"]
    with pytest.raises(SystemExit) as exit_info:
        infer.main([*common, "--out", str(out)])  # the rows kept are never dropped unasked
    assert exit_info.value.code == 2 and "pass --resume to keep them" in capsys.readouterr().err
    infer.main([*common, "--out", str(out), "--resume"])
    infer.main([*common, "--out", str(tmp_path / "uninterrupted.csv")])
    assert out.read_bytes() == (tmp_path / "uninterrupted.csv").read_bytes()
    rows = pd.read_csv(out, keep_default_na=False)
    assert list(rows.columns) == ["ImageId_ClassId", "EncodedPixels"] and len(rows) == 32 * 4
    # the CLI's own clock: spent before the first batch, exit 3, then --resume on two devices finishes it
    stopped = tmp_path / "stopped.csv"
    with pytest.raises(SystemExit) as exit_info:
        infer.main([*common, "--out", str(stopped), "--time-limit", "0.001s"])
    assert exit_info.value.code == 3 and not stopped.exists()
    infer.main([*common, "--out", str(stopped), "--resume", "--devices", "cpu,cpu"])
    assert stopped.read_bytes() == out.read_bytes()


@pytest.mark.slow
@pytest.mark.usefixtures("threads_as_cpu_shards")
def test_a_killed_shard_worker_of_a_png_run_resumed_gives_the_same_files(parts, tmp_path):
    run = parts[2]
    out = tmp_path / "masks"
    flags = ["--checkpoints", str(run), "--workers", "0", "--batch-size", "1", "--out", str(out)]
    driver = subprocess.Popen(
        [sys.executable, "infer.py", *flags, "--devices", "cpu,cpu"],
        cwd=Path(infer.__file__).parent,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.png"))) < 2:  # the shards are writing masks
            assert driver.poll() is None and time.monotonic() < deadline, "the shards did not start"
            time.sleep(0.02)
        workers = [pid for pid in session_processes(driver.pid) if pid != driver.pid]
        for pid in workers:  # paused first: none finishes while the victim is chosen
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        shard_workers = [pid for pid in workers if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(shard_workers) == 2, "a worker process per shard, both still predicting"
        victim = shard_workers[0]
        os.kill(victim, signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # the victim's signal is moot
        _, error = driver.communicate(timeout=300)
    finally:
        for pid in session_processes(driver.pid):
            os.kill(pid, signal.SIGKILL)
    assert driver.returncode == 1 and "FAILED: its worker process died (exit code -9)" in error
    assert 0 < len(list(out.glob("*.png"))) < 32, "killed mid-way"
    assert not list(out.glob("*.partial")), "no half-written mask"
    infer.main([*flags, "--devices", "cpu,cpu", "--resume"])
    infer.main(
        ["--checkpoints", str(run), "--workers", "0", "--batch-size", "1", "--out", str(tmp_path / "uninterrupted")]
    )
    assert masks_of(out) == masks_of(tmp_path / "uninterrupted") and len(masks_of(out)) == 32


def numpy_confusion(predicted: np.ndarray, truth: np.ndarray, classes: int, ignore_index: int) -> np.ndarray:
    """The confusion matrix by plain numpy: rows truth, columns prediction, ignored truth pixels left out."""
    labelled = truth != ignore_index
    pairs = truth[labelled].astype(np.int64) * classes + predicted[labelled]
    return np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


@pytest.mark.slow
def test_out_of_fold_of_a_multi_class_model_scores_writes_masks_and_draws_the_worst(parts, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="competition")
    data, folds, run = parts
    flags = ["--oof", "--tta", "--checkpoints", str(run), "--workers", "0", "--out-dir", str(tmp_path / "scores")]
    infer.main([*flags, "--out", str(tmp_path / "oof_masks"), "--worst", "3"])
    scores = pd.read_csv(tmp_path / "scores" / "oof.csv")
    held_out = pd.read_csv(folds).query("fold == 0")
    assert sorted(scores["img"]) == sorted(held_out["img"]) and "miou" in scores.columns
    worst = scores.nsmallest(3, "miou")
    expected = [f"worst{rank:02d}_{img}_miou{score:.4f}.png" for rank, (img, score) in
                enumerate(zip(worst["img"], worst["miou"]), start=1)]  # fmt: skip
    assert sorted(path.name for path in (tmp_path / "scores").glob("worst*.png")) == expected
    assert "lights" in caplog.text and "out of fold with TTA hflip" in caplog.text
    # the confusion matrix agrees with numpy over the masks it wrote and the truth as training reads it
    dataset = open_data(data)
    truth = {image_id: dataset.read_mask(image_id) for image_id in scores["img"]}
    written = {image_id: np.asarray(Image.open(tmp_path / "oof_masks" / f"{image_id}.png")) for image_id in truth}
    expected_confusion = sum(numpy_confusion(written[i], truth[i], 5, 255) for i in truth)
    members = [load_member(path, torch.device("cpu")) for path in find_checkpoints([run])]
    fold_scores = out_of_fold(members, dataset, folds, ("hflip",), "fp32", workers=0)
    np.testing.assert_array_equal(np.asarray(fold_scores.confusion["tta"]), expected_confusion)
    for image_id, row in zip(scores["img"], scores["miou"]):  # each image's mIoU, classes in neither left out
        matrix = numpy_confusion(written[image_id], truth[image_id], 5, 255).astype(float)
        union = matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
        assert row == pytest.approx(np.mean(np.diag(matrix)[union > 0] / union[union > 0]), abs=1e-6)


@pytest.mark.slow
def test_an_out_of_fold_file_of_other_checkpoints_is_not_replaced_unasked(parts, tmp_path, capsys):
    run = parts[2]
    other = tmp_path / "other" / "fold0"
    other.mkdir(parents=True)
    (other / "best.pt").write_bytes((run / "fold0" / "best.pt").read_bytes())
    flags = ["--oof", "--workers", "0", "--worst", "0", "--out-dir", str(tmp_path / "scores")]
    infer.main([*flags, "--checkpoints", str(run)])
    infer.main([*flags, "--checkpoints", str(run)])  # the same models scored again: replaced
    written = (tmp_path / "scores" / "oof.csv").read_bytes()
    error = run_infer([*flags, "--checkpoints", str(other.parent)], capsys)
    assert "oof.csv holds the out-of-fold scores of other checkpoints; pass --overwrite" in error
    assert (tmp_path / "scores" / "oof.csv").read_bytes() == written
    infer.main([*flags, "--checkpoints", str(other.parent), "--overwrite"])


@pytest.mark.slow
@ray_installed
def test_png_masks_as_ray_shards_are_the_files_of_one_device(parts, tmp_path):
    data, _, run = parts
    common = ["--checkpoints", str(run), "--data-dir", str(data), "--tta", "--workers", "0", "--batch-size", "2"]
    infer.main([*common, "--out", str(tmp_path / "one")])
    finished = run_command("infer.py", *common, "--out", str(tmp_path / "ray"), "--backend", "ray", "--shards", "3")
    assert finished.returncode == 0, finished.stderr
    assert "32 test images to predict (0 kept from an interrupted run) in 3 shard(s) on 3 x cpu" in finished.stdout
    assert masks_of(tmp_path / "ray") == masks_of(tmp_path / "one") and len(masks_of(tmp_path / "one")) == 32
    assert not list(tmp_path.glob(".ray-attempts-*")), "the attempts record removed"


@pytest.mark.slow
def test_every_writer_stores_the_same_masks_of_a_carvana_model(trained_run, data_dir, tmp_path):
    """The default RLE rows, per-class rows and PNG masks of one ensemble decode to the same masks."""
    common = ["--checkpoints", str(trained_run), "--data-dir", str(data_dir), "--workers", "0"]
    infer.main([*common, "--out", str(tmp_path / "submission.csv")])
    infer.main([*common, "--format", "rle-csv", "--out", str(tmp_path / "classes.csv")])
    infer.main([*common, "--format", "png", "--out", str(tmp_path / "masks")])
    rows = pd.read_csv(tmp_path / "submission.csv", keep_default_na=False)
    per_class = pd.read_csv(tmp_path / "classes.csv", keep_default_na=False)
    assert per_class["ImageId_ClassId"].tolist() == [f"{img[:-4]}_1" for img in sorted(rows["img"])]
    by_class = dict(zip(per_class["ImageId_ClassId"], per_class["EncodedPixels"]))
    for img, rle in zip(rows["img"], rows["rle_mask"]):
        png = np.asarray(Image.open(tmp_path / "masks" / f"{img[:-4]}.png"))
        np.testing.assert_array_equal(rle_decode(rle, png.shape), png)
        assert by_class[f"{img[:-4]}_1"] == rle
    with pytest.raises(SystemExit) as exit_info:
        infer.main([*common, "--format", "rle", "--overlays", "--out", str(tmp_path / "again.csv")])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_resume_never_mixes_formats_nor_touches_pngs_it_did_not_write(parts, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level(logging.INFO, logger="competition")
    data, _, run = parts
    members = [load_member(path, torch.device("cpu")) for path in find_checkpoints([run])]
    out = tmp_path / "parts.csv"
    settings = {"workers": 0, "progress": False}
    deadline = thirty_seconds_a_batch(monkeypatch)  # stopped after 3 batches, column-major
    column = Output("rle-csv", str(out), 5, "column")
    assert write_predictions(Ensemble(members), open_data(data), column, deadline=deadline, **settings) is None
    monkeypatch.undo()
    row = Output("rle-csv", str(out), 5, "row")
    write_predictions(Ensemble(members), open_data(data), row, resume=True, **settings)
    assert "predicted by other models or settings (output" in caplog.text
    write_predictions(Ensemble(members), open_data(data), Output("rle-csv", str(tmp_path / "fresh.csv"), 5), **settings)
    assert out.read_bytes() == (tmp_path / "fresh.csv").read_bytes()
    # a finished output resumed: validated as it is
    assert len(write_predictions(Ensemble(members), open_data(data), row, resume=True, **settings)) == 32 * 4
    # a folder of PNGs infer.py did not write is neither written into nor emptied, even with --overwrite
    own = tmp_path / "own"
    own.mkdir()
    (own / "photo.png").write_bytes(b"not ours")
    with pytest.raises(ConfigError, match=r"holds 1 \.png file\(s\) that infer.py did not write"):
        infer.main(["--checkpoints", str(run), "--workers", "0", "--out", str(own), "--overwrite", "--debug"])
    assert (own / "photo.png").read_bytes() == b"not ours"


def parts_sample(data: Path, path: Path) -> list[tuple[str, str]]:
    """A UW-Madison style sample submission (id,class,predicted) of 30 of the 32 test images of ``parts``, its rows
    class by class (not grouped by image) and shuffled; its (id, class) pairs in order."""
    test_ids = sorted(path.stem for path in (data / "test").glob("*.jpg")) or sorted(
        path.stem for path in (data / "test").iterdir()
    )
    pairs = [(image_id, name) for name in ("lights", "body", "glass", "wheels") for image_id in test_ids[2:]]
    order = np.random.default_rng(5).permutation(len(pairs))
    pairs = [pairs[index] for index in order]
    pd.DataFrame([(*pair, "") for pair in pairs], columns=["id", "class", "predicted"]).to_csv(path, index=False)
    return pairs


@pytest.mark.slow
@pytest.mark.usefixtures("threads_as_cpu_shards")
def test_sample_submission_rows_stopped_by_the_clock_and_resumed_on_two_devices(
    parts, tmp_path, monkeypatch, caplog, capsys
):
    configure()  # the project's handlers on this test's streams: write_predictions logs before any infer.main
    caplog.set_level(logging.INFO, logger="competition")
    data, _, run = parts
    sample = tmp_path / "sample_submission.csv"
    pairs = parts_sample(data, sample)
    deadline = thirty_seconds_a_batch(monkeypatch)
    members = [load_member(path, torch.device("cpu")) for path in find_checkpoints([run])]
    out = tmp_path / "sub.csv"
    classes = ("body", "glass", "wheels", "lights")
    output = Output("rle-csv", str(out), 5, "column", sample_submission=str(sample), classes=classes)
    settings = {"workers": 0, "progress": False, "deadline": deadline}
    assert write_predictions(Ensemble(members, ("hflip",)), open_data(data), output, **settings) is None
    assert f"{sample} lists 30 of the 32 test images: the 2 others are not predicted" in caplog.text
    assert not out.exists() and len((tmp_path / "sub.csv.partial").read_text().splitlines()) == 1 + 12 * 4
    monkeypatch.undo()
    common = ["--checkpoints", str(run), "--tta", "--workers", "0", "--rle-order", "column"]
    infer.main([*common, "--sample-submission", str(sample), "--out", str(out), "--resume", "--devices", "cpu,cpu"])
    infer.main([*common, "--sample-submission", str(sample), "--out", str(tmp_path / "uninterrupted.csv")])
    assert out.read_bytes() == (tmp_path / "uninterrupted.csv").read_bytes()
    rows = pd.read_csv(out, keep_default_na=False)
    assert list(rows.columns) == ["id", "class", "predicted"] and list(zip(rows["id"], rows["class"])) == pairs
    assert not list(tmp_path.glob("sub.csv.*")), "no partial, shard or record file left"
    # each row holds its class's mask: the per-class rows of the same models (ImageId_ClassId, class k = index k)
    infer.main([*common, "--format", "rle-csv", "--out", str(tmp_path / "classes.csv")])
    by_key = pd.read_csv(tmp_path / "classes.csv", keep_default_na=False).set_index("ImageId_ClassId")["EncodedPixels"]
    numbers = {name: number for number, name in enumerate(classes, start=1)}
    assert [by_key[f"{image}_{numbers[name]}"] for image, name in pairs] == rows["predicted"].tolist()
    assert rows["predicted"].str.len().gt(0).any()
    # a sample naming a class the run does not predict, or a format of other rows: one line each
    pd.DataFrame([("x", "tyre", "")], columns=["id", "class", "predicted"]).to_csv(tmp_path / "bad.csv", index=False)
    bad = ["--checkpoints", str(run), "--workers", "0", "--out", str(tmp_path / "bad_out.csv")]
    error = run_infer([*bad, "--sample-submission", str(tmp_path / "bad.csv")], capsys)
    assert (
        "bad.csv: row 2: class 'tyre' is none of the run's classes body,glass,wheels,lights nor their number" in error
    )
    error = run_infer([*bad, "--sample-submission", str(sample), "--format", "png"], capsys)
    assert "--sample-submission writes per-class RLE rows (--format rle-csv), not --format png" in error


@pytest.mark.slow
def test_oof_tune_writes_postprocess_json_that_infer_applies(parts, tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="competition")
    _, folds, trained = parts
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    flags = ["--checkpoints", str(run), "--workers", "0"]
    infer.main([*flags, "--oof", "--tune", "--folds-csv", str(folds), "--out-dir", str(tmp_path / "oof")])
    tuned = json.loads((run / "postprocess.json").read_text())
    assert tuned["head"] == "softmax" and tuned["classes"] == ["body", "glass", "wheels", "lights"]
    assert all(rule["threshold"] is None for rule in tuned["rules"]) and tuned["tuned"]["images"] == 16
    assert "post-processing tuned out of fold on 16 images" in caplog.text
    assert tuned["tuned"]["tuned_dice"] >= tuned["tuned"]["untuned_dice"]
    infer.main([*flags, "--out", str(tmp_path / "tuned.csv"), "--format", "rle-csv"])
    assert f"{run / 'postprocess.json'}: post-processing applied (min areas only: softmax" in caplog.text
    infer.main([*flags, "--out", str(tmp_path / "plain.csv"), "--format", "rle-csv", "--no-postprocess"])
    infer.main([*flags, "--out", str(tmp_path / "before.csv"), "--format", "rle-csv", "--checkpoints", str(trained)])
    assert (tmp_path / "plain.csv").read_bytes() == (tmp_path / "before.csv").read_bytes()
    # rules that remove every component: the submission's masks are all empty
    tuned["rules"] = [rule | {"min_area": 10**6} for rule in tuned["rules"]]
    (run / "postprocess.json").write_text(json.dumps(tuned))
    infer.main([*flags, "--out", str(tmp_path / "empty.csv"), "--format", "rle-csv"])
    assert pd.read_csv(tmp_path / "empty.csv", keep_default_na=False)["EncodedPixels"].eq("").all()
    # a file tuned for other classes: one line, exit 2
    (run / "postprocess.json").write_text(json.dumps(tuned | {"classes": ["car"]}))
    capsys.readouterr()
    error = run_infer([*flags, "--out", str(tmp_path / "other.csv")], capsys)
    assert error.count("\n") == 1 and "tuned for the classes car (softmax head), but the checkpoints predict" in error
    # tuning again over rules of other checkpoints is refused unless --overwrite
    tuned_elsewhere = tuned | {"checkpoints": [{"path": "elsewhere.pt"}]}
    (run / "postprocess.json").write_text(json.dumps(tuned_elsewhere))
    error = run_infer([*flags, "--oof", "--tune", "--folds-csv", str(folds), "--out-dir", str(tmp_path / "o")], capsys)
    assert "postprocess.json was tuned on other checkpoints; pass --overwrite to replace it" in error


@pytest.mark.parametrize("tile", [16, 32])
def test_a_tiff_mask_written_band_by_band_is_the_whole_masks_file_and_a_failed_one_leaves_nothing(
    tmp_path, monkeypatch, tile
):
    from competition import tiff_masks
    from competition.writers import palette

    monkeypatch.setattr(tiff_masks, "TIFF_TILE", tile)
    mask = np.random.default_rng(3).integers(0, 3, (70, 45), dtype=np.uint8)
    bands = tiff_masks.TiffBands(tmp_path / "a.tif", mask.shape, palette(3))
    for top, bottom in ((0, 20), (20, 21), (21, 64), (64, 70)):  # bands across the tiles' rows, the last one short
        bands.write(top, mask[top:bottom])
    written = bands.finish()
    assert written == tmp_path / "a.tif.partial" and written.read_bytes() == tiff_masks.encode_tiff(mask, palette(3))
    failed = tiff_masks.TiffBands(tmp_path / "b.tif", mask.shape, None)
    failed.write(0, mask[:40])
    with pytest.raises(ValueError, match="expected row 40"):
        failed.write(50, mask[50:])
    failed.discard()
    assert not (tmp_path / "b.tif.partial").exists() and not failed.thread.is_alive()
