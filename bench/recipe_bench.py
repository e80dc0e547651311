"""Recipes side by side in one run: train.py (its defaults, and variants given as flags) against the plain loop.

    python -m bench.recipe_bench -- --config configs/cpu_parts.toml --epochs 8
    python -m bench.recipe_bench --variant "median weights=--class-weights median" -- --config configs/camvid.toml

Everything after ``--`` is train.py's flags, shared by every variant; the plain loop (bench/plain_loop.py) trains
the same Unet encoder on the same fold's images at the same size, epochs, batch size and CPU threads. Both are
scored here, by one confusion matrix over the labelled pixels at full resolution, on the fold's validation images
(numpy, apart from competition.metrics, so that it checks train.py's own validation scores too):
the model after its last epoch, so no recipe picks its epoch on what it is scored on. ``--test`` scores the test
masks as well: for the README's table, once the recipe was chosen on validation.
"""

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import train
from bench.plain_loop import train_plain
from competition.config import resolve_config
from competition.data import SegmentationDataset, resize_image, to_chw
from competition.files import atomic_output
from competition.fold_data import fold_ids, open_training_data
from competition.inference import load_member


def confusion(predict, data, image_ids: list[str], size, split: str, ignore_index: int) -> np.ndarray:
    """(true class, predicted class) pixel counts of ``predict`` (uint8 batch -> logits) over the labelled pixels,
    the logits resized to each mask's full resolution."""
    classes = data.num_classes
    counts = np.zeros(classes * classes, dtype=np.int64)
    with torch.inference_mode():
        for image_id in image_ids:
            image, truth = data.read_image(image_id, split=split), data.read_mask(image_id, split=split)
            logits = predict(to_chw(resize_image(image, size) if size else image)[None])
            logits = F.interpolate(logits.float(), size=truth.shape, mode="bilinear", align_corners=False)
            predicted = logits.argmax(1)[0].numpy()
            labelled = truth != ignore_index
            counts += np.bincount(
                truth[labelled].astype(np.int64) * classes + predicted[labelled], minlength=classes**2
            )
    return counts.reshape(classes, classes)


def class_iou(matrix: np.ndarray) -> np.ndarray:
    """Each class's IoU; NaN for a class neither true nor predicted anywhere."""
    true_positives = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - true_positives
    return np.divide(true_positives, union, out=np.full(len(union), np.nan), where=union > 0)


def train_variant(name: str, flags: list[str], shared: list[str], work_dir: Path, threads: int) -> tuple[Path, float]:
    """(its last.pt, wall seconds) of train.py with the shared flags and the variant's, in its own run folder: the
    whole process, its start, validation each epoch and checkpoints included."""
    out = work_dir / name.replace(" ", "_")
    command = [sys.executable, "train.py", *shared, *flags, "--out", str(out), "--overwrite", "--quiet"]
    started = time.perf_counter()
    with open(work_dir / f"{out.name}.log", "w") as log:
        code = subprocess.call(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
        )
    if code != 0:
        sys.exit(f"{name}: train.py exited {code}; see {work_dir / f'{out.name}.log'}")
    return next(out.glob("fold*/last.pt")), time.perf_counter() - started


def training_images_per_second(checkpoint: Path) -> float:
    """train.py's img/s over its epochs' training steps alone (log.csv's train_img_per_s): without its start,
    validation and checkpoints, as the plain loop, which validates nothing and keeps no checkpoint, is timed. The
    harmonic mean: every epoch trains as many images, so it is images over seconds."""
    rates = pd.read_csv(checkpoint.parent / "log.csv")["train_img_per_s"]
    return float(len(rates) / (1 / rates).sum())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split_at = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variant", action="append", default=[], help="NAME=train.py flags, e.g. 'weights=--class-weights median'"
    )
    parser.add_argument("--no-defaults", action="store_true", help="leave out train.py with no flags of its own")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of each (default: all)")
    parser.add_argument("--plain-lr", type=float, default=2e-3, help="the plain loop's peak rate")
    parser.add_argument(
        "--test",
        action="store_true",
        help="score the test masks too, into <work-dir>/test.md, not printed: read it once the recipe is chosen",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("runs/recipe_bench"))
    args = parser.parse_args(argv[:split_at])
    shared = argv[split_at + 1 :]
    config = resolve_config(train.build_parser().parse_args(shared))
    if config.arch != "Unet":
        sys.exit("the plain loop trains a Unet: give --arch Unet (the default)")
    config, data = open_training_data(config)
    train_ids, val_ids = fold_ids(config, data)
    if args.test and not data.test_mask_ids():
        sys.exit(
            f"--test: {config.data_dir} has no test masks (name a test split with masks: --split test=IMAGES:MASKS)"
        )
    args.work_dir.mkdir(parents=True, exist_ok=True)
    with cpu_threads(args.threads):
        compare(args, shared, config, data, train_ids, val_ids)


@contextlib.contextmanager
def cpu_threads(count: int):
    """torch's CPU threads set to ``count``, then set back: a caller's process (the tests') keeps its own."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compare(args, shared: list[str], config, data, train_ids: list[str], val_ids: list[str]) -> None:
    """Train every variant and the plain loop, then print (and write, for the test set) their tables."""
    size, ignore = config.input_size(), config.label_ignore_index()

    variants = ([] if args.no_defaults else [("defaults", [])]) + [
        (text.partition("=")[0], shlex.split(text.partition("=")[2])) for text in args.variant
    ]
    models, seconds, training_pace = {}, {}, {}
    for name, flags in variants:
        checkpoint, seconds[name] = train_variant(name, flags, shared, args.work_dir, args.threads)
        training_pace[name] = training_images_per_second(checkpoint)
        member = load_member(checkpoint, torch.device("cpu"))
        models[name] = lambda images, member=member: member.forward(member.model_input({member.size_key: images}))
    started = time.perf_counter()
    plain = train_plain(
        SegmentationDataset(data, train_ids, size=size),
        config.encoder,
        data.num_classes,
        ignore,
        config.epochs,
        config.batch_size,
        lr=args.plain_lr,
        workers=min(config.workers, os.cpu_count() or 1),
        seed=config.seed,
    )
    models["plain loop"], seconds["plain loop"] = plain, time.perf_counter() - started
    images_trained = (len(train_ids) // config.batch_size) * config.batch_size * config.epochs
    training_pace["plain loop"] = images_trained / seconds["plain loop"]

    scored = [(f"validation (fold {config.fold})", val_ids, "train")]
    if args.test:
        scored.append(("test", data.test_mask_ids(), "test"))
    for title, image_ids, split in scored:
        ious = {
            name: class_iou(confusion(model, data, image_ids, size, split, ignore)) for name, model in models.items()
        }
        table = markdown_table(title, len(image_ids), data.classes, ious, seconds, images_trained, training_pace)
        if split == "test":
            with atomic_output(args.work_dir / "test.md") as partial:
                partial.write_text(table)
            print(f"\ntest scores: {args.work_dir / 'test.md'}")
        else:
            print(table)


def markdown_table(
    title: str, images: int, classes, ious: dict, seconds: dict, images_trained: int, training_pace: dict
) -> str:
    """Each class's IoU, the mIoU, wall time and img/s of each recipe (the whole run's, and its training steps'),
    and the ratios to the plain loop."""
    names = list(ious)
    means = {name: float(np.nanmean(ious[name])) for name in names}
    plain = means["plain loop"]

    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(name) for name in names) + " |"

    lines = [f"\n{title}: {images} images", row("class", str), "|---|" + "---:|" * len(names)]
    lines += [row(label, lambda name, index=index: f"{ious[name][index]:.3f}") for index, label in enumerate(classes)]
    lines += [
        row("**mIoU**", lambda name: f"**{means[name]:.3f}**"),
        row("mIoU - plain", lambda name: f"{means[name] - plain:+.3f}"),
        row("wall time", lambda name: f"{seconds[name] / 60:.1f} min"),
        row("img/s", lambda name: f"{images_trained / seconds[name]:.2f}"),
        row("time / plain", lambda name: f"{seconds[name] / seconds['plain loop']:.2f}"),
        row("training img/s", lambda name: f"{training_pace[name]:.2f}"),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
