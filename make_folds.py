"""Split the training images into car-grouped folds: python make_folds.py --n-folds 5 --seed 42."""

import argparse
from pathlib import Path

from competition.data import CarvanaData, DataError
from competition.environment import default_data_dir, default_work_dir
from competition.files import atomic_output
from competition.folds import assign_folds, fold_summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--data-dir", type=Path, default=default_data_dir(), help="Carvana data folder (default: %(default)s)"
    )
    parser.add_argument("--n-folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--stratify", metavar="COLUMN", help="a metadata.csv column to balance across folds, e.g. make")
    parser.add_argument("--out", type=Path, default=default_work_dir() / "folds" / "folds.csv")
    args = parser.parse_args(argv)
    try:
        data = CarvanaData(args.data_dir)
        image_ids = data.train_ids()
        if not image_ids:
            raise DataError(f"{args.data_dir}: no training images to split")
        strata = None
        if args.stratify:
            metadata = data.read_csv("metadata.csv", ["id", args.stratify])
            strata = dict(zip(metadata["id"], metadata[args.stratify]))
        folds = assign_folds(image_ids, args.n_folds, args.seed, strata)
    except (DataError, ValueError) as error:
        parser.exit(2, f"make_folds.py: error: {error}\n")
    if strata is not None:
        folds[args.stratify] = [strata[car_id] for car_id in folds["car_id"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as partial:
        folds[["img", "car_id", "fold"]].to_csv(partial, index=False)
    print(fold_summary(folds, args.stratify).to_string())
    print(f"{len(folds)} images of {folds['car_id'].nunique()} cars in {args.n_folds} folds -> {args.out}")


if __name__ == "__main__":
    main()
