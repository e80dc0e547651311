"""Prediction with fold ensembles: checkpoints, a streaming test-set pipeline to submission.csv, out-of-fold scoring."""

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from competition.checkpoints import checkpoint_config, load_checkpoint
from competition.clock import PROJECT_AFTER_SECONDS, Deadline, format_duration
from competition.config import TrainConfig
from competition.data import CarvanaData, as_rgb, decode_image, image_id_of, resize_image, to_chw
from competition.environment import explain_out_of_memory
from competition.errors import CheckpointError, DataError
from competition.files import atomic_output
from competition.folds import read_folds
from competition.metrics import dice_per_image
from competition.models import build_model
from competition.prediction import average_views, model_input, predict_probabilities, prepare_model, view_probabilities
from competition.rle import rle_encode
from competition.submission import (
    SubmissionWriter,
    finish_rows,
    gather_rows,
    interrupted_rows,
    keep_finished,
    predicted_by,
    shard_files,
    start_rows,
    submission_order,
    validate_submission,
)
from competition.workers import loader_start_method

__all__ = ["CheckpointError", "Ensemble", "Member", "find_checkpoints", "load_member", "write_submission"]

logger = logging.getLogger(__name__)

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass
class Member:
    """One fold model of the ensemble and the settings it was trained with."""

    path: Path
    model: torch.nn.Module
    config: TrainConfig
    image_shape: tuple[int, int] | None
    forward: torch.nn.Module | None = None  # what predicts: the compiled model, or the model itself

    def __post_init__(self):
        if self.forward is None:
            self.forward = self.model

    @property
    def size_key(self) -> str:
        size = self.config.input_size()
        return "full" if size is None else f"{size[0]}x{size[1]}"

    def model_input(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """This member's batch from a loader's images at every size, in its memory format."""
        return model_input(images[self.size_key], self.config.channels_last)


def find_checkpoints(paths: list[str | Path]) -> list[Path]:
    """Checkpoint files: each path is a ``best.pt`` file or a run folder holding ``fold*/best.pt``."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            folds = sorted(path.glob("fold*/best.pt")) or sorted(path.glob("best.pt"))
            if not folds:
                raise CheckpointError(f"{path}: no fold*/best.pt inside; train with `python train.py --out {path}`")
            found += folds
        else:
            raise CheckpointError(f"{path}: no such checkpoint file or run folder")
    return found


def load_member(path: str | Path, device: torch.device, compile: bool = False) -> Member:
    """A model rebuilt from its checkpoint alone (``weights_only``: an untrusted file cannot run code),
    on ``device`` in the memory format it was trained in, compiled with ``compile``."""
    checkpoint = load_checkpoint(path)
    config = checkpoint_config(checkpoint, path)
    model = build_model(
        config.arch, config.encoder, "none", classes=config.output_channels(), in_channels=config.in_channels
    )
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: its weights do not fit {config.arch}-{config.encoder}, the model its config names "
            f"({str(error).splitlines()[0]}); the file was altered or comes from another code version"
        ) from None
    model, forward = prepare_model(model.eval(), device, config.channels_last, compile)
    shape = checkpoint.get("image_shape")
    return Member(Path(path), model, config, tuple(shape) if shape else None, forward)


class Ensemble:
    """Fold models averaged in probability space, each fed the input size it was trained on."""

    def __init__(self, members: list[Member], tta: tuple[str, ...] = (), precision: str = "fp32"):
        if not members:
            raise CheckpointError("no checkpoints to predict with")
        classes = {tuple(member.config.class_names()) for member in members}
        if len(classes) > 1:
            raise CheckpointError(
                f"the checkpoints were trained on different classes ({' | '.join(map(','.join, sorted(classes)))}): "
                "an ensemble averages one set of classes"
            )
        channels = {member.config.in_channels for member in members}
        if len(channels) > 1:
            raise CheckpointError(
                "the checkpoints take different image channels (in_channels "
                f"{' and '.join(map(str, sorted(channels)))}): an ensemble reads each image one way"
            )
        self.members, self.tta, self.precision = members, tta, precision

    @property
    def in_channels(self) -> int:
        """The image channels every member takes: 3 (RGB) or 1 (grey)."""
        return self.members[0].config.in_channels

    @property
    def device(self) -> torch.device:
        return next(self.members[0].model.parameters()).device

    @property
    def input_sizes(self) -> dict[str, tuple[int, int] | None]:
        return {member.size_key: member.config.input_size() for member in self.members}

    def probabilities(self, images: dict[str, torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        total = None
        for member in self.members:
            probabilities = predict_probabilities(
                member.forward, member.model_input(images), output_size, self.tta, self.precision
            )
            total = probabilities if total is None else total + probabilities
        return total / len(self.members)

    def plain_and_augmented(
        self, images: dict[str, torch.Tensor], output_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the identity view alone, the identity and every TTA view), each averaged over the members:
        one pass over the views serves both."""
        plain = augmented = 0
        for member in self.members:
            views = view_probabilities(member.forward, member.model_input(images), self.tta, self.precision)
            identity = average_views(views[:1], output_size)
            plain = plain + identity
            augmented = augmented + (average_views(views, output_size) if self.tta else identity)
        return plain / len(self.members), augmented / len(self.members)


def fold_ensembles(members: list[Member], tta: tuple[str, ...], precision: str) -> dict[int, Ensemble]:
    """The members grouped by the fold they held out (several run folders may share folds), by fold."""
    folds = sorted({member.config.fold for member in members})
    return {
        fold: Ensemble([member for member in members if member.config.fold == fold], tta, precision) for fold in folds
    }


class PredictionImages(torch.utils.data.Dataset):
    """Images at each input size the ensemble needs (uint8 (C, H, W), C the data's ``in_channels``), their
    full size, and (for scoring) the mask.

    A failure is returned, not raised, so that it reaches the user as one message rather than
    as a DataLoader worker's traceback.
    """

    def __init__(
        self,
        data: CarvanaData,
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


def _loader(dataset, batch_size: int, workers: int, device: torch.device):
    workers = min(workers, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size,
        num_workers=workers,
        multiprocessing_context=loader_start_method(workers),
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )


def _batches(loader, device: torch.device):
    for batch in loader:
        if "error" in batch:
            raise DataError(batch["error"])
        images = {key: value.to(device, non_blocking=True) for key, value in batch["images"].items()}
        yield batch, images


def _expected_shape(ensemble: Ensemble) -> tuple[int, int] | None:
    shapes = {member.image_shape for member in ensemble.members if member.image_shape}
    if len(shapes) > 1:
        raise CheckpointError(f"the checkpoints were trained on images of different sizes: {sorted(shapes)}")
    return shapes.pop() if shapes else None


def write_submission(
    ensemble: Ensemble,
    data: CarvanaData,
    out: str | Path,
    threshold: float = 0.5,
    batch_size: int = 4,
    workers: int = 4,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    deadline: Deadline | None = None,
) -> pd.DataFrame | None:
    """Predict every test image and write ``img,rle_mask`` rows in sample_submission order; returns the
    validated rows. A finished ``out`` is replaced only with ``overwrite``; with ``resume`` it is kept
    (nothing to predict), and the rows of an interrupted run (one device's or several's) are kept and not
    predicted again. When ``deadline`` leaves no time for the next batch, it stops there: the rows written
    stay in ``<out>.partial`` for ``--resume``, and it returns None.
    """
    order = submission_order(data)
    expected = _expected_shape(ensemble)
    if keep_finished(out, resume, overwrite):
        logger.info("%s: already complete (--resume); nothing to predict, --overwrite predicts it again", out)
        predicted, seconds = 0, 0.0
    else:
        paths = [member.path for member in ensemble.members]
        start_rows(out, predicted_by(paths, ensemble.tta, threshold), resume)
        if resume and shard_files(out):
            gather_rows(out, order)  # the shards of a run on several devices: their rows are kept too
        predicted, seconds, finished = predict_rows(
            ensemble, data, order, out, threshold, batch_size, workers, resume, progress, deadline=deadline
        )
        if not finished:
            log_stopped(out, interrupted_rows(out), len(order), deadline)
            return None
    shape = expected or data.image_shape(order[0], "test")
    rows = validate_submission(out, [f"{image_id}.jpg" for image_id in order], shape)
    finish_rows(out)
    log_validated(out, rows, predicted, seconds)
    return rows


def log_validated(out: str | Path, rows: pd.DataFrame, predicted: int, seconds: float) -> None:
    logger.info(
        "%s: %d rows, mean mask area %.1f%%, %d predicted in %.1f s (%.1f img/s), validated",
        out,
        len(rows),
        100 * rows["area"].mean(),
        predicted,
        seconds,
        predicted / max(seconds, 1e-9),
    )


def log_stopped(out: str | Path, written: int, total: int, deadline: Deadline) -> None:
    logger.warning(
        "%s: stopped by the %s at a batch boundary: %d of the %d test images are written and kept, no submission "
        "yet; run the same command with --resume to finish",
        out,
        deadline.describe(),
        written,
        total,
    )


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
        if not left:  # done within the first minute: the pace alone
            logger.info(
                "%s: %d image(s) x %d model(s) x %d view(s) in %s (%.1f img/s); %s",
                self.label,
                self.done,
                self.models,
                self.views,
                format_duration(measured),
                rate,
                self.deadline.describe(),
            )
            return
        needed, remaining = left / rate, self.deadline.remaining()
        if self.deadline.limit is None:
            verdict, fits = "no time limit", True
        else:
            fits = needed <= remaining
            verdict = f"{self.deadline.describe()}, {format_duration(remaining)} left: " + (
                "it fits" if fits else f"it does not fit, about {int(rate * max(remaining, 0))} of them do"
            )
        (logger.info if fits else logger.warning)(
            "%s: projected %s for the %d image(s) left x %d model(s) x %d view(s) (from %.1f img/s over %s); %s",
            self.label,
            format_duration(needed),
            left,
            self.models,
            self.views,
            rate,
            format_duration(measured),
            verdict,
        )


def predict_rows(
    ensemble, data, order, out, threshold, batch_size, workers, resume, progress, label="predict", position=None,
    deadline=None,
) -> tuple[int, float, bool]:  # fmt: skip
    """A streaming pipeline with bounded memory: loader workers decode and resize, the device predicts a
    batch and thresholds it, and a thread pool RLE-encodes (numba releases the GIL) while the next batch
    is on the device. Stops before a batch that ``deadline`` leaves no time for, the rows written kept
    in ``<out>.partial``. Returns (images predicted, seconds, whether every image is written and
    ``out`` complete)."""
    writer = SubmissionWriter(out, resume)
    done = set(writer.done)
    todo = [image_id for image_id in order if f"{image_id}.jpg" not in done]
    data.in_channels = ensemble.in_channels  # the models decide the channels they take
    dataset = PredictionImages(data, todo, "test", ensemble.input_sizes, _expected_shape(ensemble))
    views = 1 + len(ensemble.tta)
    pace = PredictionPace(deadline or Deadline(None), label, len(todo), len(ensemble.members), views)
    started, predicted = time.perf_counter(), 0
    bar = tqdm(
        total=len(order),
        initial=len(order) - len(todo),
        unit="img",
        desc=label,
        position=position,
        disable=not progress,
        dynamic_ncols=True,
    )
    fix = f"lower --batch-size (now {batch_size}); rows already written are kept and --resume continues from them"
    with explain_out_of_memory(f"a batch of {batch_size} test images", fix), ThreadPoolExecutor(max(1, workers)) as rle:
        pending = []
        try:
            for batch, images in _batches(_loader(dataset, batch_size, workers, ensemble.device), ensemble.device):
                if not pace.next_batch_fits():
                    break
                shape = tuple(batch["shape"][0].tolist())
                masks = (ensemble.probabilities(images, shape) > threshold).squeeze(1).to(torch.uint8).cpu().numpy()
                names = [f"{todo[i]}.jpg" for i in batch["index"].tolist()]
                pending.append((names, [rle.submit(rle_encode, mask) for mask in masks]))
                predicted += len(names)
                pace.batch_done(len(names))
                while len(pending) > 2:  # bounded: at most three batches of masks in memory
                    _write_done(writer, pending.pop(0), bar)
        finally:
            while pending:  # also when the loop stopped early: rows already predicted are kept for --resume
                _write_done(writer, pending.pop(0), bar)
            bar.close()
            writer.handle.flush()
    pace.finish()
    finished = predicted == len(todo)
    if finished:
        writer.close()
    else:
        writer.handle.close()
    return predicted, time.perf_counter() - started, finished


def _write_done(writer: SubmissionWriter, item, bar) -> None:
    names, futures = item
    writer.write([(name, future.result()) for name, future in zip(names, futures)])
    bar.update(len(names))


def dice_column(threshold: float) -> str:
    """``dice_0.50``: the out-of-fold column of the Dice at ``threshold``."""
    return f"dice_{threshold:.2f}" if round(threshold, 2) == threshold else f"dice_{threshold:g}"


@torch.no_grad()
def out_of_fold(
    members: list[Member],
    data: CarvanaData,
    folds_csv: str | Path,
    tta: tuple[str, ...],
    precision: str,
    batch_size: int = 4,
    workers: int = 4,
    thresholds: tuple[float, ...] = THRESHOLDS,
) -> pd.DataFrame:
    """The models of each fold (one per run folder) scored together on their held-out fold at full
    resolution: one row per image with its Dice without TTA at 0.5 (``dice_plain``) and with TTA at
    each threshold (``dice_0.50``...)."""
    folds = read_folds(folds_csv)
    rows = []
    for fold, ensemble in fold_ensembles(members, tta, precision).items():
        image_ids = [image_id_of(img) for img in folds.loc[folds["fold"] == fold, "img"]]
        if not image_ids:
            raise DataError(f"{folds_csv}: fold {fold} of {ensemble.members[0].path} has no images")
        data.in_channels = ensemble.in_channels  # the models decide the channels they take
        dataset = PredictionImages(data, image_ids, "train", ensemble.input_sizes, with_masks=True)
        with explain_out_of_memory(
            f"a batch of {batch_size} validation images", f"lower --batch-size (now {batch_size})"
        ):
            for batch, images in _batches(_loader(dataset, batch_size, workers, ensemble.device), ensemble.device):
                masks = batch["mask"].to(ensemble.device)
                plain, probabilities = ensemble.plain_and_augmented(images, tuple(masks.shape[-2:]))
                scores = {"dice_plain": dice_per_image(plain > 0.5, masks).tolist()}
                for threshold in thresholds:
                    scores[dice_column(threshold)] = dice_per_image(probabilities > threshold, masks).tolist()
                for position, index in enumerate(batch["index"].tolist()):
                    row = {"img": f"{image_ids[index]}.jpg", "fold": fold}
                    rows.append(row | {key: values[position] for key, values in scores.items()})
    return pd.DataFrame(rows)


def oof_report(
    members: list[Member],
    data: CarvanaData,
    folds_csv: str | Path,
    tta: tuple[str, ...],
    precision: str,
    out_dir: str | Path,
    threshold: float = 0.5,
    worst: int = 8,
    batch_size: int = 4,
    workers: int = 4,
) -> pd.DataFrame:
    """Out-of-fold scores to ``out_dir/oof.csv``, a table per fold and the best threshold logged, and
    overlays of the ``worst`` images at ``threshold`` (red: predicted, green: truth)."""
    out_dir = Path(out_dir)
    thresholds = tuple(sorted({*THRESHOLDS, threshold}))
    scores = out_of_fold(members, data, folds_csv, tta, precision, batch_size, workers, thresholds)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / "oof.csv") as partial:
        scores.to_csv(partial, index=False)
    _log_oof_scores(scores, tta, threshold, thresholds)
    ensembles = fold_ensembles(members, tta, precision)
    column = dice_column(threshold)
    for rank, (_, row) in enumerate(scores.nsmallest(worst, column).iterrows(), start=1):
        image_id = image_id_of(row["img"])
        image = data.read_image(image_id)
        predicted = predict_image(ensembles[row["fold"]], image, threshold)
        path = out_dir / f"worst{rank:02d}_{image_id}_dice{row[column]:.4f}.png"
        save_png(overlay(image, predicted, data.read_mask(image_id)), path)
    logger.info(
        "per-image scores: %s; %d worst overlays at threshold %g (red: predicted, green: truth) in %s/",
        out_dir / "oof.csv",
        min(worst, len(scores)),
        threshold,
        out_dir,
    )
    return scores


def _log_oof_scores(scores: pd.DataFrame, tta: tuple[str, ...], threshold: float, thresholds) -> None:
    label = "TTA " + "+".join(tta) if tta else "no TTA"
    column = dice_column(threshold)
    table = scores.groupby("fold").agg(images=("img", "size"), plain=("dice_plain", "mean"), dice=(column, "mean"))
    table.loc["all"] = [len(scores), scores["dice_plain"].mean(), scores[column].mean()]
    table.columns = ["images", "Dice (no TTA)", f"Dice ({label}) at {threshold:g}"]
    logger.info("out-of-fold Dice:\n%s", table.to_string(float_format=lambda value: f"{value:.5f}"))
    by_threshold = scores[[dice_column(t) for t in thresholds]].mean()
    best = by_threshold.idxmax()
    logger.info(
        "best threshold (%s): %s -> Dice %.5f (%g -> %.5f)",
        label,
        best.removeprefix("dice_"),
        by_threshold[best],
        threshold,
        by_threshold[column],
    )


def overlay(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """The photo with the predicted outline in red and, when given, the true outline in green
    (a grey (H, W, 1) photo is drawn on in colour)."""
    canvas = as_rgb(image).copy()
    thickness = max(1, image.shape[1] // 640)
    for mask, colour in ((truth, (0, 200, 0)), (predicted, (230, 30, 30))):
        if mask is not None:
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(canvas, contours, -1, colour, thickness)
    return canvas


def save_png(array: np.ndarray, path: str | Path) -> None:
    with atomic_output(path) as partial:
        Image.fromarray(array).save(partial, format="PNG")


@torch.no_grad()
def predict_image(ensemble: Ensemble, image: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 mask of one (H, W, in_channels) image: 0/1 for a binary model, class indices for a multi-class one."""
    from competition.masks_out import class_map  # imported here: masks_out imports this module

    images = {}
    for key, size in ensemble.input_sizes.items():
        resized = image if size is None else resize_image(image, size)
        images[key] = to_chw(resized)[None].to(ensemble.device)
    return class_map(ensemble.probabilities(images, image.shape[:2]), threshold)


def predict_image_file(ensemble: Ensemble, path: str | Path, out_dir: str | Path, threshold: float = 0.5) -> np.ndarray:
    """One JPEG -> ``<stem>_mask.png`` (0/255) and ``<stem>_overlay.png`` in ``out_dir``; returns the 0/1 mask."""
    path, out_dir = Path(path), Path(out_dir)
    try:
        payload = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read the image ({error.strerror})") from None
    image = decode_image(payload, str(path), channels=ensemble.in_channels)
    mask = predict_image(ensemble, image, threshold)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_path, overlay_path = out_dir / f"{path.stem}_mask.png", out_dir / f"{path.stem}_overlay.png"
    classes = ensemble.members[0].config.num_classes()
    if classes > 2:  # class indices in a palette PNG, each class tinted in the overlay
        from competition.masks_out import colour_overlay, encode_mask_png, palette

        with atomic_output(mask_path) as partial:
            partial.write_bytes(encode_mask_png(mask, palette(classes)))
        save_png(colour_overlay(as_rgb(image), mask, palette(classes)), overlay_path)
        logger.info("%s: classes %s -> %s, %s", path, sorted(np.unique(mask).tolist()), mask_path, overlay_path)
        return mask
    save_png(mask * 255, mask_path)
    save_png(overlay(image, mask), overlay_path)
    logger.info("%s: car covers %.1f%% -> %s, %s", path, 100 * mask.mean(), mask_path, overlay_path)
    return mask


def export_onnx(member: Member, path: str | Path, tolerance: float = 1e-3) -> float:
    """Export one fold model to ONNX (uint8 images of its input size in, logits out, any batch size)
    and check that onnxruntime reproduces PyTorch; returns the largest absolute difference."""
    import onnxruntime

    path = Path(path)
    size = member.config.input_size() or member.image_shape
    if size is None:
        raise CheckpointError(f"{member.path}: records no image size to export at")
    model = member.model.float().to("cpu").eval()
    channels = member.config.in_channels
    images = torch.randint(0, 256, (2, channels, *size), dtype=torch.uint8)
    with atomic_output(path) as partial:
        torch.onnx.export(
            model,
            (images,),
            partial,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )
        session = onnxruntime.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
        fresh = torch.randint(0, 256, (3, channels, *size), dtype=torch.uint8)
        with torch.no_grad():
            expected = model(fresh).numpy()
        difference = float(np.abs(session.run(None, {"images": fresh.numpy()})[0] - expected).max())
        if not difference <= tolerance * max(1.0, float(np.abs(expected).max())):
            raise CheckpointError(f"{member.path}: onnxruntime differs from PyTorch by {difference:.2e}; not exported")
    return difference
