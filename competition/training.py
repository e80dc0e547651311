"""The training loop: a fold's model and optimiser, its epochs (steps, validation, checkpoints) up to the time limit."""

import copy
import functools
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from competition.averaging import (
    AVERAGED_NAME,
    BATCH_NORM_BATCHES,
    SCORES_NAME,
    SWA_NAME,
    average_kept,
    epochs_text,
    keep_top,
    recompute_batch_norm,
    write_scores,
)
from competition.board import Board, open_board
from competition.checkpoints import load_checkpoint, summary, write_checkpoint
from competition.clock import Deadline, parse_duration
from competition.config import ONE_IMAGE_BATCH_NORM, TrainConfig
from competition.environment import explain_out_of_memory
from competition.epoch_budget import EpochBudget, known_epoch_seconds, no_time_for_an_epoch
from competition.errors import CheckpointError, DiskFullError, TrainingError
from competition.files import is_disk_full, no_space_left, partial_path
from competition.fold_data import FoldData, open_training_data, set_up_fold, unaugmented_loader
from competition.losses import build_loss
from competition.metrics import confusion_matrix, dice_per_image, iou_per_image, segmentation_scores
from competition.models import build_model
from competition.prediction import (
    autocast,
    model_input,
    most_probable_class,
    predict_probabilities,
    prepare_model,
    setup_device,
)
from competition.run_folder import (
    claim_run_folder,
    commit_epoch,
    free_space,
    inspect_run_dir,
    kept_epochs,
    monitored,
    warn_if_little_room,
)
from competition.schedules import build_scheduler, steps_per_epoch
from competition.tile_data import stitched_scores

logger = logging.getLogger(__name__)

# Called as each epoch is saved, with the epochs this process has trained and whether it resumed a run.
EpochEnded = Callable[[int, bool], None]


# torch's warning when the schedule steps before any optimizer step has been taken.
SCHEDULER_BEFORE_OPTIMIZER = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"

# More skipped steps than this in an epoch are more than the loss scale's calibration at the start.
SKIPPED_STEPS_WARNING = 5


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; training stopped before any such weights were saved."""


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


@torch.no_grad()
def evaluate_labels(model, loader, loss_fn, precision: str, classes: list[str], ignore_index: int = 255) -> dict:
    """Multilabel validation (one sigmoid channel per class, targets (N, K, H, W)) at full resolution: the loss;
    ``dice_<class>``, each class's Dice per image at 0.5 over its labelled pixels (1 when the class is in neither
    mask, as Kaggle scores (image, class) pairs), averaged over images; ``iou_<class>``, its IoU over the whole set
    (nan when the class is in neither); ``val_dice`` and ``val_miou`` their means over the classes."""
    model.eval()
    device = next(model.parameters()).device
    losses, dice = [], []
    hits = torch.zeros(len(classes), dtype=torch.float64, device=device)
    unions = torch.zeros_like(hits)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        probabilities = predict_probabilities(
            model, images, tuple(targets.shape[-2:]), precision=precision, multilabel=True
        )
        logits = torch.logit(probabilities.clamp(1e-6, 1 - 1e-6))
        losses.append(loss_fn(logits, targets) * len(images))
        labelled = targets != ignore_index
        predicted, truth = (probabilities > 0.5) & labelled, (targets == 1) & labelled
        dice.append(dice_per_image(predicted.flatten(0, 1), truth.flatten(0, 1)).reshape(len(images), -1))
        hits += (predicted & truth).sum((0, 2, 3)).double()
        unions += (predicted | truth).sum((0, 2, 3)).double()
    per_class_dice = torch.cat(dice).mean(0).cpu()
    per_class_iou = torch.where(unions > 0, hits / unions.clamp_min(1), torch.nan).cpu()
    metrics = {
        "val_loss": (torch.stack(losses).sum() / len(loader.dataset)).item(),
        "val_dice": per_class_dice.mean().item(),
        "val_miou": float(np.nanmean(per_class_iou.numpy())) if per_class_iou.isfinite().any() else float("nan"),
    }
    metrics.update({f"dice_{name}": value.item() for name, value in zip(classes, per_class_dice)})
    metrics.update({f"iou_{name}": value.item() for name, value in zip(classes, per_class_iou)})
    return metrics


@torch.no_grad()
def evaluate(model, loader, loss_fn, precision: str, classes: list[str] | None = None, ignore_index: int = 255) -> dict:
    """Loss at full resolution (probabilities resized back to the masks' size); for a one-channel (binary) model
    Dice and IoU per image, averaged. With ``classes``, also the confusion matrix summed over the whole set, not
    averaged per batch (``confusion``, on the CPU), and its scores: mIoU, macro F1, pixel accuracy and
    ``iou_<class>`` for each class. Pixels of ``ignore_index`` count nowhere."""
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
            class_map = most_probable_class(probabilities)
        losses.append(loss_fn(logits, masks) * len(images))
        if confusion is not None:
            truth = masks.squeeze(1).long() if masks.dim() == 4 else masks
            confusion += confusion_matrix(class_map, truth, len(classes), ignore_index)
    metrics = {"val_loss": (torch.stack(losses).sum() / len(loader.dataset)).item()}
    if dice:
        metrics.update(val_dice=torch.cat(dice).mean().item(), val_iou=torch.cat(iou).mean().item())
    if confusion is not None:
        metrics.update(confusion_scores(confusion.cpu(), classes))
    return metrics


def confusion_scores(confusion: torch.Tensor, classes: list[str]) -> dict:
    """A confusion matrix (on the CPU) and its scores as validation logs them: mIoU, macro F1, pixel accuracy and
    ``iou_<class>`` for each class."""
    scores = segmentation_scores(confusion, classes)
    return {
        "confusion": confusion,
        "val_miou": float(scores["miou"]),
        "val_macro_f1": float(scores["macro_f1"]),
        "val_pixel_accuracy": float(scores["pixel_accuracy"]),
        **{f"iou_{name}": float(value) for name, value in scores["per_class"]["iou"].items()},
    }


def class_iou_line(row: dict, score: str = "iou") -> str:
    """``background 0.991, body 0.934, lights 0.412``: each class's validation IoU (or ``score``: dice) from a log
    row, so that a rare class is not hidden by the mean (nan: the class is in neither the masks nor the
    predictions)."""
    prefix = f"{score}_"
    return ", ".join(
        f"{name.removeprefix(prefix)} {value:.3f}" for name, value in row.items() if name.startswith(prefix)
    )


@dataclass
class _State:
    start_epoch: int = 0
    best_score: float = -1.0  # of the monitored score; checkpoints keep it as best_dice, their name of old
    rows: list = field(default_factory=list)
    kept: list = field(default_factory=list)  # (epoch, score) of the epochs --average-top keeps, best first


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
    swa: AveragedModel | None  # --swa-epochs: the average of the weights at the end of the last epochs
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
            "swa": self.swa.state_dict() if self.swa is not None else {},
        }

    def checkpoint_bytes(self) -> int:
        """About the size of last.pt, from its tensors: the weights and buffers, AdamW's two moments of each weight
        (made at the first step, so counted rather than read), and the EMA's or SWA's copy; best.pt is smaller."""
        state = sum(tensor.numel() * tensor.element_size() for tensor in self.model.state_dict().values())
        moments = 2 * sum(weight.numel() * weight.element_size() for weight in self.model.parameters())
        return state + moments + sum(state for average in (self.ema, self.swa) if average is not None)

    def restore(self, checkpoint: dict, path: Path) -> _State:
        """Weights and optimiser state from ``last.pt``; the log rows of the epochs it finished."""
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            self.scaler.load_state_dict(checkpoint["scaler"])
            if self.ema is not None:
                self.ema.load_state_dict(checkpoint["ema"])
            if self.swa is not None:
                self.swa.load_state_dict(checkpoint["swa"])
        except torch.OutOfMemoryError:
            raise
        except (KeyError, RuntimeError, ValueError) as error:
            raise CheckpointError(f"{path}: cannot resume from it ({type(error).__name__}: {error})") from None
        rows = _epochs_done(checkpoint)
        logger.info(
            "resumed from %s: epoch %d done, best score %.5f", path, checkpoint["epoch"], checkpoint["best_dice"]
        )
        return _State(checkpoint["epoch"], checkpoint["best_dice"], rows, kept_epochs(checkpoint))


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
    swa = AveragedModel(model) if config.swa_epochs else None  # parameters alone: batch norm is recomputed at the end
    return _Parts(
        model=model,
        forward=forward,
        loss_fn=build_loss(
            config.loss,
            num_classes=config.num_classes(),
            bce_weight=config.bce_weight,
            dice_weight=config.dice_weight,
            # Carvana labels every pixel; its pseudo-labels leave the unconfident ones out
            ignore_index=None if config.fixed_classes() and not config.pseudo else config.label_ignore_index(),
            class_weights=weights,
            multilabel=config.multilabel(),
        ),
        optimizer=optimizer,
        scheduler=build_scheduler(config, optimizer, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        ema=ema,
        swa=swa,
        precision=precision,
        optimizer_steps=OptimizerStepCount(optimizer),
    )


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
    budget: "EpochBudget | None" = None,
    board: Board | None = None,
) -> tuple[float, int]:
    """One pass over the training images; returns the mean loss and the optimizer steps skipped for fp16
    overflow. Losses are read back from the device every ``log_every`` steps (one sync), and a non-finite
    one stops the run; there the time ``budget`` (an EpochBudget) may project the run's length. ``board``
    takes each step's loss and learning rate."""
    parts.model.train()
    steps_taken_before = parts.optimizer_steps.taken
    device = next(parts.model.parameters()).device
    epoch_steps = steps_per_epoch(len(loader), config.accum_steps)
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
        if board is not None:
            board.step(epoch, step, loss, parts.scheduler.get_last_lr()[0])  # the rate this step took
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
        if (step + 1) % config.log_every == 0 or step + 1 == epoch_steps:
            losses += _check_finite(pending, epoch, run_dir)
            pending = []
            if budget is not None:
                budget.during(images_done)
            bar.set_postfix(
                loss=f"{np.mean(losses[-config.log_every :]):.4f}", lr=f"{parts.scheduler.get_last_lr()[0]:.2e}"
            )
    bar.close()
    losses += _check_finite(pending, epoch, run_dir)
    skipped = epoch_steps - (parts.optimizer_steps.taken - steps_taken_before)
    _warn_of_skipped_steps(config, epoch, skipped, epoch_steps)
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


def _save_epoch(parts: _Parts, state: _State, config: TrainConfig, row: dict, fold: FoldData, run_dir: Path):
    """best.pt when the monitored validation score improved (every epoch when the validation images are also
    trained on: no score then picks one), last.pt (with everything --resume needs), log.csv, curves.png, and the
    epoch's weights when --average-top keeps them (the latest epochs when nothing is held out): saved together, so
    that a full disk leaves the folder at the epoch before, and says so in one line."""
    column, name = monitored(config)
    rows = [*state.rows, row]
    improved = row[column] > state.best_score or not fold.held_out
    best_score = row[column] if improved else state.best_score
    epoch_summary = summary(config, row["epoch"], row[column], fold.image_shape)
    weights = {"model": parts.evaluated.state_dict(), **epoch_summary}
    kept = keep_top(state.kept, row["epoch"], row[column] if fold.held_out else row["epoch"], config.average_top)
    last = {
        "model": parts.model.state_dict(),
        **epoch_summary,
        "best_dice": best_score,
        "log": rows,
        "split": fold.split,
        "kept_epochs": [list(pair) for pair in kept],
    }
    keep = weights if row["epoch"] in (epoch for epoch, _ in kept) else None
    try:
        commit_epoch(run_dir, {**last, **parts.training_state()}, weights if improved else None, rows, config, keep)
    except OSError as error:
        if not no_space_left(error):  # commit_epoch raised torch.save's error on a full disk as ENOSPC
            raise
        raise _no_room_for(row["epoch"], state, column, fold.held_out, run_dir) from error
    state.rows, state.best_score, state.kept = rows, best_score, kept
    if improved:
        logger.debug("saved %s (%s %.5f)", run_dir / "best.pt", name, best_score)


def _no_room_for(epoch: int, state: _State, column: str, held_out: bool, run_dir: Path) -> DiskFullError:
    """The one line for an epoch that the disk had no room to save: what the run folder holds, and how to go on."""
    if state.rows:
        scores = [row[column] for row in state.rows]  # best.pt: the first best score, or each epoch's when not held out
        best_epoch = state.rows[scores.index(max(scores)) if held_out else -1]["epoch"]
        kept = f"last.pt and log.csv hold epoch {state.rows[-1]['epoch']}, best.pt epoch {best_epoch}"
    else:
        kept = "no epoch is saved yet"
    return DiskFullError(
        f"{run_dir}: no space left on its device to save epoch {epoch} ({free_space(run_dir)} free): {kept}; "
        f"once there is room, the same command with --resume goes on from epoch {epoch}"
    )


def _run_epoch(
    fold: FoldData,
    parts: _Parts,
    config: TrainConfig,
    epoch: int,
    run_dir: Path,
    progress: bool,
    budget: EpochBudget,
    board: Board,
) -> dict:
    """Train one epoch and validate; returns its log row, written to ``board`` too."""
    fold.order.manual_seed(config.seed * 100_003 + epoch)
    if fold.train_loader.dataset.transform is not None:
        fold.train_loader.dataset.transform.set_random_seed(config.seed + epoch)
    clock = budget.deadline.elapsed  # the limit's clock: later runs judge by the epoch lengths logged here
    started = clock()
    train_loss, skipped_steps = train_one_epoch(
        parts, fold.train_loader, config, epoch, run_dir, progress, budget, board
    )
    train_seconds = clock() - started
    metrics = _validate(parts.evaluated, parts, fold, config)
    confusion = metrics.pop("confusion", None)
    row = {
        "epoch": epoch + 1,  # counted from 1 in log.csv and checkpoints, as the log says it
        "lr": parts.scheduler.get_last_lr()[0],
        "train_loss": train_loss,
        **metrics,
        "train_img_per_s": fold.images_per_epoch / train_seconds,
        "seconds": clock() - started,
        "skipped_steps": skipped_steps,
    }
    board.epoch(epoch, row, confusion, parts.evaluated)
    return row


def _validate(model: torch.nn.Module, parts: _Parts, fold: FoldData, config: TrainConfig) -> dict:
    """``model``'s validation scores on the fold, as each epoch's are made (see evaluate)."""
    # Carvana's Dice needs no confusion matrix unless another score is monitored
    by_confusion = not config.fixed_classes() or monitored(config)[0] != "val_dice"
    scored_classes = list(fold.classes) if by_confusion else None
    score = evaluate_labels if config.multilabel() else evaluate
    with explain_out_of_memory(*_out_of_memory_fix(config, validating=True)):
        scores = score(
            model, fold.val_loader, parts.loss_fn, parts.precision, scored_classes, config.label_ignore_index()
        )
        if config.tile:  # the whole slides' scores (a softmax's: of their confusion matrix), stitched as infer.py
            # stitches them; the loss the windows'
            stitched = stitched_scores(model, fold.val_loader.dataset.slides, config, parts.precision)
            scores.update(
                confusion_scores(stitched["confusion"], scored_classes) if "confusion" in stitched else stitched
            )
        return scores


def _train_epochs(
    fold: FoldData,
    parts: _Parts,
    state: _State,
    config: TrainConfig,
    run_dir: Path,
    progress: bool,
    deadline: Deadline,
    epoch_ended: EpochEnded | None,
) -> str:
    """The epochs from ``state.start_epoch`` on, each saved and said as it ends; stops early at the time limit.
    Returns why the fold's first epoch did not start, when it did not ("" otherwise)."""
    known_epoch = known_epoch_seconds(config)  # read again: the set-up took time, a sibling may have ended one
    budget = EpochBudget(deadline, config, state.start_epoch, fold.images_per_epoch, known_epoch)
    with open_board(config, run_dir, fold, state.start_epoch, state.best_score, parts.precision) as board:
        for epoch in range(state.start_epoch, config.epochs):
            if not budget.begin(epoch):
                return budget.not_started
            row = _run_epoch(fold, parts, config, epoch, run_dir, progress, budget, board)
            if parts.swa is not None and epoch >= config.epochs - config.swa_epochs:
                parts.swa.update_parameters(parts.model)
            _save_epoch(parts, state, config, row, fold, run_dir)
            _log_epoch(config, epoch, row)
            budget.end()
            if epoch_ended is not None:
                epoch_ended(epoch + 1 - state.start_epoch, state.start_epoch > 0)
    return ""


def _log_epoch(config: TrainConfig, epoch: int, row: dict) -> None:
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
    for score, label in (("dice", "Dice"), ("iou", "IoU")):
        if class_iou_line(row, score):
            logger.info(
                "fold %d epoch %d/%d: %s per class: %s",
                config.fold,
                epoch + 1,
                config.epochs,
                label,
                class_iou_line(row, score),
            )


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
    epoch_ended: EpochEnded | None = None,
) -> FoldResult:
    """Train ``config.fold`` for the epochs that fit before ``deadline``; keep ``best.pt`` by the monitored
    validation score and ``last.pt`` for ``--resume``. ``epoch_ended`` is called after each epoch is saved."""
    resumable = inspect_run_dir(config, resume, overwrite)  # refuse early, before the set-up; again under the lock
    known_epoch = known_epoch_seconds(config)
    if not deadline.fits(known_epoch):  # a fold started late: no set-up, nothing written
        return _result(config, _epochs_done(resumable), no_time_for_an_epoch(deadline, known_epoch))
    device, precision = setup_device(device, config.precision)
    config, data = open_training_data(config)
    fold = set_up_fold(config, data, device, progress)
    config = fold.config
    parts = build_parts(config, device, precision, steps_per_epoch(len(fold.train_loader), config.accum_steps))
    with claim_run_folder(config, resume, overwrite, fold.split) as (run_dir, resumed_from):
        state = parts.restore(resumed_from, run_dir / "last.pt") if resumed_from else _State()
        if resume and resumed_from is None:
            logger.info("--resume: no %s yet, starting from scratch", run_dir / "last.pt")
        _log_fold_start(config, fold, precision, device, deadline)
        warn_if_little_room(run_dir, parts.checkpoint_bytes())
        not_started = _train_epochs(fold, parts, state, config, run_dir, progress, deadline, epoch_ended)
        if len(state.rows) == config.epochs and (config.average_top or config.swa_epochs):
            _average_weights(fold, parts, state, config, run_dir)
        elif config.average_top or config.swa_epochs:  # stopped early (--time-limit): averaged only at the end
            names = [
                name for name, asked in ((AVERAGED_NAME, config.average_top), (SWA_NAME, config.swa_epochs)) if asked
            ]
            logger.info(
                "fold %d: %d of %d epochs done, so no %s yet; --resume finishes the epochs and writes %s",
                config.fold, len(state.rows), config.epochs, " or ".join(names), " and ".join(names),
            )  # fmt: skip
    result = _result(config, state.rows, not_started)
    if result.best is not None and not not_started:
        _log_best(config, result, run_dir)
    return result


def _average_weights(fold: FoldData, parts: _Parts, state: _State, config: TrainConfig, run_dir: Path) -> None:
    """averaged.pt (--average-top) and swa.pt (--swa-epochs) once the fold's last epoch is saved, batch norm
    recomputed on training images; scored on the fold's validation images beside best.pt, said in one line and
    written to averaged.csv. averaged.csv goes last: a resumed run whose averaging was interrupted does it again,
    and a finished one leaves it as it is."""
    if (run_dir / SCORES_NAME).exists():
        return
    column, name = monitored(config)
    averages = []
    if config.average_top:
        epochs = sorted(epoch for epoch, _ in state.kept)
        model = copy.deepcopy(parts.model)
        model.load_state_dict(average_kept(run_dir, epochs))
        averages.append((AVERAGED_NAME, model, epochs, f"top {len(epochs)}: epochs "))
    if config.swa_epochs:
        epochs = list(range(config.epochs - config.swa_epochs + 1, config.epochs + 1))
        averages.append((SWA_NAME, parts.swa.module, epochs, "epochs "))
    device = next(parts.model.parameters()).device
    loader = unaugmented_loader(config, fold.train_loader, device, BATCH_NORM_BATCHES)
    best = max(state.rows, key=lambda row: row[column]) if fold.held_out else state.rows[-1]  # best.pt's epoch
    rows, said = [], [f"best.pt {best[column]:.5f} (epoch {best['epoch']})"]
    for file_name, model, epochs, label in averages:
        recompute_batch_norm(model, loader, config.channels_last, parts.precision)
        metrics = _validate(model, parts, fold, config)
        metrics.pop("confusion", None)
        payload = {
            "model": model.state_dict(),
            **summary(config, epochs[-1], metrics[column], fold.image_shape),
            "averaged_epochs": epochs,
        }
        _write_averaged(run_dir / file_name, functools.partial(write_checkpoint, payload))
        rows.append({"weights": file_name, "epochs": " ".join(map(str, epochs)), **metrics})
        said.append(f"{file_name} ({label}{epochs_text(epochs)}) {metrics[column]:.5f}")
    best_scores = {key: best.get(key, "") for key in rows[0] if key not in ("weights", "epochs")}
    rows.insert(0, {"weights": "best.pt", "epochs": str(best["epoch"]), **best_scores})
    _write_averaged(run_dir / SCORES_NAME, lambda path: write_scores(rows, path))
    logger.info("fold %d: %s %s", config.fold, name, ", ".join(said))


def _write_averaged(path: Path, write: Callable[[Path], None]) -> None:
    """``path`` written under a temporary name and renamed; a full disk is one line saying how to go on (asked
    before the temporary file is removed, which frees the room again)."""
    partial = partial_path(path)
    try:
        write(partial)
    except BaseException as error:
        full = is_disk_full(error, path.parent)
        partial.unlink(missing_ok=True)
        if full:
            raise DiskFullError(
                f"{path.parent}: no space left on its device to write {path.name} ({free_space(path.parent)} free); "
                "every epoch is saved: once there is room, the same command with --resume writes it"
            ) from None
        raise
    os.replace(partial, path)


def _log_fold_start(config: TrainConfig, fold: FoldData, precision: str, device, deadline: Deadline) -> None:
    inputs = f"crops of {config.crop}" if config.crop else config.size
    if config.tile:  # the datasets are windows of the slides, not images
        inputs = f"windows of {config.tile}"
    logger.info(
        "fold %d: %d train / %d validation %s, %s-%s, inputs %s, %s on %s, batch %dx%d, %s",
        config.fold,
        len(fold.train_loader.dataset),
        len(fold.val_loader.dataset),
        "windows" if config.tile else "images",
        config.arch,
        config.encoder,
        inputs,
        precision,
        device,
        config.batch_size,
        config.accum_steps,
        deadline.describe(),
    )


def _log_best(config: TrainConfig, result: FoldResult, run_dir: Path) -> None:
    column, name = monitored(config)
    logger.info(
        "fold %d: best %s %.5f at epoch %d -> %s",
        config.fold,
        name,
        result.best[column],
        result.best["epoch"],
        run_dir / "best.pt",
    )


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
            good = f"{last} (end of epoch {load_checkpoint(last)['epoch']})" if last.exists() else "none"
            raise NonFiniteLossError(
                f"loss is {value} at epoch {epoch + 1}, step {step + 1}; stopped without saving these weights. "
                f"Last good checkpoint: {good}. Lower --lr, keep --clip-grad on, or use --precision bf16/fp32 "
                "(fp16 overflows where bf16 does not)"
            )
    return values
