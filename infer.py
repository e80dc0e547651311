"""Predict with the fold ensemble: python infer.py --tta writes submissions/submission.csv.

python infer.py --tta [--checkpoints runs/unet_resnet34 [more ...]]   the test set -> submission.csv
python infer.py --tta --overwrite                                      ... replacing a finished submission.csv
python infer.py --tta --resume                                         ... keeping the rows an interrupted run wrote
python infer.py --oof --tta                                            out-of-fold Dice, best threshold, worst overlays
python infer.py --image path/to/car.jpg                                one image -> mask PNG and overlay
python infer.py --export-onnx unet.onnx --checkpoints runs/x/fold0/best.pt   one model -> ONNX
"""

import argparse
import logging
from pathlib import Path

from competition.config import TrainConfig
from competition.data import CarvanaData
from competition.environment import default_data_dir, default_work_dir
from competition.errors import ConfigError
from competition.inference import (
    Ensemble,
    export_onnx,
    find_checkpoints,
    load_member,
    oof_report,
    predict_image_file,
    write_submission,
)
from competition.logs import add_logging_arguments, configure_from, exit_on_project_error
from competition.prediction import TTA, check_tta, setup_device
from competition.submission import keep_finished

logger = logging.getLogger("competition.infer")

MODE_NAMES = {"submission": "the test submission", "oof": "--oof", "image": "--image", "export_onnx": "--export-onnx"}
# Flags of one mode or two: flag -> (its attribute, the modes it belongs to, its default when not given)
MODE_FLAGS = {
    "--out": ("out", ("submission",), lambda: default_work_dir() / "submissions" / "submission.csv"),
    "--resume": ("resume", ("submission",), lambda: False),
    "--overwrite": ("overwrite", ("submission",), lambda: False),
    "--worst": ("worst", ("oof",), lambda: 8),
    "--folds-csv": ("folds_csv", ("oof",), lambda: None),
    "--out-dir": ("out_dir", ("oof", "image"), lambda: default_work_dir() / "predictions"),
}


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--tta-transforms", help=f"comma-separated, from {', '.join(sorted(TTA))}; implies --tta")
    parser.add_argument("--threshold", type=float, default=0.5, help="car above this probability, in (0, 1)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4, help="image decoding processes and RLE threads")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on a GPU that has it), bf16, fp16, fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    modes = parser.add_argument_group("modes (default: the test submission)").add_mutually_exclusive_group()
    modes.add_argument("--oof", action="store_true", help="score each fold's models on their held-out fold instead")
    modes.add_argument("--image", type=Path, help="predict this one image instead")
    modes.add_argument(
        "--export-onnx",
        type=Path,
        metavar="PATH.onnx",
        help="export the first checkpoint to ONNX, checked against onnxruntime, instead",
    )
    submission = parser.add_argument_group("the test submission")
    submission.add_argument("--out", type=Path, help="(default: <work dir>/submissions/submission.csv)")
    submission.add_argument("--resume", action="store_true", default=None, help="keep the rows already written")
    submission.add_argument("--overwrite", action="store_true", default=None, help="replace a finished --out")
    scoring = parser.add_argument_group("--oof and --image")
    scoring.add_argument(
        "--folds-csv", type=Path, help="for --oof (default: the one the checkpoints were trained with)"
    )
    scoring.add_argument("--worst", type=int, help="for --oof: overlays of this many worst images (default: 8)")
    scoring.add_argument("--out-dir", type=Path, help="where PNGs and tables go (default: <work dir>/predictions)")
    add_logging_arguments(parser)
    return parser


def check_arguments(args: argparse.Namespace) -> str:
    """The mode asked for, after refusing the flags of other modes and values out of range (one line each);
    fills in the defaults of the mode's flags."""
    mode = "oof" if args.oof else "image" if args.image else "export_onnx" if args.export_onnx else "submission"
    for flag, (name, modes, default) in MODE_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, default())
        elif mode not in modes:
            owners = " and ".join(MODE_NAMES[owner] for owner in modes)
            raise ConfigError(f"{flag} belongs to {owners}, not to {MODE_NAMES[mode]}")
    if not 0 < args.threshold < 1:
        raise ConfigError(f"--threshold {args.threshold}: a probability strictly between 0 and 1, e.g. 0.5")
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0)):
        if value < least:
            raise ConfigError(f"{flag} {value}: must be at least {least}")
    if args.worst is not None and args.worst < 0:
        raise ConfigError(f"--worst {args.worst}: must be at least 0")
    return mode


def tta_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The TTA views asked for, checked: --tta-transforms alone implies --tta."""
    if args.tta_transforms is not None and not args.tta:
        logger.info("--tta-transforms %s implies --tta: test-time augmentation on", args.tta_transforms)
        args.tta = True
    names = args.tta_transforms if args.tta_transforms is not None else "hflip"
    return check_tta(tuple(name for name in names.split(",") if name)) if args.tta else ()


def export(args, members, tta, precision) -> None:
    difference = export_onnx(members[0], args.export_onnx)
    logger.info(
        "%s -> %s: onnxruntime matches PyTorch (max |diff| %.1e)", members[0].path, args.export_onnx, difference
    )


def score_out_of_fold(args, members, tta, precision) -> None:
    folds_csv = args.folds_csv or members[0].config.folds_csv
    data = CarvanaData(args.data_dir)
    settings = {
        "threshold": args.threshold,
        "worst": args.worst,
        "batch_size": args.batch_size,
        "workers": args.workers,
    }
    oof_report(members, data, folds_csv, tta, precision, args.out_dir, **settings)


def predict_one_image(args, members, tta, precision) -> None:
    predict_image_file(Ensemble(members, tta, precision), args.image, args.out_dir, args.threshold)


def predict_test_set(args, members, tta, precision) -> None:
    ensemble, data = Ensemble(members, tta, precision), CarvanaData(args.data_dir)
    settings = {"batch_size": args.batch_size, "workers": args.workers, "resume": args.resume}
    write_submission(ensemble, data, args.out, args.threshold, overwrite=args.overwrite, **settings)


RUN = {"submission": predict_test_set, "oof": score_out_of_fold, "image": predict_one_image, "export_onnx": export}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_from(args)
    with exit_on_project_error("infer.py", args.debug):
        mode = check_arguments(args)
        tta = tta_of(args)
        if mode == "submission" and keep_finished(args.out, args.resume, args.overwrite):
            logger.info("%s is complete; nothing to predict (--overwrite predicts it again)", args.out)
            return
        paths = find_checkpoints(args.checkpoints)
        device, precision = setup_device(args.device, args.precision)
        members = [load_member(path, device, args.compile) for path in paths]
        names = ", ".join(str(member.path) for member in members)
        logger.info("%d model(s): %s; TTA %s, %s on %s", len(members), names, "+".join(tta) or "off", precision, device)
        RUN[mode](args, members, tta, precision)


if __name__ == "__main__":
    main()
