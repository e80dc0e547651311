"""A fold's run folder: what it allows (fresh, resume, overwrite), its lock and config.json, log.csv and curves.png."""

import contextlib
import csv
import json
from dataclasses import asdict
from pathlib import Path

from competition.checkpoints import check_resumable, load_checkpoint
from competition.config import TrainConfig
from competition.errors import CheckpointError
from competition.files import atomic_output, exclusive_lock, lock_holder

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

RUN_OUTPUTS = ("best.pt", "last.pt", "log.csv", "curves.png", "config.json")

LOCK_NAME = ".lock"


def monitored(config: TrainConfig) -> tuple[str, str]:
    """(log column, its name in messages) of the validation score that picks best.pt: ``--monitor``, where
    auto is Dice on binary data and mIoU on multi-class data."""
    monitor = config.monitor
    if monitor == "auto":
        monitor = "dice" if config.num_classes() == 2 else "miou"
    return MONITOR_COLUMNS[monitor]


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


@contextlib.contextmanager
def claim_run_folder(config: TrainConfig, resume: bool, overwrite: bool, split: str):
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


def write_log(rows: list[dict], run_dir: Path, config: TrainConfig) -> None:
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

    epochs = [row["epoch"] for row in rows]
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
