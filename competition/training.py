"""The fold trainer: data, model, optimisation loop, validation, checkpoints, logs; and folds in parallel."""

import contextlib
import csv
import json
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from competition import logs
from competition.checkpoints import check_resumable, load_checkpoint, save_checkpoint, split_digest, summary
from competition.clock import PROJECT_AFTER_SECONDS, Deadline, format_duration, parse_duration
from competition.config import ONE_IMAGE_BATCH_NORM, TrainConfig, config_from
from competition.data import SegmentationDataset, image_id_of
from competition.data_checks import report_absent_classes
from competition.environment import explain_out_of_memory
from competition.errors import CheckpointError, ConfigError, DataError, ProjectError, TrainingError
from competition.files import atomic_output, exclusive_lock, lock_holder
from competition.folds import read_folds
from competition.layouts import open_data_as
from competition.losses import build_loss, class_weights
from competition.metrics import confusion_matrix, dice_per_image, iou_per_image, segmentation_scores
from competition.models import build_model
from competition.prediction import autocast, model_input, predict_probabilities, prepare_model, setup_device
from competition.sampling import class_balanced_weights
from competition.schedules import build_scheduler
from competition.survey import survey
from competition.workers import loader_start_method, stop_when_orphaned

logger = logging.getLogger(__name__)

# skipped_steps: fp16 optimizer steps skipped for overflowing gradients (empty in rows logged before it was counted).
LOG_COLUMNS = [
    "epoch",
    "lr",
    "train_loss",
    "val_loss",
    "val_dice",
    "val_iou",
    "train_img_per_s",
    "seconds",
    "skipped_steps",
    "val_miou",
    "val_macro_f1",
    "val_pixel_accuracy",
]
# --monitor -> the log column that picks best.pt, and how lines name it.
MONITOR_COLUMNS = {
    "dice": ("val_dice", "val Dice"),
    "miou": ("val_miou", "val mIoU"),
    "macro_f1": ("val_macro_f1", "val macro F1"),
    "pixel_accuracy": ("val_pixel_accuracy", "val pixel accuracy"),
}
# torch's warning when the schedule steps before any optimizer step has been taken.
SCHEDULER_BEFORE_OPTIMIZER = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"
# More skipped steps than this in an epoch are more than the loss scale's calibration at the start.
SKIPPED_STEPS_WARNING = 5
RUN_OUTPUTS = ("best.pt", "last.pt", "log.csv", "curves.png", "config.json")
LOCK_NAME = ".lock"


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; training stopped before any such weights were saved."""


def train_transform(config: TrainConfig) -> A.Compose | None:
    """Augmentations applied identically to image and mask (crops first, when training on crops)."""
    transforms = []
    if config.crop:
        transforms += [A.PadIfNeeded(config.crop, config.crop), A.RandomCrop(config.crop, config.crop)]
    if config.augment:
        transforms += [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent=(-0.05, 0.05),
                rotate=(-5, 5),
                border_mode=cv2.BORDER_REFLECT_101,
                p=0.5,
            ),
            A.RandomBrightnessContrast(0.15, 0.15, p=0.5),
        ]
        if config.in_channels == 3:  # hue and saturation need colour: a grey image has neither
            transforms.append(A.HueSaturationValue(8, 15, 10, p=0.3))
    return A.Compose(transforms, seed=config.seed) if transforms else None


def accumulate_gradients(model, loss_fn, micro_batches, precision: str, scaler) -> torch.Tensor:
    """Backward over micro-batches as over one batch: each loss weighted by its share of the images.

    The losses are means over images, so the gradients equal those of the concatenated batch
    (up to batch norm, whose statistics still come from each micro-batch). Returns the loss.
    """
    total_images = sum(len(images) for images, _ in micro_batches)
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for images, masks in micro_batches:
        with autocast(precision, images.device):
            logits = model(images)
        loss = loss_fn(logits, masks) * (len(images) / total_images)
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    return loss_sum


def optimizer_step(model, optimizer, scaler, clip_grad: float) -> None:
    """Clip (after unscaling fp16 gradients), step, and clear the gradients."""
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


class OptimizerStepCount:
    """How many times the optimizer really stepped. GradScaler skips ``optimizer.step()`` for a step whose fp16
    gradients overflowed (and lowers the loss scale); it decides on the host, so counting costs no device sync.
    (A fused optimizer would be handed the overflow flag rather than skipped; the AdamW built here is not fused.)"""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.taken = 0
        optimizer.register_step_post_hook(self._count)

    def _count(self, optimizer, args, kwargs) -> None:
        self.taken += 1


def micro_batch_groups(batches, accum_steps: int):
    """Lists of ``accum_steps`` consecutive batches, and the last, shorter list when the epoch does not
    fill one: its images make a smaller optimizer step rather than being dropped."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == accum_steps:
            yield group
            group = []
    if group:
        yield group


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """Each loader worker draws its own augmentations, reproducibly (torch seeds it per epoch)."""
    info = torch.utils.data.get_worker_info()
    if info.dataset.transform is not None:
        info.dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


def monitored(config: TrainConfig) -> tuple[str, str]:
    """(log column, its name in messages) of the validation score that picks best.pt: ``--monitor``, where
    auto is Dice on binary data and mIoU on multi-class data."""
    monitor = config.monitor
    if monitor == "auto":
        monitor = "dice" if config.num_classes() == 2 else "miou"
    return MONITOR_COLUMNS[monitor]


def _write_log(rows: list[dict], run_dir: Path, config: TrainConfig) -> None:
    per_class = [name for name in rows[-1] if name not in LOG_COLUMNS]  # iou_<class> of multi-class data
    with atomic_output(run_dir / "log.csv") as partial, open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS + per_class, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot_curves(rows, run_dir / "curves.png", *monitored(config))


def plot_curves(rows: list[dict], path: Path, column: str = "val_dice", name: str = "val Dice") -> None:
    """Training and validation loss, and the validation score ``column`` (named ``name``), per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    epochs = [row["epoch"] + 1 for row in rows]
    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_axis.plot(epochs, [row["train_loss"] for row in rows], label="train")
    loss_axis.plot(epochs, [row["val_loss"] for row in rows], label="validation")
    loss_axis.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_axis.legend()
    dice_axis.plot(epochs, [row[column] for row in rows], color="tab:green")
    dice_axis.set(xlabel="epoch", ylabel=name.removeprefix("val "), title=f"{name} (full resolution)")
    for axis in (loss_axis, dice_axis):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    figure.tight_layout()
    with atomic_output(path) as partial:
        figure.savefig(partial, dpi=100, format="png")
    plt.close(figure)


@torch.no_grad()
def evaluate(model, loader, loss_fn, precision: str, classes: list[str] | None = None, ignore_index: int = 255) -> dict:
    """Loss at full resolution (probabilities resized back to the masks' size); for a one-channel (binary) model
    Dice and IoU per image, averaged. With ``classes``, also the confusion matrix summed over the whole set, not
    averaged per batch, and its scores: mIoU, macro F1, pixel accuracy and ``iou_<class>`` for each class.
    Pixels of ``ignore_index`` count nowhere."""
    model.eval()
    device = next(model.parameters()).device
    losses, dice, iou = [], [], []
    confusion = torch.zeros((len(classes), len(classes)), dtype=torch.int64, device=device) if classes else None
    for images, masks in loader:
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        probabilities = predict_probabilities(model, images, tuple(masks.shape[-2:]), precision=precision)
        if probabilities.shape[1] == 1:
            logits = torch.logit(probabilities.clamp(1e-6, 1 - 1e-6))
            predicted = probabilities > 0.5
            if classes is not None:  # masks may hold the ignore index: those pixels are neither hit nor miss
                predicted = predicted & (masks != ignore_index)
            dice.append(dice_per_image(predicted, masks == 1))
            iou.append(iou_per_image(predicted, masks == 1))
            class_map = predicted.squeeze(1).long()
        else:  # the log of softmax probabilities: logits whose softmax gives them back
            logits = torch.log(probabilities.clamp_min(1e-6))
            class_map = probabilities.argmax(1)
        losses.append(loss_fn(logits, masks) * len(images))
        if confusion is not None:
            truth = masks.squeeze(1).long() if masks.dim() == 4 else masks
            confusion += confusion_matrix(class_map, truth, len(classes), ignore_index)
    metrics = {"val_loss": (torch.stack(losses).sum() / len(loader.dataset)).item()}
    if dice:
        metrics.update(val_dice=torch.cat(dice).mean().item(), val_iou=torch.cat(iou).mean().item())
    if confusion is not None:
        scores = segmentation_scores(confusion.cpu(), classes)
        metrics.update(
            val_miou=float(scores["miou"]),
            val_macro_f1=float(scores["macro_f1"]),
            val_pixel_accuracy=float(scores["pixel_accuracy"]),
            **{f"iou_{name}": float(value) for name, value in scores["per_class"]["iou"].items()},
        )
    return metrics


def class_iou_line(row: dict) -> str:
    """``background 0.991, body 0.934, lights 0.412``: each class's validation IoU from a log row, so that a
    rare class is not hidden by the mean (nan: the class is in neither the masks nor the predictions)."""
    return ", ".join(
        f"{name.removeprefix('iou_')} {value:.3f}" for name, value in row.items() if name.startswith("iou_")
    )


def fold_numbers(folds_csv: str | Path) -> list[int]:
    """The folds a folds file defines, sorted."""
    return sorted(read_folds(folds_csv)["fold"].unique().tolist())


def open_training_data(config: TrainConfig):
    """(the settings with the class names (and stored mask values) the data folder gave, the data). A run saves its classes, so that
    infer.py, a resumed run and every fold agree on them, whatever the folder holds later. Carvana's settings
    stay as given (its classes are fixed)."""
    data = open_data_as(config)
    if data.layout != "carvana":
        values = ",".join(str(value) for value in data.mask_values) if data.mask_values else config.mask_values
        config = replace(config, classes=",".join(data.classes), mask_values=values)
    return config, data


def _split_ids(config: TrainConfig, data) -> tuple[list[str], list[str]]:
    """``--train-on train,val``: (the images of those official splits, the images to validate on: the
    labelled images of the other splits, or the val split itself when every split is trained on)."""
    wanted = [name.strip() for name in config.train_on.split(",") if name.strip()]
    splits = data.splits
    if not splits:
        raise ConfigError("--train-on names official splits: give them with --split, e.g. train=train,val=val")
    unknown = sorted(set(wanted) - set(splits.values()))
    if unknown:
        raise ConfigError(
            f"--train-on {config.train_on}: no split {unknown}; the splits are {sorted(set(splits.values()))}"
        )
    train_ids = [image_id for image_id in data.train_ids() if splits[image_id] in wanted]
    val_ids = [image_id for image_id in data.train_ids() if splits[image_id] not in wanted]
    if not val_ids:
        val_ids = [image_id for image_id in data.train_ids() if splits[image_id] == "val"] or train_ids[:1]
        logger.warning(
            "--train-on %s: every labelled image trains, so validation scores (on %d of them) are not held out "
            "and best.pt is the last epoch",
            config.train_on,
            len(val_ids),
        )
    return train_ids, val_ids


def _fold_ids(config: TrainConfig, data) -> tuple[list[str], list[str]]:
    if config.train_on:
        return _split_ids(config, data)
    folds = read_folds(config.folds_csv)
    available = sorted(folds["fold"].unique().tolist())
    if config.fold not in available:
        raise DataError(f"{config.folds_csv}: fold {config.fold} does not exist; folds are {available}")
    known = set(data.train_ids())
    ids = folds["img"].map(image_id_of)
    absent = sorted(set(ids) - known)
    if absent:
        raise DataError(
            f"{config.folds_csv}: {len(absent)} image(s) not in {config.data_dir}, e.g. {absent[:3]}; "
            "make the folds again for this data with `python make_folds.py` and the data flags given here "
            "(--data-dir, --config, ...)"
        )
    held_out = folds["fold"] == config.fold
    return ids[~held_out].tolist(), ids[held_out].tolist()


def inspect_run_dir(config: TrainConfig, resume: bool, overwrite: bool) -> dict | None:
    """What the fold's run folder allows, decided before anything is written to it: the checkpoint to
    resume from (``resume``), or None for a fresh start. A folder that already holds a run is never
    overwritten without ``overwrite``; a resume with settings that change the run is refused."""
    run_dir = config.run_dir()
    last = run_dir / "last.pt"
    if resume and overwrite:
        raise CheckpointError("--resume continues a run and --overwrite starts it again: pass one of them")
    if resume:
        if not last.exists():
            return None
        checkpoint = load_checkpoint(last)
        check_resumable(checkpoint, config, last)
        return checkpoint
    existing = [name for name in ("best.pt", "last.pt") if (run_dir / name).exists()]
    if existing and not overwrite:
        raise CheckpointError(
            f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
            "--overwrite to train it again from scratch, or another --out"
        )
    return None


@dataclass
class _State:
    start_epoch: int = 0
    best_score: float = -1.0  # of the monitored score; checkpoints keep it as best_dice, their name of old
    rows: list = field(default_factory=list)


@dataclass
class _Parts:
    """Everything an optimizer step touches."""

    model: torch.nn.Module
    forward: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    precision: str
    optimizer_steps: OptimizerStepCount

    @property
    def evaluated(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def training_state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
        }

    def restore(self, checkpoint: dict, path: Path) -> _State:
        """Weights and optimiser state from ``last.pt``; the log rows of the epochs it finished."""
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.scaler.load_state_dict(checkpoint["scaler"])
            if self.ema is not None:
                self.ema.load_state_dict(checkpoint["ema"])
        except torch.OutOfMemoryError:
            raise
        except (KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"{path}: cannot resume from it ({type(error).__name__}: {error})") from None
        rows = _epochs_done(checkpoint)
        logger.info(
            "resumed from %s: epoch %d done, best score %.5f", path, checkpoint["epoch"] + 1, checkpoint["best_dice"]
        )
        return _State(checkpoint["epoch"] + 1, checkpoint["best_dice"], rows)


def _epochs_done(checkpoint: dict | None) -> list[dict]:
    """The log rows of the epochs a ``last.pt`` finished; none without one."""
    if checkpoint is None:
        return []
    return [row for row in checkpoint["log"] if row["epoch"] <= checkpoint["epoch"]]


def build_parts(config: TrainConfig, device: torch.device, precision: str, steps_per_epoch: int) -> _Parts:
    network = build_model(
        config.arch,
        config.encoder,
        config.encoder_weights,
        classes=config.output_channels(),
        in_channels=config.in_channels,
    )
    model, forward = prepare_model(network, device, config.channels_last, config.compile)
    weights = [float(value) for value in config.class_weight_values.split(",")] if config.class_weight_values else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True) if config.ema else None
    return _Parts(
        model=model,
        forward=forward,
        loss_fn=build_loss(
            config.loss,
            num_classes=config.num_classes(),
            bce_weight=config.bce_weight,
            dice_weight=config.dice_weight,
            ignore_index=config.label_ignore_index() if config.class_names() else None,  # Carvana labels all
            class_weights=weights,
        ),
        optimizer=optimizer,
        scheduler=build_scheduler(config, optimizer, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        ema=ema,
        precision=precision,
        optimizer_steps=OptimizerStepCount(optimizer),
    )


def same_size_batches(shapes: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices in batches of at most ``batch_size`` images of one size: full-resolution masks of different
    sizes (Oxford-IIIT Pet, people's own photos) cannot be stacked into one batch."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for index, shape in enumerate(shapes):
        by_shape.setdefault(tuple(shape), []).append(index)
    return [
        group[start : start + batch_size] for group in by_shape.values() for start in range(0, len(group), batch_size)
    ]


def build_loaders(config: TrainConfig, data, train_ids, val_ids, device: torch.device, pixel_counts=None):
    """(training loader and its generator, validation loader). Training drops a last batch smaller than
    ``batch_size`` (batch norm needs more than one image; the order changes each epoch). With ``pixel_counts``
    ((images, classes) of the training masks) images are drawn by the class-balanced sampler's weights."""
    input_size = config.input_size()
    train_set = SegmentationDataset(data, train_ids, size=input_size, transform=train_transform(config))
    val_set = SegmentationDataset(data, val_ids, size=input_size, full_size_masks=True)
    if len(train_set) < config.batch_size:
        raise DataError(
            f"fold {config.fold}: {len(train_set)} training images, fewer than one batch of {config.batch_size}; "
            "lower --batch-size"
        )
    workers = min(config.workers, os.cpu_count() or 1)
    options = {
        "num_workers": workers,
        "multiprocessing_context": loader_start_method(workers),
        "pin_memory": device.type == "cuda",
        "worker_init_fn": _seed_worker,
    }
    order = torch.Generator()
    if pixel_counts is None:
        sampler = torch.utils.data.RandomSampler(train_set, generator=order)
    else:
        weights = class_balanced_weights(pixel_counts).tolist()
        sampler = torch.utils.data.WeightedRandomSampler(weights, len(train_set), replacement=True, generator=order)
    train_loader = torch.utils.data.DataLoader(
        train_set, config.batch_size, sampler=sampler, drop_last=True, generator=order, **options
    )
    if data.layout == "carvana":  # every image 1918x1280
        return train_loader, order, torch.utils.data.DataLoader(val_set, config.val_batch_size, **options)
    batches = same_size_batches([data.image_shape(image_id) for image_id in val_ids], config.val_batch_size)
    return train_loader, order, torch.utils.data.DataLoader(val_set, batch_sampler=batches, **options)


def _out_of_memory_fix(config: TrainConfig, validating: bool) -> tuple[str, str]:
    """(what ran out, which setting to lower) for an out-of-memory error in training or validation."""
    model = f"{config.arch}-{config.encoder}, size {config.size}"
    if validating:
        context = f"validation of {model}, batch {config.val_batch_size}"
        fix = f"lower --val-batch-size (now {config.val_batch_size}); it does not change training"
    elif config.batch_size > (2 if config.arch in ONE_IMAGE_BATCH_NORM else 1):
        context = f"a training step of {model}, batch {config.batch_size}"
        fix = (
            f"halve the batch and keep its effective size: --batch-size {config.batch_size // 2} "
            f"--accum-steps {config.accum_steps * 2}; or lower --size"
        )
    else:
        context = f"a training step of {model}, batch {config.batch_size}"
        fix = "lower --size, or train on --crop 512"
    return context, fix + ". `python -m competition.memory` with the same flags counts the memory per batch size"


def train_one_epoch(
    parts: _Parts,
    loader,
    config: TrainConfig,
    epoch: int,
    run_dir: Path,
    progress: bool,
    budget: "_EpochBudget | None" = None,
) -> tuple[float, int]:
    """One pass over the training images; returns the mean loss and the optimizer steps skipped for fp16
    overflow. Losses are read back from the device every ``log_every`` steps (one sync), and a non-finite
    one stops the run; there the time ``budget`` (an _EpochBudget) may project the run's length."""
    parts.model.train()
    steps_taken_before = parts.optimizer_steps.taken
    device = next(parts.model.parameters()).device
    steps_per_epoch = math.ceil(len(loader) / config.accum_steps)
    pending: list[tuple[int, torch.Tensor]] = []
    losses: list[float] = []
    images_done = 0
    bar = tqdm(
        total=len(loader) * config.batch_size,
        unit="img",
        disable=not progress,
        desc=f"fold {config.fold} epoch {epoch + 1}/{config.epochs}",
        dynamic_ncols=True,
    )
    batches = (
        (model_input(images.to(device, non_blocking=True), config.channels_last), masks.to(device, non_blocking=True))
        for images, masks in loader
    )
    context, fix = _out_of_memory_fix(config, validating=False)
    for step, micro_batches in enumerate(micro_batch_groups(batches, config.accum_steps)):
        with explain_out_of_memory(context, fix):
            loss = accumulate_gradients(parts.forward, parts.loss_fn, micro_batches, parts.precision, parts.scaler)
            optimizer_step(parts.model, parts.optimizer, parts.scaler, config.clip_grad)
        with warnings.catch_warnings():
            # The schedule moves on even when fp16's scaler skipped the step (so each epoch keeps its learning
            # rates); torch takes a skipped first step for a misordered call. Skips are logged by epoch instead.
            warnings.filterwarnings("ignore", message=SCHEDULER_BEFORE_OPTIMIZER, category=UserWarning)
            parts.scheduler.step()
        if parts.ema is not None:
            parts.ema.update_parameters(parts.model)
        pending.append((step, loss))
        step_images = sum(len(images) for images, _ in micro_batches)
        images_done += step_images
        bar.update(step_images)
        if (step + 1) % config.log_every == 0 or step + 1 == steps_per_epoch:
            losses += _check_finite(pending, epoch, run_dir)
            pending = []
            if budget is not None:
                budget.during(images_done)
            bar.set_postfix(
                loss=f"{np.mean(losses[-config.log_every :]):.4f}", lr=f"{parts.scheduler.get_last_lr()[0]:.2e}"
            )
    bar.close()
    losses += _check_finite(pending, epoch, run_dir)
    skipped = steps_per_epoch - (parts.optimizer_steps.taken - steps_taken_before)
    _warn_of_skipped_steps(config, epoch, skipped, steps_per_epoch)
    return float(np.mean(losses)), skipped


def _warn_of_skipped_steps(config: TrainConfig, epoch: int, skipped: int, steps: int) -> None:
    if skipped > SKIPPED_STEPS_WARNING:
        logger.warning(
            "fold %d epoch %d: %d of %d optimizer steps skipped: fp16 gradients overflowed and the loss scale was "
            "lowered each time (a few at the start are its calibration); if it goes on, use --precision bf16 "
            "where the GPU has it, or fp32, or lower --lr",
            config.fold,
            epoch + 1,
            skipped,
            steps,
        )


def _save_epoch(parts: _Parts, state: _State, config: TrainConfig, row: dict, fold: "_Fold", run_dir: Path):
    """best.pt when the monitored validation score improved (every epoch when the validation images are also
    trained on: no score then picks one), last.pt (with everything --resume needs), log.csv, curves.png."""
    image_shape, split = fold.image_shape, fold.split
    state.rows.append(row)
    column, name = monitored(config)
    epoch_summary = summary(config, row["epoch"], row[column], image_shape)
    if row[column] > state.best_score or not fold.held_out:
        state.best_score = row[column]
        save_checkpoint({"model": parts.evaluated.state_dict(), **epoch_summary}, run_dir / "best.pt")
        logger.debug("saved %s (%s %.5f)", run_dir / "best.pt", name, state.best_score)
    last = {**epoch_summary, "best_dice": state.best_score, "log": state.rows, "split": split}
    save_checkpoint({"model": parts.model.state_dict(), **last, **parts.training_state()}, run_dir / "last.pt")
    _write_log(state.rows, run_dir, config)


@contextlib.contextmanager
def _run_folder(config: TrainConfig, resume: bool, overwrite: bool, split: str):
    """(the fold's run folder, the checkpoint to resume from or None), the folder held by this process
    alone while it trains, so that a resumed run never races a process still writing there. The folder
    is inspected again under the lock (another run may have finished since the first look) and begun
    with its config.json; ``overwrite`` clears an earlier run."""
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(run_dir / LOCK_NAME) as locked:
        if not locked:
            raise CheckpointError(
                f"{run_dir} is being trained by another process (pid {lock_holder(run_dir / LOCK_NAME)}); "
                "wait for it or stop it first"
            )
        resumed_from = inspect_run_dir(config, resume, overwrite)
        if resumed_from is not None and resumed_from.get("split") != split:
            raise CheckpointError(
                f"{run_dir / 'last.pt'}: fold {config.fold} of {config.folds_csv} holds other validation images than "
                "the run was trained on; resume with its folds file, or start again with --overwrite"
            )
        if overwrite:
            for name in RUN_OUTPUTS:
                (run_dir / name).unlink(missing_ok=True)
        with atomic_output(run_dir / "config.json") as partial:
            partial.write_text(json.dumps(asdict(config), indent=2) + "\n")
        yield run_dir, resumed_from


# Settings that leave an epoch's length as it is: which fold, where the files are, the time limit, the set-up check.
_SAME_EPOCH_LENGTH = {"fold", "out", "data_dir", "folds_csv", "time_limit", "check", "class_weight_values"}


def known_epoch_seconds(config: TrainConfig) -> float:
    """The longest epoch (training, validation, saving) in the log.csv of the folds in ``config.out`` whose
    config.json has settings that give epochs of this length; 0.0 when none is known. The folds of a run differ
    only in their images: a sibling fold's epochs, or this fold's own before a --resume, foretell the next."""

    def epoch_settings(values: dict) -> dict:
        return {name: value for name, value in values.items() if name not in _SAME_EPOCH_LENGTH}

    wanted = epoch_settings(asdict(config))
    longest = 0.0
    for run_dir in Path(config.out).glob("fold*"):
        try:
            if epoch_settings(json.loads((run_dir / "config.json").read_text())) != wanted:
                continue
            with open(run_dir / "log.csv", newline="") as handle:
                longest = max([longest, *(float(row["seconds"]) for row in csv.DictReader(handle))])
        except (OSError, ValueError, KeyError, TypeError, csv.Error):  # no whole log there: nothing known from it
            continue
    return longest


def _no_time_for_an_epoch(deadline: Deadline, epoch_seconds: float) -> str:
    """Why an epoch does not start, e.g. ``the time limit 6m40s leaves 1m20s, an epoch takes about 2m40s``."""
    left = deadline.remaining()
    if left <= 0 or not epoch_seconds:
        return f"the {deadline.describe()} had passed"
    epoch = format_duration(epoch_seconds)
    return f"the {deadline.describe()} leaves {format_duration(left)}, an epoch takes about {epoch}"


class _EpochBudget:
    """The time limit seen from the epoch loop: one projection early in this process's first epoch, and
    before each epoch whether it fits, judged by the longest epoch (training, validation, saving) known:
    measured so far, or ``known_epoch`` from this run's logs (so that a fold started late does not run its
    first epoch past the limit). Times are read from the deadline's clock."""

    def __init__(
        self, deadline: Deadline, config: TrainConfig, first_epoch: int, images_per_epoch: int, known_epoch: float
    ):
        self.deadline, self.config = deadline, config
        self.first_epoch, self.images_per_epoch = first_epoch, images_per_epoch
        self.longest_epoch = known_epoch
        self.epoch_started = 0.0
        self.epochs_ended = 0
        self.projected_fit: bool | None = None  # the projection's verdict; None before it is made
        self.not_started = ""  # why this process's first epoch did not start, when it did not

    def begin(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (from 0) fits in the time left; when not, says so and how to go on.
        With nothing known of an epoch's length, only a limit already passed stops it."""
        if not self.deadline.fits(self.longest_epoch):
            if epoch > 0:
                self._warn_stop(epoch)
            else:  # nothing was trained to resume from: the caller says so
                self.not_started = _no_time_for_an_epoch(self.deadline, self.longest_epoch)
            return False
        self.epoch_started = self.deadline.elapsed()
        return True

    def during(self, images_done: int) -> None:
        """At the loss sync points: the projection, once PROJECT_AFTER_SECONDS of the first epoch have passed.
        It knows the training rate only; the first epoch's end checks it with validation included."""
        seconds = self.deadline.elapsed() - self.epoch_started
        if self.projected_fit is None and seconds >= PROJECT_AFTER_SECONDS:
            rate = images_done / seconds
            measured = f"{rate:.1f} img/s over {format_duration(seconds)}: training only, validation adds to each epoch"
            self._project(self.images_per_epoch / rate, seconds, measured)

    def end(self) -> None:
        seconds = self.deadline.elapsed() - self.epoch_started
        self.longest_epoch = max(self.longest_epoch, seconds)
        self.epochs_ended += 1
        if self.epochs_ended > 1 or self.projected_fit is False:  # a warning already given is not repeated
            return
        epochs_after = self.config.epochs - self.first_epoch - 1
        if self.projected_fit is None or not self.deadline.fits(epochs_after * seconds):
            # no projection yet (a first epoch under PROJECT_AFTER_SECONDS), or validation changed its verdict
            self._project(seconds, seconds, "the first epoch, validation included")

    def _project(self, epoch_seconds: float, into_epoch: float, measured: str) -> None:
        config, deadline = self.config, self.deadline
        epochs_left = config.epochs - self.first_epoch
        total = epochs_left * epoch_seconds
        fits = self.projected_fit = deadline.fits(total - into_epoch)
        limit = deadline.describe()
        if deadline.limit is not None:
            limit += f", {format_duration(deadline.remaining())} left: it {'fits' if fits else 'does not fit'}"
        logger.info(
            "fold %d: projected %s for the %d epoch(s) to train (%s an epoch, from %s); %s",
            config.fold,
            format_duration(total),
            epochs_left,
            format_duration(epoch_seconds),
            measured,
            limit,
        )
        if not fits:
            fitting = max(1, min(epochs_left, int((deadline.remaining() + into_epoch) // epoch_seconds)))
            logger.warning(
                "fold %d: about %d of the %d epoch(s) to train fit in the %s; training will stop after them, with "
                "last.pt saved: run the same command with --resume in a new session to train the rest",
                config.fold,
                fitting,
                epochs_left,
                deadline.describe(),
            )

    def _warn_stop(self, epoch: int) -> None:
        left = max(0.0, self.deadline.remaining())
        why = (
            f"the next would take about {format_duration(self.longest_epoch)}, {format_duration(left)} are left"
            if self.longest_epoch
            else "it had passed before this session's first epoch"
        )
        logger.warning(
            "fold %d: stopped by the %s with %d of %d epochs done (%s); last.pt, best.pt and log.csv are saved: "
            "run the same command with --resume in a new session to train the other %d",
            self.config.fold,
            self.deadline.describe(),
            epoch,
            self.config.epochs,
            why,
            self.config.epochs - epoch,
        )


@dataclass
class _Fold:
    """A fold ready to train: its loaders, the data order's generator, the model and optimiser, and what
    checkpoints record about the data."""

    config: TrainConfig  # with what the set-up derived from the data: class names and weights
    train_loader: torch.utils.data.DataLoader
    order: torch.Generator
    val_loader: torch.utils.data.DataLoader
    parts: _Parts
    image_shape: tuple[int, int]
    split: str
    held_out: bool = True  # False when --train-on trains on the validation images too

    @property
    def images_per_epoch(self) -> int:
        return len(self.train_loader) * self.train_loader.batch_size


def _with_class_weights(config: TrainConfig, pixel_counts: np.ndarray) -> TrainConfig:
    """The settings with ``--class-weights`` computed from the training fold's pixels, saved with the run."""
    weights = class_weights(pixel_counts.sum(0), config.class_weights)
    logger.info(
        "fold %d: class weights (%s): %s",
        config.fold,
        config.class_weights,
        ", ".join(f"{name} {weight:.3g}" for name, weight in zip(config.class_names(), weights)),
    )
    return replace(config, class_weight_values=",".join(f"{weight:.6g}" for weight in weights))


def _set_up_fold(config: TrainConfig, data, device: torch.device, precision: str, progress: bool) -> _Fold:
    seed_everything(config.seed)
    train_ids, val_ids = _fold_ids(config, data)
    # Carvana's classes are fixed: its masks are counted only for the weights or the sampler, on the training images.
    # Elsewhere a class no training mask holds is said before training, so every mask is counted.
    ids = train_ids + val_ids
    if data.layout == "carvana":
        count = len(train_ids) if config.class_weights != "none" or config.sampler != "random" else 0
    else:
        count = len(ids)
    counts = survey(data, ids, check=config.check, count=count, progress=progress)
    pixel_counts = None if counts is None else counts[: len(train_ids)]
    if data.layout != "carvana":
        val_counts = counts[len(train_ids) :].sum(0)
        report_absent_classes(data.classes, pixel_counts.sum(0), val_counts, config.strict, logger.warning)
    if config.class_weights != "none":
        config = _with_class_weights(config, pixel_counts)
    balanced = pixel_counts if config.sampler == "class-balanced" else None
    train_loader, order, val_loader = build_loaders(config, data, train_ids, val_ids, device, balanced)
    return _Fold(
        config=config,
        train_loader=train_loader,
        order=order,
        val_loader=val_loader,
        parts=build_parts(config, device, precision, math.ceil(len(train_loader) / config.accum_steps)),
        image_shape=data.image_shape(val_ids[0]),  # inference checks test images against it
        split=split_digest(val_ids),
        held_out=not set(val_ids) & set(train_ids),
    )


def _run_epoch(
    fold: _Fold, config: TrainConfig, epoch: int, run_dir: Path, progress: bool, budget: _EpochBudget
) -> dict:
    """Train one epoch and validate; returns its log row."""
    fold.order.manual_seed(config.seed * 100_003 + epoch)
    if fold.train_loader.dataset.transform is not None:
        fold.train_loader.dataset.transform.set_random_seed(config.seed + epoch)
    parts = fold.parts
    clock = budget.deadline.elapsed  # the limit's clock: later runs judge by the epoch lengths logged here
    started = clock()
    train_loss, skipped_steps = train_one_epoch(parts, fold.train_loader, config, epoch, run_dir, progress, budget)
    train_seconds = clock() - started
    scored_classes = config.class_names() or None
    if scored_classes is None and monitored(config)[0] != "val_dice":  # Carvana scored by the confusion matrix
        scored_classes = ["background", "car"]
    with explain_out_of_memory(*_out_of_memory_fix(config, validating=True)):
        metrics = evaluate(
            parts.evaluated,
            fold.val_loader,
            parts.loss_fn,
            parts.precision,
            scored_classes,
            config.label_ignore_index(),
        )
    return {
        "epoch": epoch,
        "lr": parts.scheduler.get_last_lr()[0],
        "train_loss": train_loss,
        **metrics,
        "train_img_per_s": fold.images_per_epoch / train_seconds,
        "seconds": clock() - started,
        "skipped_steps": skipped_steps,
    }


def _train_epochs(
    fold: _Fold, state: _State, config: TrainConfig, run_dir: Path, progress: bool, deadline: Deadline
) -> str:
    """The epochs from ``state.start_epoch`` on, each saved as it ends; stops early at the time limit.
    Returns why the fold's first epoch did not start, when it did not ("" otherwise)."""
    known_epoch = known_epoch_seconds(config)  # read again: the set-up took time, a sibling may have ended one
    budget = _EpochBudget(deadline, config, state.start_epoch, fold.images_per_epoch, known_epoch)
    for epoch in range(state.start_epoch, config.epochs):
        if not budget.begin(epoch):
            return budget.not_started
        row = _run_epoch(fold, config, epoch, run_dir, progress, budget)
        _save_epoch(fold.parts, state, config, row, fold, run_dir)
        column, name = monitored(config)
        logger.info(
            "fold %d epoch %d/%d: train loss %.4f, val loss %.4f, %s %.5f, %.1f img/s",
            config.fold,
            epoch + 1,
            config.epochs,
            row["train_loss"],
            row["val_loss"],
            name,
            row[column],
            row["train_img_per_s"],
        )
        if class_iou_line(row):
            logger.info(
                "fold %d epoch %d/%d: IoU per class: %s", config.fold, epoch + 1, config.epochs, class_iou_line(row)
            )
        budget.end()
        _exit_if_fault_injected(config.fold, epoch + 1 - state.start_epoch, resumed=state.start_epoch > 0)
    return ""


FAULT_VARIABLE = "CARVANA_FAULT_EXIT_AFTER_EPOCHS"


def _exit_if_fault_injected(fold: int, epochs_this_run: int, resumed: bool) -> None:
    """Fault injection for the tests of retries: with ``$CARVANA_FAULT_EXIT_AFTER_EPOCHS`` = N, a fold started
    from scratch kills its own process after N epochs, hard, as a lost machine would; its resumed run goes on."""
    after = os.environ.get(FAULT_VARIABLE)
    if after and not resumed and epochs_this_run == int(after):
        logger.warning("fold %d: %s=%s: the process exits now, as if killed", fold, FAULT_VARIABLE, after)
        logging.shutdown()
        os._exit(9)


@dataclass
class FoldResult:
    """How far a fold's training got: the best epoch's log row (None when no epoch was ever done), the epochs
    done of ``epochs``, and why the time limit let no epoch start in this session, when it did not."""

    best: dict | None
    epochs_done: int
    epochs: int
    not_started: str = ""
    score_column: str = "val_dice"  # the monitored score's column in ``best``
    score_name: str = "val Dice"

    @property
    def finished(self) -> bool:
        return self.epochs_done == self.epochs


def train_fold_within(
    config: TrainConfig,
    deadline: Deadline,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> FoldResult:
    """Train ``config.fold`` for the epochs that fit before ``deadline``; keep ``best.pt`` by the monitored
    validation score and ``last.pt`` for ``--resume``."""
    resumable = inspect_run_dir(config, resume, overwrite)  # refuse early, before the set-up; again under the lock
    known_epoch = known_epoch_seconds(config)
    if not deadline.fits(known_epoch):  # a fold started late: no set-up, nothing written
        return _result(config, _epochs_done(resumable), _no_time_for_an_epoch(deadline, known_epoch))
    device, precision = setup_device(device, config.precision)
    config, data = open_training_data(config)
    fold = _set_up_fold(config, data, device, precision, progress)
    config = fold.config
    with _run_folder(config, resume, overwrite, fold.split) as (run_dir, resumed_from):
        state = fold.parts.restore(resumed_from, run_dir / "last.pt") if resumed_from else _State()
        if resume and resumed_from is None:
            logger.info("--resume: no %s yet, starting from scratch", run_dir / "last.pt")
        logger.info(
            "fold %d: %d train / %d validation images, %s-%s, inputs %s, %s on %s, batch %dx%d, %s",
            config.fold,
            len(fold.train_loader.dataset),
            len(fold.val_loader.dataset),
            config.arch,
            config.encoder,
            f"crops of {config.crop}" if config.crop else config.size,
            precision,
            device,
            config.batch_size,
            config.accum_steps,
            deadline.describe(),
        )
        not_started = _train_epochs(fold, state, config, run_dir, progress, deadline)
    result = _result(config, state.rows, not_started)
    column, name = monitored(config)
    if result.best is not None and not not_started:
        logger.info(
            "fold %d: best %s %.5f at epoch %d -> %s",
            config.fold,
            name,
            result.best[column],
            result.best["epoch"] + 1,
            run_dir / "best.pt",
        )
    return result


def _result(config: TrainConfig, rows: list[dict], not_started: str) -> FoldResult:
    best = max(rows, key=lambda row: row[monitored(config)[0]]) if rows else None
    return FoldResult(best, len(rows), config.epochs, not_started, *monitored(config))


def train_fold(
    config: TrainConfig,
    device: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    started: float | None = None,
) -> dict:
    """Train ``config.fold``, stopping before an epoch that would end after ``config.time_limit``, counted
    from ``started`` (a ``time.monotonic()`` reading: when the command began; None: now).

    Returns the best epoch's log row (of the epochs done, when the time limit stopped the run).
    """
    deadline = Deadline(parse_duration(config.time_limit), time.monotonic() if started is None else started)
    result = train_fold_within(config, deadline, device, resume, overwrite, progress)
    if result.best is None:
        raise TrainingError(
            f"fold {config.fold}: not started: {result.not_started} (--time-limit {config.time_limit}); "
            "nothing was trained: give a longer one"
        )
    if result.not_started:
        logger.warning(
            "fold %d: not started: %s; %d of %d epochs are done: run the same command with --resume in a new "
            "session to train the rest",
            config.fold,
            result.not_started,
            result.epochs_done,
            result.epochs,
        )
    return result.best


def _check_finite(pending: list[tuple[int, torch.Tensor]], epoch: int, run_dir: Path) -> list[float]:
    """Losses of the pending steps as floats (one device sync); stop at the first non-finite one."""
    if not pending:
        return []
    values = torch.stack([loss for _, loss in pending]).tolist()
    for (step, _), value in zip(pending, values):
        if not math.isfinite(value):
            last = run_dir / "last.pt"
            good = f"{last} (end of epoch {load_checkpoint(last)['epoch'] + 1})" if last.exists() else "none"
            raise NonFiniteLossError(
                f"loss is {value} at epoch {epoch + 1}, step {step + 1}; stopped without saving these weights. "
                f"Last good checkpoint: {good}. Lower --lr, keep --clip-grad on, or use --precision bf16/fp32 "
                "(fp16 overflows where bf16 does not)"
            )
    return values


@dataclass
class FoldOutcome:
    """One fold of ``train_folds``: ``ok`` unless it failed; ``stopped`` when the time limit stopped it, or kept it
    from starting (its checkpoints, if any, are good: ``--resume`` continues it)."""

    fold: int
    ok: bool
    message: str
    log: str
    stopped: bool = False


def _fold_outcome(result: FoldResult, fold: int, device: str, deadline: Deadline, log: str) -> FoldOutcome:
    """The outcome of a fold that did not fail."""
    if result.not_started:
        return FoldOutcome(fold, True, f"not started: {result.not_started}", log, stopped=True)
    best = f"best {result.score_name} {result.best[result.score_column]:.5f} on {device}"
    if result.finished:
        return FoldOutcome(fold, True, best, log)
    done = f"stopped by the {deadline.describe()} after {result.epochs_done} of {result.epochs} epochs"
    return FoldOutcome(fold, True, f"{done}, {best}", log, stopped=True)


@contextlib.contextmanager
def _device_slot(slots_dir: str, slots: list[str]):
    """A free device among ``slots`` (one entry per fold that may run on it at once), held until the block
    ends. The slots are file locks: the OS frees the slot of a worker that dies, however it dies."""
    while True:
        for index, device in enumerate(slots):
            with exclusive_lock(Path(slots_dir) / f"slot{index}.lock") as claimed:
                if claimed:
                    yield device
                    return
        time.sleep(0.2)


def _run_one_fold(
    config_values: dict,
    fold: int,
    slots_dir: str,
    slots: list[str],
    driver_pid: int,
    flags: dict,
    log_level: int,
    started: float,
) -> FoldOutcome:
    """A joblib worker's fold: on a free device slot, until the driver dies."""
    stop_when_orphaned(driver_pid)  # nothing to watch when one job runs the folds in the driver itself
    with _device_slot(slots_dir, slots) as device:
        logger.debug("device slots in %s", slots_dir)
        return run_fold_on(config_values, fold, device, flags, log_level, started)


def run_fold_on(
    config_values: dict, fold: int, device: str, flags: dict, log_level: int, started: float
) -> FoldOutcome:
    """Train ``fold`` of the run ``config_values`` on ``device``, logging to its ``train.log``; a failure is the
    outcome, not an exception. The fold runner of every backend (joblib's workers, Ray's tasks)."""
    config = config_from({**config_values, "fold": fold})
    deadline = Deadline(parse_duration(config.time_limit), started)
    log_path = config.run_dir() / "train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, contextlib.redirect_stderr(log), logs.redirected(log, log_level):
        logger.info("fold %d on %s (worker process %d)", fold, device, os.getpid())
        try:
            result = train_fold_within(config, deadline, device, progress=False, **flags)
        except Exception as error:  # noqa: BLE001 - any failure is reported per fold, the others go on
            if not isinstance(error, ProjectError):
                traceback.print_exc()
            logger.error("%s: %s", type(error).__name__, error)
            return FoldOutcome(fold, False, f"{type(error).__name__}: {error}", str(log_path))
        if result.not_started:  # the driver says how to go on
            logger.warning("fold %d: not started: %s", fold, result.not_started)
    return _fold_outcome(result, fold, device, deadline, str(log_path))


class _FoldProgress:
    """A line in the driver as each fold of ``train_folds`` finishes an epoch, e.g. ``cuda:0 fold 0: epoch 3/30,
    val Dice 0.99123, 41.2 img/s, best 0.99123``: each fold's log.csv (written atomically) read every
    ``interval`` seconds by a thread, the device named by the fold's train.log. Lines go to the console
    handlers of the moment it starts: a fold run in the driver redirects the project's logger to its train.log."""

    def __init__(self, config: TrainConfig, folds: list[int], interval: float = 2.0):
        self.run_dirs = {fold: Path(config.out) / f"fold{fold}" for fold in folds}
        self.score_column, self.score_name = monitored(config)
        self.epochs, self.interval = config.epochs, interval
        self.seen = {fold: {_row_key(row) for row in self._rows(fold)} for fold in folds}  # earlier runs' rows
        self.devices: dict[int, str] = {}
        self.handlers = list(logging.getLogger(logs.LOGGER_NAME).handlers)
        self.enabled = logger.isEnabledFor(logging.INFO)
        self.saying = threading.Lock()  # the watching thread and the driver's own calls of look()

    def _rows(self, fold: int) -> list[dict]:
        try:
            with open(self.run_dirs[fold] / "log.csv", newline="") as handle:
                return list(csv.DictReader(handle))
        except (OSError, csv.Error):
            return []

    def look(self) -> None:
        """A line for each epoch ended since the last look."""
        with self.saying:
            self._look()

    def _look(self) -> None:
        for fold in self.run_dirs:
            rows = self._rows(fold)
            for row in rows:
                if _row_key(row) not in self.seen[fold]:
                    self.seen[fold].add(_row_key(row))
                    self._say(self._line(fold, row, rows))

    def _line(self, fold: int, row: dict, rows: list[dict]) -> str | None:
        try:
            best = max(float(other[self.score_column]) for other in rows)
            return (
                f"{self._device(fold)} fold {fold}: epoch {int(row['epoch']) + 1}/{self.epochs}, {self.score_name} "
                f"{float(row[self.score_column]):.5f}, {float(row['train_img_per_s']):.1f} img/s, best {best:.5f}"
            )
        except (KeyError, TypeError, ValueError):  # a row that is not whole: not worth a line
            return None

    def _device(self, fold: int) -> str:
        """The device from the fold's train.log (read once: the fold's line is there before its first epoch)."""
        if fold not in self.devices:
            try:
                text = (self.run_dirs[fold] / "train.log").read_text(errors="replace")
            except OSError:
                return "?"
            found = re.findall(rf"^\S+ fold {fold} on (\S+) \(worker process", text, re.MULTILINE)
            if not found:
                return "?"
            self.devices[fold] = found[-1]  # the log is appended to by every run of the fold
        return self.devices[fold]

    def _say(self, message: str | None) -> None:
        if message is None or not self.enabled:
            return
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, None, None)
        for handler in self.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def _row_key(row: dict) -> tuple:
    return row.get("epoch"), row.get("seconds")


@contextlib.contextmanager
def fold_progress(config: TrainConfig, folds: list[int]):
    progress = _FoldProgress(config, folds)
    with logs.said_every(progress.interval, progress.look, "fold-progress"):
        yield progress


def train_folds(
    config: TrainConfig,
    folds: list[int],
    devices: list[str],
    jobs: int,
    resume: bool = False,
    overwrite: bool = False,
    log_level: int = logging.INFO,
    started: float | None = None,
) -> list[FoldOutcome]:
    """Train several folds with joblib, ``jobs`` at a time, each on a free device of ``devices``;
    each fold logs to its own ``train.log``, and this process says as each fold ends an epoch. A failing fold
    is reported and does not stop the others. ``config.time_limit`` counts from ``started`` (``time.monotonic()``;
    None: now) for every fold: a fold whose turn comes when less is left than the longest epoch of this run's
    folds is not started. The workers exit within a second when this process dies."""
    from joblib import Parallel, delayed

    slots = [devices[index % len(devices)] for index in range(max(jobs, len(devices)))]
    config = open_training_data(config)[0]  # the class names, for the lines saying each fold's score
    values = asdict(config)
    flags = {"resume": resume, "overwrite": overwrite}
    started = time.monotonic() if started is None else started
    with tempfile.TemporaryDirectory(prefix="device-slots-") as slots_dir, fold_progress(config, folds):
        return Parallel(n_jobs=jobs, backend="loky")(
            delayed(_run_one_fold)(values, fold, slots_dir, slots, os.getpid(), flags, log_level, started)
            for fold in folds
        )
