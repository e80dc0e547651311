"""RLE speed: the numba encoder/decoder against the public kernels' numpy functions, in one run.

    python -m bench.rle_bench [--repeats 200]

Masks are real-size (1918x1280) renders of synthetic cars; each figure is the median over
repeats and masks. Outputs are checked equal before anything is timed.
"""

import argparse
import statistics
import time

import numpy as np

from competition.rle import rle_decode, rle_decode_numpy, rle_encode, rle_encode_numpy
from competition.synthetic import make_car, render


def car_masks(count: int, width: int = 1918, height: int = 1280) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [render(make_car(rng), rng.uniform(0, 2 * np.pi), width, height, rng, index)[1] for index in range(count)]


def median_ms(function, arguments: list[tuple], repeats: int) -> float:
    for args in arguments:
        function(*args)  # warm-up: numba compiles or loads its cache here
    times = []
    for _ in range(repeats):
        for args in arguments:
            start = time.perf_counter()
            function(*args)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--masks", type=int, default=4)
    args = parser.parse_args()
    masks = car_masks(args.masks)
    rles = [rle_encode_numpy(mask) for mask in masks]
    for mask, rle in zip(masks, rles):
        assert rle_encode(mask) == rle, "encoders disagree"
        assert np.array_equal(rle_decode(rle, mask.shape), rle_decode_numpy(rle, mask.shape)), "decoders disagree"
    rows = [
        (
            "encode",
            median_ms(rle_encode_numpy, [(m,) for m in masks], args.repeats),
            median_ms(rle_encode, [(m,) for m in masks], args.repeats),
        ),
        (
            "decode",
            median_ms(rle_decode_numpy, [(r, m.shape) for r, m in zip(rles, masks)], args.repeats),
            median_ms(rle_decode, [(r, m.shape) for r, m in zip(rles, masks)], args.repeats),
        ),
    ]
    runs = statistics.mean(len(rle.split()) // 2 for rle in rles)
    print(f"{len(masks)} car masks of 1918x1280, {runs:.0f} runs each on average, median of {args.repeats} repeats")
    print(f"{'':8}{'numpy ms':>10}{'numba ms':>10}{'speed-up':>10}")
    for name, baseline, ours in rows:
        print(f"{name:8}{baseline:10.3f}{ours:10.3f}{baseline / ours:9.1f}x")


if __name__ == "__main__":
    main()
