"""Pseudo-labels: the fold ensemble's confident pixels on the unlabelled test images, as masks train.py --pseudo reads.

python -m competition.pseudo --checkpoints runs/x --out pseudo/x --tta          a mask per kept test image + pseudo.json
python -m competition.pseudo ... --confidence 0.95 --min-kept 0.9                 a stricter rule
python -m competition.pseudo ... --overwrite                                      replacing a pseudo-label folder

A pixel is kept when the ensemble is confident of its label: p >= --confidence where it is 1, p <= 1 - --confidence
where it is 0, for a sigmoid head (binary, and each class of a multilabel head: every class must be), its top softmax probability >= --confidence for a softmax
head; its label is the hard mask (the run's tuned thresholds of postprocess.json when it is there, else 0.5; the
softmax's top class). Every other pixel holds 255, which training ignores. A test image is kept when at least
--min-kept of its pixels are. The folder is written under <out>.partial and renamed when complete.
"""

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from competition.environment import default_data_dir
from competition.errors import ConfigError, OutputError
from competition.files import atomic_output, check_writable, no_space_left, output_lock, partial_path
from competition.inference import Ensemble, find_checkpoints, load_member, tuned_postprocess
from competition.layouts import open_data_as
from competition.logs import OneLineParser, add_logging_arguments, configure_from, exit_on_project_error
from competition.mask_values import class_pixels
from competition.postprocess import head_of
from competition.prediction import TTA, check_tta, label_masks, setup_device
from competition.prediction_stream import expected_shape, image_batches, predict_into
from competition.pseudo_data import IGNORE_VALUE, MANIFEST_NAME, run_classes
from competition.writers import encode_mask_png, encode_png, palette

logger = logging.getLogger("competition.pseudo")


def confident_masks(
    probabilities: torch.Tensor, confidence: float, thresholds: list[float] | None = None, multilabel: bool = False
) -> np.ndarray:
    """(N, C, H, W) probabilities -> uint8 (N, H, W) hard masks where the ensemble is confident, IGNORE_VALUE
    elsewhere. One sigmoid channel (binary): 1 above its threshold, confident where p >= ``confidence`` labels a 1 or
    p <= 1 - ``confidence`` labels a 0.
    Softmax (several channels): the top class, confident where its probability is. ``multilabel`` (a sigmoid per
    class): bit k set where class k is above its threshold, confident where every class is so. ``thresholds``: one per
    sigmoid channel (default 0.5 each)."""
    sigmoid = multilabel or probabilities.shape[1] == 1
    if not sigmoid:
        top, classes = probabilities.max(1)
        masks = classes.to(torch.uint8)
        confident = top >= confidence
    else:
        limits = torch.tensor(thresholds or [0.5] * probabilities.shape[1], device=probabilities.device)
        hard = probabilities > limits.view(1, -1, 1, 1)
        masks = torch.from_numpy(label_masks(probabilities, limits)).to(probabilities.device)  # bit k: class k
        # kept only where the confident side agrees with the threshold's label: with a tuned threshold of 0.9 and
        # a confidence of 0.8, p = 0.85 is confidently the class yet labelled 0, so it is ignored
        agreed = ((probabilities >= confidence) & hard) | ((probabilities <= 1 - confidence) & ~hard)
        confident = agreed.all(1)
    return torch.where(confident, masks, IGNORE_VALUE).to(torch.uint8).cpu().numpy()


def tuned_thresholds(paths: list[Path], tta: tuple[str, ...], config) -> tuple[list[float] | None, str | None]:
    """(the per-class thresholds of the postprocess.json tuned on these checkpoints, as infer.py reads it, its path),
    or (None, None) when there is none or the models are a softmax (the top class needs no threshold). Its minimum
    areas shape submissions, not labels: a small confident component is still a confident label."""
    if head_of(config) == "softmax":
        return None, None
    postprocess, path = tuned_postprocess(paths, tta, config)
    if postprocess is None:
        return None, None
    return [rule.threshold for rule in postprocess.rules], str(path)


class PseudoSink:
    """Counts each predicted mask's confident pixels, and writes the mask of an image kept by ``min_kept`` into the
    folder (a palette PNG of class indices, a greyscale PNG of multilabel bits; 255 ignored)."""

    def __init__(self, folder: Path, classes: list[str], multilabel: bool, min_kept: float):
        self.folder, self.classes, self.multilabel, self.min_kept = folder, classes, multilabel, min_kept
        self.colours = palette(len(classes))
        self.kept: list[dict] = []
        self.predicted = self.pixels = self.kept_pixels = 0

    def encode(self, image_id: str, mask: np.ndarray) -> tuple[dict, bytes | None]:
        confident = int((mask != IGNORE_VALUE).sum())
        record = {
            "id": image_id,
            "pixels": int(mask.size),
            "kept": confident,
            "class_pixels": class_pixels(mask, len(self.classes), self.multilabel).tolist(),
        }
        keep = confident >= self.min_kept * mask.size
        if not keep:
            return record, None
        # packed bits (up to 2^K - 1, and 255) have no palette colours: greyscale, as infer.py writes them
        return record, encode_png(mask) if self.multilabel else encode_mask_png(mask, self.colours)

    def write(self, items: list[tuple[str, tuple[dict, bytes | None]]]) -> None:
        for image_id, (record, png) in items:
            self.predicted += 1
            self.pixels += record["pixels"]
            self.kept_pixels += record["kept"]
            if png is not None:
                with atomic_output(self.folder / f"{image_id}.png") as partial:
                    partial.write_bytes(png)
                self.kept.append(record)

    def flush(self) -> None:
        pass

    def close(self, finished: bool) -> None:
        pass


def manifest_of(sink: PseudoSink, settings: dict) -> dict:
    """pseudo.json: how the labels were made (``settings``), and what was kept: each kept image and its pixels."""
    kept_pixels = sum(image["kept"] for image in sink.kept)
    pixels = sum(image["pixels"] for image in sink.kept)
    return settings | {
        "predicted": {"images": sink.predicted, "pixels": sink.pixels, "confident_pixels": sink.kept_pixels},
        "kept": {
            "images": len(sink.kept),
            "pixels": pixels,
            "kept_pixels": kept_pixels,
            "ignored": pixels - kept_pixels,
        },
        "images": sink.kept,
    }


def write_pseudo_labels(
    ensemble: Ensemble, data, out: Path, settings: dict, batch_size: int, workers: int, progress=True
):
    """Predict every test image of ``data`` and write the kept masks and pseudo.json under ``<out>.partial``, renamed
    to ``out`` when complete (an ``out`` there before is replaced only then); the manifest."""
    order = data.test_ids()
    if not order:
        raise ConfigError(
            f"{data.root}: no test images to pseudo-label (a test/ folder, a test split, or --test-images)"
        )
    partial = partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)  # a killed run's: this process holds out's lock
    partial.mkdir(parents=True)
    rule, multilabel = settings["rule"], settings["head"] == "multilabel"
    sink = PseudoSink(partial, settings["classes"], multilabel, rule["min_kept"])

    def masks_of(probabilities: torch.Tensor) -> np.ndarray:
        return confident_masks(probabilities, rule["confidence"], rule["thresholds"], multilabel)

    try:
        fixed = expected_shape(ensemble, data) is not None
        batches = image_batches(data, order, "test", batch_size, fixed)
        predict_into(ensemble, data, batches, sink, 0.5, workers, progress, label="pseudo-label", masks_of=masks_of)
        manifest = manifest_of(sink, settings)
        with atomic_output(partial / MANIFEST_NAME) as path:
            path.write_text(json.dumps(manifest, indent=1) + "\n")
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, OSError) and no_space_left(error):
            raise OutputError(f"{out.parent}: no space left on its disk; nothing was kept: free some space") from None
        raise
    replace_folder(partial, out)
    return manifest


def replace_folder(partial: Path, out: Path) -> None:
    """``partial`` renamed to ``out``; an ``out`` there before (a pseudo-label folder) is moved aside first and
    removed after, so that ``out`` is at every moment absent or complete."""
    if not out.exists():
        os.replace(partial, out)
        return
    aside = out.with_name(out.name + ".replaced")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(out, aside)
    os.replace(partial, out)
    shutil.rmtree(aside)


def refuse_existing(out: Path, overwrite: bool) -> None:
    """A folder at ``out`` is replaced only with ``overwrite``, and only when it is a pseudo-label folder (or empty)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out}: a file, not a folder; name a folder for the pseudo-labels")
    if not overwrite:
        raise ConfigError(f"--out {out}: the folder exists; pass --overwrite to replace it, or name another")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ConfigError(
            f"--out {out}: holds files but no {MANIFEST_NAME}, so it is not a pseudo-label folder; --overwrite "
            "replaces only those: name another folder"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m competition.pseudo",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoints", nargs="+", required=True, help="run folders (every fold*/best.pt) or files")
    parser.add_argument("--out", type=Path, required=True, help="the folder of pseudo-labels to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a pseudo-label folder at --out")
    parser.add_argument(
        "--data-dir", type=Path, help="(default: the checkpoints' data folder when it is here, else the default's)"
    )
    parser.add_argument(
        "--test-images", type=Path, help="a folder of images to label instead of the data's test/ (or test split)"
    )
    parser.add_argument("--tta", action="store_true", help="average with test-time augmented views (hflip by default)")
    parser.add_argument("--tta-transforms", help=f"comma-separated, from {', '.join(sorted(TTA))}; implies --tta")
    parser.add_argument(
        "--confidence", type=float, default=0.9, help="a pixel is kept at this confidence or more (default: 0.9)"
    )
    parser.add_argument(
        "--min-kept", type=float, default=0.8, help="an image is kept when this share of its pixels is (default: 0.8)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4, help="image decoding processes and PNG threads")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on a GPU that has it), bf16, fp16, fp32")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    add_logging_arguments(parser)
    return parser


def check_arguments(args: argparse.Namespace) -> tuple[str, ...]:
    """The TTA views; one line for a value out of range."""
    if not 0.5 <= args.confidence <= 1:
        raise ConfigError(f"--confidence {args.confidence}: a probability in [0.5, 1], e.g. 0.9")
    if not 0 <= args.min_kept <= 1:
        raise ConfigError(f"--min-kept {args.min_kept}: a share of an image's pixels in [0, 1], e.g. 0.8")
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0)):
        if value < least:
            raise ConfigError(f"{flag} {value}: must be at least {least}")
    if args.tta_transforms is not None:
        args.tta = True
    names = args.tta_transforms if args.tta_transforms is not None else "hflip"
    return check_tta(tuple(name for name in names.split(",") if name)) if args.tta else ()


def make_pseudo_labels(args: argparse.Namespace) -> dict:
    tta = check_arguments(args)
    check_writable(args.out, "--out", folder=True)
    with output_lock(args.out, "--out"):
        refuse_existing(args.out, args.overwrite)
        paths = find_checkpoints(args.checkpoints)
        device, precision = setup_device(args.device, args.precision)
        ensemble = Ensemble([load_member(path, device) for path in paths], tta, precision)
        config = ensemble.members[0].config
        data_dir = args.data_dir or (Path(config.data_dir) if Path(config.data_dir).is_dir() else default_data_dir())
        data = open_data_as(config, data_dir, test_images=args.test_images)
        classes = run_classes(config, data)
        thresholds, tuned = tuned_thresholds(paths, tta, config)
        settings = {
            "checkpoints": [str(path) for path in paths],
            "tta": list(tta),
            "classes": classes,
            "head": head_of(config),
            "data_dir": str(Path(data.root).resolve()),
            "test_images": str(args.test_images.resolve()) if args.test_images else None,
            "rule": {
                "confidence": args.confidence,
                "min_kept": args.min_kept,
                "thresholds": thresholds,
                "postprocess": tuned,
                "ignore_value": IGNORE_VALUE,
            },
        }
        logger.info(
            "%d model(s), TTA %s; a pixel kept at confidence %g, an image at %g of its pixels; thresholds %s",
            len(paths),
            "+".join(tta) or "off",
            args.confidence,
            args.min_kept,
            f"from {tuned}" if tuned else "0.5" if head_of(config) != "softmax" else "none (the softmax's top class)",
        )
        manifest = write_pseudo_labels(
            ensemble, data, args.out, settings, args.batch_size, args.workers, not args.quiet
        )
    kept = manifest["kept"]
    logger.info(
        "%s: %d of %d test images kept, %d of their %d pixels (%.1f%%) labelled, the rest 255 (ignored)",
        args.out,
        kept["images"],
        manifest["predicted"]["images"],
        kept["kept_pixels"],
        kept["pixels"],
        100 * kept["kept_pixels"] / max(kept["pixels"], 1),
    )
    if not kept["images"]:
        logger.warning("%s: no test image kept: lower --confidence or --min-kept", args.out)
    return manifest


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_from(args)
    with exit_on_project_error("competition.pseudo", args.debug, on_interrupt=f"{args.out} is as it was before"):
        make_pseudo_labels(args)


if __name__ == "__main__":
    main()
