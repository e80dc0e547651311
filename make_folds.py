"""Split the training images into grouped folds (python make_folds.py --n-folds 5), or by an official --split."""

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from competition.config import add_config_arguments, resolve_config
from competition.environment import default_work_dir
from competition.errors import ConfigError, DataError
from competition.files import atomic_output
from competition.folds import assign_folds, assign_group_folds, fold_summary, groups_of
from competition.layouts import DATA_FLAGS, open_data_as
from competition.logs import add_logging_arguments, configure_from, exit_on_project_error
from competition.survey import survey

logger = logging.getLogger("competition.make_folds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_arguments(parser, DATA_FLAGS)
    parser.add_argument("--n-folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--group-regex",
        help="images of one group share a fold: the regex's first capture group, searched in the image id, is the "
        "group, e.g. '^(.+)_\\d+$' for <car>_<NN> or Oxford Pet's <breed>_<N> (default: Carvana's car; elsewhere "
        "each image alone)",
    )
    parser.add_argument("--stratify", metavar="COLUMN", help="Carvana: a metadata.csv column to balance, e.g. make")
    parser.add_argument(
        "--stratify-classes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="other layouts: balance the classes the images hold across folds (default: on)",
    )
    parser.add_argument("--out", type=Path, default=default_work_dir() / "folds" / "folds.csv")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folds file that differs")
    add_logging_arguments(parser)
    return parser


def carvana_folds(data, args):
    """Carvana's car-grouped folds (``img,car_id,fold``), stratified by a metadata column when asked."""
    if args.group_regex:
        raise ConfigError("--group-regex is for other layouts; Carvana's folds are grouped by car")
    strata = None
    if args.stratify:
        metadata = data.read_csv("metadata.csv", ["id", args.stratify])
        strata = dict(zip(metadata["id"], metadata[args.stratify]))
    folds = assign_folds(data.train_ids(), args.n_folds, args.seed, strata)
    text = folds[["img", "car_id", "fold"]].to_csv(index=False)
    if strata is not None:
        folds[args.stratify] = [strata[car_id] for car_id in folds["car_id"]]
    return folds, text


def class_presence(data, image_ids: list[str], progress: bool) -> dict[str, np.ndarray]:
    """image id -> which classes its mask holds (every mask read once, on threads)."""
    counts = survey(data, image_ids, check=False, count=len(image_ids), progress=progress)
    return {image_id: row > 0 for image_id, row in zip(image_ids, counts)}


def group_folds(data, args):
    """Folds of any other layout (``img,group,fold``): grouped by --group-regex, stratified by class."""
    if args.stratify:
        raise ConfigError("--stratify names a Carvana metadata column; other layouts stratify by class")
    image_ids = data.train_ids()
    if data.splits:
        logger.info("the split has no val part: %d folds over its %d labelled images", args.n_folds, len(image_ids))
    groups = groups_of(image_ids, args.group_regex)
    presence = class_presence(data, image_ids, not args.quiet) if args.stratify_classes else None
    folds = assign_group_folds(groups, args.n_folds, args.seed, presence)
    if presence is not None:
        for index, name in enumerate(data.classes):
            folds[f"with {name}"] = [bool(presence[image_id][index]) for image_id in folds["img"]]
    return folds, folds[["img", "group", "fold"]].to_csv(index=False)


def split_folds(data, args):
    """An official split with a val part: fold 0 holds exactly the val images, fold 1 everything else, so that
    fold 0's scores compare with published tables (``img,group,fold,split``)."""
    if args.group_regex:
        raise ConfigError("--group-regex with --split: the official split decides which images validate")
    image_ids = data.train_ids()
    splits = [data.splits[image_id] for image_id in image_ids]
    folds = pd.DataFrame(
        {"img": image_ids, "group": image_ids, "fold": [0 if name == "val" else 1 for name in splits], "split": splits}
    )
    return folds, folds.to_csv(index=False)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_from(args)
    with exit_on_project_error("make_folds.py", args.debug):
        config = resolve_config(args, DATA_FLAGS)
        data = open_data_as(config)
        if not data.train_ids():
            raise DataError(f"{config.data_dir}: no training images to split")
        if args.out.is_dir():
            raise ConfigError(f"--out {args.out} is a folder; name the folds file, e.g. {args.out / 'folds.csv'}")
        if data.layout == "carvana":
            folds, text = carvana_folds(data, args)
        elif "val" in set(data.splits.values()):
            folds, text = split_folds(data, args)
        else:
            folds, text = group_folds(data, args)
        if args.out.exists() and args.out.read_text() != text and not args.overwrite:
            raise ConfigError(
                f"{args.out} exists and holds other folds (runs trained on it would no longer match); "
                "pass --overwrite to replace it, or another --out"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as partial:
        partial.write_text(text)
    summary = fold_summary(folds, args.stratify)
    for column in [column for column in folds.columns if column.startswith("with ")]:
        summary[f"images {column}"] = folds.groupby("fold")[column].sum()
    logger.info("%s", summary.to_string())
    groups = folds["car_id" if "car_id" in folds.columns else "group"].nunique()
    logger.info("%d images of %d groups in %d folds -> %s", len(folds), groups, folds["fold"].nunique(), args.out)


if __name__ == "__main__":
    main()
