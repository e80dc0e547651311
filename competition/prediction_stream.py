"""The prediction stream: images decoded by loader processes in batches of one size, through an ensemble, into
class masks handed to a writer's sink, on the deadline's clock."""

import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from competition.clock import PROJECT_AFTER_SECONDS, Deadline, format_duration
from competition.data import Loader, resize_image, same_size_batches, to_chw
from competition.environment import default_work_dir, explain_out_of_memory
from competition.errors import CheckpointError, DataError
from competition.postprocess import PostProcess
from competition.prediction import label_masks, most_probable_class
from competition.slide_inference import area_rules_applied, band_labelling, window_predictor
from competition.slides import TIFF_SUFFIXES, open_slide
from competition.sliding_window import InMemory, Tiling, predict_mask
from competition.workers import loader_start_method

logger = logging.getLogger(__name__)


class PredictionImages(torch.utils.data.Dataset):
    """Images at each input size the ensemble needs (uint8 (C, H, W), C the data's ``in_channels``), their
    full size, and (for scoring) the mask.

    A failure is returned, not raised, so that it reaches the user as one message rather than
    as a DataLoader worker's traceback.
    """

    def __init__(
        self,
        data,
        image_ids: list[str],
        split: str,
        sizes: dict[str, tuple[int, int] | None],
        expected_shape: tuple[int, int] | None = None,
        with_masks: bool = False,
    ):
        self.data, self.image_ids, self.split, self.sizes = data, image_ids, split, sizes
        self.expected_shape, self.with_masks = expected_shape, with_masks
        reduced = [size for size in sizes.values() if size is not None]
        # Decode at a reduced DCT scale only when every consumer is at least that small.
        self.reduce_to = max(reduced) if reduced and None not in sizes.values() else None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        try:
            image, shape = self.data.read_image_and_shape(image_id, self.split, self.reduce_to)
            if self.expected_shape is not None and shape != self.expected_shape:
                raise DataError(
                    f"{self.data.image_path(image_id, self.split)}: image is {shape[1]}x{shape[0]}, but the models "
                    f"were trained on {self.expected_shape[1]}x{self.expected_shape[0]} images; predict it with "
                    "models trained on images of its size"
                )
            sample = {"index": index, "shape": torch.tensor(shape), "images": {}}
            for key, size in self.sizes.items():
                resized = image if size is None else resize_image(image, size)
                sample["images"][key] = to_chw(resized)
            if self.with_masks:
                sample["mask"] = torch.from_numpy(self.data.read_mask(image_id, shape)).unsqueeze(0)
            return sample
        except DataError as error:
            return {"error": str(error)}


def _collate(samples: list[dict]) -> dict:
    for sample in samples:
        if "error" in sample:
            return sample
    return torch.utils.data.default_collate(samples)


def expected_shape(ensemble, data) -> tuple[int, int] | None:
    """The one image size the ensemble's models were trained on when the data's images all share one size
    (Carvana's 1918x1280), else None: each image is then predicted at its own size."""
    if not data.fixed_image_size:
        return None
    shapes = {member.image_shape for member in ensemble.members if member.image_shape}
    if len(shapes) > 1:
        raise CheckpointError(f"the checkpoints were trained on images of different sizes: {sorted(shapes)}")
    return shapes.pop() if shapes else None


def image_batches(data, image_ids: list[str], split: str, batch_size: int, fixed: bool) -> list[list[str]]:
    """``image_ids`` in batches of at most ``batch_size``: in order when every image has one size (``fixed``),
    else grouped by size (each image's header read once)."""
    if fixed:
        return [image_ids[start : start + batch_size] for start in range(0, len(image_ids), batch_size)]
    shapes = [data.image_shape(image_id, split) for image_id in image_ids]
    return [[image_ids[index] for index in batch] for batch in same_size_batches(shapes, batch_size)]


def prediction_loader(dataset, batches: list[list[int]], workers: int, device: torch.device):
    """The loader of ``dataset`` in ``batches`` (lists of indices), its errors returned as one-line batches."""
    workers = min(workers, os.cpu_count() or 1)
    return Loader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        multiprocessing_context=loader_start_method(workers),
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )


def device_batches(loader, device: torch.device):
    """(the loader's batch, its images at each size on ``device``); a sample that failed is one DataError."""
    for batch in loader:
        if "error" in batch:
            raise DataError(batch["error"])
        images = {key: value.to(device, non_blocking=True) for key, value in batch["images"].items()}
        yield batch, images


def class_masks(probabilities: torch.Tensor, threshold, multilabel: bool = False) -> np.ndarray:
    """(N, C, H, W) probabilities -> uint8 (N, H, W) masks: with ``multilabel`` the packed bits of every class
    above its threshold (``label_masks``; ``threshold`` one number or one per class); else class indices, above
    ``threshold`` for one channel (binary), the most probable class for several."""
    if multilabel:
        return label_masks(probabilities, threshold)
    if probabilities.shape[1] == 1:
        return (probabilities[:, 0] > threshold).to(torch.uint8).cpu().numpy()
    return most_probable_class(probabilities).to(torch.uint8).cpu().numpy()


class PredictionPace:
    """The pace of a prediction on the deadline's clock: whether the next batch fits in the time left (the
    longest batch so far taken as its length), and one projection of the time the rest takes, made after
    PROJECT_AFTER_SECONDS of predicting or at the end if sooner (a WARNING when it does not fit)."""

    def __init__(self, deadline: Deadline, label: str, images: int, models: int, views: int):
        self.deadline, self.label, self.images, self.models, self.views = deadline, label, images, models, views
        self.started = self.batch_started = deadline.elapsed()
        self.longest_batch, self.done, self.projected = 0.0, 0, False

    def next_batch_fits(self) -> bool:
        now = self.deadline.elapsed()
        if self.done:
            self.longest_batch = max(self.longest_batch, now - self.batch_started)
        self.batch_started = now
        return self.deadline.fits(self.longest_batch)

    def batch_done(self, images: int) -> None:
        self.done += images
        if not self.projected and self.deadline.elapsed() - self.started >= PROJECT_AFTER_SECONDS:
            self.project()

    def finish(self) -> None:
        if not self.projected and self.done:
            self.project()

    def project(self) -> None:
        self.projected = True
        measured = self.deadline.elapsed() - self.started
        rate, left = self.done / max(measured, 1e-9), self.images - self.done
        work = f"x {self.models} model(s) x {self.views} view(s)"
        if not left:  # done within the first minute: the pace alone
            logger.info(
                "%s: %d image(s) %s in %s (%.1f img/s); %s",
                self.label,
                self.done,
                work,
                format_duration(measured),
                rate,
                self.deadline.describe(),
            )
            return
        needed, remaining = left / rate, self.deadline.remaining()
        if self.deadline.limit is None:
            verdict, fits = "no time limit", True
        elif remaining <= 0:
            verdict, fits = f"the {self.deadline.describe()} was passed: none of them fit", False
        else:
            fits = needed <= remaining
            verdict = f"{self.deadline.describe()}, {format_duration(remaining)} left: " + (
                "it fits" if fits else f"it does not fit, about {int(rate * max(remaining, 0))} of them do"
            )
        (logger.info if fits else logger.warning)(
            "%s: projected %s for the %d image(s) left %s (from %.1f img/s over %s); %s",
            self.label,
            format_duration(needed),
            left,
            work,
            rate,
            format_duration(measured),
            verdict,
        )


@torch.no_grad()
def predict_into(
    ensemble, data, batches: list[list[str]], sink, threshold: float, workers: int, progress: bool = True,
    label: str = "predict", position: int | None = None, deadline: Deadline | None = None, total: int | None = None,
    masks_of=None, postprocess: PostProcess | None = None, tiling: Tiling | None = None,
) -> tuple[int, float, bool]:  # fmt: skip
    """The streaming pipeline with bounded memory: loader workers decode and resize the test images of
    ``batches``, the device predicts a batch and turns it into class masks, and a thread pool encodes them
    (``sink.encode``: the numba RLE and zlib release the GIL) while the next batch is on the device; ``sink.write``
    stores them in order. With ``postprocess`` its per-class rules make the masks from the probabilities, in
    those threads, instead of ``threshold``; ``masks_of`` turns a batch's probabilities into its masks instead of
    either. Stops before a batch that ``deadline`` leaves no time for, what was written kept. With ``tiling``
    each image is predicted by the sliding window instead (``predict_slides_into``).
    Returns (images predicted, seconds, whether every image of ``batches`` was written)."""
    if tiling is not None:
        image_ids = [image_id for batch in batches for image_id in batch]
        settings = {"progress": progress, "label": label, "position": position, "deadline": deadline, "total": total}
        return predict_slides_into(ensemble, data, image_ids, sink, threshold, tiling, postprocess=postprocess,
                                   **settings)  # fmt: skip
    image_ids = [image_id for batch in batches for image_id in batch]
    positions = {image_id: index for index, image_id in enumerate(image_ids)}
    data.in_channels = ensemble.in_channels  # the models decide the channels they take
    dataset = PredictionImages(data, image_ids, "test", ensemble.input_sizes, expected_shape(ensemble, data))
    index_batches = [[positions[image_id] for image_id in batch] for batch in batches]
    views = 1 + len(ensemble.tta)
    pace = PredictionPace(deadline or Deadline(None), label, len(image_ids), len(ensemble.members), views)
    total = len(image_ids) if total is None else total
    started, predicted = time.perf_counter(), 0
    bar = tqdm(total=total, initial=total - len(image_ids), unit="img", desc=label, position=position,
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    batch_size = max((len(batch) for batch in batches), default=1)
    fix = f"lower --batch-size (now {batch_size}); what is already written is kept and --resume continues from it"
    loader = prediction_loader(dataset, index_batches, workers, ensemble.device)
    with (
        explain_out_of_memory(f"a batch of {batch_size} test images", fix),
        ThreadPoolExecutor(max(1, workers)) as pool,
    ):
        pending = []
        try:
            for batch, images in device_batches(loader, ensemble.device):
                if not pace.next_batch_fits():
                    break
                shape = tuple(batch["shape"][0].tolist())
                probabilities = ensemble.probabilities(images, shape)
                names = [image_ids[index] for index in batch["index"].tolist()]
                rule = (masks_of, postprocess, threshold, ensemble)
                pending.append(_submit_masks(pool, sink, names, probabilities, *rule))
                predicted += len(names)
                pace.batch_done(len(names))
                while len(pending) > 2:  # bounded: at most three batches of masks in memory
                    _write_done(sink, pending.pop(0), bar)
        finally:
            try:
                while pending:  # also when the loop stopped early: what was predicted is kept for --resume
                    _write_done(sink, pending.pop(0), bar)
                sink.flush()
            finally:
                bar.close()  # also when a write failed (a full disk): the bar ends before the error's line
    pace.finish()
    return predicted, time.perf_counter() - started, predicted == len(image_ids)


def _submit_masks(pool, sink, names, probabilities, masks_of, postprocess, threshold, ensemble) -> list:
    """(name, future of ``sink.encode``) of each image of a batch: its mask made on the device by ``masks_of``
    or ``threshold``, or with ``postprocess`` (and no ``masks_of``) from its probabilities in the pool's thread."""
    if masks_of is not None or postprocess is None:
        masks = (
            masks_of(probabilities)
            if masks_of is not None
            else class_masks(probabilities, threshold, ensemble.multilabel)
        )
        return [(name, pool.submit(sink.encode, name, mask)) for name, mask in zip(names, masks)]
    arrays = probabilities.float().cpu().numpy()
    return [
        (name, pool.submit(_encode_postprocessed, sink, postprocess, name, array)) for name, array in zip(names, arrays)
    ]


def _encode_postprocessed(sink, postprocess: PostProcess, name: str, probabilities: np.ndarray):
    return sink.encode(name, postprocess.mask(probabilities))


def _write_done(sink, items, bar) -> None:
    sink.write([(name, future.result()) for name, future in items])
    bar.update(len(items))


def open_test_slide(data, image_id: str, cache_dir: Path):
    """A test image as a slide: a TIFF through ``open_slide`` (a tiled one read window by window), any other image
    decoded whole as the data reads it (its channels as the models take them)."""
    path = Path(data.image_path(image_id, "test"))
    if path.suffix.lower() in TIFF_SUFFIXES:
        return open_slide(path, cache_dir)
    image, _ = data.read_image_and_shape(image_id, "test")
    return InMemory(image)


@torch.no_grad()
def predict_slides_into(
    ensemble, data, image_ids: list[str], sink, threshold: float, tiling: Tiling, progress: bool = True,
    label: str = "predict", position: int | None = None, deadline: Deadline | None = None, total: int | None = None,
    postprocess: PostProcess | None = None,
) -> tuple[int, float, bool]:  # fmt: skip
    """``predict_into`` of images one at a time by the sliding window of ``tiling`` (windows in its batches, each
    through every model and TTA view; the blend's accumulator in memory, or on disk in the work folder's
    slide_cache when the image is large), each band labelled as whole images are (``band_labelling``: the head's
    rule, or ``postprocess``'s thresholds; its area rules on the whole mask) and handed to ``sink.image_bands``
    (its ``write(top, band)``, then ``finish()``, or ``discard()`` when the prediction fails: RLE rows and TIFFs are
    encoded from the bands, never whole). What it makes goes to ``sink.write`` at once: the image is the unit of
    ``--resume``, and ``deadline`` is checked before each image.
    Returns (images predicted, seconds, whether every image was written)."""
    data.in_channels = ensemble.in_channels
    batch_size = tiling.batch_size
    cache_dir = default_work_dir() / "slide_cache"
    predict, labels = window_predictor(ensemble), band_labelling(threshold, ensemble.multilabel, postprocess)
    views = 1 + len(ensemble.tta)
    pace = PredictionPace(deadline or Deadline(None), label, len(image_ids), len(ensemble.members), views)
    total = len(image_ids) if total is None else total
    started, predicted = time.perf_counter(), 0
    bar = tqdm(total=total, initial=total - len(image_ids), unit="img", desc=label, position=position,
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    fix = f"lower --batch-size (now {batch_size}) or --tile (now {tiling.tile}); --resume keeps what is written"
    options = {"weighting": tiling.weighting, "batch_size": batch_size, "work_dir": cache_dir}
    try:
        with explain_out_of_memory(f"a batch of {batch_size} windows of {tiling.tile} pixels", fix):
            for image_id in image_ids:
                if not pace.next_batch_fits():
                    break
                with contextlib.closing(open_test_slide(data, image_id, cache_dir)) as slide:
                    bands = sink.image_bands(image_id, slide.shape[:2])
                    try:
                        with area_rules_applied(bands.write, slide.shape[:2], postprocess, image_id) as hand_on:
                            predict_mask(slide, predict, hand_on, tiling.tile, tiling.overlap, labels, **options)
                        encoded = bands.finish()
                    except BaseException:
                        bands.discard()  # a file begun for the image goes: the image is the unit of --resume
                        raise
                sink.write([(image_id, encoded)])
                predicted += 1
                bar.update(1)
                pace.batch_done(1)
        sink.flush()
    finally:
        bar.close()
    pace.finish()
    return predicted, time.perf_counter() - started, predicted == len(image_ids)
