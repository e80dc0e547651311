"""The time limit seen from the epoch loop: epoch lengths known from a run's logs, and whether the next epoch fits."""

import csv
import json
import logging
from dataclasses import asdict
from pathlib import Path

from competition.clock import PROJECT_AFTER_SECONDS, Deadline, format_duration
from competition.config import DERIVED_SETTINGS, TrainConfig

logger = logging.getLogger(__name__)


# Settings that leave an epoch's length as it is: which fold, where the files are, the time limit, the set-up check,
# and the derived ones (compared through what they come from; recipe_applied is absent from older config.json files)
_SAME_EPOCH_LENGTH = DERIVED_SETTINGS | {"fold", "out", "data_dir", "folds_csv", "time_limit", "check"}


def known_epoch_seconds(config: TrainConfig) -> float:
    """The longest epoch (training, validation, saving) in the log.csv of the folds in ``config.out`` whose
    config.json has settings that give epochs of this length; 0.0 when none is known. The folds of a run differ
    only in their images: a sibling fold's epochs, or this fold's own before a --resume, foretell the next."""

    def epoch_settings(values: dict) -> dict:
        return {name: value for name, value in values.items() if name not in _SAME_EPOCH_LENGTH}

    wanted = epoch_settings(asdict(config))
    longest = 0.0
    for run_dir in Path(config.out).glob("fold*"):
        try:
            if epoch_settings(json.loads((run_dir / "config.json").read_text())) != wanted:
                continue
            with open(run_dir / "log.csv", newline="") as handle:
                longest = max([longest, *(float(row["seconds"]) for row in csv.DictReader(handle))])
        except (OSError, ValueError, KeyError, TypeError, csv.Error):  # no whole log there: nothing known from it
            continue
    return longest


def no_time_for_an_epoch(deadline: Deadline, epoch_seconds: float) -> str:
    """Why an epoch does not start, e.g. ``the time limit 6m40s leaves 1m20s, an epoch takes about 2m40s``."""
    left = deadline.remaining()
    if left <= 0 or not epoch_seconds:
        return f"the {deadline.describe()} had passed"
    epoch = format_duration(epoch_seconds)
    return f"the {deadline.describe()} leaves {format_duration(left)}, an epoch takes about {epoch}"


class EpochBudget:
    """The time limit seen from the epoch loop: one projection early in this process's first epoch, and
    before each epoch whether it fits, judged by the longest epoch (training, validation, saving) known:
    measured so far, or ``known_epoch`` from this run's logs (so that a fold started late does not run its
    first epoch past the limit). Times are read from the deadline's clock."""

    def __init__(
        self, deadline: Deadline, config: TrainConfig, first_epoch: int, images_per_epoch: int, known_epoch: float
    ):
        self.deadline, self.config = deadline, config
        self.first_epoch, self.images_per_epoch = first_epoch, images_per_epoch
        self.longest_epoch = known_epoch
        self.epoch_started = 0.0
        self.epochs_ended = 0
        self.projected_fit: bool | None = None  # the projection's verdict; None before it is made
        self.not_started = ""  # why this process's first epoch did not start, when it did not
        self.passed = False  # an epoch ended past the limit (said then): the next is not started

    def begin(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (from 0) fits in the time left; when not, says so and how to go on.
        With nothing known of an epoch's length, only a limit already passed stops it."""
        if not self.deadline.fits(self.longest_epoch):
            if epoch > 0:
                if not self.passed:  # when the last epoch passed the limit, end() said so
                    self._warn_stop(epoch)
            else:  # nothing was trained to resume from: the caller says so
                self.not_started = no_time_for_an_epoch(self.deadline, self.longest_epoch)
            return False
        self.epoch_started = self.deadline.elapsed()
        return True

    def during(self, images_done: int) -> None:
        """At the loss sync points: the projection, once PROJECT_AFTER_SECONDS of the first epoch have passed.
        It knows the training rate only; the first epoch's end checks it with validation included."""
        seconds = self.deadline.elapsed() - self.epoch_started
        if self.projected_fit is None and seconds >= PROJECT_AFTER_SECONDS:
            rate = images_done / seconds
            measured = f"{rate:.1f} img/s over {format_duration(seconds)}: training only, validation adds to each epoch"
            self._project(self.images_per_epoch / rate, seconds, measured)

    def end(self) -> None:
        seconds = self.deadline.elapsed() - self.epoch_started
        self.longest_epoch = max(self.longest_epoch, seconds)
        self.epochs_ended += 1
        epochs_left = self.config.epochs - self.first_epoch - self.epochs_ended
        if self.deadline.remaining() <= 0:  # nothing foretold it, or it ran longer than foretold: said as it is
            self.passed = True
            how_on = (
                f"last.pt is kept: run the same command with --resume in a new session to train the other {epochs_left}"
                if epochs_left
                else "it was the last: the fold is trained"
            )
            logger.warning(
                "fold %d: --time-limit %s was passed: epoch %d took %s; %s",
                self.config.fold,
                self.config.time_limit,
                self.first_epoch + self.epochs_ended,
                format_duration(seconds),
                how_on,
            )
            return
        if self.epochs_ended > 1 or self.projected_fit is False:  # a warning already given is not repeated
            return
        epochs_after = self.config.epochs - self.first_epoch - 1
        if self.projected_fit is None or not self.deadline.fits(epochs_after * seconds):
            # no projection yet (a first epoch under PROJECT_AFTER_SECONDS), or validation changed its verdict
            self._project(seconds, seconds, "the first epoch, validation included")

    def _project(self, epoch_seconds: float, into_epoch: float, measured: str) -> None:
        config, deadline = self.config, self.deadline
        epochs_left = config.epochs - self.first_epoch
        total = epochs_left * epoch_seconds
        fits = self.projected_fit = deadline.fits(total - into_epoch)
        limit = deadline.describe()
        if deadline.limit is not None:
            limit += f", {format_duration(deadline.remaining())} left: it {'fits' if fits else 'does not fit'}"
        logger.info(
            "fold %d: projected %s for the %d epoch(s) to train (%s an epoch, from %s); %s",
            config.fold,
            format_duration(total),
            epochs_left,
            format_duration(epoch_seconds),
            measured,
            limit,
        )
        if fits:
            return
        fitting = min(epochs_left, int((deadline.remaining() + into_epoch) // epoch_seconds))
        if fitting < 1:  # not even the epoch under way: it is not cut short, end() says what happened
            logger.warning(
                "fold %d: epoch %d is projected to end past the %s; it is finished and saved, then training stops",
                config.fold,
                self.first_epoch + 1,
                deadline.describe(),
            )
        else:
            logger.warning(
                "fold %d: about %d of the %d epoch(s) to train fit in the %s; training will stop after them, with "
                "last.pt saved: run the same command with --resume in a new session to train the rest",
                config.fold,
                fitting,
                epochs_left,
                deadline.describe(),
            )

    def _warn_stop(self, epoch: int) -> None:
        left = max(0.0, self.deadline.remaining())
        why = (
            f"the next would take about {format_duration(self.longest_epoch)}, {format_duration(left)} are left"
            if self.longest_epoch
            else "it had passed before this session's first epoch"
        )
        logger.warning(
            "fold %d: stopped by the %s with %d of %d epochs done (%s); last.pt, best.pt and log.csv are saved: "
            "run the same command with --resume in a new session to train the other %d",
            self.config.fold,
            self.deadline.describe(),
            epoch,
            self.config.epochs,
            why,
            self.config.epochs - epoch,
        )
