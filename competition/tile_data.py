"""Training on tiles (``--tile``): windows of slides read one at a time with their masks' windows, as data sets of
the one pipeline (same augmentation, loss and loop as whole images).

A slide is opened lazily (``slides.open_slide``: a tiled TIFF in place, anything else decoded once into the work
folder's cache), its mask read by window whatever its source (``slide_mask``: an RLE table's runs, a tiled TIFF mask
in place, any other mask file decoded once into the cache by the layout's rules), and its tile index built once
(``tiles.build_index``: every tile decoded once, which is also the check that the file is whole). Training draws
each sample's window through ``tiles.sample_windows``; validation scores the index's grid windows of the held-out
slides, a fixed list, for the loss; its other scores are the held-out slides' own, each predicted whole by the
sliding window as infer.py stitches it (``stitched_scores``)."""

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from competition.config import TrainConfig
from competition.data import SegmentationDataset, image_to_array, to_chw
from competition.environment import default_work_dir
from competition.errors import ConfigError, DataError
from competition.metrics import confusion_matrix
from competition.prediction import predict_probabilities
from competition.segmentation_data import MASK_EXTENSIONS, SegmentationData
from competition.slides import RunsMask, open_mask, open_slide
from competition.sliding_window import blended_bands, labels_of
from competition.tiles import TileIndex, build_index, sample_windows

logger = logging.getLogger(__name__)

SLIDE_CACHE = "slide_cache"  # in the work folder: slides that are no tiled TIFF, decoded once
ACCUMULATORS = "sliding_window"  # in the work folder: a large slide's blended probabilities while it is validated


class TiledSlide:
    """One training slide: its ``Slide``, its mask's windows (``slide_mask``), and its tile index."""

    def __init__(self, data, image_id: str, config: TrainConfig):
        self.image_id, self.in_channels = image_id, data.in_channels
        self.ignore_index = 255 if data.multilabel else data.ignore_index
        self.slide = open_slide(data.image_path(image_id), default_work_dir() / SLIDE_CACHE)
        self.mask = slide_mask(data, image_id, self.slide.shape[:2])
        self.index: TileIndex = build_index(
            self.slide, self.mask, config.tile, config.tile_overlap, ignore_index=self.ignore_index
        )

    def window(self, top: int, left: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 (tile, tile, in_channels), mask uint8 (tile, tile)) at (top, left); a slide smaller than the
        tile is mirrored at its bottom and right edges, as the sliding window pads it."""
        rows, columns = min(tile, self.slide.shape[0] - top), min(tile, self.slide.shape[1] - left)
        image, mask = self.slide.read(top, left, rows, columns), self.mask.read(top, left, rows, columns)
        if (rows, columns) != (tile, tile):
            pad = ((0, tile - rows), (0, tile - columns))
            image, mask = np.pad(image, (*pad, (0, 0)), mode="reflect"), np.pad(mask, pad, mode="reflect")
        return as_channels(image, self.in_channels, str(self.slide.path)), mask


def as_channels(window: np.ndarray, channels: int, source: str) -> np.ndarray:
    """A slide's uint8 RGB window as the model takes it: as it is (3), or (h, w, 1) grey by the data layer's rule for
    whole images (Pillow's luma; a grey slide's replicated channel gives its grey levels back)."""
    return window if channels == 3 else image_to_array(Image.fromarray(window), source, channels)


def slide_mask(data, image_id: str, shape: tuple[int, int]):
    """The image's mask as windows (``shape``, ``read``, ``source``), never drawn whole: its rows of the RLE table
    (``--masks-csv``), or its mask file (a tiled TIFF in place, any other decoded once into the cache)."""
    if getattr(data, "layout", "") == "rle-table":
        return _runs_of(data, image_id, shape)
    source = Path(data.mask_source(image_id)) if isinstance(data, SegmentationData) else None
    if source is None or source.suffix.lower() not in MASK_EXTENSIONS:
        raise ConfigError(
            f"--tile reads masks window by window from an RLE table (--masks-csv) or mask files "
            f"({', '.join(MASK_EXTENSIONS)}), and {data.root} is read as the "
            f"{getattr(data, 'layout', type(data).__name__)} layout, whose masks are neither: train on whole images "
            "without --tile"
        )
    windowed = getattr(data, "table", None) is None and not getattr(data, "snap", False)
    return open_mask(
        source,
        default_work_dir() / SLIDE_CACHE,
        lambda: data.read_mask(image_id),
        data.classes_of if windowed else None,
        data.mask_rules(),
    )


def _runs_of(data, image_id: str, shape: tuple[int, int]):
    """The image's rows as runs: one ``RunsMask`` for a binary table's one row, else ``RunsLayers`` of them."""
    rows = data.rows.get(image_id, [])
    where = f"{data.csv}: line"
    if not data.multilabel and data.num_classes == 2 and len(rows) <= 1:
        rle, source = (rows[0][1], f"{where} {rows[0][2]} (image {image_id})") if rows else ("", str(data.csv))
        return RunsMask(rle, shape, data.rle_order, source)
    layers = [
        (
            1 << label if data.multilabel else label + 1,
            RunsMask(rle, shape, data.rle_order, f"{where} {line} (image {image_id})"),
        )
        for label, rle, line in rows
    ]
    return RunsLayers(layers, shape, data.multilabel, f"{data.csv} (image {image_id})")


class RunsLayers:
    """A slide's mask of several RLE rows (one per class, or several of one), each kept as its runs: ``read`` draws a
    window of class indices (row of class k: value k + 1), or of bits (``multilabel``: bit k for class k). Two
    classes on one pixel of an index mask stop in one line naming both rows, as the whole mask's drawing does."""

    def __init__(self, layers: list[tuple[int, RunsMask]], shape: tuple[int, int], multilabel: bool, source: str):
        self.layers, self.shape, self.multilabel, self.source = layers, shape, multilabel, source

    def read(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        window = np.zeros((height, width), np.uint8)
        for value, runs in self.layers:
            covered = runs.read(y, x, height, width).astype(bool)
            if self.multilabel:
                window[covered] |= value
                continue
            other = window[covered & (window != 0) & (window != value)]
            if other.size:
                first = next(layer for layer_value, layer in self.layers if layer_value == other[0])
                raise DataError(
                    f"{first.source} and {runs.source}: classes {other[0] - 1} and {value - 1} overlap, and a softmax "
                    "gives each pixel one class: pass --head multilabel (a sigmoid channel per class)"
                )
            window[covered] = value
        return window


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
            slide.index,
            slide.mask,
            1,
            rng,
            config.empty_tile_weight,
            config.positive_ratio,
            config.min_tissue,
            slide.ignore_index,
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
    """Scores of whole slides, each predicted by the sliding window (windows of ``--tile`` and ``--tile-overlap``,
    Gaussian-blended, as infer.py stitches them) and compared band by band with its mask's windows: neither the
    slide's probabilities nor its mask is held whole; ignored pixels count nowhere. One class: ``val_dice`` and
    ``val_iou`` averaged over the slides; multilabel: ``val_dice`` (per slide and class) and ``val_miou`` (per class
    over the slides), with each class's ``dice_<class>`` and ``iou_<class>``; several classes: the confusion matrix summed over the slides (``confusion``), which training
    scores as it scores whole images'."""
    model.eval()
    device = next(model.parameters()).device
    multilabel, classes = config.multilabel(), config.class_names()

    def predict(windows: np.ndarray) -> np.ndarray:
        images = torch.stack([to_chw(as_channels(window, config.in_channels, "a slide")) for window in windows])
        return predict_probabilities(model, images.to(device), precision=precision, multilabel=multilabel).cpu().numpy()

    if config.num_classes() > 2 and not multilabel:
        confusion = sum(_counted(slide, predict, config, len(classes)) for slide in slides)
        return {"confusion": torch.from_numpy(confusion)}  # scored by training.confusion_scores, as whole images
    counts = np.stack([_counted(slide, predict, config, 0) for slide in slides])  # (slides, K, 3)
    both, predicted, truth = counts[..., 0], counts[..., 1], counts[..., 2]
    dice = np.where(predicted + truth == 0, 1.0, 2 * both / np.maximum(predicted + truth, 1))
    if multilabel:
        unions = (predicted + truth - both).sum(0)
        iou = np.where(unions > 0, both.sum(0) / np.maximum(unions, 1), np.nan)
        return {  # each class's too, replacing the windows' (the per-class line agrees with its means)
            "val_dice": float(dice.mean()),
            "val_miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else np.nan,
            **{f"dice_{name}": float(value) for name, value in zip(classes, dice.mean(0))},
            **{f"iou_{name}": float(value) for name, value in zip(classes, iou)},
        }
    iou = np.where(predicted + truth == 0, 1.0, both / np.maximum(predicted + truth - both, 1))
    return {"val_dice": float(dice.mean()), "val_iou": float(iou.mean())}


def _counted(slide: TiledSlide, predict, config: TrainConfig, num_classes: int) -> np.ndarray:
    """The slide's stitched prediction against its mask, band by band: with ``num_classes`` the (classes, classes)
    confusion matrix; else (K, 3) pixels predicted and true, predicted, true of each sigmoid channel (a binary
    mask's foreground 1, or a multilabel mask's bit k)."""
    counts = None
    bands = blended_bands(
        slide.slide,
        predict,
        config.tile,
        config.tile_overlap,
        batch_size=config.val_batch_size,
        work_dir=default_work_dir() / ACCUMULATORS,
    )
    for top, probabilities in bands:
        truth = slide.mask.read(top, 0, *probabilities.shape[:2])
        if num_classes:
            band = confusion_matrix(
                torch.from_numpy(labels_of(probabilities)), torch.from_numpy(truth), num_classes, slide.ignore_index
            )
            counts = band.numpy() if counts is None else counts + band.numpy()
            continue
        labelled = truth != slide.ignore_index
        predicted = (probabilities > 0.5) & labelled[..., None]
        bits = 1 << np.arange(probabilities.shape[-1]) if config.multilabel() else np.ones(1, np.int64)
        true = ((truth[..., None] & bits) > 0) & labelled[..., None] if config.multilabel() else (truth == 1)[..., None]
        band = np.stack([(predicted & true).sum((0, 1)), predicted.sum((0, 1)), true.sum((0, 1))], 1)
        counts = band if counts is None else counts + band
    return counts
