"""Training on tiles (--tile): windows of slides and their RLE masks as data sets of the pipeline, the folds, and
the settings."""

import numpy as np
import pytest
import torch

from competition import synthetic
from competition.config import TrainConfig, check_config
from competition.errors import ConfigError
from competition.fold_data import fold_ids
from competition.layouts import open_data
from competition.tile_data import TiledSlide, TrainingTiles, ValidationTiles

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
    """A one-channel model whose logit is ``logit`` at every pixel, whatever the window."""

    def __init__(self, logit: float):
        super().__init__()
        self.logit = torch.nn.Parameter(torch.tensor(logit))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit.expand(images.shape[0], 1, *images.shape[-2:])


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

    with pytest.raises(ConfigError, match="--tile reads masks from an RLE table window by window"):
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
        slides_.append(SimpleNamespace(slide=InMemory(image), mask=mask))
        kept = truth != 255
        expected += np.bincount(truth[kept] * 3 + brightest[kept], minlength=9).reshape(3, 3)
    config = TrainConfig(classes="a,b,c", tile=64, tile_overlap=0.25, val_batch_size=4)
    scores = stitched_scores(ChannelModel(), slides_, config, "fp32")
    assert set(scores) == {"confusion"} and np.array_equal(scores["confusion"].numpy(), expected)
