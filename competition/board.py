"""TensorBoard event files of a run (--tensorboard): per-step loss and learning rate, each epoch's log.csv metrics,
fixed validation images, the confusion matrix and the hyperparameters, in the fold's run folder."""

import contextlib
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import torch

from competition.config import TrainConfig
from competition.data import as_rgb
from competition.errors import ConfigError
from competition.files import no_space_left
from competition.mask_values import pack_labels
from competition.prediction import label_masks, predict_probabilities
from competition.run_folder import monitored
from competition.schedules import steps_per_epoch
from competition.writers import colour_overlay, label_overlay, palette

logger = logging.getLogger(__name__)

INSTALL = "pip install -r requirements-tensorboard.txt"
# Validation images drawn every epoch: the first ids in sorted order, so each epoch (and a resumed run) shows the same.
FIXED_IMAGES = 4
# The drawn strip (photo, truth, prediction) is shrunk to at most this height: event files stay small.
STRIP_HEIGHT = 320
GAP = 4  # white pixels between the strip's panels


def summary_writer_class():
    """torch's SummaryWriter; one line naming the install command when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            f"--tensorboard: the tensorboard package is not installed; {INSTALL} (or leave --tensorboard off)"
        ) from None
    return SummaryWriter


def require_tensorboard(config: TrainConfig) -> None:
    """Before any work: a run with ``tensorboard`` on needs the package."""
    if config.tensorboard:
        summary_writer_class()


def fixed_images(dataset, count: int = FIXED_IMAGES) -> list[tuple[str, torch.Tensor, np.ndarray]]:
    """(id, image (C, H, W) uint8 as the model sees it, its true class indices (H, W) at that size) of the first
    ``count`` validation ids in sorted order."""
    chosen = sorted(range(len(dataset)), key=lambda index: dataset.image_ids[index])[:count]
    images = []
    for index in chosen:
        image, mask = dataset[index]
        if getattr(dataset, "multilabel", False):  # float (K, H, W) targets, 255 where ignored: packed again
            targets = mask.numpy()
            truth = np.where((targets == 255).any(0), 255, pack_labels(targets == 1)).astype(np.uint8)
        else:
            truth = mask.reshape(mask.shape[-2:]).numpy().astype(np.uint8)  # binary: float 0/1 (1, H, W); else (H, W)
        truth = cv2.resize(truth, image.shape[:0:-1], interpolation=cv2.INTER_NEAREST)  # validation masks: full size
        images.append((dataset.image_ids[index], image, truth))
    return images


def strip(
    photo: np.ndarray, truth: np.ndarray, predicted: np.ndarray, colours: np.ndarray, labels: int | None = None
) -> np.ndarray:
    """The photo, then the truth and the prediction tinted on it in the mask palette's colours, side by side;
    ``labels``: the masks are packed bits of that many classes, each class tinted (``label_overlay``)."""
    gap = np.full((photo.shape[0], GAP, 3), 255, dtype=np.uint8)

    def tint(mask: np.ndarray) -> np.ndarray:
        return colour_overlay(photo, mask, colours) if labels is None else label_overlay(photo, mask, labels)

    panels = [photo, gap, tint(truth), gap, tint(predicted)]
    drawn = np.concatenate(panels, axis=1)
    if drawn.shape[0] > STRIP_HEIGHT:
        width = round(drawn.shape[1] * STRIP_HEIGHT / drawn.shape[0])
        drawn = cv2.resize(drawn, (width, STRIP_HEIGHT), interpolation=cv2.INTER_AREA)
    return drawn


def confusion_figure(confusion: torch.Tensor, classes: list[str]):
    """The confusion matrix as a matplotlib figure: each true class's row as shares of its pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion.double()
    shares = (counts / counts.sum(1, keepdim=True).clamp_min(1)).numpy()
    side = 1.5 + 0.5 * len(classes)
    figure, axis = plt.subplots(figsize=(side + 1, side))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axis.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true")
    axis.set_xticklabels(classes, rotation=45, ha="right")
    axis.set_yticklabels(classes)
    if len(classes) <= 12:
        for (row, column), share in np.ndenumerate(shares):
            axis.text(column, row, f"{share:.2f}", ha="center", va="center", color="white" if share > 0.5 else "black")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    return figure


def hyperparameters(config: TrainConfig) -> dict:
    """The settings HParams can show (numbers, text, switches)."""
    return {name: value for name, value in asdict(config).items() if isinstance(value, int | float | str | bool)}


class Board:
    """Writes one fold's events. Steps count optimizer steps from the run's start (1, 2, ...); an epoch's values
    are written at its last step, so that they line up with the per-step loss. A writer of None writes nothing."""

    def __init__(self, writer, config: TrainConfig, steps_per_epoch: int, precision: str, images, best: float):
        self.writer = writer
        self.steps_per_epoch = steps_per_epoch
        self.precision = precision
        self.images = images
        self.classes = config.class_names() or ["background", "car"]
        self.column = monitored(config)[0]
        self.labels = len(self.classes) if config.multilabel() else None  # packed multilabel masks: K classes
        self.best = best
        self.every = config.log_every
        self.pending: list[tuple[int, torch.Tensor, float]] = []

    def step(self, epoch: int, step: int, loss: torch.Tensor, lr: float) -> None:
        """A step's loss (a device tensor: read back with the others every ``log_every`` steps) and learning rate."""
        if self.writer is None:
            return
        self.pending.append((epoch * self.steps_per_epoch + step + 1, loss, lr))
        if len(self.pending) >= self.every:
            with self._disk_full_ends_it():
                self._write_steps()

    @contextlib.contextmanager
    def _disk_full_ends_it(self) -> Iterator[None]:
        """A full disk stops the event files, not the run: the epoch's checkpoints then say it in their one line."""
        try:
            yield
        except OSError as error:
            if not no_space_left(error):
                raise
            logger.warning(
                "%s: no space left for TensorBoard's event files: none are written from here on", self.writer.log_dir
            )
            self.writer = None

    def _write_steps(self) -> None:
        if not self.pending:
            return
        losses = torch.stack([loss for _, loss, _ in self.pending]).tolist()
        for (global_step, _, lr), loss in zip(self.pending, losses):
            self.writer.add_scalar("train/loss", loss, global_step)
            self.writer.add_scalar("train/lr", lr, global_step)
        self.pending = []

    def epoch(self, epoch: int, row: dict, confusion: torch.Tensor | None, model: torch.nn.Module) -> None:
        """The epoch's log row (per-class IoU under iou/), the best score so far, the fixed images as ``model``
        predicts them, and the confusion matrix of multi-class data."""
        if self.writer is None:
            return
        with self._disk_full_ends_it():
            self._write_epoch(epoch, row, confusion, model)

    def _write_epoch(self, epoch: int, row: dict, confusion: torch.Tensor | None, model: torch.nn.Module) -> None:
        self._write_steps()
        at = (epoch + 1) * self.steps_per_epoch
        for name, value in row.items():
            if name != "epoch" and isinstance(value, int | float):
                prefix = name.split("_", 1)[0]
                tag = f"{prefix}/{name[len(prefix) + 1 :]}" if prefix in ("iou", "dice") else f"epoch/{name}"
                self.writer.add_scalar(tag, value, at)
        if math.isfinite(row[self.column]) and row[self.column] > self.best:
            self.best = row[self.column]
        self.writer.add_scalar(f"best/{self.column}", self.best, at)
        self._draw(model, at)
        if confusion is not None and len(self.classes) > 2:
            self.writer.add_figure("confusion", confusion_figure(confusion, self.classes), at)
        self.writer.flush()

    @torch.no_grad()
    def _draw(self, model: torch.nn.Module, at: int) -> None:
        model.eval()
        device = next(model.parameters()).device
        colours = palette(len(self.classes))
        for image_id, image, truth in self.images:
            probabilities = predict_probabilities(
                model, image[None].to(device), truth.shape, precision=self.precision, multilabel=self.labels is not None
            )
            if self.labels is not None:
                predicted = torch.from_numpy(label_masks(probabilities, 0.5)[0])
            elif probabilities.shape[1] == 1:
                predicted = (probabilities[0, 0] > 0.5).to(torch.uint8)
            else:
                predicted = probabilities[0].argmax(0).to(torch.uint8)
            photo = np.ascontiguousarray(as_rgb(image.permute(1, 2, 0).numpy()))
            drawn = strip(photo, truth, predicted.cpu().numpy(), colours, self.labels)
            self.writer.add_image(f"images/{image_id}", drawn, at, dataformats="HWC")

    def write_hyperparameters(self, config: TrainConfig) -> None:
        """The run's settings for TensorBoard's HParams view, its metric the best score (``best/<column>``)."""
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(hyperparameters(config), {f"best/{self.column}": self.best}):
            self.writer.file_writer.add_summary(summary, 0)


@contextlib.contextmanager
def open_board(config: TrainConfig, run_dir: Path, fold, start_epoch: int, best: float, precision: str) -> Iterator:
    """The fold's Board: event files in ``run_dir`` when ``config.tensorboard``, else one that writes nothing. A run
    resumed after ``start_epoch`` epochs drops what an earlier session wrote after them (TensorBoard's purge step);
    one started from scratch drops everything earlier and writes the hyperparameters."""
    epoch_steps = steps_per_epoch(len(fold.train_loader), config.accum_steps)
    if not config.tensorboard:
        yield Board(None, config, epoch_steps, precision, [], best)
        return
    purge_step = start_epoch * epoch_steps + 1 if start_epoch else 0
    writer = summary_writer_class()(str(run_dir), purge_step=purge_step)
    board = Board(writer, config, epoch_steps, precision, fixed_images(fold.val_loader.dataset), best)
    previous_hook = threading.excepthook
    threading.excepthook = _quiet_when_disk_full(previous_hook)
    try:
        if not start_epoch:
            with board._disk_full_ends_it():
                board.write_hyperparameters(config)
        yield board
    finally:
        with contextlib.suppress(OSError) if board.writer is None else contextlib.nullcontext():
            writer.close()  # after a full disk it raises the writer thread's error again: said already
        threading.excepthook = previous_hook


def _quiet_when_disk_full(previous_hook):
    """threading.excepthook without the traceback of TensorBoard's writer thread on a full disk: the board says it
    in one line when its next write meets the same error."""

    def hook(args) -> None:
        if not no_space_left(args.exc_value):
            previous_hook(args)

    return hook
