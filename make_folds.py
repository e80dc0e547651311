"""Split the training images into car-grouped folds: python make_folds.py --n-folds 5 --seed 42."""

import argparse
import logging
from pathlib import Path

from competition.data import CarvanaData
from competition.environment import default_data_dir, default_work_dir
from competition.errors import ConfigError, DataError
from competition.files import atomic_output
from competition.folds import assign_folds, fold_summary
from competition.logs import add_logging_arguments, configure_from, exit_on_project_error

logger = logging.getLogger("competition.make_folds")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--data-dir", type=Path, default=default_data_dir(), help="Carvana data folder (default: %(default)s)"
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
        data = CarvanaData(args.data_dir)
        image_ids = data.train_ids()
        if not image_ids:
            raise DataError(f"{args.data_dir}: no training images to split")
        strata = None
        if args.stratify:
            metadata = data.read_csv("metadata.csv", ["id", args.stratify])
            strata = dict(zip(metadata["id"], metadata[args.stratify]))
        if args.out.is_dir():
            raise ConfigError(f"--out {args.out} is a folder; name the folds file, e.g. {args.out / 'folds.csv'}")
        folds = assign_folds(image_ids, args.n_folds, args.seed, strata)
        text = folds[["img", "car_id", "fold"]].to_csv(index=False)
        if args.out.exists() and args.out.read_text() != text and not args.overwrite:
            raise ConfigError(
                f"{args.out} exists and holds other folds (runs trained on it would no longer match); "
                "pass --overwrite to replace it, or another --out"
            )
    if strata is not None:
        folds[args.stratify] = [strata[car_id] for car_id in folds["car_id"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as partial:
        partial.write_text(text)
    logger.info("%s", fold_summary(folds, args.stratify).to_string())
    logger.info("%d images of %d cars in %d folds -> %s", len(folds), folds["car_id"].nunique(), args.n_folds, args.out)


if __name__ == "__main__":
    main()
