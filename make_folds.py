"""Split the training images into grouped folds (Carvana: by car): python make_folds.py --n-folds 5 --seed 42."""

import argparse
import logging
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed
from tqdm import tqdm

from competition.environment import default_data_dir, default_work_dir
from competition.errors import ConfigError, DataError
from competition.files import atomic_output
from competition.folds import assign_folds, assign_group_folds, class_fold_summary, fold_summary
from competition.layouts import LAYOUTS, PET_BORDERS, open_data
from competition.logs import add_logging_arguments, configure_from, exit_on_project_error

logger = logging.getLogger("competition.make_folds")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--data-dir", type=Path, default=default_data_dir(), help="Carvana data folder (default: %(default)s)"
    )
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="data layout (default: detected)")
    parser.add_argument("--classes", default="", help="class names a,b,c, background first (default: from the data)")
    parser.add_argument("--ignore-index", type=int, default=255, help="mask value left out (default: %(default)s)")
    parser.add_argument("--pet-border", choices=PET_BORDERS, default="ignore", help="Oxford Pet trimap border")
    parser.add_argument(
        "--group-regex", help=r"group key = the first capture group of the image id, e.g. '^(.+)_\d+$' (not Carvana)"
    )
    parser.add_argument(
        "--no-stratify-classes", action="store_true", help="other layouts: do not balance the classes images hold"
    )
    parser.add_argument("--n-folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--stratify", metavar="COLUMN", help="a metadata.csv column to balance across folds, e.g. make")
    parser.add_argument("--out", type=Path, default=default_work_dir() / "folds" / "folds.csv")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folds file that differs")
    add_logging_arguments(parser)
    args = parser.parse_args(argv)
    configure_from(args)
    with exit_on_project_error("make_folds.py", args.debug):
        data = open_data(args.data_dir, args.layout, args.classes, args.ignore_index, args.pet_border)
        if args.out.is_dir():
            raise ConfigError(f"--out {args.out} is a folder; name the folds file, e.g. {args.out / 'folds.csv'}")
        image_ids = data.train_ids()
        if not image_ids:
            raise DataError(f"{args.data_dir}: no training images to split")
        if data.layout != "carvana":
            return _other_layout(args, data, image_ids)
        if args.group_regex:
            raise ConfigError("--group-regex: Carvana folds are grouped by car already; leave it out")
        strata = None
        if args.stratify:
            metadata = data.read_csv("metadata.csv", ["id", args.stratify])
            strata = dict(zip(metadata["id"], metadata[args.stratify]))
        folds = assign_folds(image_ids, args.n_folds, args.seed, strata)
        text = folds[["img", "car_id", "fold"]].to_csv(index=False)
        _refuse_other_folds(args, text)
    if strata is not None:
        folds[args.stratify] = [strata[car_id] for car_id in folds["car_id"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as partial:
        partial.write_text(text)
    logger.info("%s", fold_summary(folds, args.stratify).to_string())
    logger.info("%d images of %d cars in %d folds -> %s", len(folds), folds["car_id"].nunique(), args.n_folds, args.out)


def _refuse_other_folds(args, text: str) -> None:
    if args.out.exists() and args.out.read_text() != text and not args.overwrite:
        raise ConfigError(
            f"{args.out} exists and holds other folds (runs trained on it would no longer match); "
            "pass --overwrite to replace it, or another --out"
        )


def _other_layout(args, data, image_ids: list[str]) -> None:
    """Folds grouped by --group-regex and stratified by the classes each image holds (every mask read once)."""
    if args.stratify:
        raise ConfigError("--stratify reads Carvana's metadata.csv; other layouts stratify by class")
    presence = None
    if not args.no_stratify_classes:
        bar = tqdm(image_ids, desc="class counts", unit="mask", disable=args.quiet, dynamic_ncols=True)
        counts = Parallel(n_jobs=-1, prefer="threads")(delayed(data.class_pixel_counts)(image_id) for image_id in bar)
        presence = {image_id: np.asarray(count) > 0 for image_id, count in zip(image_ids, counts)}
    folds = assign_group_folds(image_ids, args.n_folds, args.seed, args.group_regex, presence)
    text = folds.to_csv(index=False)
    _refuse_other_folds(args, text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as partial:
        partial.write_text(text)
    if presence is not None:
        logger.info("%s", class_fold_summary(folds, presence, data.classes).to_string())
    logger.info(
        "%d images of %d groups in %d folds -> %s", len(folds), folds["group"].nunique(), args.n_folds, args.out
    )


if __name__ == "__main__":
    main()
