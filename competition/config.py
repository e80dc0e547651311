"""One training run's settings: defaults, then a config file (TOML or JSON), then command-line flags."""

import argparse
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import tomllib

from competition.environment import default_data_dir, default_work_dir


def setting(default, description: str):
    """A TrainConfig field with its --help text; a callable default is called per instance."""
    if callable(default):
        return field(default_factory=default, metadata={"help": description})
    return field(default=default, metadata={"help": description})


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in every checkpoint so infer.py needs nothing else."""

    data_dir: str = setting(lambda: str(default_data_dir()), "Carvana data folder (folders or the competition's zips)")
    folds_csv: str = setting(lambda: str(default_work_dir() / "folds" / "folds.csv"), "written by make_folds.py")
    out: str = setting(lambda: str(default_work_dir() / "runs" / "unet_resnet34"), "run folder; fold<N>/ inside")
    fold: int = setting(0, "the held-out fold")
    arch: str = setting("Unet", "Unet, UnetPlusPlus, FPN, Linknet or DeepLabV3Plus")
    encoder: str = setting("resnet34", "an smp encoder, or any timm model as tu-NAME")
    encoder_weights: str = setting("imagenet", "imagenet, none, or the path of a local encoder weights file")
    size: str = setting("1024x1536", "HEIGHTxWIDTH the images are resized to (multiples of 32), or full")
    crop: int = setting(0, "> 0: train on random full-resolution crops of this side instead of resizing")
    epochs: int = setting(30, "epochs")
    batch_size: int = setting(8, "images per forward pass")
    accum_steps: int = setting(1, "forward passes per optimizer step: effective batch = batch_size x accum_steps")
    lr: float = setting(3e-4, "peak learning rate (AdamW)")
    weight_decay: float = setting(1e-4, "AdamW weight decay")
    warmup_epochs: float = setting(1.0, "linear warm-up length, in epochs (cosine schedule)")
    schedule: str = setting("cosine", "cosine (warm-up, then cosine decay) or onecycle")
    loss: str = setting("bce_dice", "bce_dice, bce, dice, focal or lovasz")
    bce_weight: float = setting(1.0, "weight of BCE in bce_dice")
    dice_weight: float = setting(1.0, "weight of soft Dice in bce_dice")
    precision: str = setting("auto", "auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), bf16, fp16 or fp32")
    channels_last: bool = setting(True, "channels_last memory format (faster convolutions on GPUs)")
    compile: bool = setting(False, "torch.compile the model")
    clip_grad: float = setting(1.0, "max gradient norm; 0 turns clipping off")
    ema: float = setting(0.0, "decay of an exponential moving average of the weights, e.g. 0.999; 0 is off")
    augment: bool = setting(True, "flip, shift-scale-rotate, brightness/contrast and hue augmentation")
    val_batch_size: int = setting(2, "images per validation batch (full-resolution masks)")
    workers: int = setting(4, "data loader processes (capped at the CPU count)")
    mask_source: str = setting("auto", "auto (GIFs when present), gif or csv (train_masks.csv)")
    seed: int = setting(42, "seed of weights, data order and augmentation")
    log_every: int = setting(10, "optimizer steps between progress updates and non-finite-loss checks")

    def input_size(self) -> tuple[int, int] | None:
        """(height, width) the model sees in training and validation, or None for full resolution."""
        if self.crop or self.size.lower() in ("full", ""):
            return None
        return parse_size(self.size)

    def run_dir(self) -> Path:
        return Path(self.out) / f"fold{self.fold}"


def parse_size(text: str) -> tuple[int, int]:
    """``1024x1536`` -> (1024, 1536), checked to be multiples of 32 as smp's encoders need."""
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r} must be HEIGHTxWIDTH, e.g. 1024x1536") from None
    if height <= 0 or width <= 0 or height % 32 or width % 32:
        raise ValueError(f"size {text!r}: both sides must be positive multiples of 32 (the encoder downsamples 32x)")
    return height, width


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"{path}: cannot read the config file ({error.strerror})") from None
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({error})") from None


def config_from(values: dict, source: str = "config") -> TrainConfig:
    """A TrainConfig from a dict (a config file, or one saved in a checkpoint); unknown keys are rejected."""
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown}; known: {sorted(known)}")
    config = TrainConfig(**values)
    for name, value in asdict(config).items():
        expected = known[name].type
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, name, float(value))
        elif not isinstance(getattr(config, name), expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"{source}: {name} must be {expected.__name__}, got {value!r}")
    return config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per TrainConfig field, defaulting to None so that only given flags override."""
    parser.add_argument("--config", type=Path, help="a TOML or JSON file of settings; flags override it")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        text = f"{f.metadata['help']} (default: {default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type=f.type, default=None, help=text)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then ``--config``, then the flags given on the command line."""
    values = _read_file(args.config) if args.config else {}
    config_from(values, str(args.config))  # reject unknown keys before the flags mix in
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    config = config_from(values, str(args.config or "flags"))
    config.input_size()  # fail early on a malformed size
    return config
