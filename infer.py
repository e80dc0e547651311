"""Predict with the fold ensemble: python infer.py --tta writes submissions/submission.csv.

python infer.py --tta [--checkpoints runs/unet_resnet34 [more ...]]   the test set -> submission.csv
python infer.py --tta --overwrite                                      ... replacing a finished submission.csv
python infer.py --tta --resume                                         ... keeping the rows an interrupted run wrote
python infer.py --tta --devices cuda:0,cuda:1                          ... a shard of the test set on each device
python infer.py --tta --backend ray --address auto                     ... a shard per GPU of a Ray cluster
python infer.py --tta --time-limit 11h30m                              ... stopping in time; --resume finishes
python infer.py --oof --tta                                            out-of-fold Dice, best threshold, worst overlays
python infer.py --image path/to/car.jpg                                one image -> mask PNG and overlay
python infer.py --export-onnx unet.onnx --checkpoints runs/x/fold0/best.pt   one model -> ONNX
python infer.py --tta --checkpoints runs/parts --out submissions/parts/   any other data set: a PNG mask per image
python infer.py --tta --checkpoints runs/parts --format rle-csv --out parts.csv   ... or per-class RLE rows
python infer.py --oof --tta --checkpoints runs/parts --out predictions/oof-masks/   ... out of fold, masks written
python infer.py --oof --tta --tune --checkpoints runs/gi   ... and per-class post-processing tuned: postprocess.json
python infer.py --tta --checkpoints runs/gi --sample-submission input/sample_submission.csv --out sub.csv
                                                                       ... per-class rows as the sample lists them
python infer.py --tta --tile 1024 --tile-overlap 0.25                  each image by a blended sliding window

Every output is one stream into a writer (--format): rle, one img,rle_mask row per image in sample-submission
order (Carvana's, the default of its models); rle-csv, Kaggle's ImageId_ClassId,EncodedPixels rows; png, a
palette PNG of class indices per test image (the data folder's test/ or test split, or --test-images DIR) in the
--out folder (default: <work dir>/submissions/masks), --overlays adding colour overlays (the default of every
other data set); tiff, a tiled TIFF mask per image (written band by band with --tile, never whole). --sample-submission FILE writes per-class RLE rows in the rows and columns of a competition's
sample submission (id,class,predicted; ImageId_ClassId,EncodedPixels; ImageId,ClassId,EncodedPixels).

A postprocess.json in the checkpoints' run folder (written by --oof --tune) makes the masks of the test
submission and of --image: per class its threshold (replacing --threshold), minimum component area and minimum total area;
--no-postprocess leaves it out.

On several devices (--devices; by default every GPU when there are several) the test images are cut into
contiguous shards at batch boundaries, one worker process per device: row files are written to
<out>.shard<i>of<n> (<out>.shard<i>of<n>.partial until complete) beside --out and gathered into --out, validated,
and removed; masks go straight into the --out folder. --resume keeps everything complete an interrupted run
wrote, whatever devices it ran on. With --backend ray the shards (--shards, default one per GPU of the cluster)
are Ray tasks, one GPU each, writing into --out's folder, which every node must see.

Exit status: 0 done; 1 a shard failed (its line names the device and the error; what every shard wrote is kept
for --resume); 2 an error in the input, the settings or the machine (one line); 3 stopped by --time-limit
at a batch boundary, not finished (what was written is kept for --resume); 130 interrupted (Ctrl-C).
"""

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

import torch

from competition.checkpoints import checkpoint_config, load_checkpoint
from competition.clock import Deadline, parse_duration
from competition.cluster import add_cluster_arguments, check_cluster_arguments, connect, shard_runner
from competition.config import TrainConfig
from competition.environment import default_data_dir, default_work_dir, resolve_device
from competition.errors import ConfigError
from competition.files import check_writable, output_lock
from competition.inference import (
    WEIGHTS_FILES,
    Ensemble,
    export_onnx,
    find_checkpoints,
    load_member,
    output_record,
    predict_image_file,
    prediction_record,
    tuned_postprocess,
    write_predictions,
)
from competition.layouts import open_data_as
from competition.logs import OneLineParser, add_logging_arguments, configure_from, exit_on_project_error
from competition.out_of_fold import check_tuning_file, oof_report, tune_report
from competition.postprocess import FILE_NAME as POSTPROCESS_FILE
from competition.postprocess import (
    OutOfFoldStore,
    PostProcess,
    find_file,
    head_of,
    predicted_classes,
)
from competition.prediction import TTA, check_tta, resolve_precision, setup_device
from competition.rle import RLE_ORDERS
from competition.shards import ShardSettings, ShardsFailed, describe_devices, write_on_devices
from competition.sliding_window import WEIGHTINGS, Tiling
from competition.submission import check_resume_flags
from competition.writers import FORMATS, MASK_FILES, Output

logger = logging.getLogger("competition.infer")

EXIT_SHARD_FAILED, EXIT_STOPPED_BY_TIME_LIMIT = 1, 3

MODE_NAMES = {"submission": "the test submission", "oof": "--oof", "image": "--image", "export_onnx": "--export-onnx"}
# Flags of one mode or two: flag -> (its attribute, the modes it belongs to, its default when not given)
MODE_FLAGS = {
    "--out": ("out", ("submission", "oof"), lambda: None),
    "--resume": ("resume", ("submission",), lambda: False),
    "--overwrite": ("overwrite", ("submission", "oof", "export_onnx"), lambda: False),
    "--devices": ("devices", ("submission",), lambda: None),
    "--time-limit": ("time_limit", ("submission",), lambda: None),
    "--shards": ("shards", ("submission",), lambda: None),
    "--test-images": ("test_images", ("submission",), lambda: None),
    "--format": ("format", ("submission",), lambda: None),
    "--rle-order": ("rle_order", ("submission",), lambda: None),
    "--sample-submission": ("sample_submission", ("submission",), lambda: None),
    "--no-postprocess": ("no_postprocess", ("submission", "image"), lambda: False),
    "--tune": ("tune", ("oof",), lambda: False),
    "--overlays": ("overlays", ("submission",), lambda: False),
    "--tile": ("tile", ("submission",), lambda: None),
    "--tile-overlap": ("tile_overlap", ("submission",), lambda: None),
    "--tile-weighting": ("tile_weighting", ("submission",), lambda: None),
    "--worst": ("worst", ("oof",), lambda: 8),
    "--folds-csv": ("folds_csv", ("oof",), lambda: None),
    "--out-dir": ("out_dir", ("oof", "image"), lambda: default_work_dir() / "predictions"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    parser.add_argument(
        "--weights",
        choices=tuple(WEIGHTS_FILES),
        default="best",
        help="the weights of each fold folder: best (best.pt), averaged (averaged.pt: train.py --average-top) or swa "
        "(swa.pt: train.py --swa-epochs) (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir", type=Path, help="(default: the checkpoints' data folder when it is here, else the default's)"
    )
    parser.add_argument("--tta", action="store_true", help="average with test-time augmented views (hflip by default)")
    parser.add_argument("--tta-transforms", help=f"comma-separated, from {', '.join(sorted(TTA))}; implies --tta")
    parser.add_argument(
        "--threshold", type=float, help="foreground above this probability (binary models), in (0, 1) (default: 0.5)"
    )
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
    submission.add_argument(
        "--out",
        type=Path,
        help="(default: <work dir>/submissions/submission.csv for RLE rows, <work dir>/submissions/masks for PNG "
        "masks); with --oof, a folder for the out-of-fold masks (none by default)",
    )
    submission.add_argument("--resume", action="store_true", default=None, help="keep what was already written")
    submission.add_argument(
        "--overwrite", action="store_true", default=None, help="replace a finished --out (with --oof: an oof.csv)"
    )
    submission.add_argument(
        "--devices",
        help="e.g. cuda:0,cuda:1: a shard of the test set on each, in its own process (default: every GPU when "
        "there are several; cpu,cpu runs the same on the CPU)",
    )
    submission.add_argument(
        "--test-images", type=Path, help="a folder of images to predict instead of the data's test/ (or test split)"
    )
    submission.add_argument(
        "--format",
        choices=FORMATS,
        help="png (a palette PNG of class indices per image; the default but on Carvana), rle-csv (Kaggle's "
        "ImageId_ClassId,EncodedPixels rows), rle (one img,rle_mask row per image, binary models; Carvana's default) "
        "or tiff (a tiled TIFF per image; with --tile written band by band: for slides larger than memory)",
    )
    submission.add_argument(
        "--rle-order", choices=RLE_ORDERS, help="rle-csv: flatten row- or column-major (default: the run's, else row)"
    )
    submission.add_argument(
        "--sample-submission",
        type=Path,
        help="per-class RLE rows in this file's row order and column names (implies --format rle-csv); test images "
        "it does not list are not predicted",
    )
    submission.add_argument(
        "--no-postprocess",
        action="store_true",
        default=None,
        help=f"leave out the run folder's {POSTPROCESS_FILE} (tuned by --oof --tune): --threshold for every class",
    )
    submission.add_argument(
        "--overlays", action="store_true", default=None, help="png: colour overlays in <out>/overlays"
    )
    submission.add_argument(
        "--time-limit",
        help="e.g. 11h30m, counted from the start: stop at a batch boundary before it passes, the rows kept for "
        "--resume (exit status 3)",
    )
    submission.add_argument(
        "--tile",
        type=int,
        help="predict each image by a sliding window of this many pixels a side (a multiple of 32), the windows' "
        "probabilities blended, instead of whole: for images larger than memory (--batch-size: windows at once)",
    )
    submission.add_argument(
        "--tile-overlap",
        type=float,
        help="with --tile: the share of a window the next one covers again (default: 0.25)",
    )
    submission.add_argument(
        "--tile-weighting",
        choices=WEIGHTINGS,
        help="with --tile: how overlapping windows are blended (default: gaussian; uniform, a plain average)",
    )
    add_cluster_arguments(parser, "test shard")
    parser.add_argument(
        "--shards", type=int, help="--backend ray: test shards, each a task (default: one per GPU of the cluster)"
    )
    scoring = parser.add_argument_group("--oof and --image")
    scoring.add_argument(
        "--folds-csv", type=Path, help="for --oof (default: the one the checkpoints were trained with)"
    )
    scoring.add_argument("--worst", type=int, help="for --oof: overlays of this many worst images (default: 8)")
    scoring.add_argument(
        "--tune",
        action="store_true",
        default=None,
        help=f"for --oof: search per class a threshold and minimum areas on the out-of-fold probabilities, written "
        f"to {POSTPROCESS_FILE} in the run folder",
    )
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
            names = [MODE_NAMES[owner] for owner in modes]
            owners = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
            raise ConfigError(f"{flag} belongs to {owners}, not to {MODE_NAMES[mode]}")
    if mode == "export_onnx":
        check_export(args)
    args.threshold = 0.5 if args.threshold is None else args.threshold
    if not 0 < args.threshold < 1:
        raise ConfigError(f"--threshold {args.threshold}: a probability strictly between 0 and 1, e.g. 0.5")
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0)):
        if value < least:
            raise ConfigError(f"{flag} {value}: must be at least {least}")
    if args.device and args.devices:
        raise ConfigError("--device and --devices: pass one of them (--devices cuda:0,cuda:1 runs a shard on each)")
    if args.backend == "ray" and mode != "submission":
        raise ConfigError(f"--backend ray is for the test submission, not {MODE_NAMES[mode]}")
    if args.shards is not None and args.backend != "ray":
        raise ConfigError("--shards is for --backend ray; locally, --devices makes one shard per device")
    if args.shards is not None and args.shards < 1:
        raise ConfigError(f"--shards {args.shards}: must be at least 1")
    check_cluster_arguments(args, {"--device": args.device, "--devices": args.devices})
    if args.worst is not None and args.worst < 0:
        raise ConfigError(f"--worst {args.worst}: must be at least 0")
    args.tiling = tiling_of(args)
    return mode


def tiling_of(args: argparse.Namespace) -> Tiling | None:
    """The sliding window of --tile, checked (one line naming the flag), or None: each image predicted whole."""
    if args.tile is None:
        given = [flag for flag, value in (("--tile-overlap", args.tile_overlap), ("--tile-weighting", args.tile_weighting))
                 if value is not None]  # fmt: skip
        if given:
            raise ConfigError(f"{given[0]} belongs to --tile: pass --tile SIZE (e.g. --tile 1024) too")
        return None
    overlap = 0.25 if args.tile_overlap is None else args.tile_overlap
    return Tiling(args.tile, overlap, args.tile_weighting or "gaussian", args.batch_size)


def check_export(args: argparse.Namespace) -> None:
    """--export-onnx writes the model alone: what infer.py does around the model is refused, not dropped silently."""
    values = {"--tta": args.tta, "--tta-transforms": args.tta_transforms, "--threshold": args.threshold}
    around = [flag for flag, value in values.items() if value is not None and value is not False]
    if around:
        raise ConfigError(
            f"--export-onnx writes the model alone (its logits for one view): leave out {' and '.join(around)}, "
            "which infer.py applies around the model, and apply that to the ONNX model's output yourself"
        )
    if args.export_onnx.exists() and not args.overwrite:
        raise ConfigError(f"--export-onnx {args.export_onnx}: the file exists; pass --overwrite to replace it")


def check_outputs(args: argparse.Namespace, mode: str) -> None:
    """Every path the mode writes that is known before the checkpoints are read, checked writable before any work
    (one line naming its flag); missing folders are made as the outputs are written."""
    given = {"--out": (args.out, mode == "oof"), "--export-onnx": (args.export_onnx, False)}
    if mode in ("oof", "image"):
        given["--out-dir"] = (args.out_dir, True)
    for flag, (path, folder) in given.items():
        if path is not None:
            check_writable(path, flag, folder)


def hold_outputs(args: argparse.Namespace, mode: str, held: contextlib.ExitStack) -> None:
    """The outputs of the test submission (--out, when given) and of --oof (its oof.csv, and --out's masks), held
    by this command alone until ``held`` closes: a second command writing them is refused at once, in one line
    naming this one's pid (shard workers write under the lock of their parent, this process)."""
    if mode == "oof":
        held.enter_context(output_lock(args.out_dir / "oof.csv", "--oof"))
    if mode in ("submission", "oof") and args.out is not None:
        held.enter_context(output_lock(args.out, "--out"))


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


def data_dir_of(args, config) -> Path:
    """--data-dir, else the folder the checkpoints were trained on when it is here, else the default one."""
    if args.data_dir is not None:
        return args.data_dir
    trained_on = Path(config.data_dir)
    return trained_on if trained_on.is_dir() else default_data_dir()


def open_test_data(args, config):
    """The data as the checkpoints' settings read it (layout, classes, folders, split), --test-images for test/."""
    return open_data_as(config, data_dir_of(args, config), test_images=args.test_images)


def score_out_of_fold(args, members, tta, precision) -> None:
    trained_on = [str(member.path) for member in members if member.config.train_on]
    if trained_on:
        raise ConfigError(f"{trained_on[0]}: trained with --train-on, on every split it names: nothing is out of fold")
    folds_csv = args.folds_csv or members[0].config.folds_csv
    data = open_test_data(args, members[0].config)
    config = members[0].config
    record = prediction_record([member.path for member in members], tta, args.threshold, config)
    store = None
    if args.tune:
        tuning = find_file([member.path for member in members])
        check_writable(tuning, "--tune")
        check_tuning_file(tuning, record, args.overwrite)
        store = OutOfFoldStore(head_of(config), config.output_channels(), data.ignore_index)
    settings = {
        "threshold": args.threshold,
        "worst": args.worst,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "masks_out": args.out,
        "overwrite": args.overwrite,
        "store": store,
    }
    oof_report(members, data, folds_csv, tta, precision, args.out_dir, **settings)
    if store is not None:
        tune_report(store, predicted_classes(config), args.threshold, tuning, record)


def predict_one_image(args, members, tta, precision) -> None:
    paths, config = [member.path for member in members], members[0].config
    postprocess = None if args.no_postprocess else postprocess_of(args, paths, tta, config)
    predict_image_file(Ensemble(members, tta, precision), args.image, args.out_dir, args.threshold, postprocess)


def submission_devices(args: argparse.Namespace) -> list[str | None]:
    """The devices of the test submission, each checked: --devices, else --device, else every GPU when there
    are several, else the one default device (None)."""
    if args.devices:
        names = args.devices.split(",")
        if not all(names):
            raise ConfigError(f"--devices {args.devices!r}: comma-separated devices, e.g. cuda:0,cuda:1 or cpu,cpu")
    elif args.device is None and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        names = [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    else:
        resolve_device(args.device)  # an unusable GPU is one line here, before any checkpoint is read
        return [args.device]  # set up as the models load, in this process
    return [check_device(name, args.precision) for name in names]


def check_device(name: str, precision: str) -> str:
    """A device of --devices (or of the default GPU list), checked with --precision here, so that an unusable
    one is one line before any shard starts. Not set up (setup_device): that would open a CUDA context on
    every GPU in this process, which only waits for the shard workers."""
    device = resolve_device(name)
    resolve_precision(precision, device)
    return str(device)


def load_members(args, paths, device_name, tta):
    device, precision = setup_device(device_name, args.precision)
    members = [load_member(path, device, args.compile) for path in paths]
    names = ", ".join(str(member.path) for member in members)
    logger.info("%d model(s): %s; TTA %s, %s on %s", len(members), names, "+".join(tta) or "off", precision, device)
    return members, precision


def output_of(args, config, data, paths: list[Path], tta: tuple[str, ...]) -> Output:
    """What the test predictions are written as: --format, else the data's own (Carvana's RLE rows, PNG masks
    elsewhere), at --out or the format's default place; checked against the models."""
    format = args.format or ("rle-csv" if args.sample_submission else data.submission_format)
    if format == "rle" and (config.output_channels() != 1 or config.multilabel()):
        raise ConfigError("--format rle writes one row per image, for binary models; use --format rle-csv or png")
    if args.overlays and format != "png":
        raise ConfigError("--overlays belongs to --format png")
    if args.rle_order is not None and format != "rle-csv":
        raise ConfigError("--rle-order belongs to --format rle-csv")
    if args.sample_submission is not None and format != "rle-csv":
        raise ConfigError(f"--sample-submission writes per-class RLE rows (--format rle-csv), not --format {format}")
    if args.sample_submission is not None and not args.sample_submission.is_file():
        raise ConfigError(f"--sample-submission {args.sample_submission}: no such file; name the competition's CSV")
    postprocess = None if args.no_postprocess else postprocess_of(args, paths, tta, config)
    tiling = args.tiling or tiling_of_run(config, args.batch_size)
    default = "masks" if format in MASK_FILES else "submission.csv"
    out = args.out or default_work_dir() / "submissions" / default
    rle_order = args.rle_order or getattr(config, "rle_order", None) or "row"  # the run's table's order, if it has one
    return Output(
        format, str(out), config.num_classes(), rle_order, bool(args.overlays),
        sample_submission=str(args.sample_submission) if args.sample_submission else None,
        classes=tuple(predicted_classes(config)), multilabel=config.multilabel(),
        postprocess=postprocess, tiling=tiling,
    )  # fmt: skip


def tiling_of_run(config, batch_size: int) -> Tiling | None:
    """The sliding window of a run trained on tiles (train.py --tile), when --tile is not given: its images are
    slides, which whole-image prediction would resize to one size."""
    if not config.tile:
        return None
    logger.info(
        "the checkpoints were trained on tiles of %d px: each test image is predicted by a sliding window of them "
        "(--tile %d --tile-overlap %g; give --tile to choose another)", config.tile, config.tile, config.tile_overlap,
    )  # fmt: skip
    return Tiling(config.tile, config.tile_overlap, "gaussian", batch_size)


def postprocess_of(args, paths: list[Path], tta: tuple[str, ...], config) -> PostProcess | None:
    """The rules of the postprocess.json tuned on these checkpoints (postprocess.find_file), read for the run's
    classes (one line when tuned for others, or on other checkpoints); None when there is none."""
    postprocess, path = tuned_postprocess(paths, tta, config)
    if postprocess is None:
        return None
    replaces = "min areas only: softmax classes are the most probable" if postprocess.head == "softmax" else (
        f"its thresholds replace --threshold {args.threshold:g}")  # fmt: skip
    logger.info("%s: post-processing applied (%s; --no-postprocess leaves it out): %s", path, replaces,
                postprocess.describe())  # fmt: skip
    return postprocess


def predict_test_set(args, paths, tta, deadline: Deadline, devices: list[str | None]) -> int:
    """The test predictions on one device in this process, on several in worker processes, or on a Ray cluster,
    into the writer of --format; the exit status."""
    checkpoints = [load_checkpoint(path) for path in paths]  # an unreadable one is one line here, not in a shard
    configs = [checkpoint_config(checkpoint, path) for checkpoint, path in zip(checkpoints, paths)]
    data = open_test_data(args, configs[0])
    output = output_of(args, configs[0], data, paths, tta)
    if args.out is None:  # the format's default place, known now: checked as a given --out is at the start
        check_writable(output.path, "--out")
    with output_lock(output.path, "--out") if args.out is None else contextlib.nullcontext():  # a given one is held
        if output.writer().keep_finished(args.resume, args.overwrite):
            logger.info("%s is complete; nothing to predict (--overwrite predicts it again)", output.path)
            return 0
        if len(devices) > 1 or args.backend == "ray":
            shapes = {tuple(checkpoint["image_shape"]) for checkpoint in checkpoints if checkpoint.get("image_shape")}
            shape = shapes.pop() if data.fixed_image_size and len(shapes) == 1 else None
            return predict_on_devices(args, paths, configs, tta, devices, deadline, data, output, shape)
        members, precision = load_members(args, paths, devices[0], tta)
        settings = {"batch_size": args.batch_size, "workers": args.workers, "resume": args.resume}
        result = write_predictions(
            Ensemble(members, tta, precision), data, output, args.threshold, overwrite=args.overwrite,
            deadline=deadline, **settings,
        )  # fmt: skip
    return EXIT_STOPPED_BY_TIME_LIMIT if result is None else 0


def predict_on_devices(args, paths, configs, tta, devices: list[str], deadline: Deadline, data, output, shape) -> int:
    run = {}
    if args.backend == "ray":
        resolve_precision(args.precision, torch.device("cpu"))  # its name here; each shard checks it on its GPU
        cluster = connect(args.address)
        devices = [cluster.device] * (args.shards or cluster.slots)
        run = {"run": shard_runner(cluster, Path(output.path), args.retries)}
    names = ", ".join(map(str, paths))
    logger.info("%d model(s): %s; TTA %s, on %s", len(paths), names, "+".join(tta) or "off", describe_devices(devices))
    settings = ShardSettings(
        checkpoints=[str(path) for path in paths],
        data_dir=str(data_dir_of(args, configs[0])),
        test_images=str(args.test_images) if args.test_images else None,
        output=output,
        tta=tta,
        precision=args.precision,
        compile=args.compile,
        threshold=args.threshold,
        batch_size=args.batch_size,
        workers=args.workers,
        time_limit=deadline.limit,
        started=deadline.started,
        log_level=logging.getLogger("competition").level,
    )
    record = output_record(prediction_record(paths, tta, args.threshold, configs[0]), output)
    try:
        result = write_on_devices(shape, data, devices, settings, record, args.resume, args.overwrite, **run)
    except ShardsFailed:
        return EXIT_SHARD_FAILED
    return EXIT_STOPPED_BY_TIME_LIMIT if result is None else 0


RUN = {"oof": score_out_of_fold, "image": predict_one_image, "export_onnx": export}


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()  # --time-limit counts from here, in every shard worker too
    args = build_parser().parse_args(argv)
    configure_from(args)
    with (
        exit_on_project_error(
            "infer.py",
            args.debug,
            on_interrupt="the rows written are kept: run the same command with --resume to go on",
        ),
        contextlib.ExitStack() as held,
    ):
        mode = check_arguments(args)
        check_outputs(args, mode)
        hold_outputs(args, mode, held)
        tta = tta_of(args)
        deadline = Deadline(parse_duration(args.time_limit) if args.time_limit is not None else None, started)
        if mode == "submission":
            check_resume_flags(args.resume, args.overwrite)
        paths = find_checkpoints(args.checkpoints, args.weights)
        if mode == "submission":
            devices = [None] if args.backend == "ray" else submission_devices(args)  # Ray: the cluster's
            status = predict_test_set(args, paths, tta, deadline, devices)
        else:
            members, precision = load_members(args, paths, args.device, tta)
            status = RUN[mode](args, members, tta, precision)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
