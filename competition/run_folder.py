"""A fold's run folder: what it allows (fresh, resume, overwrite), its lock and config.json, log.csv and curves.png."""

import contextlib
import csv
import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

from competition.averaging import AVERAGED_NAME, KEPT_NAME, SCORES_NAME, SWA_NAME, kept_epoch, kept_name
from competition.checkpoints import check_resumable, load_checkpoint, write_checkpoint
from competition.config import TrainConfig
from competition.errors import CheckpointError, DiskFullError
from competition.files import (
    atomic_output,
    exclusive_lock,
    format_bytes,
    is_disk_full,
    lock_holder,
    write_all_then_rename,
)

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

RUN_OUTPUTS = ("best.pt", "last.pt", "log.csv", "curves.png", "config.json", AVERAGED_NAME, SWA_NAME, SCORES_NAME)

LOCK_NAME = ".lock"

# An epoch's files are all written under temporary names (``last.pt.epoch3.partial``...) before any is renamed, so a
# full disk or a kill while writing leaves the folder whole at the epoch before (the temporary files removed, or
# removed by the next claim). Then they are renamed in this order. last.pt is the commit: it holds the log rows and
# everything --resume reads, so the epoch is saved once it is in place. best.pt goes last, so that a crash between two
# renames never leaves a best.pt of an epoch that log.csv does not list; and the claim of a resumed run renames
# what such a crash left of the epoch last.pt holds (resume alone would not write that best.pt again).
# --average-top's weights of the epoch (top_epoch<N>.pt, KEPT_SLOT here) go before best.pt for the same reason; the
# kept files of epochs the new one displaced are removed once all are renamed (or by the claim, after a crash).
KEPT_SLOT = "top_epoch<N>.pt"
COMMIT_ORDER = ("last.pt", "log.csv", "curves.png", KEPT_SLOT, "best.pt")
# What a write of the run folder's files leaves under a temporary name: an epoch's (tagged), or config.json's and
# the averaged weights' and their scores' at the end of a run.
PARTIAL_NAME = re.compile(
    r"(?P<name>best\.pt|last\.pt|log\.csv|curves\.png|config\.json|top_epoch\d+\.pt|averaged\.pt|swa\.pt|averaged\.csv)"
    r"(\.epoch(?P<epoch>\d+))?\.partial"
)
# Fewer checkpoints than this fitting in the free space is warned of before training.
CHECKPOINTS_OF_ROOM = 3


def monitored(config: TrainConfig) -> tuple[str, str]:
    """(log column, its name in messages) of the validation score that picks best.pt: ``--monitor``, where
    auto is Dice on binary data, the mean Dice over the classes on multilabel data and mIoU on multi-class data."""
    monitor = config.monitor
    if monitor == "auto":
        monitor = "dice" if config.num_classes() == 2 or config.multilabel() else "miou"
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
        finish_interrupted_commit(run_dir, resumed_from["epoch"] if resumed_from is not None else None)
        remove_unkept(run_dir, resumed_from)
        if overwrite:
            for name in RUN_OUTPUTS:
                (run_dir / name).unlink(missing_ok=True)
        try:
            with atomic_output(run_dir / "config.json") as partial:
                partial.write_text(json.dumps(asdict(config), indent=2) + "\n")
        except OSError as error:
            if not is_disk_full(error, run_dir):
                raise
            raise DiskFullError(
                f"{run_dir}: no space left on its device to write config.json ({free_space(run_dir)} free); "
                "free some space and run the command again"
            ) from error
        yield run_dir, resumed_from


def free_space(folder: Path) -> str:
    """``1.2 GB``: the room left on the file system of ``folder``."""
    return format_bytes(shutil.disk_usage(folder).free)


def finish_interrupted_commit(run_dir: Path, committed_epoch: int | None) -> None:
    """Temporary files a crash left in ``run_dir`` (see COMMIT_ORDER): those of the epoch ``last.pt`` holds
    (``committed_epoch``) were complete, and are renamed into place; any other is removed."""
    left = {}
    for path in run_dir.iterdir():
        match = PARTIAL_NAME.fullmatch(path.name)
        if match is None:
            continue
        epoch = int(match["epoch"]) if match["epoch"] else None
        if epoch is not None and epoch == committed_epoch and match["name"] != "last.pt":
            left[match["name"]] = path
        else:
            path.unlink()
    for name in sorted(left, key=_commit_position):
        os.replace(left[name], run_dir / name)
    if left:
        logger.info(
            "%s: finished saving epoch %d (%s), interrupted after last.pt", run_dir, committed_epoch, ", ".join(left)
        )


def _commit_position(name: str) -> int:
    """Where a file of an epoch's save is renamed in COMMIT_ORDER."""
    return COMMIT_ORDER.index(KEPT_SLOT if kept_epoch(name) is not None else name)


def kept_epochs(checkpoint: dict | None) -> list[tuple[int, float]]:
    """The (epoch, score) pairs of the epochs whose weights ``last.pt`` keeps for --average-top, best first."""
    return [(int(epoch), float(score)) for epoch, score in (checkpoint or {}).get("kept_epochs", [])]


def remove_unkept(run_dir: Path, last: dict | None) -> None:
    """The kept weights (top_epoch<N>.pt) of epochs that ``last`` (last.pt's content, None: no epoch saved) no
    longer keeps: displaced by a better epoch, or left by an epoch that was never saved."""
    kept = {epoch for epoch, _ in kept_epochs(last)}
    for path in run_dir.iterdir():
        if KEPT_NAME.fullmatch(path.name) and kept_epoch(path.name) not in kept:
            path.unlink()


def commit_epoch(
    run_dir: Path, last: dict, best: dict | None, rows: list[dict], config: TrainConfig, kept: dict | None = None
) -> None:
    """An epoch's last.pt, best.pt (``best``: when it improved), log.csv, curves.png and its weights kept for
    --average-top (``kept``: when it is among the best, top_epoch<N>.pt), saved together (see COMMIT_ORDER); then
    the kept weights that last.pt no longer lists are removed. A full disk raises OSError ENOSPC with the folder as
    it was."""
    column, name = monitored(config)
    writers = {
        "last.pt": lambda path: write_checkpoint(last, path),
        "log.csv": lambda path: write_log_csv(rows, path),
        "curves.png": lambda path: plot_curves(rows, path, column, name),
        kept_name(last["epoch"]): lambda path: write_checkpoint(kept, path),
        "best.pt": lambda path: write_checkpoint(best, path),
    }
    if best is None:
        del writers["best.pt"]
    if kept is None:
        del writers[kept_name(last["epoch"])]
    writes = [(run_dir / name, writers[name]) for name in sorted(writers, key=_commit_position)]
    write_all_then_rename(writes, f"epoch{last['epoch']}")
    remove_unkept(run_dir, last)


def warn_if_little_room(run_dir: Path, checkpoint_bytes: int) -> None:
    """A warning before training when fewer than CHECKPOINTS_OF_ROOM checkpoints of ``checkpoint_bytes`` fit in
    the free space of ``run_dir``'s file system: each epoch writes its last.pt and best.pt beside the old ones."""
    free = shutil.disk_usage(run_dir).free
    fit = free // max(checkpoint_bytes, 1)
    if fit < CHECKPOINTS_OF_ROOM:
        logger.warning(
            "%s: %s free on its device, room for %d checkpoint(s) of about %s; each epoch writes its last.pt and "
            "best.pt beside the old ones, so training may stop for want of space: free some, or train into another --out",
            run_dir,
            format_bytes(free),
            fit,
            format_bytes(checkpoint_bytes),
        )


def write_log_csv(rows: list[dict], path: Path) -> None:
    """The log rows as ``path``, written as it is: the caller names a temporary file."""
    per_class = [name for name in rows[-1] if name not in LOG_COLUMNS]  # iou_<class> of multi-class data
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS + per_class, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(rows: list[dict], path: Path, column: str, name: str) -> None:
    """Training and validation loss, and the validation score ``column`` (named ``name``), per epoch, as ``path``,
    written as it is: the caller names a temporary file."""
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
    try:
        figure.savefig(path, dpi=100, format="png")
    finally:
        plt.close(figure)
