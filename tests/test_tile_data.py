"""Training on tiles (--tile): windows of slides and their RLE masks as data sets of the pipeline, the folds, and
the settings."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from competition import synthetic
from competition.config import TrainConfig, check_config
from competition.errors import ConfigError, DataError
from competition.fold_data import fold_ids
from competition.layouts import open_data
from competition.rle import rle_encode
from competition.tile_data import TiledSlide, TrainingTiles, ValidationTiles, slide_mask

TILE = 256
SLIDE_FLAGS = ["--masks-csv", "train.csv", "--rle-columns", "id,encoding", "--rle-order", "column"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """4 synthetic 1024 x 1024 slides (HuBMAP's layout), read as the rle-table layout, and their folds."""
    import make_folds

    root = synthetic.generate_slides(tmp_path_factory.mktemp("slides") / "in", size=1024, count=4, test_count=0)
    folds = root.parent / "folds.csv"
    make_folds.main(["--data-dir", str(root), *SLIDE_FLAGS, "--n-folds", "2", "--out", str(folds), "--quiet"])
    data = open_data(root, masks_csv="train.csv", rle_columns="id,encoding", rle_order="column")
    return root, folds, data


def tile_config(root, folds, **settings) -> TrainConfig:
    settings = {"tile": TILE, "tile_overlap": 0.25} | settings
    return TrainConfig(
        data_dir=str(root),
        folds_csv=str(folds),
        masks_csv="train.csv",
        rle_columns="id,encoding",
        rle_order="column",
        **settings,
    )


def test_windows_are_the_tile_and_their_masks_the_rle_tables_window(slides):
    root, folds, data = slides
    image_id = data.train_ids()[0]
    slide = TiledSlide(data, image_id, tile_config(root, folds))
    whole_mask = data.draw(image_id, (1024, 1024))  # the pipeline's whole-image reading of the same row
    import tifffile

    whole_image = tifffile.imread(data.image_path(image_id))
    windows = ValidationTiles(data, [slide], TILE)
    assert len(windows) == 25  # 1024 on a 192-pixel stride: starts 0, 192, ..., 576, 768 per side
    for index, (_, top, left) in enumerate(windows.windows):
        image, mask = windows[index]
        assert image.shape == (3, TILE, TILE) and mask.shape == (1, TILE, TILE)
        assert np.array_equal(mask[0].numpy(), whole_mask[top : top + TILE, left : left + TILE])
        assert np.array_equal(image.permute(1, 2, 0).numpy(), whole_image[top : top + TILE, left : left + TILE])
    assert whole_mask.any() and any(windows[index][1].any() for index in range(len(windows)))


def test_a_slide_smaller_than_the_tile_is_mirrored_at_its_edges_as_the_sliding_window_pads_it(slides):
    root, folds, data = slides
    image_id = data.train_ids()[1]
    slide = TiledSlide(data, image_id, tile_config(root, folds, tile=1280))
    assert slide.index.tops.tolist() == [0] and slide.index.lefts.tolist() == [0]
    image, mask = slide.window(0, 0, 1280)
    assert image.shape == (1280, 1280, 3) and mask.shape == (1280, 1280)
    assert np.array_equal(mask[:1024, :1024], data.draw(image_id, (1024, 1024)))
    assert np.array_equal(mask[1024:, :1024], mask[1022:766:-1, :1024])  # reflected about the last row
    assert np.array_equal(image[:, 1024:], image[:, 1022:766:-1])


def test_a_slide_is_never_in_both_training_and_validation(slides):
    root, folds, data = slides
    for fold in (0, 1):
        config = tile_config(root, folds, fold=fold)
        train_ids, val_ids = fold_ids(config, data)
        assert train_ids and val_ids and not set(train_ids) & set(val_ids)
        assert sorted(train_ids + val_ids) == data.train_ids()


def positive_share(data, slides_, config, count: int = 120) -> float:
    torch.manual_seed(0)
    tiles = TrainingTiles(data, slides_, config)
    return float(np.mean([tiles[index % len(tiles)][1].any().item() for index in range(count)]))


def test_windows_are_drawn_around_foreground_at_the_ratio_given(slides):
    root, folds, data = slides
    config = tile_config(root, folds, positive_ratio=1.0, empty_tile_weight=0.0)
    slides_ = [TiledSlide(data, image_id, config) for image_id in data.train_ids()]
    assert len(TrainingTiles(data, slides_, config)) == 4 * 25  # an epoch: the index's tiles
    assert positive_share(data, slides_, config) == 1.0
    grid = np.mean([(slide.index.foreground > 0).mean() for slide in slides_])
    none_around = positive_share(data, slides_, tile_config(root, folds, positive_ratio=0.0, empty_tile_weight=1.0))
    half = positive_share(data, slides_, tile_config(root, folds, positive_ratio=0.5, empty_tile_weight=1.0))
    assert abs(none_around - grid) < 0.15  # tiles of the grid, drawn alike
    assert half == pytest.approx(0.5 + 0.5 * none_around, abs=0.12)


class ConstantModel(torch.nn.Module):
    """A model of ``channels`` channels whose logit is ``logit`` at every pixel, whatever the window."""

    def __init__(self, logit: float, channels: int = 1):
        super().__init__()
        self.logit, self.channels = torch.nn.Parameter(torch.tensor(logit)), channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit.expand(images.shape[0], self.channels, *images.shape[-2:])


def test_validation_scores_whole_slides_stitched_as_inference_stitches_them(slides):
    from competition.tile_data import stitched_scores

    root, folds, data = slides
    config = tile_config(root, folds, val_batch_size=4)
    slides_ = [TiledSlide(data, image_id, config) for image_id in data.train_ids()[:2]]
    truths = [data.draw(slide.image_id, (1024, 1024)).sum() for slide in slides_]
    everywhere = stitched_scores(ConstantModel(10.0), slides_, config, "fp32")
    pixels = 1024 * 1024  # every pixel of each slide predicted foreground once: Dice 2T / (N + T), IoU T / N
    assert everywhere["val_dice"] == pytest.approx(np.mean([2 * t / (pixels + t) for t in truths]))
    assert everywhere["val_iou"] == pytest.approx(np.mean([t / pixels for t in truths]))
    assert stitched_scores(ConstantModel(-10.0), slides_, config, "fp32") == {"val_dice": 0.0, "val_iou": 0.0}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tile": 100}, "--tile 100: must be a positive multiple of 32, e.g. 96"),
        ({"tile": 1024, "tile_overlap": 1.0}, "--tile-overlap 1.0: must be at least 0 and below 1"),
        ({"tile": 1024, "positive_ratio": 1.5}, "--positive-ratio 1.5: must be between 0 and 1"),
        ({"tile": 1024, "crop": 512}, "--tile 1024 and --crop 512"),
        ({"tile": 1024, "class_weights": "inverse"}, "--class-weights with --tile 1024"),
    ],
)
def test_tile_settings_that_cannot_be_used_are_one_line(settings, message):
    with pytest.raises(ConfigError, match=message):
        check_config(TrainConfig(**settings))


def test_tiles_of_a_layout_without_an_rle_table_are_refused(data_dir):
    from competition.tile_data import slide_mask

    with pytest.raises(
        ConfigError,
        match="--tile reads masks window by window from an RLE table .* the carvana layout, whose masks are neither",
    ):
        slide_mask(open_data(data_dir), "any", (64, 64))


@pytest.mark.slow
def test_one_epoch_on_tiles_trains_and_saves_the_tile_settings(slides, tmp_path):
    from competition.checkpoints import load_checkpoint
    from competition.training import train_fold

    root, folds, _ = slides
    config = tile_config(
        root,
        folds,
        out=str(tmp_path / "run"),
        encoder="resnet18",
        encoder_weights="none",
        epochs=1,
        batch_size=4,
        tile=512,  # 4 windows a slide, no overlap: 2 steps, and seconds of validation
        tile_overlap=0.0,
    )
    config.workers, config.warmup_epochs = 0, 0.2
    train_fold(config, "cpu", progress=False)
    saved = load_checkpoint(tmp_path / "run" / "fold0" / "best.pt")
    assert saved["config"]["tile"] == 512 and saved["config"]["tile_overlap"] == 0.0
    assert saved["image_shape"] == [1024, 1024]
    assert 0 <= saved["score"] <= 1 and "val_dice" in (tmp_path / "run" / "fold0" / "log.csv").read_text()


SIDE = 512  # the folder slides' side: 9 windows of 256 on a 192-pixel stride


def write_folder_slides(root, kind: str, count: int = 3):
    """``count`` 512 x 512 tiled-TIFF slides in images/ and their masks in masks/: ``binary`` PNGs of 0/255,
    ``classes`` PNGs of 0, 1, 2 (discs left and right of the middle) with a band of 255 (ignored), or ``tiff`` tiled
    TIFFs of 0/255. Returns the folder."""
    import tifffile

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for number in range(count):
        plan = synthetic.plan_slide(SIDE, seed=number + 1)
        tifffile.imwrite(
            root / "images" / f"s{number}.tiff", synthetic.slide_window(plan, 0, 0, SIDE, SIDE), tile=(256, 256)
        )
        discs = synthetic.slide_mask_window(plan, 0, 0, SIDE, SIDE)
        if kind == "classes":
            mask = discs * np.where(np.arange(SIDE) < SIDE // 2, 1, 2).astype(np.uint8)[None]
            mask[300:316] = 255
            (root / "classes.txt").write_text("background\nleft\nright\n")
        else:
            mask = discs * 255
        if kind == "tiff":
            tifffile.imwrite(root / "masks" / f"s{number}.tiff", mask, tile=(128, 128))
        else:
            Image.fromarray(mask).save(root / "masks" / f"s{number}.png")
    return root


@pytest.fixture(scope="module", params=["binary", "classes", "tiff"])
def folder_slides(request, tmp_path_factory):
    """Folder slides of each mask kind, their data and folds (one slide per group)."""
    import make_folds

    root = write_folder_slides(tmp_path_factory.mktemp("folder") / request.param, request.param)
    folds = root.parent / f"{request.param}-folds.csv"
    make_folds.main(["--data-dir", str(root), "--n-folds", "2", "--out", str(folds), "--quiet"])
    return request.param, root, folds, open_data(root)


def folder_config(root, folds, **settings) -> TrainConfig:
    return TrainConfig(data_dir=str(root), folds_csv=str(folds), **({"tile": TILE, "tile_overlap": 0.25} | settings))


def test_mask_files_give_the_windows_of_the_masks_the_data_layer_reads_whole(folder_slides, monkeypatch, tmp_path):
    kind, root, folds, data = folder_slides
    monkeypatch.setenv("CARVANA_WORK_DIR", str(tmp_path / "work"))
    slides_ = [TiledSlide(data, image_id, folder_config(root, folds)) for image_id in data.train_ids()]
    windows = ValidationTiles(data, slides_, TILE)
    assert len(windows) == 3 * 9
    for index, (number, top, left) in enumerate(windows.windows):
        whole = data.read_mask(slides_[number].image_id)  # the pipeline's reading of the whole mask
        _, mask = windows[index]
        expected = whole[top : top + TILE, left : left + TILE]
        if kind == "classes":  # class indices, the ignore index kept, as whole images' masks are given
            assert mask.dtype == torch.int64 and mask.shape == (TILE, TILE)
            np.testing.assert_array_equal(mask.numpy(), expected)
        else:  # one class: the model's one sigmoid channel
            assert mask.dtype == torch.float32 and mask.shape == (1, TILE, TILE)
            np.testing.assert_array_equal(mask[0].numpy(), expected)
    assert set(np.unique(data.read_mask("s0"))) <= ({0, 1, 2, 255} if kind == "classes" else {0, 1})
    for slide in slides_:  # any class but the background is foreground; the ignored band is not
        whole = data.read_mask(slide.image_id)
        for top, left, share in zip(slide.index.tops, slide.index.lefts, slide.index.foreground):
            window = whole[top : top + TILE, left : left + TILE]
            assert share == pytest.approx(((window != 0) & (window != 255)).mean())
    assert any(slide.index.foreground.any() for slide in slides_)
    cached = list((tmp_path / "work").rglob("*.npy"))
    assert len(cached) == (0 if kind == "tiff" else 3)  # a tiled TIFF mask is read in place, PNGs decoded once


def test_a_mask_file_of_another_size_than_its_slide_is_one_line_naming_both(tmp_path, monkeypatch):
    monkeypatch.setenv("CARVANA_WORK_DIR", str(tmp_path / "work"))
    root = write_folder_slides(tmp_path / "data", "binary", count=2)
    Image.fromarray(np.zeros((SIDE, SIDE - 32), np.uint8)).save(root / "masks" / "s1.png")
    data = open_data(root)
    with pytest.raises(DataError, match=r"masks/s1.png: the mask is 480x512 and its slide .*images/s1.tiff 512x512"):
        TiledSlide(data, "s1", folder_config(root, root / "folds.csv"))


CLASS_TABLE = {"masks_csv": "classes.csv", "rle_columns": "id,class,encoding", "rle_order": "column"}


def write_class_table(root):
    """classes.csv beside a synthetic slide set's train.csv: its discs as class ``disc``, and class ``half`` over the
    left half and every disc (the two overlap on each disc)."""
    table = pd.read_csv(root / "train.csv")
    discs = open_data(root, masks_csv="train.csv", rle_columns="id,encoding", rle_order="column")
    rows = [(image_id, "disc", encoding) for image_id, encoding in zip(table["id"], table["encoding"])]
    for image_id in table["id"]:
        half = discs.draw(image_id, (SIDE, SIDE))
        assert half.any()
        half[:, : SIDE // 2] = 1
        rows.append((image_id, "half", rle_encode(half.T)))
    pd.DataFrame(rows, columns=["id", "class", "encoding"]).to_csv(root / "classes.csv", index=False)


def test_several_classes_of_an_rle_table_give_windows_of_class_indices_or_bits(tmp_path):
    root = synthetic.generate_slides(tmp_path / "in", size=SIDE, count=1, test_count=0)
    write_class_table(root)
    labels = open_data(root, head="multilabel", classes="disc,half", **CLASS_TABLE)
    image_id = labels.train_ids()[0]
    mask = slide_mask(labels, image_id, (SIDE, SIDE))
    whole = labels.draw(image_id, (SIDE, SIDE))
    for y, x, height, width in [(0, 0, SIDE, SIDE), (100, 200, 256, 256), (500, 7, 12, 300)]:
        np.testing.assert_array_equal(mask.read(y, x, height, width), whole[y : y + height, x : x + width])
    assert set(np.unique(whole)) == {0, 2, 3}  # the half alone (bit 1), and both classes on a disc (bits 0 and 1)
    indices = open_data(root, **CLASS_TABLE)
    with pytest.raises(DataError, match=r"classes.csv: line 2 \(image .*\) and .*line 3 .*overlap"):
        slide_mask(indices, image_id, (SIDE, SIDE)).read(0, 0, SIDE, SIDE)


def test_validation_of_multilabel_slides_scores_each_class_of_the_stitched_slides(tmp_path, monkeypatch):
    from competition.tile_data import stitched_scores

    monkeypatch.setenv("CARVANA_WORK_DIR", str(tmp_path / "work"))
    root = synthetic.generate_slides(tmp_path / "in", size=SIDE, count=2, test_count=0)
    write_class_table(root)
    data = open_data(root, head="multilabel", classes="disc,half", **CLASS_TABLE)
    config = TrainConfig(
        data_dir=str(root), head="multilabel", classes="disc,half", tile=TILE, val_batch_size=4, **CLASS_TABLE
    )
    slides_ = [TiledSlide(data, image_id, config) for image_id in data.train_ids()]
    scores = stitched_scores(ConstantModel(10.0, channels=2), slides_, config, "fp32")  # both classes everywhere
    wholes = [data.draw(slide.image_id, (SIDE, SIDE)) for slide in slides_]
    truths = np.array([[(whole & bit > 0).sum() for bit in (1, 2)] for whole in wholes])  # (slides, classes)
    pixels = SIDE * SIDE
    assert scores["val_dice"] == pytest.approx((2 * truths / (pixels + truths)).mean())
    assert scores["val_miou"] == pytest.approx((truths.sum(0) / (2 * pixels)).mean())
    for index, name in enumerate(("disc", "half")):  # each class's own, as the per-class line shows them
        assert scores[f"dice_{name}"] == pytest.approx((2 * truths[:, index] / (pixels + truths[:, index])).mean())
        assert scores[f"iou_{name}"] == pytest.approx(truths[:, index].sum() / (2 * pixels))


@pytest.mark.parametrize("folder_slides", ["binary"], indirect=True)
def test_one_channel_models_get_grey_windows_as_whole_images_are_read(folder_slides, monkeypatch, tmp_path):
    _, root, folds, _ = folder_slides
    monkeypatch.setenv("CARVANA_WORK_DIR", str(tmp_path / "work"))
    data = open_data(root, in_channels=1)
    slide = TiledSlide(data, "s0", folder_config(root, folds, in_channels=1))
    image, _ = slide.window(192, 64, TILE)
    assert image.shape == (TILE, TILE, 1)
    np.testing.assert_array_equal(image, data.read_image("s0")[192 : 192 + TILE, 64 : 64 + TILE])


class ClassModel(torch.nn.Module):
    """A model of ``classes`` channels that predicts class ``chosen`` at every pixel."""

    def __init__(self, classes: int, chosen: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.eye(classes)[chosen] * 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[None, :, None, None].expand(images.shape[0], -1, *images.shape[-2:])


@pytest.mark.parametrize("folder_slides", ["classes"], indirect=True)
def test_validation_of_several_classes_scores_the_stitched_slides_confusion(folder_slides, monkeypatch, tmp_path):
    _, root, folds, data = folder_slides
    from competition.tile_data import stitched_scores
    from competition.training import confusion_scores

    monkeypatch.setenv("CARVANA_WORK_DIR", str(tmp_path / "work"))
    config = folder_config(root, folds, classes="background,left,right", val_batch_size=4)
    slides_ = [TiledSlide(data, image_id, config) for image_id in data.train_ids()[:2]]
    stitched = stitched_scores(ClassModel(3, 1), slides_, config, "fp32")
    scores = confusion_scores(stitched["confusion"], ["background", "left", "right"])
    truth = np.concatenate([data.read_mask(slide.image_id).ravel() for slide in slides_])
    labelled = truth[truth != 255]
    assert scores["val_pixel_accuracy"] == pytest.approx((labelled == 1).mean())
    assert scores["confusion"].sum() == labelled.size and scores["confusion"][:, 1].sum() == labelled.size
    assert scores["iou_left"] == pytest.approx((labelled == 1).mean())
    assert scores["iou_background"] == 0 and scores["iou_right"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["binary", "classes"])
def test_one_epoch_on_tiles_of_a_folder_of_png_masks(kind, tmp_path, monkeypatch):
    import make_folds
    from competition.checkpoints import load_checkpoint
    from competition.training import train_fold

    monkeypatch.setenv("CARVANA_WORK_DIR", str(tmp_path / "work"))
    root = write_folder_slides(tmp_path / "data", kind)
    make_folds.main(["--data-dir", str(root), "--n-folds", "2", "--out", str(tmp_path / "folds.csv"), "--quiet"])
    config = folder_config(
        root,
        tmp_path / "folds.csv",
        out=str(tmp_path / "run"),
        encoder="resnet18",
        encoder_weights="none",
        epochs=1,
        batch_size=2,
        tile_overlap=0.0,
    )
    config.workers, config.warmup_epochs = 0, 0.2
    train_fold(config, "cpu", progress=False)
    saved = load_checkpoint(tmp_path / "run" / "fold0" / "best.pt")
    assert saved["config"]["tile"] == TILE and saved["image_shape"] == [SIDE, SIDE]
    log = (tmp_path / "run" / "fold0" / "log.csv").read_text()
    assert ("val_miou" if kind == "classes" else "val_dice") in log and 0 <= saved["score"] <= 1


def test_make_folds_of_big_slides_reads_their_headers_and_runs_alone(tmp_path, monkeypatch):
    """Folds of an 8192 x 8192 tiled TIFF (192 MiB as RGB) and a small one: their sizes come from the TIFF headers and their
    classes from the RLE runs; no image is decoded and no mask drawn (a 32k slide would take 3 GB and 1 GB)."""
    import tracemalloc

    import tifffile

    import make_folds
    from competition.rle_table import RLETableData

    side, tile = 8192, 1024
    (tmp_path / "train").mkdir()
    blank = np.full((tile, tile, 3), 240, np.uint8)
    for name, size in (("a", side), ("b", tile)):
        tiles = (blank for _ in range((size // tile) ** 2))
        tifffile.imwrite(
            tmp_path / "train" / f"{name}.tiff", tiles, shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile),
            compression="zlib",
        )  # fmt: skip
    pd.DataFrame({"id": ["a", "b"], "encoding": ["1 100 9000 50", ""]}).to_csv(tmp_path / "train.csv", index=False)
    monkeypatch.setattr(RLETableData, "draw", lambda *_: pytest.fail("a mask drawn whole"))
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *_, **__: pytest.fail("a slide decoded"))
    tracemalloc.start()
    try:
        make_folds.main(
            ["--data-dir", str(tmp_path), *SLIDE_FLAGS, "--n-folds", "2", "--out", str(tmp_path / "f.csv"), "--quiet"]
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB"  # a decoded slide is 192 MiB, a drawn mask 64 MiB
    folds = pd.read_csv(tmp_path / "f.csv")
    assert sorted(folds["img"]) == ["a", "b"] and folds["fold"].nunique() == 2


@pytest.mark.slow
def test_one_epoch_on_tiles_of_a_multilabel_rle_table(tmp_path, monkeypatch):
    import make_folds
    from competition.checkpoints import load_checkpoint
    from competition.training import train_fold

    monkeypatch.setenv("CARVANA_WORK_DIR", str(tmp_path / "work"))
    root = synthetic.generate_slides(tmp_path / "in", size=SIDE, count=3, test_count=0)
    write_class_table(root)
    flags = ["--masks-csv", "classes.csv", "--rle-columns", "id,class,encoding", "--rle-order", "column"]
    flags += ["--head", "multilabel", "--classes", "disc,half"]
    make_folds.main(["--data-dir", str(root), *flags, "--n-folds", "2", "--out", str(tmp_path / "f.csv"), "--quiet"])
    config = TrainConfig(
        data_dir=str(root),
        folds_csv=str(tmp_path / "f.csv"),
        head="multilabel",
        classes="disc,half",
        loss="bce",
        out=str(tmp_path / "run"),
        encoder="resnet18",
        encoder_weights="none",
        epochs=1,
        batch_size=2,
        tile=TILE,
        tile_overlap=0.0,
        **CLASS_TABLE,
    )
    config.workers, config.warmup_epochs = 0, 0.2
    train_fold(config, "cpu", progress=False)
    saved = load_checkpoint(tmp_path / "run" / "fold0" / "best.pt")
    assert saved["config"]["head"] == "multilabel" and saved["image_shape"] == [SIDE, SIDE]
    assert "val_miou" in (tmp_path / "run" / "fold0" / "log.csv").read_text() and 0 <= saved["score"] <= 1


class ChannelModel(torch.nn.Module):
    """A per-pixel softmax model: each pixel's class is its brightest channel (logits of 0.1 a grey level)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * self.scale


def test_softmax_validation_counts_the_stitched_slides_confusion_band_by_band():
    from types import SimpleNamespace

    from competition.sliding_window import InMemory
    from competition.tile_data import stitched_scores

    rng = np.random.default_rng(0)
    slides_, expected = [], np.zeros((3, 3), np.int64)
    for height, width in ((100, 130), (40, 70)):  # the second smaller than a window of the first's grid
        brightest = rng.integers(0, 3, (height, width))
        image = (np.eye(3)[brightest] * 200 + rng.integers(0, 50, (height, width, 3))).astype(np.uint8)
        truth = rng.integers(0, 3, (height, width)).astype(np.uint8)
        truth[rng.random((height, width)) < 0.1] = 255  # ignored: counted nowhere
        mask = SimpleNamespace(read=lambda top, left, rows, columns, truth=truth: truth[top : top + rows])
        slides_.append(SimpleNamespace(slide=InMemory(image), mask=mask, ignore_index=255))
        kept = truth != 255
        expected += np.bincount(truth[kept] * 3 + brightest[kept], minlength=9).reshape(3, 3)
    config = TrainConfig(classes="a,b,c", tile=64, tile_overlap=0.25, val_batch_size=4)
    scores = stitched_scores(ChannelModel(), slides_, config, "fp32")
    assert set(scores) == {"confusion"} and np.array_equal(scores["confusion"].numpy(), expected)
