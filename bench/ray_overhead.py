"""What --backend ray costs before any work, beside the local path's own start, in one run.

    python -m bench.ray_overhead [--address auto] [--warm 20]

Joining the cluster (``ray.init``: starting a local one when there is none, and shipping the project's code), the
first wave of tasks (one per free slot: a new worker process each, which imports the training module as a fold's task
does), later tasks on the warm workers (median round trip of a task that returns at once), and, side by side, a local
worker process started and importing the same module, as ``train.py --folds`` and ``infer.py --devices`` start theirs.
"""

import argparse
import multiprocessing
import statistics
import time

from competition.cluster import connect


def import_training() -> float:
    """What a fold's or shard's worker does first: import the training module (torch, smp, timm)."""
    started = time.perf_counter()
    import competition.training  # noqa: F401

    return time.perf_counter() - started


def noop() -> None:
    return None


def local_process_start() -> float:
    """A spawned process that imports the training module and ends: the local backends' worker start."""
    context = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    with context.Pool(1) as pool:
        pool.apply(import_training)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="a running cluster (auto, ray://head:10001); default: ray.init's own")
    parser.add_argument("--warm", type=int, default=20, help="tasks timed one after another on warm workers")
    args = parser.parse_args()
    local = local_process_start()
    started = time.perf_counter()
    cluster = connect(args.address)
    joined = time.perf_counter() - started
    ray = cluster.ray
    first = ray.remote(import_training).options(**cluster.resources)
    started = time.perf_counter()
    imports = ray.get([first.remote() for _ in range(cluster.slots)])
    first_wave = time.perf_counter() - started
    task = ray.remote(noop).options(**cluster.resources)
    warm = []
    for _ in range(args.warm):
        started = time.perf_counter()
        ray.get(task.remote())
        warm.append(time.perf_counter() - started)
    print(f"Ray cluster: {cluster.slots} slot(s) of one {'GPU' if cluster.gpus else 'CPU'}")
    print(f"{'what':58}{'seconds':>10}")
    print(f"{'join the cluster (ray.init, code shipped)':58}{joined:>10.2f}")
    print(f"{f'first wave: {cluster.slots} new worker(s) importing the training module':58}{first_wave:>10.2f}")
    print(f"{'  of which the import, in the slowest worker':58}{max(imports):>10.2f}")
    print(f"{f'a task on a warm worker (median of {args.warm})':58}{statistics.median(warm):>10.4f}")
    print(f"{'local: a spawned process importing the training module':58}{local:>10.2f}")
    print(f"Ray's start before the first task's work: {joined + first_wave:.2f} s, local {local:.2f} s "
          f"({(joined + first_wave) / local:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
