"""Checkpoints: saved atomically, loaded without running code (``weights_only``), checked, and resumed from."""

import hashlib
import logging
from dataclasses import asdict, fields
from pathlib import Path

import torch

from competition.config import DERIVED_SETTINGS, RECIPE_SETTINGS, TrainConfig, config_from, short_run_warmup
from competition.errors import CheckpointError, ConfigError, refusal
from competition.files import atomic_output

logger = logging.getLogger(__name__)

# Bumped when what a checkpoint means changes; files without the key are format 1.
# 2: an epoch's last micro-batches that do not fill --accum-steps make a step (format 1 dropped them), and
#    last.pt records the validation split.
# 3: epochs count from 1 (a checkpoint's "epoch" is the epoch it ended, as the log and log.csv say); earlier
#    formats counted from 0 and are read as format 3 numbers.
FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)  # the weights and config of format 1 load as they are
RESUMABLE_FORMATS = (2, 3)  # format 1's schedule counted steps differently
# Settings a resumed run may change: where things are and how fast they go, not what is learned; and the
# time limit, since a new session resumes with the time it has.
RESUMABLE_CHANGES = DERIVED_SETTINGS | {
    "out",
    "data_dir",
    "folds_csv",
    "workers",
    "log_every",
    "val_batch_size",
    "compile",
    "check",
    "time_limit",
    "tensorboard",  # what is written beside the run, not what it learns
    "labels",  # where the classes were read: the classes themselves are compared as resolved
}


def split_digest(validation_ids: list[str]) -> str:
    """A short fingerprint of a fold's validation images, kept in last.pt: a resumed run must not meet
    another split (a different folds file would mix validation images into training)."""
    return hashlib.sha1("\n".join(sorted(validation_ids)).encode()).hexdigest()[:16]


def summary(config: TrainConfig, epoch: int, score: float, image_shape: tuple[int, int]) -> dict:
    """What every checkpoint carries besides weights: all infer.py needs to rebuild and check the model."""
    return {
        "format": FORMAT_VERSION,
        "config": asdict(config),
        "fold": config.fold,
        "epoch": epoch,
        "score": score,
        "image_shape": list(image_shape),
    }


def write_checkpoint(payload: dict, path: str | Path) -> None:
    """Write ``payload`` to ``path`` as it is, with the format version: the caller names a temporary file."""
    torch.save({"format": FORMAT_VERSION, **payload}, path)


def save_checkpoint(payload: dict, path: str | Path) -> None:
    """Write ``payload`` under a temporary name and rename it: a kill never leaves half a checkpoint."""
    with atomic_output(path) as partial:
        write_checkpoint(payload, partial)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint of this project, checked: readable, tensors only, with weights, config and a known format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, not a zip, pickled code: each gets one line
        raise CheckpointError(f"{refusal(path, error)}, copy or train it again") from None
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= set(checkpoint):
        raise CheckpointError(f"{path}: not a checkpoint of this repository (no model weights and config inside)")
    version = checkpoint.get("format", 1)
    if version not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path}: written in checkpoint format {version}, and this code reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}; use the version of the repository that trained it, or train again"
        )
    return _epochs_from_one(checkpoint, version)


def _epochs_from_one(checkpoint: dict, version: int) -> dict:
    """A checkpoint whose epoch (and last.pt's log rows) count from 1, whatever format wrote it."""
    if version < 3:
        if "epoch" in checkpoint:
            checkpoint["epoch"] += 1
        for row in checkpoint.get("log", []):
            row["epoch"] += 1
    return checkpoint


def checkpoint_config(checkpoint: dict, path: str | Path) -> TrainConfig:
    """The training settings saved in a checkpoint."""
    try:
        return config_from(checkpoint["config"], str(path))
    except ConfigError as error:
        raise CheckpointError(f"{error}; the file was altered or comes from another code version") from None


def _keep_saved(names: list[str], saved: TrainConfig, config: TrainConfig, path: Path, why: str) -> None:
    """``config`` takes the saved value of each of ``names``, said in one line with ``why``."""
    for name in names:
        setattr(config, name, getattr(saved, name))
    if names:
        logger.info(
            "%s was begun %s: it goes on with the settings it began with (%s)",
            path,
            why,
            ", ".join(f"{name} {getattr(saved, name)}" for name in names),
        )


def _go_on_as_begun(saved: TrainConfig, config: TrainConfig, path: Path) -> None:
    """A run begun before the defaults by situation had TrainConfig's defaults where the rule now picks others:
    it goes on with those it began with."""
    defaults = TrainConfig()
    kept = [
        name
        for name in RECIPE_SETTINGS
        if getattr(saved, name) == getattr(defaults, name) and getattr(config, name) != getattr(saved, name)
    ]
    _keep_saved(kept, saved, config, path, "before the defaults by situation")


def _go_on_under_its_rule(saved: TrainConfig, config: TrainConfig, path: Path) -> None:
    """A setting the rule chose when the run began and chooses now, but differently (the rule changed since): the
    run goes on with the value it began with. Names outside RECIPE_SETTINGS (a hand-edited file) are not read."""
    chosen_now = set(config.recipe_applied.split(",")) & set(RECIPE_SETTINGS)
    kept = [
        name
        for name in saved.recipe_applied.split(",")
        if name in chosen_now and getattr(config, name) != getattr(saved, name)
    ]
    _keep_saved(kept, saved, config, path, "under an earlier rule of the defaults by situation")


# Settings that, left empty, are resolved from the data as a run starts and saved: empty on a resumed run's command
# line means "as the data says", which is what the checkpoint holds.
RESOLVED_FROM_DATA = ("classes", "mask_values")


def check_resumable(checkpoint: dict, config: TrainConfig, path: Path) -> None:
    """Refuse to resume a run with settings that change what it learns (epochs, sizes, model, ...), or
    from a last.pt written before the current format."""
    if checkpoint.get("format", 1) not in RESUMABLE_FORMATS:
        raise CheckpointError(
            f"{path}: written by an earlier version of this code (checkpoint format {checkpoint.get('format', 1)}), "
            "whose schedule counted steps differently; start again with --overwrite (best.pt still predicts)"
        )
    saved = checkpoint_config(checkpoint, path)
    # Format 2 had no short-run warm-up: a run it began with the default goes on with the warm-up it began with.
    old_default = checkpoint.get("format") == 2 and saved.warmup_epochs == TrainConfig.warmup_epochs
    if old_default and config.warmup_epochs == short_run_warmup(config.epochs):
        config.warmup_epochs = saved.warmup_epochs
    if "recipe" not in checkpoint["config"]:
        _go_on_as_begun(saved, config, path)
    _go_on_under_its_rule(saved, config, path)
    changed = [
        f"{f.name}={getattr(saved, f.name)!r}, now {getattr(config, f.name)!r}"
        for f in fields(TrainConfig)
        if f.name not in RESUMABLE_CHANGES
        and getattr(saved, f.name) != getattr(config, f.name)
        and not (f.name in RESOLVED_FROM_DATA and not getattr(config, f.name))  # not given: the data's, resolved
    ]
    if changed:
        raise ConfigError(
            f"{path}: was trained with {'; '.join(changed)}. Resume with its settings, or start over with --overwrite"
        )
