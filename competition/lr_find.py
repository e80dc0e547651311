"""The learning-rate range test (Smith 2015): a fold's training loss as the rate grows step by step, and the rate it suggests.

``python -m competition.lr_find --fold 0 [train.py's flags]`` trains a fresh model for at most ``--steps``
optimizer steps on the fold's training images, the learning rate growing geometrically from ``--start-lr``
to ``--end-lr``, and stops early once the loss has blown up. It writes the loss-versus-rate curve
(``lr_find.png``, and its figures in ``lr_find.csv``) and prints the rate of the steepest descent of the
smoothed loss, the suggestion fastai's and Lightning's finders make. Nothing of the run folder is touched
but those two files; the same seed gives the same curve.
"""

import csv
import itertools
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from competition.checkpoints import checkpoint_config, load_checkpoint
from competition.config import add_config_arguments
from competition.errors import ConfigError
from competition.files import atomic_output, check_writable
from competition.fold_data import open_training_data, set_up_fold
from competition.logs import OneLineParser, add_logging_arguments, configure_from, exit_on_project_error
from competition.prediction import model_input, setup_device
from competition.recipes import resolve_run_config
from competition.training import accumulate_gradients, build_parts, micro_batch_groups, optimizer_step

logger = logging.getLogger(__name__)

SMOOTHING = 0.98  # the loss's exponential moving average, as fastai's finder keeps it, to see the blow-up
CENTRED_HALF_WIDTH = 2  # the curve judged at the end: each loss averaged with 2 steps either side, no lag
BLOW_UP = 4.0  # stop once the smoothed loss is this many times its lowest: the rates beyond teach nothing
DEFAULT_STEPS, DEFAULT_START_LR, DEFAULT_END_LR = 100, 1e-7, 1.0
SKIP_START = 10  # the first steps' losses are noise: no rate among them is suggested


@dataclass
class RangeTest:
    """The rates tried, the loss of each step, its smoothed curve (``centred``) and the suggested rate."""

    rates: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    steps_planned: int


def rate_schedule(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    """``steps`` rates from ``start_lr`` to ``end_lr``, each the last times one factor."""
    return np.geomspace(start_lr, end_lr, steps)


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """The bias-corrected exponential moving average of ``losses`` (its first values are not pulled to 0)."""
    average, smoothed = 0.0, []
    for step, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**step))
    return smoothed


def centred(losses: list[float], half_width: int = CENTRED_HALF_WIDTH) -> list[float]:
    """Each loss averaged with up to ``half_width`` losses either side: the finished curve smoothed without the
    moving average's lag, which puts a 100-step test's steepest descent about a decade too high."""
    values = np.asarray(losses, dtype=float)
    return [float(values[max(0, index - half_width) : index + half_width + 1].mean()) for index in range(len(values))]


def suggest(rates: list[float], smoothed: list[float]) -> float:
    """The rate where the smoothed loss falls fastest against log(rate), up to its lowest point (the first
    ``SKIP_START`` steps, noise, left out when the curve is long enough); on a curve too short to judge, a tenth of
    the rate of the lowest loss."""
    lowest = int(np.argmin(smoothed))
    first = SKIP_START if lowest - SKIP_START >= 2 else 0
    if lowest - first < 2:
        return rates[lowest] / 10
    slopes = np.gradient(np.asarray(smoothed[first : lowest + 1]), np.log(np.asarray(rates[first : lowest + 1])))
    return float(rates[first + int(np.argmin(slopes))])


def blown_up(smoothed: list[float]) -> bool:
    """Whether the smoothed loss has left its lowest far behind (after the first, noisy steps)."""
    return len(smoothed) > SKIP_START and smoothed[-1] > BLOW_UP * min(smoothed)


def range_test(config, device: str | None, steps: int, start_lr: float, end_lr: float, progress: bool) -> RangeTest:
    """The range test on ``config.fold``'s training images: a fresh model, one optimizer step per rate of
    ``rate_schedule``, the training batches read in order again as often as ``steps`` needs."""
    torch_device, precision = setup_device(device, config.precision)
    config, data = open_training_data(config)
    fold = set_up_fold(config, data, torch_device, progress)
    config = fold.config
    parts = build_parts(config, torch_device, precision, steps_per_epoch=max(1, len(fold.train_loader)))
    fold.order.manual_seed(config.seed * 100_003)  # the first epoch's order, as training draws it
    if fold.train_loader.dataset.transform is not None:  # the first epoch's augmentation, as training draws it
        fold.train_loader.dataset.transform.set_random_seed(config.seed)
    batches = (
        (model_input(images.to(torch_device), config.channels_last), masks.to(torch_device))
        for images, masks in itertools.chain.from_iterable(itertools.repeat(fold.train_loader))
    )
    parts.model.train()
    rates, losses = [], []
    for rate, micro_batches in tqdm(
        zip(rate_schedule(start_lr, end_lr, steps), micro_batch_groups(batches, config.accum_steps)),
        total=steps,
        desc=f"fold {config.fold} lr range test",
        unit="step",
        disable=not progress,
    ):
        for group in parts.optimizer.param_groups:
            group["lr"] = float(rate)
        loss = accumulate_gradients(parts.forward, parts.loss_fn, micro_batches, parts.precision, parts.scaler)
        optimizer_step(parts.model, parts.optimizer, parts.scaler, config.clip_grad)
        value = float(loss)  # one sync a step: the test is short, and must see each loss to stop in time
        rates.append(float(rate))
        losses.append(value)
        if not math.isfinite(value) or blown_up(smooth(losses)):
            break
    finite = len(losses) - (not math.isfinite(losses[-1]))  # the test stops at the first non-finite loss
    if finite < 2:
        raise ConfigError(f"--start-lr {start_lr:g}: the loss was not finite from the first steps; start lower")
    curve = centred(losses[:finite])
    return RangeTest(rates, losses, curve, suggest(rates[:finite], curve), steps)


def with_found_lr(config, device: str | None, progress: bool, resume: bool = False):
    """``config`` with the rate the range test suggests on its fold (``--lr auto``), rounded to two figures and said
    in a line; the curve goes to ``<out>/lr_find.png``. A resumed run takes the rate its last.pt was trained at."""
    last = config.run_dir() / "last.pt"
    if resume and last.is_file():
        rate = checkpoint_config(load_checkpoint(last), last).lr
        logger.info("--lr auto: %.2g, the rate %s was trained at", rate, last)
        return replace(config, lr=rate)
    result = range_test(config, device, DEFAULT_STEPS, DEFAULT_START_LR, DEFAULT_END_LR, progress)
    picture, _ = write_curve(result, Path(config.out))
    rate = float(f"{result.suggestion:.2g}")
    logger.info("--lr auto: %.2g, from the range test on fold %d (%s)", rate, config.fold, picture)
    return replace(config, lr=rate)


def write_curve(result: RangeTest, folder: Path) -> tuple[Path, Path]:
    """``lr_find.png`` (loss against rate, log axis, the suggestion marked) and ``lr_find.csv`` in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    table, picture = folder / "lr_find.csv", folder / "lr_find.png"
    with atomic_output(table) as partial, open(partial, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["lr", "loss", "smoothed_loss"])
        writer.writerows(zip(result.rates, result.losses, result.smoothed))
    figure, axis = plt.subplots(figsize=(6, 3.6))
    axis.plot(result.rates[: len(result.smoothed)], result.smoothed, label="smoothed loss")
    axis.scatter(result.rates, result.losses, s=4, alpha=0.3, label="loss of the step")
    axis.axvline(result.suggestion, color="tab:red", linestyle="--", label=f"suggested {result.suggestion:.2e}")
    axis.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    finite = [loss for loss in result.losses + result.smoothed if math.isfinite(loss)]
    axis.set_ylim(min(finite) * 0.9, min(max(finite), BLOW_UP * min(finite)) * 1.1)
    axis.legend()
    figure.tight_layout()
    with atomic_output(picture) as partial:
        figure.savefig(partial, dpi=100, format="png")
    plt.close(figure)
    return picture, table


def build_parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: the GPU when there is one)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps at most ({DEFAULT_STEPS})")
    parser.add_argument(
        "--start-lr", type=float, default=DEFAULT_START_LR, help=f"the first rate ({DEFAULT_START_LR:g})"
    )
    parser.add_argument("--end-lr", type=float, default=DEFAULT_END_LR, help=f"the last rate ({DEFAULT_END_LR:g})")
    parser.add_argument("--out-dir", type=Path, help="where lr_find.png and .csv go (default: the fold's run folder)")
    add_logging_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_from(args)
    with exit_on_project_error("competition.lr_find", args.debug):
        if args.steps < 2:
            raise ConfigError(f"--steps {args.steps}: take at least 2 (100 is usual)")
        if not 0 < args.start_lr < args.end_lr or not math.isfinite(args.end_lr):
            raise ConfigError(f"--start-lr {args.start_lr:g} --end-lr {args.end_lr:g}: need 0 < start < end")
        if args.out_dir is not None:  # before the data is read and the test runs
            check_writable(args.out_dir, "--out-dir", folder=True)
        config = resolve_run_config(args)
        logger.info(
            "lr range test: at most %d steps of %d image(s), rates %.1e to %.1e",
            args.steps,
            config.batch_size * config.accum_steps,
            args.start_lr,
            args.end_lr,
        )
        result = range_test(config, args.device, args.steps, args.start_lr, args.end_lr, not args.quiet)
        picture, table = write_curve(result, args.out_dir or config.run_dir())
    done = len(result.losses)
    stopped = "" if done == result.steps_planned else f" of {result.steps_planned} (stopped: the loss blew up)"
    logger.info("%d steps%s; curve: %s, figures: %s", done, stopped, picture, table)
    print(
        f"suggested lr: {result.suggestion:.2e} (where the loss falls fastest); train with --lr {result.suggestion:.2g}"
    )


if __name__ == "__main__":
    main()
