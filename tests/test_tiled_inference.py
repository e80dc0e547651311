"""infer.py --tile: each test image predicted by the blended sliding window, through the writers, shards,
--time-limit and --resume of whole-image prediction."""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infer
from competition.checkpoints import save_checkpoint, summary
from competition.config import TrainConfig
from competition.models import build_model
from competition.prediction_stream import PredictionPace
from competition.rle import rle_encode
from competition.submission import predicted_by_path
from tests.conftest import HEIGHT, WIDTH
from tests.test_shards import common_flags


class PixelModel(torch.nn.Module):
    """A per-pixel model (a 1x1 convolution of the raw uint8 channels, red minus green): its mask is the same
    whole or cut into windows. Its logits are 0.2 * (red - green) + 0.1, integers times 0.2 shifted by 0.1, so at
    least 0.1 from the threshold's 0: the blend's rounding (float16, at most 2**-12 in probability) cannot flip a
    pixel, and tiled and whole masks must match exactly."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.2, -0.2, 0.0]).view(1, 3, 1, 1))
            self.conv.bias.fill_(0.1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images.float())


class ClassPixelModel(torch.nn.Module):
    """A per-pixel model of three classes (background, red minus green, blue minus green): logits that differ by at
    least 0.0125 between any two classes, so that the blend's rounding cannot change the most probable class."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[0, 0, 0], [0.05, -0.05, 0], [0, -0.05, 0.05]]).view(3, 3, 1, 1))
            self.conv.bias.copy_(torch.tensor([0, 0.025, 0.0125]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images.float())


def few_test_images(data_dir: Path, folder: Path, count: int = 4) -> list[str]:
    """--test-images of ``count`` of the data's test images copied into ``folder``: a fast test predicts few."""
    folder.mkdir()
    for path in sorted((data_dir / "test").iterdir())[:count]:
        shutil.copy(path, folder / path.name)
    return ["--test-images", str(folder)]


def swap_models(monkeypatch, pixel_model: type[torch.nn.Module]) -> None:
    """infer.py's checkpoints loaded as they are, each model swapped for a fresh ``pixel_model()``."""
    load_member = infer.load_member

    def pixel_member(path, device, compile=False):
        model = pixel_model().to(device)
        return dataclasses.replace(load_member(path, device, compile), model=model, forward=model)

    monkeypatch.setattr(infer, "load_member", pixel_member)


def constructed_run(out: Path, monkeypatch, classes: str = "", **settings) -> Path:
    """A run folder of one untrained full-resolution checkpoint (made in a second, no training), whose model
    infer.py swaps for PixelModel (binary) or ClassPixelModel (``classes``); ``settings``: more of its config."""
    config = TrainConfig(
        out=str(out), encoder="resnet18", encoder_weights="none", size="full", classes=classes, **settings
    )
    model = build_model(config.arch, config.encoder, "none", classes=config.output_channels())
    (out / "fold0").mkdir(parents=True)
    save_checkpoint(
        {"model": model.state_dict(), **summary(config, 1, 0.0, (HEIGHT, WIDTH))}, out / "fold0" / "best.pt"
    )
    swap_models(monkeypatch, ClassPixelModel if classes else PixelModel)
    return out


@pytest.mark.parametrize(
    "classes, flags",
    [
        ("", ["--format", "rle"]),
        ("", ["--format", "rle-csv", "--rle-order", "column"]),
        ("background,red,blue", ["--format", "rle-csv", "--rle-order", "row"]),
        ("background,red,blue", ["--format", "rle-csv", "--rle-order", "column"]),
    ],
)
def test_rle_rows_written_band_by_band_are_the_rows_of_whole_image_inference(
    classes, flags, data_dir, tmp_path, monkeypatch
):
    run = constructed_run(tmp_path / "run", monkeypatch, classes)
    whole, tiled = tmp_path / "whole.csv", tmp_path / "tiled.csv"
    if flags[1] != "rle":  # Carvana's rows follow its sample submission: every test image
        flags = [*flags, *few_test_images(data_dir, tmp_path / "test")]
    infer.main([*common_flags(run, data_dir, whole), *flags])
    infer.main([*common_flags(run, data_dir, tiled), *flags, "--tile", "64", "--tile-overlap", "0.25"])
    rows = whole.read_text().splitlines()
    assert sum(len(row) > 60 for row in rows) > len(rows) // 2, "masks with foreground, not empty ones"
    assert tiled.read_text() == whole.read_text()


@pytest.mark.parametrize("classes", ["", "background,red,blue"])
def test_tiff_masks_written_band_by_band_are_the_files_of_whole_image_inference(
    classes, data_dir, tmp_path, monkeypatch
):
    import tifffile

    from competition import tiff_masks

    monkeypatch.setattr(tiff_masks, "TIFF_TILE", 48)  # several rows and columns of tiles, edge tiles padded
    run = constructed_run(tmp_path / "run", monkeypatch, classes)
    flags = ["--format", "tiff", *few_test_images(data_dir, tmp_path / "test")]
    infer.main([*common_flags(run, data_dir, tmp_path / "whole"), *flags])
    (tmp_path / "tiled").mkdir()
    (tmp_path / "tiled" / "killed.tif.partial").write_bytes(b"II*\x00")  # a killed run's unfinished mask: removed
    infer.main([*common_flags(run, data_dir, tmp_path / "tiled"), *flags, "--tile", "64", "--tile-overlap", "0.5"])
    names = sorted(path.name for path in (tmp_path / "whole").glob("*.tif"))
    assert len(names) == 4 and not list((tmp_path / "tiled").glob("*.partial"))
    assert all((tmp_path / "whole" / name).read_bytes() == (tmp_path / "tiled" / name).read_bytes() for name in names)
    with tifffile.TiffFile(tmp_path / "tiled" / names[0]) as tiff:
        page = tiff.pages[0]
        mask = page.asarray()
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (48, 48) and mask.shape == (HEIGHT, WIDTH)
        assert set(mask.ravel().tolist()) == ({0, 1, 2} if classes else {0, 1})


def test_slides_rows_are_checked_against_their_tiff_headers_not_decoded_by_pillow(tmp_path, monkeypatch):
    import numpy as np
    import tifffile
    from PIL import Image

    data = tmp_path / "slides"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    (data / "train.csv").write_text("id,encoding\n")
    slide = np.random.default_rng(5).integers(0, 256, (150, 230, 3), dtype=np.uint8)
    tifffile.imwrite(data / "test" / "a.tiff", slide, tile=(64, 64), photometric="rgb")
    layout = {"masks_csv": "train.csv", "rle_columns": "id,encoding", "rle_order": "column"}
    run = constructed_run(tmp_path / "run", monkeypatch, data_dir=str(data), **layout)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a small slide past Pillow's decompression-bomb limit
    out = tmp_path / "rows.csv"
    infer.main([*common_flags(run, data, out), "--tile", "64", "--format", "rle-csv", "--rle-order", "column"])
    red_over_green = (0.2 * (slide[..., 0].astype(int) - slide[..., 1]) + 0.1 > 0).astype(np.uint8)
    assert out.read_text() == f"ImageId_ClassId,EncodedPixels\na_1,{rle_encode(red_over_green.T.copy())}\n"


@pytest.fixture
def pixel_checkpoints(trained_run, tmp_path, monkeypatch):
    """fold0 of the trained run at full resolution (windows are not resized), its model swapped for PixelModel."""
    checkpoint = torch.load(trained_run / "fold0" / "best.pt", weights_only=True)
    checkpoint["config"]["size"] = "full"
    (tmp_path / "pixel" / "fold0").mkdir(parents=True)
    torch.save(checkpoint, tmp_path / "pixel" / "fold0" / "best.pt")
    swap_models(monkeypatch, PixelModel)
    return tmp_path / "pixel"


@pytest.mark.slow
@pytest.mark.parametrize(
    "tiling",
    [["--tile", "64", "--tile-overlap", "0.25"], ["--tile", "96", "--tile-weighting", "ramp"], ["--tile", "256"]],
)
def test_tiles_give_the_mask_of_the_whole_image_for_a_per_pixel_model(pixel_checkpoints, data_dir, tmp_path, tiling):
    whole, tiled = tmp_path / "whole.csv", tmp_path / "tiled.csv"
    infer.main([*common_flags(pixel_checkpoints, data_dir, whole), "--tta"])
    infer.main([*common_flags(pixel_checkpoints, data_dir, tiled), "--tta", *tiling])
    rows = whole.read_text().splitlines()
    assert len(rows) == 33 and sum(len(row) > 60 for row in rows) > 16, "masks with foreground, not empty ones"
    assert tiled.read_text() == whole.read_text()


@pytest.mark.slow
def test_tiles_write_png_masks_of_the_whole_image(pixel_checkpoints, data_dir, tmp_path):
    flags = ["--format", "png", "--tta"]
    infer.main([*common_flags(pixel_checkpoints, data_dir, tmp_path / "whole"), *flags])
    infer.main([*common_flags(pixel_checkpoints, data_dir, tmp_path / "tiled"), *flags, "--tile", "64"])
    names = sorted(path.name for path in (tmp_path / "whole").glob("*.png"))
    assert len(names) == 32
    assert all((tmp_path / "whole" / name).read_bytes() == (tmp_path / "tiled" / name).read_bytes() for name in names)


@pytest.mark.slow
def test_tiles_stop_at_the_time_limit_by_image_and_resume_finishes(
    trained_run, data_dir, tmp_path, monkeypatch, caplog
):
    complete, out = tmp_path / "complete.csv", tmp_path / "submission.csv"
    tiling = ["--tile", "64", "--tile-overlap", "0.5"]
    infer.main([*common_flags(trained_run, data_dir, complete), *tiling])
    fits = PredictionPace.next_batch_fits
    asked = []

    def three_images_fit(pace):  # the clock of a limit that leaves time for three images
        asked.append(1)
        return fits(pace) and len(asked) <= 3

    monkeypatch.setattr(PredictionPace, "next_batch_fits", three_images_fit)
    with pytest.raises(SystemExit) as exit_info:
        infer.main([*common_flags(trained_run, data_dir, out), *tiling, "--time-limit", "1h"])
    assert exit_info.value.code == 3 and not out.exists()
    assert "stopped by the time limit 1h00m at a batch boundary: 3 of the 32 test images are written" in caplog.text
    record = json.loads(predicted_by_path(out).read_text())["output"]["tiling"]
    assert record == {"tile": 64, "overlap": 0.5, "weighting": "gaussian"}, "another tiling predicts them all again"
    monkeypatch.setattr(PredictionPace, "next_batch_fits", fits)
    caplog.clear()
    infer.main([*common_flags(trained_run, data_dir, out), *tiling, "--resume"])
    assert "32 rows" in caplog.text and "29 predicted" in caplog.text, "the 3 images written are kept"
    assert out.read_bytes() == complete.read_bytes()


@pytest.mark.slow
def test_tiles_on_two_cpu_shards_write_the_file_of_one_device(trained_run, data_dir, tmp_path):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    infer.main([*common_flags(trained_run, data_dir, one), "--tile", "64"])
    infer.main([*common_flags(trained_run, data_dir, two), "--tile", "64", "--devices", "cpu,cpu"])
    assert two.read_bytes() == one.read_bytes()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tile", "1000"], "--tile 1000: must be a positive multiple of 32, e.g. 992"),
        (["--tile", "1024", "--tile-overlap", "1"], "--tile-overlap 1.0: must be at least 0 and below 1"),
        (["--tile-overlap", "0.5"], "--tile-overlap belongs to --tile: pass --tile SIZE (e.g. --tile 1024) too"),
        (["--oof", "--tile", "64"], "--tile belongs to the test submission, not to --oof"),
    ],
)
def test_bad_tiling_is_one_line_naming_the_flag(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer.main(["--checkpoints", str(tmp_path), *flags])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and len(error.strip().splitlines()) == 1


def test_a_run_trained_on_tiles_is_predicted_by_a_window_of_its_tiles():
    from competition.config import TrainConfig
    from infer import tiling_of_run

    assert tiling_of_run(TrainConfig(), 4) is None  # whole images: predicted whole
    tiling = tiling_of_run(TrainConfig(tile=256, tile_overlap=0.5), 4)
    assert (tiling.tile, tiling.overlap) == (256, 0.5)


class LabelPixelModel(torch.nn.Module):
    """PixelModel's per-pixel logits for the three labels of ``test_multilabel``'s scenes (box: red - green, disc:
    blue - red, dot: green - blue), each 0.2 * an integer + 0.1: sigmoids at least 0.02 from 0.5 and from a
    threshold of 0.6 (sigmoid(0.4)), so neither the blend's rounding nor a window flips a class bit."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            weights = [[0.2, -0.2, 0.0], [-0.2, 0.0, 0.2], [0.0, 0.2, -0.2]]
            self.conv.weight.copy_(torch.tensor(weights).view(3, 3, 1, 1))
            self.conv.bias.fill_(0.1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images.float())


@pytest.fixture
def label_run(tmp_path, monkeypatch):
    """A multilabel run (box, disc, dot; full size) on ``test_multilabel``'s folder data, its model LabelPixelModel."""
    from competition.checkpoints import save_checkpoint, summary
    from competition.config import TrainConfig
    from competition.models import build_model
    from tests.test_multilabel import LABELS, make_label_folders

    root = make_label_folders(tmp_path / "data", count=2, tests=4)
    config = TrainConfig(data_dir=str(root), out=str(tmp_path / "run"), encoder="resnet18", encoder_weights="none",
                         size="full", head="multilabel", classes=",".join(LABELS))  # fmt: skip
    model = build_model(config.arch, config.encoder, "none", classes=config.output_channels())
    (tmp_path / "run" / "fold0").mkdir(parents=True)
    save_checkpoint(
        {"model": model.state_dict(), **summary(config, 1, 0.0, (64, 96))}, tmp_path / "run" / "fold0" / "best.pt"
    )
    swap_models(monkeypatch, LabelPixelModel)
    return tmp_path / "run"


def tuned_rules(run, min_area: int, min_total: int) -> None:
    """A postprocess.json for ``label_run``: the disc's threshold 0.6, and these area rules for every class."""
    from competition.inference import find_checkpoints
    from competition.postprocess import ClassRule, PostProcess, write_postprocess
    from competition.submission import predicted_by
    from tests.test_multilabel import LABELS

    rules = tuple(ClassRule(name, 0.6 if name == "disc" else 0.5, min_area, min_total) for name in LABELS)
    checkpoints = predicted_by(find_checkpoints([run]), ("hflip",), 0.5)["checkpoints"]
    write_postprocess(run / "postprocess.json", PostProcess("multilabel", rules), {"images": 1, "tta": ["hflip"]},
                      checkpoints)  # fmt: skip


def label_masks_of(run, out, *flags) -> dict:
    infer.main(["--checkpoints", str(run), "--workers", "0", "--tta", "--out", str(out), *flags])
    return {path.name: path.read_bytes() for path in sorted(out.glob("*.png"))}


@pytest.mark.parametrize("tiling", [["--tile", "32"], ["--tile", "64", "--tile-overlap", "0.5"]])
def test_tiles_give_the_packed_masks_of_the_whole_image_for_a_multilabel_model(label_run, tmp_path, tiling):
    whole = label_masks_of(label_run, tmp_path / "whole")
    tiled = label_masks_of(label_run, tmp_path / "tiled", *tiling)
    assert len(whole) == 4 and tiled == whole
    masks = [np.asarray(Image.open(tmp_path / "whole" / name)) for name in whole]
    assert all(len(np.unique(mask)) > 4 for mask in masks), "several class bits, and their overlaps, in each mask"


@pytest.mark.slow
def test_tiles_apply_the_tuned_thresholds_and_the_area_rules_of_the_whole_image(label_run, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="competition")
    tuned_rules(label_run, 0, 0)
    thresholds = label_masks_of(label_run, tmp_path / "thresholds", "--tile", "32")
    assert "held whole" not in caplog.text, "thresholds alone are applied band by band"
    tuned_rules(label_run, 40, 400)
    whole = label_masks_of(label_run, tmp_path / "whole")
    tiled = label_masks_of(label_run, tmp_path / "tiled", "--tile", "32")
    assert tiled == whole and whole != thresholds, "the area rules remove components"
    assert "its mask is held whole as uint8 (6.1 kB)" in caplog.text
    untuned = label_masks_of(label_run, tmp_path / "untuned", "--tile", "32", "--no-postprocess")
    assert untuned == label_masks_of(label_run, tmp_path / "untuned_whole", "--no-postprocess") != thresholds
