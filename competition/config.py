"""One training run's settings: defaults, then a config file (TOML or JSON), then command-line flags."""

import argparse
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import tomllib

from competition.environment import default_data_dir, default_work_dir


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in every checkpoint so infer.py needs nothing else."""

    data_dir: str = field(default_factory=lambda: str(default_data_dir()))
    folds_csv: str = field(default_factory=lambda: str(default_work_dir() / "folds" / "folds.csv"))
    out: str = field(default_factory=lambda: str(default_work_dir() / "runs" / "unet_resnet34"))
    fold: int = 0
    arch: str = "Unet"
    encoder: str = "resnet34"
    encoder_weights: str = "imagenet"  # imagenet, none, or a path to an encoder weights file
    size: str = "1024x1536"  # HEIGHTxWIDTH the images are resized to for training; "full" keeps full size
    crop: int = 0  # > 0: train on random full-resolution crops of this side instead of resized images
    epochs: int = 30
    batch_size: int = 8
    accum_steps: int = 1
    lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # cosine (linear warm-up, then cosine) or onecycle
    loss: str = "bce_dice"  # bce_dice, bce, dice, focal, lovasz
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    precision: str = "auto"  # auto (bf16 where the GPU has it, else fp16; fp32 on CPU), bf16, fp16, fp32
    channels_last: bool = True
    compile: bool = False
    clip_grad: float = 1.0  # max gradient norm; 0 turns clipping off
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0 turns it off
    augment: bool = True
    val_batch_size: int = 2
    workers: int = 4
    mask_source: str = "auto"  # auto, gif or csv
    seed: int = 42
    log_every: int = 10  # optimizer steps between progress updates (and non-finite checks)

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
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default: {default})")
        else:
            parser.add_argument(flag, type=f.type, default=None, help=f"(default: {default})")


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
