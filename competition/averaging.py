"""Checkpoint averaging: the K best epochs' weights of a fold (--average-top) or SWA over its last epochs
(--swa-epochs), their batch-norm statistics recomputed on training images; the files and their validation scores."""

import csv
import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn

from competition.checkpoints import load_checkpoint
from competition.prediction import autocast, model_input

AVERAGED_NAME, SWA_NAME = "averaged.pt", "swa.pt"
# The validation scores of best.pt, averaged.pt and swa.pt, one row each; written last, so that it marks the
# averaging of a finished run as done (a resumed run whose averaging was interrupted does it again).
SCORES_NAME = "averaged.csv"
# The weights of an epoch among the K best, kept in the fold folder until a better epoch displaces it.
KEPT_NAME = re.compile(r"top_epoch(?P<epoch>\d+)\.pt")
# Training batches (without augmentation) whose statistics batch norm is given for averaged weights: enough for
# stable means and variances, bounded so that a large fold does not spend an epoch's time on them.
BATCH_NORM_BATCHES = 100


def kept_name(epoch: int) -> str:
    """``top_epoch7.pt``: the file that keeps epoch 7's weights for --average-top."""
    return f"top_epoch{epoch}.pt"


def kept_epoch(name: str) -> int | None:
    """The epoch whose kept weights a file name holds (``top_epoch7.pt`` -> 7), None for any other name."""
    match = KEPT_NAME.fullmatch(name)
    return int(match["epoch"]) if match else None


def keep_top(kept: list[tuple[int, float]], epoch: int, score: float, k: int) -> list[tuple[int, float]]:
    """The ``k`` best (epoch, score) pairs once ``epoch`` has scored ``score``, best first. A tie keeps the earlier
    epoch (as best.pt does); a NaN score ranks below every number."""

    def rank(pair: tuple[int, float]) -> tuple[float, int]:
        return (math.inf if math.isnan(pair[1]) else -pair[1], pair[0])

    return sorted([*kept, (epoch, score)], key=rank)[:k]


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of each floating-point tensor over ``states`` (summed in float64, returned in its own dtype); any
    other tensor (batch norm's num_batches_tracked) is copied from the first state."""
    averaged = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            averaged[name] = (sum(state[name].double() for state in states) / len(states)).to(first.dtype)
        else:
            averaged[name] = first.clone()
    return averaged


def average_kept(run_dir: Path, epochs: list[int]) -> dict[str, torch.Tensor]:
    """The averaged weights of the kept files of ``epochs`` in ``run_dir``."""
    return average_states([load_checkpoint(run_dir / kept_name(epoch))["model"] for epoch in epochs])


def recompute_batch_norm(
    model: torch.nn.Module, loader: Iterable, channels_last: bool = False, precision: str = "fp32"
) -> None:
    """Batch norm's running statistics of ``model`` made again from the images of ``loader`` ((images, masks)
    batches), by torch.optim.swa_utils.update_bn: an equal-weight mean over the batches, in the memory format and
    precision the model trained in. Averaged weights need this: the average of several epochs' statistics is not
    the statistics of the averaged weights' activations."""
    device = next(model.parameters()).device
    batches = (model_input(images.to(device, non_blocking=True), channels_last) for images, _ in loader)
    with autocast(precision, device):
        update_bn(batches, model)


def epochs_text(epochs: list[int]) -> str:
    """``5, 7, 8``; consecutive epochs as a range, ``8-10``."""
    ordered = sorted(epochs)
    if len(ordered) > 2 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{ordered[0]}-{ordered[-1]}"
    return ", ".join(map(str, ordered))


def write_scores(rows: list[dict], path: Path) -> None:
    """The rows (weights, epochs, then the validation scores) as ``path``, written as it is: the caller names a
    temporary file."""
    columns = list(dict.fromkeys(name for row in rows for name in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
