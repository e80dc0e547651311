"""Data loading: CPU milliseconds per training sample and per step of it, measured side by side in one run.

    python -m bench.loader_bench --size 640x960 --data-dir input

One core, one process: what each DataLoader worker spends per image. Compares the JPEG decoded at
full size against the reduced DCT scale the loaders use, and the mask read from its GIF against
its row of train_masks.csv; then the whole augmented sample as train.py builds it.
"""

import argparse
import time

import cv2
import numpy as np
import torch

from competition.carvana import CarvanaData
from competition.config import TrainConfig, parse_size
from competition.data import SegmentationDataset, decode_image, resize_image
from competition.fold_data import train_transform


def milliseconds(function, items, repeats: int) -> float:
    """Best of ``repeats`` passes over ``items``, per item."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for item in items:
            function(item)
        best = min(best, (time.perf_counter() - started) / len(items))
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="640x960")
    parser.add_argument("--data-dir", default="input")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.size)
    cv2.setNumThreads(1)  # one core, as in a loader worker
    torch.set_num_threads(1)
    gifs, csv = CarvanaData(args.data_dir, mask_source="gif"), CarvanaData(args.data_dir, mask_source="csv")
    image_ids = gifs.train_ids()[: args.images]
    payloads = [gifs.train_images.read(f"{image_id}.jpg") for image_id in image_ids]
    shape = gifs.image_shape(image_ids[0])
    csv.read_mask(image_ids[0], shape)  # parse the CSV once, as each worker does before its first sample

    def full(payload):
        return resize_image(decode_image(payload, "bench"), size)

    def reduced(payload):
        return resize_image(decode_image(payload, "bench", reduce_to=size), size)

    rows = [
        ("image: full decode + resize", milliseconds(full, payloads, args.repeats)),
        ("image: reduced decode + resize (as loaded)", milliseconds(reduced, payloads, args.repeats)),
        ("mask: GIF (default)", milliseconds(lambda i: gifs.read_mask(i, shape), image_ids, args.repeats)),
        ("mask: train_masks.csv (--mask-source csv)", milliseconds(lambda i: csv.read_mask(i, shape), image_ids, 3)),
    ]
    transform = train_transform(TrainConfig(size=args.size))
    for label, data in (("GIF masks", gifs), ("CSV masks", csv)):
        dataset = SegmentationDataset(data, image_ids, size=size, transform=transform)
        rows.append((f"augmented sample, {label}", milliseconds(dataset.__getitem__, range(len(dataset)), 1)))
    difference = np.mean([np.abs(full(p).astype(int) - reduced(p)).mean() for p in payloads])
    print(f"{len(image_ids)} images of {shape[1]}x{shape[0]} from {args.data_dir} -> {size[0]}x{size[1]}, one core")
    for label, value in rows:
        print(f"{label:48}{value:8.2f} ms")
    print(f"full / reduced image: {rows[0][1] / rows[1][1]:.1f}x; GIF / CSV mask: {rows[2][1] / rows[3][1]:.0f}x")
    print(f"reduced vs full decode: {difference:.2f} grey levels apart on average")


if __name__ == "__main__":
    main()
