"""Training on tiles (``--tile``): windows of slides read one at a time with their masks' windows, as data sets of
the one pipeline (same augmentation, loss and loop as whole images).

A slide is opened lazily (``slides.open_slide``: a tiled TIFF in place, anything else decoded once into the work
folder's cache), its mask kept as the RLE table's runs (``slides.RunsMask``), and its tile index built once
(``tiles.build_index``: every tile decoded once, which is also the check that the file is whole). Training draws
each sample's window through ``tiles.sample_windows``; validation scores the index's grid windows of the held-out
slides, a fixed list, for the loss; Dice and IoU (a softmax's confusion matrix) are the held-out slides' own, each
predicted whole by the sliding window as infer.py stitches it (``stitched_scores``)."""

import logging

import numpy as np
import torch

from competition.config import TrainConfig
from competition.data import SegmentationDataset, to_chw
from competition.environment import default_work_dir
from competition.errors import ConfigError, DataError
from competition.prediction import predict_probabilities
from competition.slides import RunsMask, open_slide
from competition.sliding_window import predict_mask
from competition.tiles import TileIndex, build_index, sample_windows

logger = logging.getLogger(__name__)

SLIDE_CACHE = "slide_cache"  # in the work folder: slides that are no tiled TIFF, decoded once
ACCUMULATORS = "sliding_window"  # in the work folder: a large slide's blended probabilities while it is validated


class TiledSlide:
    """One training slide: its ``Slide``, its mask's runs, and its tile index."""

    def __init__(self, data, image_id: str, config: TrainConfig):
        self.image_id = image_id
        self.slide = open_slide(data.image_path(image_id), default_work_dir() / SLIDE_CACHE)
        self.mask = slide_mask(data, image_id, self.slide.shape[:2])
        self.index: TileIndex = build_index(self.slide, self.mask, config.tile, config.tile_overlap)

    def window(self, top: int, left: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (tile, tile, 3), mask uint8 (tile, tile)) at (top, left); a slide smaller than the tile
        is mirrored at its bottom and right edges, as the sliding window pads it."""
        rows, columns = min(tile, self.slide.shape[0] - top), min(tile, self.slide.shape[1] - left)
        image, mask = self.slide.read(top, left, rows, columns), self.mask.read(top, left, rows, columns)
        if (rows, columns) != (tile, tile):
            pad = ((0, tile - rows), (0, tile - columns))
            image, mask = np.pad(image, (*pad, (0, 0)), mode="reflect"), np.pad(mask, pad, mode="reflect")
        return image, mask


def slide_mask(data, image_id: str, shape: tuple[int, int]) -> RunsMask:
    """The image's binary mask as the runs of its row in the RLE table (``--masks-csv``), never drawn whole."""
    if getattr(data, "layout", "") != "rle-table":
        raise ConfigError(
            f"--tile reads masks from an RLE table window by window, and {data.root} is read as the "
            f"{getattr(data, 'layout', type(data).__name__)} layout: give --masks-csv (e.g. train.csv --rle-columns "
            "id,encoding --rle-order column), or train on whole images without --tile"
        )
    if data.num_classes != 2 or data.multilabel:
        raise ConfigError(f"--tile: {data.csv} holds {data.num_classes - 1} classes; tiles are trained on one class")
    rows = data.rows.get(image_id, [])
    if len(rows) > 1:
        lines = ", ".join(str(line) for _, _, line in rows)
        raise DataError(
            f"{data.csv}: lines {lines} are all image {image_id}'s; --tile takes one row per slide: join them"
        )
    rle, source = (rows[0][1], f"{data.csv}: line {rows[0][2]} (image {image_id})") if rows else ("", str(data.csv))
    return RunsMask(rle, shape, data.rle_order, source)


def tiled_slides(data, image_ids: list[str], config: TrainConfig) -> list[TiledSlide]:
    slides = [TiledSlide(data, image_id, config) for image_id in image_ids]
    logger.info(
        "--tile %d: %d slide(s) indexed, %d tiles of which %d hold foreground",
        config.tile,
        len(slides),
        sum(slide.index.tops.size for slide in slides),
        sum(int((slide.index.foreground > 0).sum()) for slide in slides),
    )
    return slides


class TrainingTiles(SegmentationDataset):
    """As many samples an epoch as the training slides' index has tiles, sample k from the slide of the k-th tile
    (each slide drawn as often as it has tiles); its window drawn by ``sample_windows`` from torch's generator
    (seeded per epoch and worker by the loader: reproducible, new each epoch)."""

    def __init__(self, data, slides: list[TiledSlide], config: TrainConfig, transform=None):
        super().__init__(data, [slide.image_id for slide in slides], transform=transform)
        self.slides, self.config = slides, config
        self.ends = np.cumsum([slide.index.tops.size for slide in slides])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        slide = self.slides[int(np.searchsorted(self.ends, index, "right"))]
        rng = np.random.default_rng(int(torch.randint(2**62, ()).item()))
        config = self.config
        (top, left), *_ = sample_windows(
            slide.index, slide.mask, 1, rng, config.empty_tile_weight, config.positive_ratio, config.min_tissue
        )
        image, mask = slide.window(int(top), int(left), config.tile)
        return self.prepared(image, mask, False)


class ValidationTiles(SegmentationDataset):
    """Every grid window of the held-out slides' tile index, in order, unaugmented: a fixed list."""

    def __init__(self, data, slides: list[TiledSlide], tile: int):
        super().__init__(data, [slide.image_id for slide in slides])
        self.slides, self.tile = slides, tile
        self.windows = [
            (number, int(top), int(left))
            for number, slide in enumerate(slides)
            for top, left in zip(slide.index.tops, slide.index.lefts)
        ]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        number, top, left = self.windows[index]
        return self.prepared(*self.slides[number].window(top, left, self.tile), False)


@torch.no_grad()
def stitched_scores(model: torch.nn.Module, slides: list[TiledSlide], config: TrainConfig, precision: str) -> dict:
    """The held-out slides' own scores, each slide predicted whole by ``predict_mask`` (windows of ``--tile`` and
    ``--tile-overlap``, Gaussian-blended, labelled as infer.py labels them) and compared band by band with its
    mask: neither the slide's probabilities nor its mask is held whole. One channel: ``val_dice`` and ``val_iou``
    averaged over the slides; several (a softmax): the ``confusion`` matrix of all their pixels (rows the true
    class, columns the predicted one), for the scores whole-image validation makes of its own."""
    model.eval()
    device = next(model.parameters()).device

    def predict(windows: np.ndarray) -> np.ndarray:
        images = torch.stack([to_chw(window) for window in windows]).to(device)
        return predict_probabilities(model, images, precision=precision).cpu().numpy()

    if config.output_channels() > 1:
        return {"confusion": torch.from_numpy(np.sum([_confusion(slide, predict, config) for slide in slides], 0))}
    dice, iou = [], []
    for slide in slides:
        both, predicted, truth = _overlap(slide, predict, config)
        dice.append(1.0 if predicted + truth == 0 else 2 * both / (predicted + truth))
        iou.append(1.0 if predicted + truth == 0 else both / (predicted + truth - both))
    return {"val_dice": float(np.mean(dice)), "val_iou": float(np.mean(iou))}


def _stitch(slide: TiledSlide, predict, config: TrainConfig, compare) -> None:
    """``compare(top, label band)`` of each band of the slide's stitched mask, as infer.py stitches it."""
    work_dir = default_work_dir() / ACCUMULATORS
    predict_mask(
        slide.slide,
        predict,
        compare,
        config.tile,
        config.tile_overlap,
        batch_size=config.val_batch_size,
        work_dir=work_dir,
    )


def _overlap(slide: TiledSlide, predict, config: TrainConfig) -> tuple[int, int, int]:
    """(pixels predicted and true, predicted, true) of the slide's stitched mask, counted band by band."""
    counts = np.zeros(3, np.int64)

    def compare(top: int, band: np.ndarray) -> None:
        labels, mask = band.astype(bool), slide.mask.read(top, 0, *band.shape).astype(bool)
        counts[:] += ((labels & mask).sum(), labels.sum(), mask.sum())

    _stitch(slide, predict, config, compare)
    return tuple(int(count) for count in counts)


def _confusion(slide: TiledSlide, predict, config: TrainConfig) -> np.ndarray:
    """int64 (K, K) pixels of the slide by true class (rows) and predicted class, counted band by band; pixels of
    the ignore value count nowhere (as ``metrics.confusion_matrix``)."""
    classes, ignored = config.output_channels(), config.label_ignore_index()
    counts = np.zeros((classes, classes), np.int64)

    def compare(top: int, band: np.ndarray) -> None:
        truth = slide.mask.read(top, 0, *band.shape)
        labelled = truth != ignored
        pairs = truth[labelled].astype(np.int64) * classes + band[labelled]
        counts[:] += np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)

    _stitch(slide, predict, config, compare)
    return counts
