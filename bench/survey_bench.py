"""The pass before a fold's first step, side by side in one run: on a multi-class data set a check pass then a count
pass (each mask read twice, as before competition.survey); the survey on one thread and on its threads; and what
it costs against one epoch's data loading (every training sample read, resized to ``--epoch-size`` and augmented as
train.py's loaders do, on one thread).

    python -m bench.survey_bench                      # synthetic car parts at 2048x1024, made in a temporary folder
    python -m bench.survey_bench --data-dir input-parts
    python -m bench.survey_bench --data-dir input     # Carvana's layout: the check alone, as train.py runs it
    python -m bench.survey_bench --data-dir input --mask-source csv

Seconds are the best of ``--repeats`` passes, so files are in the page cache for each (a first pass from a cold
disk costs more in every variant).
"""

import argparse
import tempfile
import time

import cv2
import torch

from competition.config import TrainConfig, parse_size
from competition.data import SegmentationDataset
from competition.fold_data import train_transform
from competition.layouts import open_data
from competition.survey import survey, survey_threads
from competition.synthetic import generate_parts


def best_seconds(function, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def epoch_loading_seconds(data, image_ids: list[str], size: str) -> float:
    """One pass of a training loader's work over ``image_ids`` on this thread: read, resize, augment."""
    dataset = SegmentationDataset(
        data, image_ids, size=parse_size(size), transform=train_transform(TrainConfig(size=size))
    )
    started = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return time.perf_counter() - started


def measure(data_dir: str, repeats: int, epoch_size: str, mask_source: str = "auto") -> None:
    cv2.setNumThreads(1)  # the threads are the survey's, not OpenCV's
    torch.set_num_threads(1)
    data = open_data(data_dir, mask_source=mask_source)
    image_ids = data.train_ids()
    threads = survey_threads()
    count = data.masks_to_count(len(image_ids), len(image_ids), False)  # as train.py counts, without weights

    def two_passes():
        for image_id in image_ids:
            data.check_sample(image_id)
        for image_id in image_ids:
            data.class_pixel_counts(image_id)

    def surveyed(threads: int):
        return best_seconds(
            lambda: survey(data, image_ids, check=True, count=count, threads=threads, progress=False), repeats
        )

    rows = [] if data.fixed_classes else [("check pass, then count pass (before)", best_seconds(two_passes, repeats))]
    rows += [("survey, 1 thread", surveyed(1)), (f"survey, {threads} threads (as train.py runs it)", surveyed(threads))]
    epoch = epoch_loading_seconds(data, image_ids, epoch_size)
    height, width = data.image_shape(image_ids[0])
    masks = f", masks from {data.mask_source}" if isinstance(data.mask_source, str) else ""
    print(f"{len(image_ids)} labelled images of {width}x{height}, {data.num_classes} classes{masks}, {data_dir}")
    print(f"{'variant':48s} {'seconds':>8s} {'ms/img':>8s} {'speed-up':>9s} {'of epoch':>9s}")
    for name, seconds in rows:
        print(
            f"{name:48s} {seconds:8.2f} {1000 * seconds / len(image_ids):8.1f} {rows[0][1] / seconds:8.2f}x "
            f"{100 * seconds / epoch:8.1f}%"
        )
    print(
        f"{f'one epoch of data loading at {epoch_size}, 1 thread':48s} {epoch:8.2f} {1000 * epoch / len(image_ids):8.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="a data set of any layout (default: synthetic car parts, made here)")
    parser.add_argument("--size", default="2048x1024", help="WIDTHxHEIGHT of the synthetic images")
    parser.add_argument("--cars", type=int, default=6, help="synthetic cars (16 views each)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mask-source", default="auto", help="Carvana's masks: gif or csv (default: gif when present)")
    parser.add_argument(
        "--epoch-size", default="1024x1536", help="HEIGHTxWIDTH of the epoch's inputs (train.py's default)"
    )
    args = parser.parse_args()
    if args.data_dir:
        measure(args.data_dir, args.repeats, args.epoch_size, args.mask_source)
        return
    width, height = (int(side) for side in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="survey-bench-") as folder:
        generate_parts(folder, cars=args.cars, test_cars=1, width=width, height=height, seed=0)
        measure(folder, args.repeats, args.epoch_size)


if __name__ == "__main__":
    main()
