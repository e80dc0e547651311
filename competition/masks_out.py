"""Predicted masks of any data set but Carvana: palette PNGs of class indices (and colour overlays), or Kaggle's
per-class RLE CSV (``ImageId_ClassId,EncodedPixels``)."""

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from competition.data import as_rgb
from competition.errors import ConfigError, DataError
from competition.files import atomic_output
from competition.rle import RLEError, rle_encode, rle_runs
from competition.submission import predicted_by

logger = logging.getLogger(__name__)

FORMATS = ("png", "rle-csv")
RLE_ORDERS = ("row", "column")  # flatten row-major (Carvana, most competitions) or column-major (e.g. TGS, SIIM)
RECORD_NAME = "predicted-by.json"
# The first colours of the mask palette: background black, then distinct hues; more classes repeat them darker.
BASE_COLOURS = (
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
)


def palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8 colours of the class indices: viewers show the mask in colour, the values stay indices."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    for index in range(min(num_classes, 255)):
        base = np.array(BASE_COLOURS[index % len(BASE_COLOURS)])
        colours[index] = base // (1 + index // len(BASE_COLOURS))
    colours[255] = (255, 255, 255)  # the ignore index of truth masks
    return colours


def encode_mask_png(mask: np.ndarray, colours: np.ndarray) -> bytes:
    """A class-index mask as a palette PNG."""
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(colours.ravel().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def colour_overlay(image: np.ndarray, mask: np.ndarray, colours: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """The photo with each non-background class tinted in its palette colour."""
    tinted = image.astype(np.float32)
    labelled = mask > 0
    tinted[labelled] = (1 - opacity) * tinted[labelled] + opacity * colours[mask[labelled]]
    return tinted.astype(np.uint8)


def class_map(probabilities: torch.Tensor, threshold: float) -> np.ndarray:
    """(1, C, H, W) probabilities -> uint8 (H, W) class indices: above ``threshold`` for one channel
    (binary), the most probable class for several."""
    if probabilities.shape[1] == 1:
        return (probabilities[0, 0] > threshold).to(torch.uint8).cpu().numpy()
    return probabilities[0].argmax(0).to(torch.uint8).cpu().numpy()


def class_rles(mask: np.ndarray, num_classes: int, order: str = "row") -> list[str]:
    """RLE of each class 1..K-1 of a class-index mask (1-indexed start/length pairs), flattened row-major, or
    column-major with ``order="column"`` (the transposed mask read row by row)."""
    if order == "column":
        mask = np.ascontiguousarray(mask.T)
    return [rle_encode((mask == index).astype(np.uint8)) for index in range(1, num_classes)]


def check_rle_rows(rows: list[tuple[str, str]], expected_ids: list[str], pixels: dict[str, int]) -> None:
    """Every expected ``<image>_<class>`` id exactly once, and every RLE decodable within its image."""
    ids = [row_id for row_id, _ in rows]
    if sorted(ids) != sorted(expected_ids) or len(set(ids)) != len(ids):
        raise DataError("the per-class RLE rows do not cover every image and class exactly once")
    for row_id, rle in rows:
        try:
            rle_runs(rle, pixels[row_id])
        except RLEError as error:
            raise DataError(f"row {row_id}: {error}") from None


def _prepare_folder(out: Path, record: dict, resume: bool, overwrite: bool) -> set[str]:
    """The stems already predicted in ``out`` by the same checkpoints and settings (kept with ``resume``);
    a folder of other masks is never written into without ``overwrite``."""
    written = {path.stem for path in out.glob("*.png")} if out.is_dir() else set()
    record_path = out / RECORD_NAME
    if written and not (resume or overwrite):
        raise ConfigError(
            f"{out} already holds {len(written)} predicted masks; pass --resume to keep them and predict the rest, "
            "or --overwrite to predict them all again"
        )
    if resume and written:
        recorded = json.loads(record_path.read_text()) if record_path.is_file() else None
        if recorded != json.loads(json.dumps(record)):
            raise ConfigError(f"{out}: its masks were predicted by other checkpoints or settings; pass --overwrite")
    if overwrite and out.is_dir():
        for path in out.glob("*.png"):
            path.unlink()
        shutil.rmtree(out / "overlays", ignore_errors=True)
        written = set()
    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(record_path) as partial:
        partial.write_text(json.dumps(record, indent=2) + "\n")
    return written if resume else set()


def _predictions(ensemble, data, image_ids: list[str], threshold: float, workers: int, progress: bool):
    """(image id, RGB image, class-index mask) of each test image, each predicted at its own full size."""
    from competition.inference import PredictionImages, _batches, _loader  # imported here: inference imports us

    data.in_channels = ensemble.in_channels  # the models decide the channels they take
    dataset = PredictionImages(data, image_ids, "test", ensemble.input_sizes)
    loader = _loader(dataset, 1, workers, ensemble.device)  # test images may differ in size: one at a time
    bar = tqdm(total=len(image_ids), unit="img", desc="predict", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for batch, images in _batches(loader, ensemble.device):
            shape = tuple(batch["shape"][0].tolist())
            image_id = image_ids[int(batch["index"][0])]
            mask = class_map(ensemble.probabilities(images, shape), threshold)
            bar.update(1)
            yield image_id, mask
    bar.close()


def write_masks(
    ensemble,
    data,
    checkpoints: list[Path],
    out: str | Path,
    threshold: float = 0.5,
    overlays: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    workers: int = 2,
    progress: bool = True,
) -> int:
    """One palette PNG of class indices per test image in ``out`` (same stem), each written whole under a
    temporary name; ``overlays`` adds ``out/overlays/<stem>.png``. Returns the masks written."""
    out = Path(out)
    if out.suffix.lower() == ".csv":
        raise ConfigError(f"--out {out}: PNG masks go to a folder; name one, or pass --format rle-csv for a CSV")
    record = predicted_by(checkpoints, ensemble.tta, threshold)
    done = _prepare_folder(out, record, resume, overwrite)
    image_ids = [image_id for image_id in data.test_ids() if image_id not in done]
    if not data.test_ids():
        raise DataError(f"{data.root}: no test images (a test/ folder, a test split, or --test-images DIR)")
    colours = palette(data.num_classes)
    if overlays:
        (out / "overlays").mkdir(exist_ok=True)
    for image_id, mask in _predictions(ensemble, data, image_ids, threshold, workers, progress):
        with atomic_output(out / f"{image_id}.png") as partial:
            partial.write_bytes(encode_mask_png(mask, colours))
        if overlays:
            with atomic_output(out / "overlays" / f"{image_id}.png") as partial:
                Image.fromarray(colour_overlay(as_rgb(data.read_image(image_id, "test")), mask, colours)).save(
                    partial, "PNG"
                )
    logger.info(
        "%d masks -> %s/ (%d kept from before); classes %s",
        len(image_ids),
        out,
        len(done),
        ", ".join(f"{index} {name}" for index, name in enumerate(data.classes)),
    )
    return len(image_ids)


def write_rle_csv(
    ensemble,
    data,
    out: str | Path,
    threshold: float = 0.5,
    order: str = "row",
    overwrite: bool = False,
    workers: int = 2,
    progress: bool = True,
) -> int:
    """Kaggle's per-class RLE submission: a row ``<image>_<class>,<rle>`` for every test image and class
    1..K-1, validated, then written whole. Returns the rows written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it, or another --out")
    rows, pixels, image_ids = [], {}, data.test_ids()
    if not image_ids:
        raise DataError(f"{data.root}: no test images (a test/ folder, a test split, or --test-images DIR)")
    for image_id, mask in _predictions(ensemble, data, image_ids, threshold, workers, progress):
        for index, rle in enumerate(class_rles(mask, data.num_classes, order), start=1):
            rows.append((f"{image_id}_{index}", rle))
            pixels[f"{image_id}_{index}"] = mask.size
    expected = [f"{image_id}_{index}" for image_id in image_ids for index in range(1, data.num_classes)]
    check_rle_rows(rows, expected, pixels)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as partial:
        partial.write_text("ImageId_ClassId,EncodedPixels\n" + "".join(f"{row},{rle}\n" for row, rle in rows))
    logger.info(
        "%d rows (%d images x %d classes, %s-major RLE) -> %s, validated",
        len(rows),
        len(image_ids),
        data.num_classes - 1,
        order,
        out,
    )
    return len(rows)


def class_out_of_fold(members, data, folds_csv, tta, precision, out_dir: str | Path, workers: int = 2) -> dict:
    """Each fold's models on their held-out images at full resolution (TTA and plain): the confusion matrix
    over all of them, its per-class table logged, and each image's mIoU in ``out_dir/oof.csv``."""
    import pandas as pd

    from competition.data import image_id_of
    from competition.folds import read_folds
    from competition.inference import PredictionImages, _batches, _loader, fold_ensembles
    from competition.metrics import confusion_matrix, format_class_table, segmentation_scores

    folds, classes = read_folds(folds_csv), list(data.classes)
    confusion = {"plain": 0, "tta": 0}
    rows = []
    for fold, ensemble in fold_ensembles(members, tta, precision).items():
        image_ids = [image_id_of(img) for img in folds.loc[folds["fold"] == fold, "img"]]
        data.in_channels = ensemble.in_channels  # the models decide the channels they take
        dataset = PredictionImages(data, image_ids, "train", ensemble.input_sizes, with_masks=True)
        for batch, images in _batches(_loader(dataset, 1, workers, ensemble.device), ensemble.device):
            truth = batch["mask"][0, 0].to(ensemble.device)
            plain, augmented = ensemble.plain_and_augmented(images, tuple(truth.shape))
            for key, probabilities in (("plain", plain), ("tta", augmented)):
                predicted = torch.from_numpy(class_map(probabilities, 0.5)).to(truth.device)
                image_confusion = confusion_matrix(predicted, truth, len(classes), data.ignore_index)
                confusion[key] = confusion[key] + image_confusion.cpu()
            image_id = image_ids[int(batch["index"][0])]
            rows.append({"img": image_id, "fold": fold, "miou": segmentation_scores(image_confusion, classes)["miou"]})
    scores = {key: segmentation_scores(matrix, classes) for key, matrix in confusion.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / "oof.csv") as partial:
        pd.DataFrame(rows).to_csv(partial, index=False)
    label = "+".join(tta) if tta else "no TTA"
    logger.info("out of fold, %d images: mIoU %.4f without TTA", len(rows), scores["plain"]["miou"])
    logger.info("out of fold with %s:\n%s", label, format_class_table(scores["tta"]))
    return scores
