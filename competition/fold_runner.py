"""Folds in parallel: workers on free device slots, each fold's outcome, the driver's progress lines, fault injection."""

import contextlib
import csv
import functools
import logging
import os
import re
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from competition import logs
from competition.clock import Deadline, parse_duration
from competition.config import TrainConfig, config_from
from competition.errors import ProjectError
from competition.files import exclusive_lock
from competition.fold_data import open_training_data
from competition.run_folder import monitored
from competition.training import FoldResult, train_fold_within
from competition.workers import stop_when_orphaned

logger = logging.getLogger(__name__)


FAULT_VARIABLE = "CARVANA_FAULT_EXIT_AFTER_EPOCHS"


def _exit_if_fault_injected(fold: int, epochs_this_run: int, resumed: bool) -> None:
    """Fault injection for the tests of retries: with ``$CARVANA_FAULT_EXIT_AFTER_EPOCHS`` = N, a fold started
    from scratch kills its own process after N epochs, hard, as a lost machine would; its resumed run goes on.
    ``run_fold_on`` hands it to the loop as ``epoch_ended``: it acts in the fold workers of every backend."""
    after = os.environ.get(FAULT_VARIABLE)
    if after and not resumed and epochs_this_run == int(after):
        logger.warning("fold %d: %s=%s: the process exits now, as if killed", fold, FAULT_VARIABLE, after)
        logging.shutdown()
        os._exit(9)


@dataclass
class FoldOutcome:
    """One fold of ``train_folds``: ``ok`` unless it failed; ``stopped`` when the time limit stopped it, or kept it
    from starting (its checkpoints, if any, are good: ``--resume`` continues it)."""

    fold: int
    ok: bool
    message: str
    log: str
    stopped: bool = False


def _fold_outcome(result: FoldResult, fold: int, device: str, deadline: Deadline, log: str) -> FoldOutcome:
    """The outcome of a fold that did not fail."""
    if result.not_started:
        return FoldOutcome(fold, True, f"not started: {result.not_started}", log, stopped=True)
    best = f"best {result.score_name} {result.best[result.score_column]:.5f} on {device}"
    if result.finished:
        return FoldOutcome(fold, True, best, log)
    done = f"stopped by the {deadline.describe()} after {result.epochs_done} of {result.epochs} epochs"
    return FoldOutcome(fold, True, f"{done}, {best}", log, stopped=True)


@contextlib.contextmanager
def _device_slot(slots_dir: str, slots: list[str]):
    """A free device among ``slots`` (one entry per fold that may run on it at once), held until the block
    ends. The slots are file locks: the OS frees the slot of a worker that dies, however it dies."""
    while True:
        for index, device in enumerate(slots):
            with exclusive_lock(Path(slots_dir) / f"slot{index}.lock") as claimed:
                if claimed:
                    yield device
                    return
        time.sleep(0.2)


def _run_one_fold(
    config_values: dict,
    fold: int,
    slots_dir: str,
    slots: list[str],
    driver_pid: int,
    flags: dict,
    log_level: int,
    started: float,
) -> FoldOutcome:
    """A joblib worker's fold: on a free device slot, until the driver dies."""
    stop_when_orphaned(driver_pid)  # nothing to watch when one job runs the folds in the driver itself
    with _device_slot(slots_dir, slots) as device:
        logger.debug("device slots in %s", slots_dir)
        return run_fold_on(config_values, fold, device, flags, log_level, started)


def run_fold_on(
    config_values: dict, fold: int, device: str, flags: dict, log_level: int, started: float
) -> FoldOutcome:
    """Train ``fold`` of the run ``config_values`` on ``device``, logging to its ``train.log``; a failure is the
    outcome, not an exception. The fold runner of every backend (joblib's workers, Ray's tasks)."""
    config = config_from({**config_values, "fold": fold})
    deadline = Deadline(parse_duration(config.time_limit), started)
    log_path = config.run_dir() / "train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, contextlib.redirect_stderr(log), logs.redirected(log, log_level):
        logger.info("fold %d on %s (worker process %d)", fold, device, os.getpid())
        try:
            fault = functools.partial(_exit_if_fault_injected, fold)
            result = train_fold_within(config, deadline, device, progress=False, epoch_ended=fault, **flags)
        except Exception as error:  # noqa: BLE001 - any failure is reported per fold, the others go on
            if not isinstance(error, ProjectError):
                traceback.print_exc()
            logger.error("%s: %s", type(error).__name__, error)
            return FoldOutcome(fold, False, f"{type(error).__name__}: {error}", str(log_path))
        if result.not_started:  # the driver says how to go on
            logger.warning("fold %d: not started: %s", fold, result.not_started)
    return _fold_outcome(result, fold, device, deadline, str(log_path))


class _FoldProgress:
    """A line in the driver as each fold of ``train_folds`` finishes an epoch, e.g. ``cuda:0 fold 0: epoch 3/30,
    val Dice 0.99123, 41.2 img/s, best 0.99123``: each fold's log.csv (written atomically) read every
    ``interval`` seconds by a thread, the device named by the fold's train.log. Lines go to the console
    handlers of the moment it starts: a fold run in the driver redirects the project's logger to its train.log."""

    def __init__(self, config: TrainConfig, folds: list[int], interval: float = 2.0):
        self.run_dirs = {fold: Path(config.out) / f"fold{fold}" for fold in folds}
        self.score_column, self.score_name = monitored(config)
        self.epochs, self.interval = config.epochs, interval
        self.seen = {fold: {_row_key(row) for row in self._rows(fold)} for fold in folds}  # earlier runs' rows
        self.devices: dict[int, str] = {}
        self.handlers = list(logging.getLogger(logs.LOGGER_NAME).handlers)
        self.enabled = logger.isEnabledFor(logging.INFO)
        self.saying = threading.Lock()  # the watching thread and the driver's own calls of look()

    def _rows(self, fold: int) -> list[dict]:
        try:
            with open(self.run_dirs[fold] / "log.csv", newline="") as handle:
                return list(csv.DictReader(handle))
        except (OSError, csv.Error):
            return []

    def look(self) -> None:
        """A line for each epoch ended since the last look."""
        with self.saying:
            self._look()

    def _look(self) -> None:
        for fold in self.run_dirs:
            rows = self._rows(fold)
            for row in rows:
                if _row_key(row) not in self.seen[fold]:
                    self.seen[fold].add(_row_key(row))
                    self._say(self._line(fold, row, rows))

    def _line(self, fold: int, row: dict, rows: list[dict]) -> str | None:
        try:
            best = max(float(other[self.score_column]) for other in rows)
            return (
                f"{self._device(fold)} fold {fold}: epoch {row['epoch']}/{self.epochs}, {self.score_name} "
                f"{float(row[self.score_column]):.5f}, {float(row['train_img_per_s']):.1f} img/s, best {best:.5f}"
            )
        except (KeyError, TypeError, ValueError):  # a row that is not whole: not worth a line
            return None

    def _device(self, fold: int) -> str:
        """The device from the fold's train.log (read once: the fold's line is there before its first epoch)."""
        if fold not in self.devices:
            try:
                text = (self.run_dirs[fold] / "train.log").read_text(errors="replace")
            except OSError:
                return "?"
            found = re.findall(rf"^\S+ fold {fold} on (\S+) \(worker process", text, re.MULTILINE)
            if not found:
                return "?"
            self.devices[fold] = found[-1]  # the log is appended to by every run of the fold
        return self.devices[fold]

    def _say(self, message: str | None) -> None:
        if message is None or not self.enabled:
            return
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, None, None)
        for handler in self.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def _row_key(row: dict) -> tuple:
    return row.get("epoch"), row.get("seconds")


@contextlib.contextmanager
def fold_progress(config: TrainConfig, folds: list[int]):
    progress = _FoldProgress(config, folds)
    with logs.said_every(progress.interval, progress.look, "fold-progress"):
        yield progress


def train_folds(
    config: TrainConfig,
    folds: list[int],
    devices: list[str],
    jobs: int,
    resume: bool = False,
    overwrite: bool = False,
    log_level: int = logging.INFO,
    started: float | None = None,
) -> list[FoldOutcome]:
    """Train several folds with joblib, ``jobs`` at a time, each on a free device of ``devices``;
    each fold logs to its own ``train.log``, and this process says as each fold ends an epoch. A failing fold
    is reported and does not stop the others. ``config.time_limit`` counts from ``started`` (``time.monotonic()``;
    None: now) for every fold: a fold whose turn comes when less is left than the longest epoch of this run's
    folds is not started. The workers exit within a second when this process dies."""
    from joblib import Parallel, delayed

    slots = [devices[index % len(devices)] for index in range(max(jobs, len(devices)))]
    config = open_training_data(config)[0]  # the class names, for the lines saying each fold's score
    values = asdict(config)
    flags = {"resume": resume, "overwrite": overwrite}
    started = time.monotonic() if started is None else started
    with tempfile.TemporaryDirectory(prefix="device-slots-") as slots_dir, fold_progress(config, folds):
        return Parallel(n_jobs=jobs, backend="loky")(
            delayed(_run_one_fold)(values, fold, slots_dir, slots, os.getpid(), flags, log_level, started)
            for fold in folds
        )
