"""The fold trainer: data, model, optimisation loop, validation, checkpoints, logs; and folds in parallel."""

import contextlib
import csv
import json
import math
import os
import random
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from competition.config import TrainConfig, config_from
from competition.data import CarvanaData, CarvanaDataset, DataError, image_id_of
from competition.environment import resolve_device
from competition.files import atomic_output
from competition.folds import read_folds
from competition.losses import build_loss
from competition.metrics import dice_per_image, iou_per_image
from competition.models import build_model
from competition.prediction import autocast, predict_probabilities, resolve_precision, tune_for

LOG_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_dice", "val_iou", "train_img_per_s", "seconds"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before any such weights were saved."""


class DeviceMemoryError(RuntimeError):
    """The device ran out of memory; the message says which setting to lower."""


@contextlib.contextmanager
def _explain_out_of_memory(config: TrainConfig, validating: bool = False):
    """Turn the allocator's out-of-memory error into one that names the settings to change."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        cause = str(error).splitlines()[0] if str(error) else "out of memory"
        if validating:
            fix = f"lower --val-batch-size (now {config.val_batch_size}); it does not change training"
        elif config.batch_size > 1:
            fix = (
                f"halve the batch and keep its effective size: --batch-size {config.batch_size // 2} "
                f"--accum-steps {config.accum_steps * 2}; or lower --size"
            )
        else:
            fix = "lower --size, or train on --crop 512"
        raise DeviceMemoryError(
            f"{cause} ({'validation' if validating else 'a training step'} of {config.arch}-{config.encoder}, "
            f"batch {config.val_batch_size if validating else config.batch_size}, size {config.size}): {fix}. "
            f"`python -m competition.memory` with the same flags counts the memory per batch size"
        ) from None


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
            A.HueSaturationValue(8, 15, 10, p=0.3),
        ]
    return A.Compose(transforms, seed=config.seed) if transforms else None


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total)
    if config.schedule != "cosine":
        raise ValueError(f"schedule must be cosine or onecycle, got {config.schedule!r}")
    warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """Each loader worker draws its own augmentations, reproducibly (torch seeds it per epoch)."""
    info = torch.utils.data.get_worker_info()
    if info.dataset.transform is not None:
        info.dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


def _atomic_save(payload: dict, path: Path) -> None:
    with atomic_output(path) as partial:
        torch.save(payload, partial)


def _write_log(rows: list[dict], run_dir: Path) -> None:
    with atomic_output(run_dir / "log.csv") as partial, open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot_curves(rows, run_dir / "curves.png")


def plot_curves(rows: list[dict], path: Path) -> None:
    """Training and validation loss, and validation Dice, per epoch."""
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
    dice_axis.plot(epochs, [row["val_dice"] for row in rows], color="tab:green")
    dice_axis.set(xlabel="epoch", ylabel="Dice", title="validation Dice (full resolution)")
    for axis in (loss_axis, dice_axis):
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    figure.tight_layout()
    with atomic_output(path) as partial:
        figure.savefig(partial, dpi=100, format="png")
    plt.close(figure)


@torch.no_grad()
def evaluate(model, loader, loss_fn, precision: str) -> dict:
    """Loss, Dice and IoU at full resolution (probabilities resized back to the masks' size)."""
    model.eval()
    device = next(model.parameters()).device
    losses, dice, iou = [], [], []
    for images, masks in loader:
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        probabilities = predict_probabilities(model, images, tuple(masks.shape[-2:]), precision=precision)
        logits = torch.logit(probabilities.clamp(1e-6, 1 - 1e-6))
        losses.append(loss_fn(logits, masks) * len(images))
        predicted = probabilities > 0.5
        dice.append(dice_per_image(predicted, masks))
        iou.append(iou_per_image(predicted, masks))
    count = sum(len(d) for d in dice)
    return {
        "val_loss": (torch.stack(losses).sum() / count).item(),
        "val_dice": torch.cat(dice).mean().item(),
        "val_iou": torch.cat(iou).mean().item(),
    }


def _fold_ids(config: TrainConfig, data: CarvanaData) -> tuple[list[str], list[str]]:
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
            "make the folds again for this data with `python make_folds.py`"
        )
    held_out = folds["fold"] == config.fold
    return ids[~held_out].tolist(), ids[held_out].tolist()


@dataclass
class _State:
    start_epoch: int = 0
    best_dice: float = -1.0
    rows: list = field(default_factory=list)


def _resume(run_dir: Path, config: TrainConfig, model, optimizer, scheduler, scaler, ema) -> _State:
    path = run_dir / "last.pt"
    if not path.exists():
        print(f"--resume: no {path} yet, starting from scratch")
        return _State()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    saved = config_from(checkpoint["config"], str(path))
    for name in ("arch", "encoder", "fold", "epochs", "batch_size", "accum_steps", "size", "crop"):
        if getattr(saved, name) != getattr(config, name):
            raise ValueError(f"{path}: was trained with {name}={getattr(saved, name)!r}, now {getattr(config, name)!r}")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    if ema is not None:
        ema.load_state_dict(checkpoint["ema"])
    rows = [row for row in checkpoint["log"] if row["epoch"] <= checkpoint["epoch"]]
    print(f"resumed from {path}: epoch {checkpoint['epoch']} done, best Dice {checkpoint['best_dice']:.5f}")
    return _State(checkpoint["epoch"] + 1, checkpoint["best_dice"], rows)


def train_fold(config: TrainConfig, device: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train ``config.fold``; keep ``best.pt`` by validation Dice and ``last.pt`` for ``--resume``.

    Returns the best epoch's log row.
    """
    device = resolve_device(device)
    precision = resolve_precision(config.precision, device)
    tune_for(device)
    seed_everything(config.seed)
    data = CarvanaData(config.data_dir, config.mask_source)
    train_ids, val_ids = _fold_ids(config, data)
    input_size = config.input_size()
    train_set = CarvanaDataset(data, train_ids, size=input_size, transform=train_transform(config))
    val_set = CarvanaDataset(data, val_ids, size=input_size, full_size_masks=True)
    if len(train_set) < config.batch_size * config.accum_steps:
        raise DataError(
            f"fold {config.fold}: {len(train_set)} training images, fewer than one batch of "
            f"{config.batch_size} x {config.accum_steps}; lower --batch-size"
        )
    image_shape = data.image_shape(val_ids[0])  # inference checks test images against it
    workers = min(config.workers, os.cpu_count() or 1)
    order = torch.Generator()
    loader_options = {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "worker_init_fn": _seed_worker,
        "persistent_workers": False,
    }
    train_loader = torch.utils.data.DataLoader(
        train_set,
        config.batch_size,
        sampler=torch.utils.data.RandomSampler(train_set, generator=order),
        drop_last=True,
        generator=order,
        **loader_options,
    )
    val_loader = torch.utils.data.DataLoader(val_set, config.val_batch_size, **loader_options)

    model = build_model(config.arch, config.encoder, config.encoder_weights).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward_model = torch.compile(model) if config.compile else model
    loss_fn = build_loss(config.loss, config.bce_weight, config.dice_weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = len(train_loader) // config.accum_steps
    scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True) if config.ema else None

    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(run_dir / "config.json") as partial:
        partial.write_text(json.dumps(asdict(config), indent=2) + "\n")
    state = _resume(run_dir, config, model, optimizer, scheduler, scaler, ema) if resume else _State()
    inputs = f"crops of {config.crop}" if config.crop else f"resized to {input_size}" if input_size else "full size"
    print(
        f"fold {config.fold}: {len(train_set)} train / {len(val_set)} validation images, {config.arch}-"
        f"{config.encoder}, inputs {inputs}, "
        f"{precision} on {device}, {steps_per_epoch} steps/epoch of {config.batch_size}x{config.accum_steps}"
    )

    for epoch in range(state.start_epoch, config.epochs):
        order.manual_seed(config.seed * 100_003 + epoch)
        if train_set.transform is not None:
            train_set.transform.set_random_seed(config.seed + epoch)
        model.train()
        started = time.perf_counter()
        pending: list[tuple[int, torch.Tensor]] = []
        losses: list[float] = []
        micro_batches = []
        step = 0
        bar = tqdm(
            total=steps_per_epoch * config.batch_size * config.accum_steps,
            unit="img",
            disable=not progress,
            desc=f"fold {config.fold} epoch {epoch + 1}/{config.epochs}",
            dynamic_ncols=True,
        )
        for images, masks in train_loader:
            images = images.to(device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            micro_batches.append((images, masks.to(device, non_blocking=True)))
            if len(micro_batches) < config.accum_steps:
                continue
            with _explain_out_of_memory(config):
                loss = accumulate_gradients(forward_model, loss_fn, micro_batches, precision, scaler)
                optimizer_step(model, optimizer, scaler, config.clip_grad)
            micro_batches = []
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            pending.append((step, loss))
            step += 1
            bar.update(config.batch_size * config.accum_steps)
            if step % config.log_every == 0 or step == steps_per_epoch:
                losses += _check_finite(pending, epoch, run_dir)
                pending = []
                bar.set_postfix(
                    loss=f"{np.mean(losses[-config.log_every :]):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}"
                )
            if step == steps_per_epoch:
                break
        bar.close()
        losses += _check_finite(pending, epoch, run_dir)
        train_seconds = time.perf_counter() - started
        evaluated = ema.module if ema is not None else model
        with _explain_out_of_memory(config, validating=True):
            metrics = evaluate(evaluated, val_loader, loss_fn, precision)
        row = {
            "epoch": epoch,
            "lr": scheduler.get_last_lr()[0],
            "train_loss": float(np.mean(losses)),
            **metrics,
            "train_img_per_s": steps_per_epoch * config.batch_size * config.accum_steps / train_seconds,
            "seconds": time.perf_counter() - started,
        }
        state.rows.append(row)
        weights = evaluated.state_dict()
        summary = checkpoint_summary(config, epoch, metrics["val_dice"], image_shape)
        if metrics["val_dice"] > state.best_dice:
            state.best_dice = metrics["val_dice"]
            _atomic_save({"model": weights, **summary}, run_dir / "best.pt")
        _atomic_save(
            {
                "model": model.state_dict(),
                **summary,
                "best_dice": state.best_dice,
                "log": state.rows,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema is not None else {},
            },
            run_dir / "last.pt",
        )
        _write_log(state.rows, run_dir)
        print(
            f"fold {config.fold} epoch {epoch + 1}/{config.epochs}: train loss {row['train_loss']:.4f}, "
            f"val loss {row['val_loss']:.4f}, val Dice {row['val_dice']:.5f}, {row['train_img_per_s']:.1f} img/s"
        )
    best = max(state.rows, key=lambda r: r["val_dice"])
    print(
        f"fold {config.fold}: best val Dice {best['val_dice']:.5f} at epoch {best['epoch'] + 1} -> {run_dir / 'best.pt'}"
    )
    return best


def checkpoint_summary(config: TrainConfig, epoch: int, score: float, image_shape: tuple[int, int]) -> dict:
    """What every checkpoint carries besides weights: all infer.py needs to rebuild and check the model."""
    return {
        "config": asdict(config),
        "fold": config.fold,
        "epoch": epoch,
        "score": score,
        "image_shape": list(image_shape),
    }


def _check_finite(pending: list[tuple[int, torch.Tensor]], epoch: int, run_dir: Path) -> list[float]:
    """Losses of the pending steps as floats (one device sync); stop at the first non-finite one."""
    if not pending:
        return []
    values = torch.stack([loss for _, loss in pending]).tolist()
    for (step, _), value in zip(pending, values):
        if not math.isfinite(value):
            last = run_dir / "last.pt"
            good = (
                f"{last} (end of epoch {torch.load(last, weights_only=True)['epoch'] + 1})" if last.exists() else "none"
            )
            raise NonFiniteLossError(
                f"loss is {value} at epoch {epoch + 1}, step {step + 1}; stopped without saving these weights. "
                f"Last good checkpoint: {good}. Lower --lr, keep --clip-grad on, or use --precision bf16/fp32 "
                "(fp16 overflows where bf16 does not)"
            )
    return values


@dataclass
class FoldOutcome:
    fold: int
    ok: bool
    message: str
    log: str


def _run_one_fold(config_values: dict, fold: int, devices, resume: bool) -> FoldOutcome:
    config = config_from({**config_values, "fold": fold})
    log_path = config.run_dir() / "train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    device = devices.get()
    try:
        with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                best = train_fold(config, device, resume=resume, progress=False)
            except Exception as error:  # noqa: BLE001 - any failure is reported per fold, the others go on
                traceback.print_exc()
                return FoldOutcome(fold, False, f"{type(error).__name__}: {error}", str(log_path))
        return FoldOutcome(fold, True, f"best val Dice {best['val_dice']:.5f} on {device}", str(log_path))
    finally:
        devices.put(device)


def train_folds(config: TrainConfig, folds: list[int], devices: list[str], jobs: int, resume: bool = False):
    """Train several folds with joblib, ``jobs`` at a time, each on a device taken from ``devices``
    and given back when done; each fold logs to its own ``train.log``. A failing fold is reported
    and does not stop the others."""
    import multiprocessing

    from joblib import Parallel, delayed

    manager = multiprocessing.Manager()
    queue = manager.Queue()
    for index in range(max(jobs, len(devices))):
        queue.put(devices[index % len(devices)])
    values = asdict(config)
    return Parallel(n_jobs=jobs, backend="loky")(delayed(_run_one_fold)(values, fold, queue, resume) for fold in folds)
