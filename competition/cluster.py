"""Folds and test shards as Ray tasks (``--backend ray``): the local paths' own fold and shard runners, placed by
Ray on whatever node has a free GPU (or CPU), and run again from their checkpoints when a worker is lost."""

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import competition
from competition import logs
from competition.config import config_from
from competition.errors import ConfigError, ProjectError
from competition.files import exclusive_lock
from competition.fold_data import open_training_data
from competition.fold_runner import FoldOutcome, fold_progress, run_fold_on
from competition.run_folder import LOCK_NAME as RUN_LOCK_NAME
from competition.shards import predict_shard

logger = logging.getLogger(__name__)

INSTALL = "pip install -r requirements-cluster.txt"
BACKENDS = ("local", "ray")
ATTEMPTS_PREFIX, LOCK_NAME = ".ray-attempts-", ".driver.lock"


class ClusterError(ProjectError):
    """The Ray cluster cannot be reached or used as asked."""


def add_cluster_arguments(parser: argparse.ArgumentParser, unit: str) -> None:
    group = parser.add_argument_group("beyond one machine (Ray)")
    group.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help=f"local (default): this machine's devices; ray: each {unit} a Ray task on a free GPU of the cluster "
        f"(CPU when it has none); needs {INSTALL}",
    )
    group.add_argument(
        "--address",
        help="--backend ray: the cluster, auto (one started with ray start on this machine) or ray://head:10001 "
        "(default: a cluster started on this machine, else a new one for this run alone)",
    )
    group.add_argument(
        "--retries",
        type=int,
        help=f"--backend ray: times a {unit} whose worker died (a lost machine, killed) is run again (default: 2)",
    )


def check_cluster_arguments(args: argparse.Namespace, local_flags: dict[str, object]) -> None:
    """One line for Ray's flags without ``--backend ray``, or the local path's flags (``local_flags``: flag ->
    value given) with it; fills in ``--retries``."""
    if args.backend != "ray":
        given = [
            flag for flag, value in (("--address", args.address), ("--retries", args.retries)) if value is not None
        ]
        if given:
            raise ConfigError(f"{given[0]} is for --backend ray")
        return
    given = [flag for flag, value in local_flags.items() if value is not None]
    if given:
        raise ConfigError(f"{given[0]} is for the local backend; Ray places each task on a free device itself")
    if args.retries is None:
        args.retries = 2
    if args.retries < 0:
        raise ConfigError(f"--retries {args.retries}: must be at least 0")
    require_ray()  # before any data or checkpoint is read


def ray_importable() -> bool:
    try:
        require_ray()
    except ConfigError:
        return False
    return True


def _node_address() -> str:
    """The IP address of the node this task runs on, as Ray knows it."""
    import ray

    return ray.util.get_node_ip_address()


def require_ray():
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--backend ray needs Ray, which the plain install leaves out: {INSTALL}") from None
    return ray


@dataclasses.dataclass
class Cluster:
    """A connection to a Ray cluster and what each task asks of it: one GPU when the cluster has any, else one CPU."""

    ray: object
    gpus: float
    cpus: float

    @property
    def resources(self) -> dict:
        return {"num_gpus": 1, "num_cpus": 1} if self.gpus else {"num_cpus": 1}

    @property
    def device(self) -> str:
        """What each task predicts or trains on: Ray shows a GPU task only its own GPU, as cuda:0."""
        return "cuda:0" if self.gpus else "cpu"

    @property
    def slots(self) -> int:
        """Tasks that can run at once."""
        return int(self.gpus or self.cpus)


def connect(address: str | None) -> Cluster:
    """Connect to the cluster at ``address`` (None: ray.init's own choice), shipping this project's code to it."""
    ray = require_ray()
    started = time.perf_counter()
    if not ray.is_initialized():
        _check_answers(address)
        # The code travels with the job: the nodes need the same Python packages, not a copy of this checkout.
        runtime_env = {"py_modules": [str(Path(competition.__file__).parent)]}
        try:
            # Workers' own output stays on their nodes: folds log to their train.log, shards report to the driver.
            with warnings.catch_warnings():  # Ray's client warns in two lines before the error said below
                warnings.simplefilter("ignore", UserWarning)
                ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as error:
            raise ClusterError(
                f"--address {address}: no Ray cluster answers there ({error}); start one with ray start --head, "
                "or leave --address out for one on this machine alone"
            ) from None
        except ValueError as error:  # Ray's word on an address it cannot parse or a client it cannot make
            raise ClusterError(f"--address {address}: {error}; e.g. auto, head:6379 or ray://head:10001") from None
    resources = ray.cluster_resources()
    cluster = Cluster(ray, resources.get("GPU", 0.0), resources.get("CPU", 0.0))
    logger.info(
        "Ray cluster: %d node(s), %g CPU(s), %g GPU(s), joined in %.1f s; each task asks for %s",
        len([node for node in ray.nodes() if node.get("Alive")]),
        cluster.cpus,
        cluster.gpus,
        time.perf_counter() - started,
        "one GPU" if cluster.gpus else "one CPU (the cluster has no GPU)",
    )
    return cluster


def _check_answers(address: str | None, seconds: float = 10.0) -> None:
    """One line when nothing listens at a ``host:port`` address: Ray itself retries such an address for minutes.
    ``auto`` and Ray's default say what is wrong with them themselves."""
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=seconds):
            pass
    except OSError as error:
        raise ClusterError(
            f"--address {address}: nothing answers there ({error.strerror or error}); start the head there with "
            f"ray start --head --{'ray-client-server-' if '://' in address else ''}port {port}, or give the head's "
            "host:port (auto on a machine of the cluster)"
        ) from None


def wall_clock(started: float) -> float:
    """A ``time.monotonic()`` reading of this machine as ``time.time()``: other machines' monotonic clocks differ."""
    return time.time() - (time.monotonic() - started)


def monotonic_here(started_wall: float) -> float:
    """The reverse of ``wall_clock``, on the machine a task runs on."""
    return time.monotonic() - (time.time() - started_wall)


def claim_attempt(folder: str, key: str, device: str) -> int:
    """In a task: record this attempt of ``key`` (what the lines call the task, e.g. ``fold 0``) in the driver's
    attempts folder; its number, 1 for the first. Each number is claimed by creating its file exclusively, which
    holds on a shared file system whose folder listings may be stale."""
    if not Path(folder).is_dir():
        raise ClusterError(
            f"node {_node_address()} does not see {folder}: the output folder must be on storage that every node "
            "sees (a shared file system, at the same path on each)"
        )
    record = json.dumps({"node": _node_address(), "device": device, "pid": os.getpid()})
    number = 1
    while True:
        try:
            with open(Path(folder) / f"{key}.{number}.json", "x") as claimed:
                claimed.write(record)
            return number
        except FileExistsError:
            number += 1


class Attempts:
    """The driver's side of the attempts record: a folder in the output folder, which every node must see, where
    each task's attempts are claimed (``claim_attempt``). A task knows from it that it is a retry, and so resumes;
    the driver says each start and retry from it."""

    def __init__(self, parent: Path, retries: int, retry_means: str):
        self.folder = Path(parent) / f"{ATTEMPTS_PREFIX}{uuid.uuid4().hex[:8]}"
        try:
            self.folder.mkdir(parents=True)
        except OSError as error:
            raise ClusterError(
                f"cannot write to {parent} ({error.strerror}): the output folder must be writable storage that every "
                "node sees (a shared file system, at the same path on each)"
            ) from None
        self.retries, self.retry_means = retries, retry_means
        self.said: set = set()
        self.saying = threading.Lock()  # the watching thread and the driver's own calls of look()
        self.held = contextlib.ExitStack()  # the folder's lock, held by this driver until it is done
        self.held.enter_context(exclusive_lock(self.folder / LOCK_NAME))
        _remove_abandoned(Path(parent))

    def seen(self) -> dict[tuple[str, int], dict]:
        """(key, attempt number) -> its record, for every record written whole."""
        found = {}
        for path in self.folder.glob("*.json"):
            key, _, number = path.stem.rpartition(".")
            with contextlib.suppress(OSError, TypeError, ValueError):  # one still being written: read next time
                record = json.loads(path.read_text())
                if {"node", "device", "pid"} <= set(record):
                    found[key, int(number)] = record
        return found

    def where(self, key: str) -> str:
        """The node and device of ``key``'s latest attempt."""
        attempts = {number: record for (seen_key, number), record in self.seen().items() if seen_key == key}
        if not attempts:
            return "an unknown node"
        record = attempts[max(attempts)]
        return f"node {record['node']}, {record['device']}"

    def look(self) -> None:
        """A line for each attempt begun since the last look."""
        with self.saying:
            for (key, number), record in sorted(self.seen().items()):
                if (key, number) in self.said:
                    continue
                self.said.add((key, number))
                where = f"node {record['node']}, {record['device']} (Ray worker process {record['pid']})"
                if number == 1:
                    logger.info("%s: started on %s", key, where)
                else:
                    logger.warning(
                        "%s: retry %d of %d on %s: attempt %d's worker died; %s",
                        *(key, number - 1, self.retries, where, number - 1, self.retry_means),
                    )

    @contextlib.contextmanager
    def watched(self, interval: float = 0.5) -> Iterator[None]:
        """``look()`` every ``interval`` seconds until the block ends; then the folder is removed."""
        try:
            with logs.said_every(interval, self.look, "ray-attempts"):
                yield
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.held.close()


def _remove_abandoned(parent: Path) -> None:
    """The attempts folders of drivers that died before removing theirs (their lock is free)."""
    for folder in parent.glob(f"{ATTEMPTS_PREFIX}*"):
        with contextlib.suppress(OSError), exclusive_lock(folder / LOCK_NAME) as free:  # OSError: removed meanwhile
            if free:
                shutil.rmtree(folder, ignore_errors=True)


def _enter(cwd: str, attempts: str, key: str, device: str) -> int:
    """A task's first steps: the driver's working folder (so relative paths mean the same), its attempt number."""
    if not Path(cwd).is_dir():
        raise ClusterError(
            f"node {_node_address()} has no folder {cwd}, where the command was run: run it from a "
            "folder that every node sees at the same path"
        )
    os.chdir(cwd)
    return claim_attempt(attempts, key, device)


def _failure(error: Exception, retries: int) -> str:
    """One line for a task that failed for good: its own exception (which Ray does not retry), or the death of its
    worker on every try."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        lines = str(cause).strip().splitlines() or [""]
        return f"its Ray task raised {type(cause).__name__}: {lines[0]}"
    lines = str(error).strip().splitlines() or [""]
    return f"its Ray task failed {retries + 1} time(s): {lines[0]}"


def _gather_as_they_finish(cluster: Cluster, tasks: dict, attempts: Attempts, summary, say_pending) -> dict:
    """The results of ``tasks`` (Ray object reference -> its key in ``attempts``), each said as it comes with
    ``summary(result)`` -> (ok, text), after the lines still pending (``say_pending()``, then the attempts' own).
    A task that failed for good is its exception."""
    ray, results, pending = cluster.ray, {}, list(tasks)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        say_pending()
        attempts.look()
        key, where, counted = tasks[ready[0]], attempts.where(tasks[ready[0]]), f"({len(results) + 1} of {len(tasks)})"
        try:
            results[ready[0]] = ray.get(ready[0])
        except ray.exceptions.RayError as error:
            results[ready[0]] = error
            logger.error("%s: failed for good on %s: %s %s", key, where, _failure(error, attempts.retries), counted)
            continue
        ok, text = summary(results[ready[0]])
        (logger.info if ok else logger.error)(
            "%s: %s on %s: %s %s", key, "finished" if ok else "FAILED", where, text, counted
        )
    return results


# Folds ---------------------------------------------------------------------------------------------------------------


def _fold_task(config_values, fold, flags, log_level, started_wall, cwd, attempts, device):
    try:
        attempt = _enter(cwd, attempts, f"fold {fold}", device)
    except ClusterError as error:
        return FoldOutcome(fold, False, f"ClusterError: {error}", "none: the fold did not start")
    if attempt > 1:  # an earlier attempt's process died: go on from its last.pt, not from scratch
        flags = {"resume": True, "overwrite": False}
        _wait_for_the_lost_attempt(config_from({**config_values, "fold": fold}).run_dir())
    return run_fold_on(config_values, fold, device, flags, log_level, monotonic_here(started_wall))


def _wait_for_the_lost_attempt(run_dir: Path, seconds: float = 180.0) -> None:
    """Until the run folder's lock is free: a network file system keeps the lock of a lost machine's process until
    its lease runs out (NFSv4: 90 s by default), and Ray may retry sooner. Past ``seconds`` the fold's own check
    says who holds it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), exclusive_lock(run_dir / RUN_LOCK_NAME) as free:
            if free:
                return
        time.sleep(2.0)


def _fold_summary(outcome: FoldOutcome) -> tuple[bool, str]:
    return outcome.ok, outcome.message


def train_folds_on_ray(
    config, folds: list[int], *, address, retries: int, resume: bool, overwrite: bool, log_level: int, started: float
) -> list[FoldOutcome]:
    """``train_folds`` on a Ray cluster: each fold a task with one GPU (or CPU), retried ``retries`` times from its
    own last.pt when its worker dies; the outcomes in the order of ``folds``."""
    cluster = connect(address)
    config = open_training_data(config)[0]  # the class names, for the lines saying each fold's score
    attempts = Attempts(Path(config.out), retries, "resuming from its last.pt")
    task = cluster.ray.remote(_fold_task)
    values, flags, cwd = dataclasses.asdict(config), {"resume": resume, "overwrite": overwrite}, os.getcwd()
    logger.info(
        "%d fold(s) as Ray tasks, %d at a time at most; logs in %s/fold<N>/train.log",
        len(folds),
        cluster.slots,
        config.out,
    )
    with attempts.watched(), fold_progress(config, folds) as progress:
        tasks = {
            task.options(**cluster.resources, max_retries=retries, name=f"fold{fold}").remote(
                values, fold, flags, log_level, wall_clock(started), cwd, str(attempts.folder), cluster.device
            ): f"fold {fold}"
            for fold in folds
        }
        results = _gather_as_they_finish(cluster, tasks, attempts, _fold_summary, progress.look)
    outcomes = []
    for fold, result in zip(folds, (results[ref] for ref in tasks)):
        if isinstance(result, Exception):
            log = str(Path(config.out) / f"fold{fold}" / "train.log")
            result = FoldOutcome(fold, False, _failure(result, retries), log)
        outcomes.append(result)
    return outcomes


# Test shards ---------------------------------------------------------------------------------------------------------


def _shard_task(job, settings, started_wall, cwd, attempts):
    logs.configure(settings.log_level)
    try:
        attempt = _enter(cwd, attempts, f"shard {job.index} of {job.count}", job.device)
    except ClusterError as error:
        return {"finished": False, "error": f"ClusterError: {error}", "seconds": 0.0}
    if attempt > 1 and Path(job.path).is_file():  # the lost attempt finished its file (renamed when complete)
        return {"finished": True, "error": None, "seconds": 0.0}
    import ray

    threads = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    job = dataclasses.replace(job, threads=threads if job.device == "cpu" else None)
    settings = dataclasses.replace(settings, started=monotonic_here(started_wall))
    return predict_shard(job, settings, resume=attempt > 1)  # a retry keeps the rows its shard file holds


def _shard_summary(outcome: dict) -> tuple[bool, str]:
    if outcome["error"]:
        return False, outcome["error"]
    done = "complete" if outcome["finished"] else "stopped by the time limit"
    return True, f"{done}, {outcome['seconds']:.1f} s predicting"


def shard_runner(cluster: Cluster, out: Path, retries: int):
    """A ``run`` for ``write_on_devices``: each shard a Ray task with one GPU (or CPU)."""

    def run(jobs, settings) -> list[dict]:
        if not jobs:
            return []
        attempts = Attempts(Path(out).parent, retries, "keeping the rows its shard file holds")
        started_wall = wall_clock(settings.started)
        settings = dataclasses.replace(settings, progress=False)  # tqdm through Ray's log forwarding is noise
        task = cluster.ray.remote(_shard_task)
        with attempts.watched():
            tasks = {
                task.options(**cluster.resources, max_retries=retries, name=f"shard{job.index}of{job.count}").remote(
                    job, settings, started_wall, os.getcwd(), str(attempts.folder)
                ): f"shard {job.index} of {job.count}"
                for job in jobs
            }
            results = _gather_as_they_finish(cluster, tasks, attempts, _shard_summary, lambda: None)
        return [
            {"finished": False, "error": _failure(result, retries), "seconds": 0.0}
            if isinstance(result, Exception)
            else result
            for result in (results[ref] for ref in tasks)
        ]

    return run
