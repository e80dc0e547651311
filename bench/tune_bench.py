"""The post-processing search (``infer.py --oof --tune``) on out-of-fold probabilities of 1000 synthetic images at
256x256, 3 classes, most images empty of the rarer classes: its time (wall clock and CPU, with the load average:
the machine may be shared), to stay under a minute on a 2-core CPU.

    python -m bench.tune_bench [--images 1000] [--size 256]
"""

import argparse
import os
import time

import numpy as np
from scipy import ndimage

from competition.postprocess import OutOfFoldStore, tune

CLASSES = ("common", "rare", "rarest")
PRESENT = (0.7, 0.3, 0.1)  # the share of images holding each class


def blobs(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """(count, size, size) boolean masks of 1 to 3 discs each."""
    rows, cols = np.mgrid[:size, :size]
    masks = np.zeros((count, size, size), dtype=bool)
    for mask in masks:
        for _ in range(rng.integers(1, 4)):
            row, col, radius = rng.integers(0, size, 2).tolist() + [int(rng.integers(size // 16, size // 5))]
            mask |= (rows - row) ** 2 + (cols - col) ** 2 < radius**2
    return masks


def synthetic_batch(rng: np.random.Generator, count: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (count, 3, size, size) float32, packed multilabel truth (count, size, size) uint8): the
    truth blurred and noised, with small false-positive specks on images where a class is absent."""
    truth = np.zeros((count, size, size), dtype=np.uint8)
    probabilities = np.empty((count, len(CLASSES), size, size), dtype=np.float32)
    for index, share in enumerate(PRESENT):
        present = rng.random(count) < share
        masks = blobs(rng, count, size) & present[:, None, None]
        truth |= masks.astype(np.uint8) << index
        specks = rng.random((count, size, size)) < 0.0005
        noisy = masks + 0.8 * ndimage.grey_dilation(specks, size=(1, 5, 5)) + rng.normal(0, 0.15, masks.shape)
        probabilities[:, index] = np.clip(ndimage.uniform_filter(noisy.astype(np.float32), (1, 5, 5)), 0, 1)
    return probabilities, truth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    store = OutOfFoldStore("multilabel", len(CLASSES), 255)
    for start in range(0, args.images, 100):
        store.add(*synthetic_batch(rng, min(100, args.images - start), args.size))
    load = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    _, table = tune(store, list(CLASSES), 0.5)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    print(table.to_string(index=False, float_format=lambda value: f"{value:.4f}"))
    print(
        f"tuning search: {args.images} images {args.size}x{args.size}, {len(CLASSES)} classes in {seconds:.1f} s "
        f"({cpu_seconds:.1f} s of CPU) on {os.cpu_count()} CPU(s), load average {load:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end"
    )


if __name__ == "__main__":
    main()
