"""The pass before a fold's first step on a multi-class data set, side by side in one run: a check pass then a count
pass (each mask read twice, as before competition.survey), the survey on one thread, and the survey on its threads.

    python -m bench.survey_bench                      # synthetic car parts at 2048x1024, made in a temporary folder
    python -m bench.survey_bench --data-dir input-parts

Seconds are the best of ``--repeats`` passes, so files are in the page cache for each (a first pass from a cold
disk costs more in every variant).
"""

import argparse
import tempfile
import time

import cv2

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


def measure(data_dir: str, repeats: int) -> None:
    cv2.setNumThreads(1)  # the threads are the survey's, not OpenCV's
    data = open_data(data_dir)
    image_ids = data.train_ids()
    threads = survey_threads()

    def two_passes():
        for image_id in image_ids:
            data.check_sample(image_id)
        for image_id in image_ids:
            data.class_pixel_counts(image_id)

    rows = [
        ("check pass, then count pass (before)", best_seconds(two_passes, repeats)),
        (
            "survey, 1 thread",
            best_seconds(
                lambda: survey(data, image_ids, check=True, count=len(image_ids), threads=1, progress=False), repeats
            ),
        ),
        (
            f"survey, {threads} threads (as train.py runs it)",
            best_seconds(
                lambda: survey(data, image_ids, check=True, count=len(image_ids), threads=threads, progress=False),
                repeats,
            ),
        ),
    ]
    height, width = data.image_shape(image_ids[0])
    print(f"{len(image_ids)} labelled images of {width}x{height}, {data.num_classes} classes, {data_dir}")
    print(f"{'variant':48s} {'seconds':>8s} {'ms/img':>8s} {'speed-up':>9s}")
    for name, seconds in rows:
        print(f"{name:48s} {seconds:8.2f} {1000 * seconds / len(image_ids):8.1f} {rows[0][1] / seconds:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="a data set of any layout (default: synthetic car parts, made here)")
    parser.add_argument("--size", default="2048x1024", help="WIDTHxHEIGHT of the synthetic images")
    parser.add_argument("--cars", type=int, default=6, help="synthetic cars (16 views each)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.data_dir:
        measure(args.data_dir, args.repeats)
        return
    width, height = (int(side) for side in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="survey-bench-") as folder:
        generate_parts(folder, cars=args.cars, test_cars=1, width=width, height=height, seed=0)
        measure(folder, args.repeats)


if __name__ == "__main__":
    main()
