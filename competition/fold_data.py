"""A fold's data set up: the run's classes, the fold's images, class weights, augmentations, and the loaders."""

import logging
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch

from competition.checkpoints import split_digest
from competition.config import TrainConfig
from competition.data import Loader, SegmentationDataset, image_id_of, same_size_batches
from competition.data_checks import report_absent_classes
from competition.errors import ConfigError, DataError
from competition.folds import read_folds
from competition.layouts import open_data_as
from competition.losses import class_weights
from competition.mask_values import with_background
from competition.pseudo_data import PseudoLabelledSet, PseudoLabels, read_pseudo_labels
from competition.sampling import class_balanced_weights
from competition.survey import survey
from competition.tile_data import TrainingTiles, ValidationTiles, tiled_slides
from competition.workers import loader_start_method

logger = logging.getLogger(__name__)


def train_transform(config: TrainConfig) -> A.Compose | None:
    """Augmentations applied identically to image and mask (crops first, when training on crops)."""
    transforms = []
    if config.crop:
        transforms += [A.PadIfNeeded(config.crop, config.crop), A.RandomCrop(config.crop, config.crop)]
    if config.augment != "none":
        transforms.append(A.HorizontalFlip(p=0.5))
    if config.augment == "full":
        transforms += [
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    """Each loader worker draws its own augmentations, reproducibly (torch seeds it per epoch)."""
    info = torch.utils.data.get_worker_info()
    if info.dataset.transform is not None:
        info.dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


def fold_numbers(folds_csv: str | Path) -> list[int]:
    """The folds a folds file defines, sorted."""
    return sorted(read_folds(folds_csv)["fold"].unique().tolist())


def open_training_data(config: TrainConfig):
    """(the settings with the class names (and stored mask values) the data folder gave, the data). A run saves its classes, so that
    infer.py, a resumed run and every fold agree on them, whatever the folder holds later. Carvana's settings
    stay as given (its classes are fixed)."""
    data = open_data_as(config)
    if not data.fixed_classes:
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


def fold_ids(config: TrainConfig, data) -> tuple[list[str], list[str]]:
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


def _loader_options(config: TrainConfig, device: torch.device) -> dict:
    workers = min(config.workers, os.cpu_count() or 1)
    return {
        "num_workers": workers,
        "multiprocessing_context": loader_start_method(workers),
        "pin_memory": device.type == "cuda",
        "worker_init_fn": _seed_worker,
    }


def unaugmented_loader(config: TrainConfig, train_loader, device: torch.device, batches: int) -> Loader:
    """At most ``batches`` batches of the fold's training images as training feeds them but without augmentation
    (training crops kept: they are what the model's batch norm saw), drawn in an order fixed by the seed: the images
    that averaged weights' batch-norm statistics are recomputed on, the same for each."""
    trained, unaugmented = train_loader.dataset, train_transform(replace(config, augment="none"))
    if isinstance(trained, TrainingTiles):
        plain = TrainingTiles(trained.data, trained.slides, config, transform=unaugmented)
    else:
        plain = SegmentationDataset(trained.data, trained.image_ids, size=trained.size, transform=unaugmented)
    drawn = torch.randperm(len(plain), generator=torch.Generator().manual_seed(config.seed))
    chosen = drawn[: batches * config.batch_size].tolist()  # a list: every pass over the loader sees the same batches
    return Loader(plain, config.batch_size, sampler=chosen, drop_last=True, **_loader_options(config, device))


def build_loaders(config: TrainConfig, data, train_ids, val_ids, device: torch.device, pixel_counts=None, pseudo=None):
    """(training loader and its generator, validation loader). Training drops a last batch smaller than
    ``batch_size`` (batch norm needs more than one image; the order changes each epoch). With ``pixel_counts``
    ((images, classes) of the training masks, ``pseudo``'s images last) images are drawn by the class-balanced
    sampler's weights. ``pseudo`` (PseudoLabels) joins its images to the training images alone."""
    input_size = config.input_size()
    transform = train_transform(config)
    if config.tile:
        train_set = TrainingTiles(data, tiled_slides(data, train_ids, config), config, transform)
        val_set = ValidationTiles(data, tiled_slides(data, val_ids, config), config.tile)
    elif pseudo is None:
        train_set = SegmentationDataset(data, train_ids, size=input_size, transform=transform)
    else:
        train_set = PseudoLabelledSet(data, train_ids, pseudo, size=input_size, transform=transform)
    if not config.tile:
        val_set = SegmentationDataset(data, val_ids, size=input_size, full_size_masks=True)
    if len(train_set) < config.batch_size:
        raise DataError(
            f"fold {config.fold}: {len(train_set)} training images, fewer than one batch of {config.batch_size}; "
            "lower --batch-size"
        )
    options = _loader_options(config, device)
    order = torch.Generator()
    if pixel_counts is None:
        sampler = torch.utils.data.RandomSampler(train_set, generator=order)
    else:
        weights = class_balanced_weights(pixel_counts).tolist()
        sampler = torch.utils.data.WeightedRandomSampler(weights, len(train_set), replacement=True, generator=order)
    train_loader = Loader(train_set, config.batch_size, sampler=sampler, drop_last=True, generator=order, **options)
    if (
        data.fixed_image_size or config.tile
    ):  # every image (window) one size one size (Carvana's 1918x1280): no same-size batches needed
        return train_loader, order, Loader(val_set, config.val_batch_size, **options)
    batches = same_size_batches([data.image_shape(image_id) for image_id in val_ids], config.val_batch_size)
    return train_loader, order, Loader(val_set, batch_sampler=batches, **options)


@dataclass
class FoldData:
    """A fold's data ready to train on: its loaders, the data order's generator, and what checkpoints record
    about the data."""

    config: TrainConfig  # with what the set-up derived from the data: class names and weights
    train_loader: torch.utils.data.DataLoader
    order: torch.Generator
    val_loader: torch.utils.data.DataLoader
    image_shape: tuple[int, int]
    split: str
    classes: tuple[str, ...]  # the data's classes, Carvana's fixed ones too: validation's confusion matrix
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


def sampler_counts(data, pixel_counts: np.ndarray, pseudo: PseudoLabels | None) -> np.ndarray:
    """The (images, classes) pixel counts the class-balanced sampler weighs, background first: the training
    images', then the pseudo-labelled images' confident pixels. A multilabel set's column 0 is a class, not the
    background that the sampler weighs 1, so an empty background column leads."""
    counts = pixel_counts if pseudo is None else np.concatenate([pixel_counts, pseudo.class_pixels])
    return with_background(counts) if getattr(data, "multilabel", False) else counts


def set_up_fold(config: TrainConfig, data, device: torch.device, progress: bool) -> FoldData:
    seed_everything(config.seed)
    train_ids, val_ids = fold_ids(config, data)
    pseudo = _pseudo_labels(config, data, val_ids)  # before the masks are checked: that takes a while
    # The layout says which masks are counted: with fixed classes (Carvana's) the training images' alone, and only
    # for the weights or the sampler; elsewhere every mask, so that a class no training mask holds is said first.
    if config.tile:  # no image decoded whole: the tile index reads each slide once, tile by tile, and checks it
        return _set_up_tiles(config, data, device, train_ids, val_ids)
    ids = train_ids + val_ids
    pixel_counts_needed = config.class_weights != "none" or config.sampler != "random"
    count = data.masks_to_count(len(train_ids), len(ids), pixel_counts_needed)
    counts = survey(data, ids, check=config.check, count=count, progress=progress)
    pixel_counts = None if counts is None else counts[: len(train_ids)]
    if not data.fixed_classes:
        val_counts = counts[len(train_ids) :].sum(0)
        report_absent_classes(
            data.classes, pixel_counts.sum(0), val_counts, config.strict, logger.warning, data.multilabel
        )
    if config.class_weights != "none":
        config = _with_class_weights(config, pixel_counts)
    balanced = sampler_counts(data, pixel_counts, pseudo) if config.sampler == "class-balanced" else None
    train_loader, order, val_loader = build_loaders(config, data, train_ids, val_ids, device, balanced, pseudo)
    return FoldData(
        config=config,
        train_loader=train_loader,
        order=order,
        val_loader=val_loader,
        image_shape=data.image_shape(val_ids[0]),  # inference checks test images against it
        split=split_digest(val_ids),
        classes=tuple(data.classes),
        held_out=not set(val_ids) & set(train_ids),
    )


def _set_up_tiles(config: TrainConfig, data, device: torch.device, train_ids, val_ids) -> FoldData:
    """``--tile``: the loaders of the slides' windows (settings that count or draw whole images are refused by
    check_config)."""
    train_loader, order, val_loader = build_loaders(config, data, train_ids, val_ids, device)
    return FoldData(
        config=config,
        train_loader=train_loader,
        order=order,
        val_loader=val_loader,
        image_shape=val_loader.dataset.slides[0].slide.shape[:2],  # from the TIFF's header, not a decode
        split=split_digest(val_ids),
        classes=tuple(data.classes),
        held_out=not set(val_ids) & set(train_ids),
    )


def _pseudo_labels(config: TrainConfig, data, val_ids: list[str]) -> PseudoLabels | None:
    """``--pseudo``'s images for the fold's training set, said in one line; None without it. The class weights and
    the class checks stay the labelled images' own."""
    if not config.pseudo:
        return None
    pseudo = read_pseudo_labels(config, data, val_ids)
    logger.info("%s", pseudo.describe())
    return pseudo
