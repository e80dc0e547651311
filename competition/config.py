"""One training run's settings: defaults, then a config file (TOML or JSON), then command-line flags."""

import argparse
import difflib
import json
import logging
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import tomllib

from competition.clock import parse_duration
from competition.environment import default_data_dir, default_work_dir
from competition.errors import ConfigError
from competition.layouts import LAYOUT_CHOICES
from competition.losses import CLASS_WEIGHTINGS, LABEL_LOSSES, LOSSES
from competition.mask_values import MAX_LABELS, label_ignore_index
from competition.models import ARCHITECTURES, encoder_exists, encoder_names
from competition.prediction import PRECISIONS
from competition.rle import RLE_ORDERS
from competition.rle_table import UW_MADISON_COLUMNS
from competition.sampling import SAMPLERS
from competition.schedules import SCHEDULES
from competition.sliding_window import check_tiling
from competition.tiles import check_sampling

MONITORS = ("auto", "dice", "miou", "macro_f1", "pixel_accuracy")
PET_BORDERS = ("ignore", "class")
AUGMENTATIONS = ("full", "flip", "none")
RECIPES = ("auto", "carvana")
HEADS = ("auto", "multilabel")


def setting(default, description: str):
    """A TrainConfig field with its --help text; a callable default is called per instance."""
    if callable(default):
        return field(default_factory=default, metadata={"help": description})
    return field(default=default, metadata={"help": description})


logger = logging.getLogger(__name__)


# The settings competition/recipes.py's rule may pick by situation (a run begun before the rule had the defaults).
RECIPE_SETTINGS = ("lr", "schedule", "augment", "class_weights")


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in every checkpoint so infer.py needs nothing else."""

    data_dir: str = setting(
        lambda: str(default_data_dir()),
        "data folder: Carvana (folders or the competition's zips), images/+masks/, VOC, labelme or Oxford-IIIT Pet",
    )
    layout: str = setting("auto", "auto (recognised by what the data folder holds), " + ", ".join(LAYOUT_CHOICES[1:]))
    classes: str = setting(
        "", "class names a,b,c, background first; empty: classes.txt, labelme's labels.txt or the layout's rule"
    )
    labels: str = setting(
        "",
        "labelme: its classes file, labelme's labels.txt (__ignore__, _background_, then the classes) or "
        "labelme2voc's class_names.txt, numbered as labelme numbers them (default: labels.txt beside the JSON "
        "files, then one folder up)",
    )
    ignore_index: int = setting(255, "mask value left out of losses and metrics (VOC's border)")
    pet_border: str = setting("ignore", "Oxford-IIIT Pet trimap border: ignore, or class (a class of its own)")
    images: str = setting(
        "", "folder of the training images when named otherwise (relative to data_dir, or absolute), e.g. img"
    )
    masks: str = setting("", "folder of their masks when named otherwise (relative to data_dir, or absolute), e.g. gt")
    mask_suffix: str = setting("", "a mask's name is its image's id and this, e.g. _mask or _gtFine_labelIds")
    image_suffix: str = setting(
        "", "an image's name is its id and this, e.g. Cityscapes' _leftImg8bit (default: the id is the whole stem)"
    )
    split: str = setting(
        "",
        "an official split, e.g. train=train,val=val,test=test: each a list of ids (a .txt file) or an image "
        "folder[:its mask folder]; fold 0 validates on exactly val",
    )
    train_on: str = setting("", "with --split: train on these splits, e.g. train,val (the final model), none held out")
    pseudo: str = setting(
        "",
        "a folder of pseudo-labels (python -m competition.pseudo): its test images join every fold's training set, "
        "never validation, their unconfident pixels ignored; empty: none",
    )
    colors: str = setting(
        "",
        "colour table of RGB masks: a name,r,g,b CSV or an 'r g b name' text file (default: class_dict.csv, "
        "label_colors.txt or colors.csv/.txt in the data folder)",
    )
    unknown_colors: str = setting("error", "a mask colour not in the table: error, or ignore (the ignore index)")
    mask_values: str = setting(
        "", "the value of each class in the mask files, in class order, e.g. 0,255; default: the class index"
    )
    unknown_values: str = setting(
        "error",
        "a stored mask value that is no class's and not the ignore index: error, or ignore (the ignore index; "
        "Cityscapes' labelIds keep 19 of their 34 ids)",
    )
    snap_mask_values: bool = setting(
        False, "map each mask value (or colour) to the nearest class's: for lossy JPEG masks, refused otherwise"
    )
    masks_csv: str = setting(
        "",
        "masks as a table of RLE rows, one per image and class (UW-Madison's train.csv, Severstal's); relative to "
        "data_dir, or absolute; images from train/ (or --images); gives the rle-table layout",
    )
    rle_columns: str = setting(
        UW_MADISON_COLUMNS,
        "--masks-csv's id, class and RLE columns, e.g. ImageId,ClassId,EncodedPixels; two for a table without "
        "classes, e.g. ImageId,EncodedPixels",
    )
    rle_order: str = setting(
        "row", "how RLE numbers pixels: row (row-major: Carvana, UW-Madison) or column (Severstal)"
    )
    strict: bool = setting(False, "stop, rather than warn, when a class never occurs in the training masks")
    head: str = setting(
        "auto",
        "auto: one sigmoid channel for binary data, a softmax over the classes otherwise; multilabel: one sigmoid "
        "channel per class, for classes that overlap (--classes names them, no background; at most 7)",
    )
    in_channels: int = setting(3, "image channels the model takes: 3 (greyscale replicated), or 1 for greyscale data")
    folds_csv: str = setting(lambda: str(default_work_dir() / "folds" / "folds.csv"), "written by make_folds.py")
    out: str = setting(lambda: str(default_work_dir() / "runs" / "unet_resnet34"), "run folder; fold<N>/ inside")
    fold: int = setting(0, "the held-out fold")
    recipe: str = setting(
        "auto",
        "auto: the defaults by situation (pretrained or from scratch, binary or multi-class, small or large data; "
        "README); carvana: the defaults below, Carvana's winners' recipe, whatever the data",
    )
    arch: str = setting("Unet", ", ".join(ARCHITECTURES))
    encoder: str = setting("resnet34", "an smp encoder, or any timm model as tu-NAME")
    encoder_weights: str = setting("imagenet", "imagenet, none, or the path of a local encoder weights file")
    size: str = setting("1024x1536", "HEIGHTxWIDTH the images are resized to (multiples of 32), or full")
    crop: int = setting(0, "> 0: train on random full-resolution crops of this side instead of resizing")
    tile: int = setting(
        0,
        "> 0: train on windows of this side (a multiple of 32) sampled from slides through a tile index, each read "
        "alone, never the whole image (the rle-table layout); 0: whole images",
    )
    tile_overlap: float = setting(
        0.25, "with --tile: the share of a tile the next one on the index's grid covers again"
    )
    empty_tile_weight: float = setting(
        0.1, "with --tile: how often a tile of no foreground and little tissue is drawn, relative to the others"
    )
    positive_ratio: float = setting(0.5, "with --tile: the share of windows centred near a random foreground pixel")
    min_tissue: float = setting(0.05, "with --tile: the share of tissue under which a tile with no foreground is empty")
    epochs: int = setting(30, "epochs")
    batch_size: int = setting(8, "images per forward pass")
    accum_steps: int = setting(1, "forward passes per optimizer step: effective batch = batch_size x accum_steps")
    lr: float = setting(3e-4, "peak learning rate (AdamW); train.py takes auto: the range test's suggestion")
    weight_decay: float = setting(1e-4, "AdamW weight decay")
    warmup_epochs: float = setting(
        1.0, "linear warm-up length, in epochs; not given: 1, or a quarter of a run of under 4 epochs"
    )
    schedule: str = setting("cosine", "cosine (warm-up, then cosine decay), onecycle or step")
    step_epochs: int = setting(10, "step schedule: epochs between learning-rate decays")
    step_factor: float = setting(0.1, "step schedule: the factor the learning rate is multiplied by at each decay")
    loss: str = setting("bce_dice", ", ".join(LOSSES) + " (--head multilabel: ce and ce_dice are bce and bce_dice)")
    bce_weight: float = setting(1.0, "weight of BCE in bce_dice")
    dice_weight: float = setting(1.0, "weight of soft Dice in bce_dice")
    class_weights: str = setting(
        "none",
        "cross-entropy class weights from the training fold's pixel frequencies: "
        "none, inverse, median (median frequency), effective (effective number of samples) or enet "
        "(1 / ln(1.02 + frequency), bounded)",
    )
    class_weight_values: str = field(default="", metadata={"help": "", "derived": True})  # class_weights' result
    # the settings --recipe auto chose (comma-separated names), so that a run resumed under a later rule goes on
    # with the values it began with
    recipe_applied: str = field(default="", metadata={"help": "", "derived": True})
    sampler: str = setting("random", "random, or class-balanced (images holding rare classes drawn more often)")
    monitor: str = setting(
        "auto",
        "validation score that picks best.pt: auto (dice when binary or multilabel, miou otherwise), "
        + ", ".join(MONITORS[1:]),
    )
    precision: str = setting("auto", "auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), bf16, fp16 or fp32")
    channels_last: bool = setting(True, "channels_last memory format (faster convolutions on GPUs)")
    compile: bool = setting(False, "torch.compile the model")
    clip_grad: float = setting(1.0, "max gradient norm; 0 turns clipping off")
    ema: float = setting(0.0, "decay of an exponential moving average of the weights, e.g. 0.999; 0 is off")
    average_top: int = setting(
        0,
        "keep the weights of this many best epochs (by --monitor) and write their average as averaged.pt at the "
        "end, batch norm recomputed on training images; 0 is off",
    )
    swa_epochs: int = setting(
        0, "average the weights at the end of each of the last this many epochs (SWA) into swa.pt; 0 is off"
    )
    augment: str = setting(
        "full", "full (flips, shift-scale-rotate, brightness/contrast, hue), flip (horizontal flips alone) or none"
    )
    val_batch_size: int = setting(2, "images per validation batch (full-resolution masks)")
    workers: int = setting(4, "data loader processes (capped at the CPU count)")
    mask_source: str = setting("auto", "auto (GIFs when present), gif or csv (train_masks.csv)")
    seed: int = setting(42, "seed of weights, data order and augmentation")
    log_every: int = setting(10, "optimizer steps between progress updates and non-finite-loss checks")
    check: bool = setting(True, "read every image header and mask before the first step (seconds), not mid-epoch")
    tensorboard: bool = setting(
        False,
        "TensorBoard event files in the run folder: loss and learning rate per step, log.csv's metrics, validation "
        "images and the confusion matrix per epoch, the settings (needs: pip install -r requirements-tensorboard.txt)",
    )
    time_limit: str = setting(
        "",
        "stop before an epoch that would end after this long, e.g. 11h30m; counted from the start of train.py; "
        "empty: no limit",
    )

    def input_size(self) -> tuple[int, int] | None:
        """(height, width) the model sees in training and validation, or None for full resolution."""
        if self.crop or self.tile or self.size.lower() in ("full", ""):
            return None
        return parse_size(self.size)

    def class_names(self) -> list[str]:
        """The class names, background first; empty for Carvana, and until set up (``classes`` given, or
        resolved from the data by fold_data.open_training_data)."""
        return [name.strip() for name in self.classes.split(",") if name.strip()]

    def fixed_classes(self) -> bool:
        """Whether the run's classes are its layout's own (Carvana's background and car): none were saved with it."""
        return not self.class_names()

    def multilabel(self) -> bool:
        """Whether each class has a sigmoid channel of its own (classes may overlap; no background class)."""
        return self.head == "multilabel"

    def num_classes(self) -> int:
        """Classes, background included: Carvana's two (background, car) when none are named."""
        return len(self.class_names()) or 2

    def label_ignore_index(self) -> int:
        """The value ignored pixels hold once read (losses and metrics skip it): ``ignore_index``, or 255 when
        that is below the number of classes (the data layer maps it so)."""
        return label_ignore_index(self.ignore_index, self.num_classes())

    def output_channels(self) -> int:
        """The model's channels: one sigmoid channel for binary data (background and one class), else one
        softmax channel per class; multilabel: one sigmoid channel per class."""
        if self.multilabel():
            return len(self.class_names())
        return 1 if self.num_classes() == 2 else self.num_classes()

    def run_dir(self) -> Path:
        return Path(self.out) / f"fold{self.fold}"


def parse_size(text: str) -> tuple[int, int]:
    """``1024x1536`` -> (1024, 1536), checked to be multiples of 32 as smp's encoders need."""
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size {text!r} must be HEIGHTxWIDTH, e.g. 1024x1536, or full") from None
    if height <= 0 or width <= 0 or height % 32 or width % 32:
        raise ConfigError(f"--size {text!r}: both sides must be positive multiples of 32 (the encoder downsamples 32x)")
    return height, width


# name -> the values it takes; checked for files, flags and checkpoints alike.
CHOICES = {
    "arch": tuple(ARCHITECTURES),
    "loss": tuple(LOSSES),
    "schedule": tuple(SCHEDULES),
    "precision": PRECISIONS,
    "mask_source": ("auto", "gif", "csv"),
    "layout": LAYOUT_CHOICES,
    "pet_border": PET_BORDERS,
    "unknown_colors": ("error", "ignore"),
    "unknown_values": ("error", "ignore"),
    "class_weights": CLASS_WEIGHTINGS,
    "sampler": SAMPLERS,
    "monitor": MONITORS,
    "augment": AUGMENTATIONS,
    "recipe": RECIPES,
    "head": HEADS,
    "rle_order": RLE_ORDERS,
}
# Architectures whose image-level pooling feeds a batch norm: training fails on a batch of one image.
ONE_IMAGE_BATCH_NORM = ("DeepLabV3Plus",)
# name -> (test, what it must be)
BOUNDS = {
    "fold": (lambda v: v >= 0, "0 or more"),
    "epochs": (lambda v: v >= 1, "at least 1"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "accum_steps": (lambda v: v >= 1, "at least 1"),
    "val_batch_size": (lambda v: v >= 1, "at least 1"),
    "log_every": (lambda v: v >= 1, "at least 1"),
    "workers": (lambda v: v >= 0, "0 or more"),
    "crop": (lambda v: v == 0 or (v > 0 and v % 32 == 0), "0 (off) or a positive multiple of 32"),
    "lr": (lambda v: v > 0, "positive"),
    "weight_decay": (lambda v: v >= 0, "0 or more"),
    "warmup_epochs": (lambda v: v >= 0, "0 or more"),
    "bce_weight": (lambda v: v >= 0, "0 or more"),
    "dice_weight": (lambda v: v >= 0, "0 or more"),
    "clip_grad": (lambda v: v >= 0, "0 (off) or more"),
    "ema": (lambda v: 0 <= v < 1, "in [0, 1): 0 is off, e.g. 0.999"),
    "average_top": (lambda v: v >= 0, "0 (off) or more"),
    "swa_epochs": (lambda v: v >= 0, "0 (off) or more"),
    "ignore_index": (lambda v: 0 <= v <= 255, "in 0..255 (masks are 8-bit)"),
    "step_epochs": (lambda v: v >= 1, "at least 1"),
    "step_factor": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "in_channels": (lambda v: v in (1, 3), "1 (greyscale) or 3"),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _suggest(value: str, choices) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_config(config: "TrainConfig") -> None:
    """Every setting within its choices and bounds, one line naming the flag when not."""
    for name, choices in CHOICES.items():
        value = getattr(config, name)
        if value not in choices:
            raise ConfigError(f"{flag(name)} {value!r}{_suggest(value, choices)}: choose one of {', '.join(choices)}")
    for name, (test, wanted) in BOUNDS.items():
        value = getattr(config, name)
        if isinstance(value, float) and not math.isfinite(value) or not test(value):
            raise ConfigError(f"{flag(name)} must be {wanted}, got {value!r}")
    if not encoder_exists(config.encoder):
        raise ConfigError(
            f"--encoder {config.encoder!r}{_suggest(config.encoder, encoder_names())}: not an smp encoder; "
            "see smp.encoders.get_encoder_names(), or any timm model as tu-NAME"
        )
    if config.arch in ONE_IMAGE_BATCH_NORM and config.batch_size < 2:
        raise ConfigError(
            f"--batch-size 1: {config.arch} pools each image to one value per channel before a batch norm, which "
            "needs at least 2 images a batch; use --batch-size 2 (with --accum-steps for a larger effective batch)"
        )
    if config.multilabel():
        check_multilabel(config)
    if config.tile:
        _check_tiles(config)
    config.input_size()
    parse_duration(config.time_limit, flag("time_limit"))
    _check_averaging(config)


def _check_tiles(config: "TrainConfig") -> None:
    """--tile's window and sampling settings, one line naming the flag; --crop is the whole images' crops."""
    check_tiling(config.tile, config.tile_overlap)
    check_sampling(config.empty_tile_weight, config.positive_ratio, config.min_tissue)
    if config.crop:
        raise ConfigError(f"--tile {config.tile} and --crop {config.crop}: --tile's windows are the crops; give one")
    whole_images = {"--class-weights": config.class_weights != "none", "--sampler": config.sampler != "random"}
    whole_images["--pseudo"] = bool(config.pseudo)
    for name, given in whole_images.items():
        if given:
            raise ConfigError(
                f"{name} with --tile {config.tile}: it counts or draws whole images; tiles are drawn by "
                "--empty-tile-weight and --positive-ratio: leave it out"
            )


def _check_averaging(config: "TrainConfig") -> None:
    """--average-top and --swa-epochs within the run, and not with --ema: EMA's weights are an average already,
    and averaging them again would leave unclear which weights best.pt and the averages hold."""
    for name in ("average_top", "swa_epochs"):
        value = getattr(config, name)
        if value > config.epochs:
            raise ConfigError(
                f"{flag(name)} {value}: more epochs than the run's {config.epochs} (--epochs); give at most {config.epochs}"
            )
        if value and config.ema:
            raise ConfigError(
                f"{flag(name)} and --ema {config.ema:g}: both average the weights; give one of them (--ema 0 turns EMA off)"
            )


def check_multilabel(config: "TrainConfig") -> None:
    """``--head multilabel``: at most MAX_LABELS classes (one bit each of the packed masks), 255 the ignore value,
    a loss that takes one sigmoid channel per class, and no cross-entropy class weights."""
    names = config.class_names()
    if len(names) > MAX_LABELS:
        raise ConfigError(
            f"--head multilabel: {len(names)} classes ({','.join(names)}); a multilabel mask holds at most "
            f"{MAX_LABELS} (one bit each): drop some, or train with --head auto if the classes never overlap"
        )
    if config.loss not in LABEL_LOSSES:
        raise ConfigError(
            f"--loss {config.loss} has no multilabel form (one sigmoid channel per class): with --head multilabel "
            f"choose one of {', '.join(LABEL_LOSSES)}"
        )
    if config.class_weights != "none":
        raise ConfigError(
            f"--class-weights {config.class_weights} weights softmax classes; --head multilabel has one sigmoid "
            "channel per class: leave it at none (--sampler class-balanced draws images of rare classes more often)"
        )
    if config.monitor not in ("auto", "dice", "miou"):
        raise ConfigError(
            f"--monitor {config.monitor}: a multilabel run scores each class's Dice and IoU; choose auto (the mean "
            "Dice), dice or miou"
        )
    if config.ignore_index != 255:
        raise ConfigError(
            f"--ignore-index {config.ignore_index}: multilabel masks keep bit k for class k and 255 for ignored "
            "pixels; leave --ignore-index at 255"
        )


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file ({error.strerror})") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({error})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must hold a table of settings, e.g. epochs = 4")
    return values


def _reject_unknown(values: dict, source: str) -> None:
    known = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = "".join(_suggest(name, known) for name in unknown)
        raise ConfigError(f"{source}: unknown setting(s) {unknown}{hints}; known: {', '.join(sorted(known))}")


# Fields computed as a run starts (from the data, or by the recipe rule) and saved, never set by a flag: compared
# through the settings they come from, so a resume or an epoch-length match leaves them out.
DERIVED_SETTINGS = frozenset(f.name for f in fields(TrainConfig) if f.metadata.get("derived"))


def config_from(values: dict, source: str = "config") -> TrainConfig:
    """A checked TrainConfig from a dict (a config file, flags, or one saved in a checkpoint); unknown keys,
    wrong types and values outside their choices or bounds are rejected."""
    known = {f.name: f for f in fields(TrainConfig)}
    _reject_unknown(values, source)
    if isinstance(values.get("augment"), bool):  # before the levels (checkpoints of format 3, old config files)
        values = {**values, "augment": "full" if values["augment"] else "none"}
    config = TrainConfig(**values)
    for name, value in asdict(config).items():
        expected = known[name].type
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, name, float(value))
        elif not isinstance(getattr(config, name), expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: {name} must be {expected.__name__}, got {value!r}")
    check_config(config)
    return config


def rate_or_auto(text: str) -> float | str:
    """``--lr``: a rate, or ``auto`` (train.py runs the learning-rate range test and trains at its suggestion)."""
    return "auto" if text.strip().lower() == "auto" else float(text)


# Flags that take more than their field's type: resolved by the command before the settings are checked.
FLAG_TYPES = {"lr": rate_or_auto}


def add_config_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """One ``--flag`` per TrainConfig field (or per field in ``names``: make_folds.py takes the data settings
    alone), defaulting to None so that only given flags override."""
    parser.add_argument("--config", type=Path, help="a TOML or JSON file of settings; flags override it")
    for f in fields(TrainConfig):
        if f.metadata.get("derived") or (names is not None and f.name not in names):  # derived: computed, saved
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        text = f"{f.metadata['help']} (default: {default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type=FLAG_TYPES.get(f.name, f.type), default=None, help=text)


# The default warm-up's share of the run at most: --epochs 1 must not spend its whole run warming up.
WARMUP_SHARE = 0.25


def short_run_warmup(epochs: int) -> float:
    """The default warm-up of a run of ``epochs``: 1 epoch, or a quarter of a shorter run."""
    return min(TrainConfig.warmup_epochs, epochs * WARMUP_SHARE)


def _fit_warmup(values: dict, source: str) -> None:
    """The default warm-up cut to a quarter of a short run (said in a line); a warm-up that was asked for (in
    ``source``: a flag or a config file) and is not shorter than the run is refused. Only on the command line: a
    checkpoint's config is kept as saved. One-cycle has a warm-up of its own, and is left alone."""
    epochs = values.get("epochs", TrainConfig.epochs)
    if not isinstance(epochs, int) or epochs < 1 or values.get("schedule", TrainConfig.schedule) == "onecycle":
        return  # config_from names a bad value
    if "warmup_epochs" in values:
        warmup = values["warmup_epochs"]
        if isinstance(warmup, int | float) and warmup >= epochs > 0:
            raise ConfigError(
                f"{source} {warmup:g} is not shorter than the {epochs}-epoch run: the whole run would be warm-up; "
                f"give less (e.g. {epochs * WARMUP_SHARE:g}) or 0 for none"
            )
        return
    if short_run_warmup(epochs) < TrainConfig.warmup_epochs:
        values["warmup_epochs"] = short_run_warmup(epochs)
        logger.info(
            "warm-up: %g epochs, a quarter of the %d-epoch run (--warmup-epochs sets it)",
            values["warmup_epochs"],
            epochs,
        )


def given_settings(args: argparse.Namespace) -> set[str]:
    """The settings a command's ``--config`` file or flags name: the defaults by situation leave them as given."""
    in_file = set(_read_file(args.config)) if args.config else set()
    return in_file | {f.name for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}


def resolve_config(args: argparse.Namespace, names: tuple[str, ...] | None = None) -> TrainConfig:
    """Defaults, then ``--config``, then the flags given on the command line (those of ``names``, when the
    command took only some: make_folds.py's own ``--out`` is not a run folder)."""
    if getattr(args, "lr", None) == "auto":
        raise ConfigError("--lr auto is train.py's (it runs the range test first); give a rate here, e.g. --lr 3e-4")
    values = _read_file(args.config) if args.config else {}
    _reject_unknown(values, str(args.config))  # before the flags mix in, so the message names the file
    for name in names or [f.name for f in fields(TrainConfig)]:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    if names is None:  # a run's own settings (make_folds takes the data settings alone)
        given = getattr(args, "warmup_epochs", None) is not None
        _fit_warmup(values, flag("warmup_epochs") if given else f"{args.config}: warmup_epochs")
    config = config_from(values, str(args.config or "flags"))
    # Here and not in config_from: a checkpoint's config names the weights file it started from, which
    # need not exist where the checkpoint is used.
    weights = config.encoder_weights.strip()
    if weights.lower() not in ("imagenet", "none") and not Path(weights).is_file():
        raise ConfigError(f"--encoder-weights {weights}: encoder weights file not found; pass a file, imagenet or none")
    return config
