"""Split the training images into grouped folds (python make_folds.py --n-folds 5), or by an official --split."""

import argparse
import logging
from pathlib import Path

from competition.config import add_config_arguments, resolve_config
from competition.errors import ConfigError, DataError
from competition.files import atomic_output, check_writable
from competition.folds import fold_summary_text
from competition.layouts import DATA_FLAGS, open_data_as
from competition.logs import OneLineParser, add_logging_arguments, configure_from, exit_on_project_error

logger = logging.getLogger("competition.make_folds")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__)
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
    parser.add_argument(
        "--out",
        type=Path,
        help="the folds file (default: --config's folds_csv, which train.py reads; else folds/folds.csv)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folds file that differs")
    add_logging_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_from(args)
    with exit_on_project_error("make_folds.py", args.debug):
        config = resolve_config(args, DATA_FLAGS)
        args.out = args.out or Path(config.folds_csv)  # the file the same --config trains on
        check_writable(args.out, "--out")  # before the images are read; its missing folders are made
        data = open_data_as(config)
        if not data.train_ids():
            raise DataError(f"{config.data_dir}: no training images to split")
        if args.out.is_dir():
            raise ConfigError(f"--out {args.out} is a folder; name the folds file, e.g. {args.out / 'folds.csv'}")
        folds, text = data.folds(
            args.n_folds,
            args.seed,
            group_regex=args.group_regex,
            stratify=args.stratify,
            stratify_classes=args.stratify_classes,
            progress=not args.quiet,
        )
        if args.out.exists() and args.out.read_text() != text and not args.overwrite:
            raise ConfigError(
                f"{args.out} exists and holds other folds (runs trained on it would no longer match); "
                "pass --overwrite to replace it, or another --out"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as partial:
        partial.write_text(text)
    logger.info("%s", fold_summary_text(folds, args.stratify))
    groups = folds["car_id" if "car_id" in folds.columns else "group"].nunique()
    logger.info("%d images of %d groups in %d folds -> %s", len(folds), groups, folds["fold"].nunique(), args.out)


if __name__ == "__main__":
    main()
