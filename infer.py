"""Predict with the fold ensemble: python infer.py --tta writes submissions/submission.csv.

python infer.py --tta [--checkpoints runs/unet_resnet34 [more ...]]   the test set -> submission.csv
python infer.py --oof --tta                                            out-of-fold Dice, best threshold, worst overlays
python infer.py --image path/to/car.jpg                                one image -> mask PNG and overlay
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from competition.config import TrainConfig
from competition.data import CarvanaData, DataError, decode_image, image_id_of
from competition.environment import DeviceError, default_data_dir, default_work_dir, resolve_device
from competition.files import atomic_output
from competition.inference import (
    CheckpointError,
    Ensemble,
    export_onnx,
    find_checkpoints,
    load_member,
    out_of_fold,
    overlay,
    predict_image,
    write_submission,
)
from competition.models import ModelError
from competition.prediction import TTA, resolve_precision, tune_for


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoints",
        nargs="+",
        default=[TrainConfig().out],
        help="run folders (every fold*/best.pt inside) or checkpoint files (default: %(default)s)",
    )
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="(default: %(default)s)")
    parser.add_argument("--tta", action="store_true", help="average with test-time augmented views (hflip by default)")
    parser.add_argument("--tta-transforms", default="hflip", help=f"comma-separated, from {sorted(TTA)}")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4, help="image decoding processes and RLE threads")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on a GPU that has it), bf16, fp16, fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--out", type=Path, default=default_work_dir() / "submissions" / "submission.csv")
    parser.add_argument("--resume", action="store_true", help="keep the rows an interrupted run already wrote")
    parser.add_argument("--oof", action="store_true", help="score each fold model on its held-out fold instead")
    parser.add_argument("--folds-csv", type=Path, help="for --oof (default: the one the checkpoints were trained with)")
    parser.add_argument("--worst", type=int, default=8, help="for --oof: overlays of this many worst images")
    parser.add_argument("--image", type=Path, help="predict this one image instead")
    parser.add_argument(
        "--export-onnx",
        type=Path,
        metavar="PATH.onnx",
        help="export the first checkpoint to ONNX, checked against onnxruntime, instead",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=default_work_dir() / "predictions",
        help="for --oof and --image: where PNGs and tables go (default: %(default)s)",
    )
    return parser.parse_args(argv)


def save_png(array: np.ndarray, path: Path) -> None:
    with atomic_output(path) as partial:
        Image.fromarray(array).save(partial, format="PNG")


def run_oof(args, members, tta, precision) -> None:
    data = CarvanaData(args.data_dir)
    folds_csv = args.folds_csv or members[0].config.folds_csv
    scores = out_of_fold(members, data, folds_csv, tta, precision, args.batch_size, args.workers)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    scores.to_csv(args.out_dir / "oof.csv", index=False)
    label = "TTA " + "+".join(tta) if tta else "no TTA"
    table = scores.groupby("fold").agg(
        images=("img", "size"), dice_plain=("dice_plain", "mean"), dice=("dice_0.50", "mean")
    )
    table.loc["all"] = [len(scores), scores["dice_plain"].mean(), scores["dice_0.50"].mean()]
    table.columns = ["images", "Dice (no TTA)", f"Dice ({label})"]
    print(table.to_string(float_format=lambda value: f"{value:.5f}"))
    by_threshold = scores.filter(like="dice_0").mean()
    best = by_threshold.idxmax()
    print(
        f"best threshold ({label}): {best.removeprefix('dice_')} -> Dice {by_threshold[best]:.5f} "
        f"(0.50 -> {by_threshold['dice_0.50']:.5f})"
    )
    member_of_fold = {member.config.fold: member for member in members}
    worst = scores.nsmallest(args.worst, "dice_0.50")
    for rank, (_, row) in enumerate(worst.iterrows(), start=1):
        image_id = image_id_of(row["img"])
        image = data.read_image(image_id)
        predicted = predict_image(Ensemble([member_of_fold[row["fold"]]], tta, precision), image, 0.5)
        path = args.out_dir / f"worst{rank:02d}_{image_id}_dice{row['dice_0.50']:.4f}.png"
        save_png(overlay(image, predicted, data.read_mask(image_id)), path)
    print(
        f"per-image scores: {args.out_dir / 'oof.csv'}; {len(worst)} worst overlays (red: predicted, green: "
        f"truth) in {args.out_dir}/"
    )


def run_image(args, ensemble, threshold) -> None:
    try:
        payload = args.image.read_bytes()
    except OSError as error:
        raise DataError(f"{args.image}: cannot read the image ({error.strerror})") from None
    image = decode_image(payload, str(args.image))
    mask = predict_image(ensemble, image, threshold)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.image.stem
    save_png(mask * 255, args.out_dir / f"{stem}_mask.png")
    save_png(overlay(image, mask), args.out_dir / f"{stem}_overlay.png")
    print(
        f"{args.image}: car covers {mask.mean():.1%} -> {args.out_dir / (stem + '_mask.png')}, "
        f"{args.out_dir / (stem + '_overlay.png')}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        tune_for(device)
        tta = tuple(name for name in args.tta_transforms.split(",") if name) if args.tta else ()
        unknown = [name for name in tta if name not in TTA]
        if unknown:
            raise ValueError(f"unknown TTA transform(s) {unknown}; choose from {sorted(TTA)}")
        members = [load_member(path, device) for path in find_checkpoints(args.checkpoints)]
        if args.compile:
            for member in members:
                member.model = torch.compile(member.model)
        print(
            f"{len(members)} model(s): {', '.join(str(member.path) for member in members)}; "
            f"TTA {'+'.join(tta) or 'off'}, {precision} on {device}"
        )
        if args.export_onnx:
            difference = export_onnx(members[0], args.export_onnx)
            print(f"{members[0].path} -> {args.export_onnx}: onnxruntime matches PyTorch (max |diff| {difference:.1e})")
        elif args.oof:
            run_oof(args, members, tta, precision)
        elif args.image:
            run_image(args, Ensemble(members, tta, precision), args.threshold)
        else:
            write_submission(
                Ensemble(members, tta, precision),
                CarvanaData(args.data_dir),
                args.out,
                args.threshold,
                args.batch_size,
                args.workers,
                args.resume,
            )
    except (CheckpointError, DataError, DeviceError, ModelError, ValueError) as error:
        sys.stderr.write(f"infer.py: error: {error}\n")
        raise SystemExit(2) from None
    except torch.OutOfMemoryError as error:
        cause = str(error).splitlines()[0] if str(error) else "out of memory"
        sys.stderr.write(
            f"infer.py: error: {cause} (batch {args.batch_size}): lower --batch-size; rows already written "
            "are kept, and --resume continues from them\n"
        )
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
