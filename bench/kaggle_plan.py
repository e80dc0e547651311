"""A session plan: a minute of training and of inference measured on this machine, projected to the whole competition.

    python -m bench.kaggle_plan --config configs/kaggle_full.toml                 # in a Kaggle notebook (T4 x2)
    python -m bench.kaggle_plan --config configs/cpu_demo.toml --seconds 20       # anywhere, on the CPU

It trains the configuration's model with the trainer's own step on the images of --data-dir (decoding,
augmentation and all) for --seconds, times the data loaders alone, predicts test images with a fold
ensemble and TTA (end to end: decoding, every model and view, full-resolution probabilities,
thresholding, RLE) for --seconds, and projects those rates onto the competition's 5,088 training and
100,064 test images: time per epoch and per fold, folds per session, test inference time, and whether
every fold and the submission fit one session. Folds train one per GPU at a time, and the CPU cores
that decode JPEGs are shared between them: a fold's rate is the lower of the GPU's and its share of
the loaders'.
"""

import argparse
import itertools
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib
import torch

from bench.device import describe, synchronize
from bench.train_bench import trainer_step_factory
from competition.carvana import CarvanaData
from competition.checkpoints import save_checkpoint, summary
from competition.clock import format_duration, parse_duration
from competition.config import config_from
from competition.data import SegmentationDataset
from competition.errors import ConfigError
from competition.fold_data import train_transform
from competition.inference import Ensemble, load_member
from competition.logs import configure, exit_on_project_error
from competition.models import build_model
from competition.prediction import check_tta, setup_device
from competition.prediction_stream import PredictionImages
from competition.rle import rle_encode

CARVANA_TRAIN_IMAGES = 5088
CARVANA_TEST_IMAGES = 100_064
KAGGLE_SESSION = "12h"  # Kaggle's limit for one GPU notebook session
KAGGLE_WEEKLY_GPU_HOURS = 30.0  # Kaggle's weekly GPU quota


@dataclass
class Rates:
    """What this machine did in the measured minute, per device (images per second)."""

    train: float  # training steps, end to end from JPEG files, one fold on one device
    loader: float  # the training loaders alone, all their workers: the CPU's decoding rate
    predict: float  # test images through the whole ensemble and every TTA view, one device
    predict_loader: float  # the test images' loaders alone: decoding and resizing on the CPU
    validate: float  # validation images: one model, no TTA, full-resolution masks


@dataclass
class Workload:
    folds: int
    epochs: int
    train_images: int
    test_images: int
    devices: int  # GPUs training folds (and predicting test shards) at once
    session: float  # seconds
    weekly_gpu_hours: float


def plan(rates: Rates, work: Workload) -> dict:
    """The projection, in seconds: pure arithmetic on the measured rates, so that it can be checked by hand."""
    concurrent = min(work.devices, work.folds)
    fold_rate = min(rates.train, rates.loader / concurrent)  # the loaders' CPU is shared by folds at once
    validation_images = work.train_images / work.folds
    epoch = (work.train_images - validation_images) / fold_rate + validation_images / rates.validate
    fold = work.epochs * epoch
    training = math.ceil(work.folds / concurrent) * fold
    # Shards on several devices share the CPU that decodes the test images, as folds share it in training.
    predict_rate = min(rates.predict * work.devices, rates.predict_loader)
    inference = work.test_images / predict_rate
    return {
        "fold_rate": fold_rate,
        "loader_bound": fold_rate < rates.train,
        "epoch": epoch,
        "fold": fold,
        "folds_per_session": math.floor(work.session / fold) * concurrent,
        "training": training,
        "predict_rate": predict_rate,
        "inference": inference,
        "total": training + inference,
        "fits": training + inference <= work.session,
        # Kaggle meters a session's time, whatever number of its GPUs are busy.
        "quota_hours": (training + inference) / 3600,
    }


def timed_rate(step, batches, seconds: float, device: torch.device, warmup: int = 2) -> float:
    """Images per second of ``step`` over ``batches`` for about ``seconds`` after ``warmup`` batches."""
    iterator = iter(batches)
    for _ in range(warmup):
        step(next(iterator))
    synchronize(device)
    started, images = time.perf_counter(), 0
    while time.perf_counter() - started < seconds or images == 0:
        images += step(next(iterator))
        synchronize(device)
    return images / (time.perf_counter() - started)


def measure_training(config, data: CarvanaData, device, precision: str, seconds: float) -> tuple[float, float]:
    """(trainer img/s end to end, loader img/s alone) on the training images of ``data``."""
    dataset = SegmentationDataset(data, data.train_ids(), size=config.input_size(), transform=train_transform(config))
    loader = torch.utils.data.DataLoader(
        dataset,
        config.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=config.workers > 0,
    )
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    loader_rate = timed_rate(lambda batch: len(batch[0]), batches, seconds / 3, torch.device("cpu"))
    train_step = trainer_step_factory(config, device, precision)

    def step(batch):
        train_step(*batch)
        return len(batch[0])

    return timed_rate(step, batches, seconds, device), loader_rate


def measure_prediction(
    config, data: CarvanaData, device, precision, members: int, tta, seconds: float
) -> tuple[float, float]:
    """(test images per second through an ensemble of ``members`` models of ``config`` with ``tta`` views, from
    JPEG files to RLE strings; the loaders' rate alone). The models are randomly initialised: speed does not
    depend on the weights."""
    shape = data.image_shape(data.test_ids()[0], "test")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "best.pt"
        model = build_model(config.arch, config.encoder)
        save_checkpoint({"model": model.state_dict(), **summary(config, 0, 0.0, shape)}, path)
        ensemble = Ensemble([load_member(path, device, config.compile) for _ in range(members)], tta, precision)
    dataset = PredictionImages(data, data.test_ids(), "test", ensemble.input_sizes, shape)
    loader = torch.utils.data.DataLoader(
        dataset,
        config.val_batch_size * 2,
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=config.workers > 0,
    )

    @torch.no_grad()
    def step(batch):
        images = {key: value.to(device, non_blocking=True) for key, value in batch["images"].items()}
        masks = (ensemble.probabilities(images, shape) > 0.5).squeeze(1).to(torch.uint8).cpu().numpy()
        for mask in masks:
            rle_encode(mask)
        return len(masks)

    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    loader_rate = timed_rate(lambda batch: len(batch["index"]), batches, seconds / 3, torch.device("cpu"))
    return timed_rate(step, batches, seconds, device), loader_rate


def report(rates: Rates, work: Workload, result: dict, heading: str) -> str:
    """The plan as a Markdown table."""
    concurrent = min(work.devices, work.folds)
    bound = "the loaders' CPU" if result["loader_bound"] else "the device"
    validation_images = work.train_images // work.folds
    training_images = work.train_images - validation_images
    verdict = "yes" if result["fits"] else "no: split it over sessions, each resuming (`--resume`)"
    rows = [
        (
            "training, one fold on one device",
            f"{rates.train:.1f} img/s end to end; loaders alone {rates.loader:.1f} img/s",
        ),
        (f"a fold's rate with {concurrent} at once", f"{result['fold_rate']:.1f} img/s (bound by {bound})"),
        (
            "one epoch",
            f"{training_images:,} training + {validation_images:,} validation images: "
            + format_duration(result["epoch"]),
        ),
        (f"one fold ({work.epochs} epochs)", format_duration(result["fold"])),
        (f"{work.folds} folds, {concurrent} at a time", format_duration(result["training"])),
        (f"folds per {format_duration(work.session)} session", str(result["folds_per_session"])),
        (
            f"test inference, {work.test_images:,} images on {work.devices} device(s)",
            f"{result['predict_rate']:.1f} img/s ({rates.predict:.1f} a device, loaders alone "
            + f"{rates.predict_loader:.1f}): {format_duration(result['inference'])}",
        ),
        ("every fold and the submission", format_duration(result["total"])),
        (f"fits one {format_duration(work.session)} session", verdict),
        (f"quota hours (Kaggle's weekly GPU quota: {work.weekly_gpu_hours:g})", f"{result['quota_hours']:.1f}"),
    ]
    lines = [heading, "", "| | |", "| --- | --- |", *(f"| {name} | {value} |" for name, value in rows)]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=Path("configs/kaggle_full.toml"), help="(default: %(default)s)")
    parser.add_argument("--data-dir", default="input", help="images to measure on (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time of each phase (default: 60)")
    parser.add_argument("--size", help="override the configuration's size (e.g. a tiny one on a CPU)")
    parser.add_argument("--encoder", help="override the configuration's encoder")
    parser.add_argument("--batch-size", type=int, help="override the configuration's batch size")
    parser.add_argument("--workers", type=int, help="override the configuration's loader workers")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--tta", default="hflip", help="comma-separated TTA views, or empty (default: hflip)")
    parser.add_argument("--devices", type=int, help="GPUs at work at once (default: every visible GPU, else 1)")
    parser.add_argument("--train-images", type=int, default=CARVANA_TRAIN_IMAGES)
    parser.add_argument("--test-images", type=int, default=CARVANA_TEST_IMAGES)
    parser.add_argument("--session", default=KAGGLE_SESSION, help="a session's time limit (default: Kaggle's 12h)")
    parser.add_argument("--out", type=Path, help="also write the plan to this Markdown file")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure()
    with exit_on_project_error("bench.kaggle_plan"):
        plan_session(args)


def read_config(path: Path, overrides: dict):
    """The run's settings from its config file with ``overrides``, checked (one line for a bad file)."""
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"--config {path}: cannot read it as TOML ({error})") from None
    values |= {name: value for name, value in overrides.items() if value is not None}
    return config_from(values | {"encoder_weights": "none"}, str(path))


def plan_session(args: argparse.Namespace) -> None:
    overrides = {"size": args.size, "encoder": args.encoder, "batch_size": args.batch_size, "workers": args.workers}
    config = read_config(args.config, overrides)
    device, precision = setup_device(None, config.precision)
    data = CarvanaData(args.data_dir)
    tta = check_tta(tuple(name for name in args.tta.split(",") if name))
    devices = args.devices or max(1, torch.cuda.device_count())
    train_rate, loader_rate = measure_training(config, data, device, precision, args.seconds)
    predict_rate, predict_loader_rate = measure_prediction(
        config, data, device, precision, args.folds, tta, args.seconds
    )
    validate_rate, _ = measure_prediction(config, data, device, precision, 1, (), args.seconds / 3)
    rates = Rates(train_rate, loader_rate, predict_rate, predict_loader_rate, validate_rate)
    session = parse_duration(args.session, "--session")
    work = Workload(
        args.folds, config.epochs, args.train_images, args.test_images, devices, session, KAGGLE_WEEKLY_GPU_HOURS
    )
    heading = (
        f"Plan for `{args.config}` on {describe(device)} x{devices}, {os.cpu_count()} CPU cores: "
        f"{config.arch}-{config.encoder} at {config.size}, batch {config.batch_size}x{config.accum_steps}, {precision}, "
        f"{args.folds} folds x TTA {'+'.join(tta) or 'off'}; measured {args.seconds:g} s a phase on {args.data_dir}"
    )
    text = report(rates, work, plan(rates, work), heading)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
