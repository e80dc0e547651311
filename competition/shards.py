"""The test set on several devices at once, for every writer: shards cut at batch boundaries, a worker process per
device (or a Ray task), one finish."""

import contextlib
import itertools
import logging
import multiprocessing
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from competition import logs
from competition.clock import Deadline
from competition.errors import OutputError, ProjectError
from competition.files import no_space_left
from competition.inference import Ensemble, load_member, log_stopped, log_written, validation_shape
from competition.layouts import open_data_as
from competition.prediction import setup_device
from competition.prediction_stream import image_batches, predict_into
from competition.workers import stop_when_orphaned
from competition.writers import Output, no_space_message

logger = logging.getLogger(__name__)


class ShardsFailed(Exception):
    """Some shards failed (each reported in a line of its own); the rows of every shard are kept for --resume."""


def shard_bounds(n_images: int, n_shards: int, batch_size: int) -> list[tuple[int, int]]:
    """``n_shards`` contiguous (start, end) ranges covering ``n_images`` in order, as equal as whole batches allow.

    Every cut falls on a multiple of ``batch_size``, so each batch holds the same images as in a run on one
    device: CPU convolutions may differ in the last bits with the composition of a batch, and the files
    are compared byte for byte. A shard is empty only when there are fewer batches than shards.
    """
    n_batches = -(-n_images // batch_size)
    cuts = [min(index * n_batches // n_shards * batch_size, n_images) for index in range(n_shards + 1)]
    return list(itertools.pairwise(cuts))


@dataclass
class ShardSettings:
    """What every shard worker predicts with: the same for all of them."""

    checkpoints: list[str]
    data_dir: str
    test_images: str | None
    output: Output
    tta: tuple[str, ...]
    precision: str
    compile: bool
    threshold: float
    batch_size: int
    workers: int
    time_limit: float | None
    started: float  # time.monotonic() at the command's start: the clock is system-wide, so workers share it
    log_level: int = logging.INFO
    progress: bool = True


@dataclass
class ShardJob:
    """Shard ``index`` of ``count``: its batches of images, predicted on ``device`` into ``path`` (a row file, or the
    mask folder every shard shares)."""

    index: int
    count: int
    device: str
    batches: list[list[str]]
    path: str
    threads: int | None  # torch threads on a CPU shared by several shards
    workers: int  # its part of --workers (image decoding processes and RLE threads): the shards share the CPU

    @property
    def label(self) -> str:
        return f"{self.device} shard {self.index}/{self.count}"

    @property
    def images(self) -> int:
        return sum(map(len, self.batches))


def predict_shard(job: ShardJob, settings: ShardSettings, resume: bool = False) -> dict:
    """Predict ``job``'s images in this process into its shard (``resume``: keeping what an earlier attempt wrote
    there); {"finished": bool, "error": str | None, "seconds": float (predicting), "no_space": bool (the error is a
    full disk)}. The shard runner of every backend (local worker processes, Ray's tasks)."""
    outcome = {"finished": False, "error": None, "seconds": 0.0, "no_space": False}
    sink = None
    try:
        if job.threads:
            torch.set_num_threads(job.threads)
        device, precision = setup_device(job.device, settings.precision)
        members = [load_member(path, device, settings.compile) for path in settings.checkpoints]
        logger.info(
            "%s: %d test images on %s (worker process %d; --workers %d split across %d shards: %d here)",
            job.label,
            job.images,
            device,
            os.getpid(),
            settings.workers,
            job.count,
            job.workers,
        )
        data = open_data_as(members[0].config, settings.data_dir, test_images=settings.test_images)
        sink = settings.output.writer().sink(job.path, data, resume)
        batches = [kept for kept in ([i for i in batch if i not in sink.done] for batch in job.batches) if kept]
        _, outcome["seconds"], outcome["finished"] = predict_into(
            Ensemble(members, settings.tta, precision),
            data,
            batches,
            sink,
            settings.threshold,
            job.workers,
            settings.progress,
            label=job.label,
            position=job.index - 1,
            deadline=Deadline(settings.time_limit, settings.started),
            total=job.images,
            postprocess=settings.output.postprocess,
            tiling=settings.output.tiling,
        )
        sink.close(outcome["finished"])
    except Exception as error:  # noqa: BLE001 - reported to the driver; the other shards go on
        outcome["no_space"] = no_space_left(error)
        if outcome["no_space"] and sink is not None:
            with contextlib.suppress(OSError):  # what the full disk refused stays unwritten
                sink.close(False)
        if not outcome["no_space"] and not isinstance(error, ProjectError):
            traceback.print_exc()
        outcome["error"] = f"{type(error).__name__}: {error}"
    return outcome


def _run_shard(job: ShardJob, settings: ShardSettings, driver_pid: int, connection) -> None:
    """A local worker process: predicts its shard and sends the outcome to the driver."""
    stop_when_orphaned(driver_pid)
    logs.configure(settings.log_level)
    connection.send(predict_shard(job, settings))


def run_shards(jobs: list[ShardJob], settings: ShardSettings) -> list[dict]:
    """Each job in a worker process of its own, all at once; their outcomes in the order of ``jobs``. A worker
    that dies without a word (killed, out of host memory) is an outcome with an error too."""
    context = multiprocessing.get_context("spawn")  # a forked process cannot use CUDA
    running = []
    try:
        for job in jobs:
            receiver, sender = context.Pipe(duplex=False)
            worker = context.Process(target=_run_shard, args=(job, settings, os.getpid(), sender), name=job.label)
            worker.start()
            sender.close()  # the worker holds the only sending end: its death ends the wait below
            running.append((worker, receiver))
        outcomes = []
        for worker, receiver in running:
            try:
                outcomes.append(receiver.recv())
            except EOFError:
                worker.join()
                outcomes.append({"finished": False, "error": f"its worker process died (exit code {worker.exitcode})"})
            worker.join()
        return outcomes
    finally:  # the driver interrupted: its workers stop with it
        for worker, _ in running:
            if worker.is_alive():
                worker.terminate()
                worker.join()


def write_on_devices(
    ensemble_shape,
    data,
    devices: list[str],
    settings: ShardSettings,
    record: dict,
    resume: bool = False,
    overwrite: bool = False,
    run: Callable[[list[ShardJob], ShardSettings], list[dict]] = run_shards,
):
    """The test images still to predict cut into one shard per device (see ``shard_bounds``), each predicted by
    ``run`` (by default a worker process each, all at once; Ray's tasks with ``competition.cluster``) into its
    shard of ``settings.output``, then finished as one device's run is (rows gathered in submission order and
    validated; a mask folder checked complete); returns what the writer's ``finish`` returns. With ``resume``
    what an interrupted run wrote (whatever devices it ran on) is kept. Returns None when ``--time-limit``
    stopped the shards, what they wrote kept; raises ShardsFailed, each failure logged, when a shard failed.
    ``ensemble_shape``: the one image size of the models' data, or None (each image at its own)."""
    writer = settings.output.writer()
    order = writer.order(data)
    done = writer.begin(record, order, resume, overwrite)
    todo = [image_id for image_id in order if image_id not in done]
    in_order = ensemble_shape is not None or settings.output.tiling is not None  # slides: no header read here
    batches = image_batches(data, todo, "test", settings.batch_size, in_order)
    count = min(len(devices), len(batches))
    jobs = _jobs(writer, batches, devices[:count], settings)
    if jobs:
        logger.info(
            "%d test images to predict (%d kept from an interrupted run) in %d shard(s) on %s",
            len(todo),
            len(order) - len(todo),
            count,
            describe_devices(devices[:count]),
        )
    else:
        logger.info("nothing left to predict: all %d test images kept from an interrupted run", len(order))
    outcomes = run(jobs, settings)
    failed = [(job, outcome) for job, outcome in zip(jobs, outcomes) if outcome["error"]]
    if failed and all(outcome.get("no_space") for _, outcome in failed):  # one line, as on one device
        raise OutputError(no_space_message(writer, len(order)))
    for job, outcome in failed:
        logger.error(
            "%s: FAILED: %s; %s: run the same command with --resume to continue",
            job.label,
            outcome["error"],
            writer.kept_in(job.path, [image_id for batch in job.batches for image_id in batch]),
        )
    if failed:
        raise ShardsFailed(f"{len(failed)} of {len(jobs)} shard(s) failed")
    if not all(outcome["finished"] for outcome in outcomes):
        log_stopped(settings.output.path, writer.written(), len(order), Deadline(settings.time_limit, settings.started))
        return None
    shape = validation_shape(ensemble_shape, data, order, settings.output.tiling is not None)
    result = writer.finish(order, data, shape, in_order=False)
    # The shards predict at once: the longest one's prediction time (without spawning and model loading)
    # is the time the images took, as in the one-device run's line.
    log_written(writer.summary(result), len(todo), max((outcome["seconds"] for outcome in outcomes), default=0.0))
    return result


def describe_devices(devices: list[str]) -> str:
    """``cuda:0, cuda:1``; a device named more than once as ``3 x cpu`` (Ray's tasks each see one ``cuda``)."""
    if len(set(devices)) == len(devices):
        return ", ".join(devices)
    return ", ".join(f"{devices.count(device)} x {device}" for device in dict.fromkeys(devices))


def cpu_shard_threads(cpu_shards: int) -> int:
    """The torch threads of each of ``cpu_shards`` shards on the CPU: they share the cores, not oversubscribe them."""
    return max(1, (os.cpu_count() or 1) // max(1, cpu_shards))


def _jobs(writer, batches: list[list[str]], devices: list[str], settings: ShardSettings) -> list[ShardJob]:
    if not devices:  # nothing left to predict
        return []
    threads = cpu_shard_threads(sum(device.startswith("cpu") for device in devices))
    # Likewise the decoders of every shard share the cores: --workers in all, not per shard (0 stays 0: each
    # shard decodes in its own process)
    workers = max(1, settings.workers // max(1, len(devices))) if settings.workers else 0
    bounds = shard_bounds(len(batches), len(devices), 1)
    return [
        ShardJob(
            index,
            len(devices),
            device,
            batches[start:end],
            writer.target(index, len(devices)),
            threads if device.startswith("cpu") else None,
            workers,
        )
        for index, (device, (start, end)) in enumerate(zip(devices, bounds), start=1)
    ]
