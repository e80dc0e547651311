"""Train folds: python train.py --fold 0, or python train.py --folds 0,1,2,3,4 --gpus 0,1,2,3."""

import argparse
import sys

from competition.config import add_config_arguments, resolve_config
from competition.data import DataError
from competition.environment import DeviceError, resolve_device
from competition.models import ModelError
from competition.training import DeviceMemoryError, NonFiniteLossError, train_fold, train_folds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config_arguments(parser)
    parser.add_argument("--folds", help="several folds, e.g. 0,1,2,3,4 (run in parallel with --gpus or --jobs)")
    parser.add_argument("--gpus", help="GPU ids for --folds, e.g. 0,1,2,3: one fold per GPU at a time")
    parser.add_argument("--jobs", type=int, help="folds run at once (default: one per GPU, else 1)")
    parser.add_argument("--resume", action="store_true", help="continue each fold from its last.pt")
    args = parser.parse_args(argv)
    try:
        config = resolve_config(args)
    except ValueError as error:
        parser.error(str(error))
    if not args.folds:
        try:
            train_fold(config, resume=args.resume)
        except (DataError, DeviceError, DeviceMemoryError, ModelError, NonFiniteLossError, ValueError) as error:
            parser.exit(2, f"train.py: error: {error}\n")
        return
    folds = [int(fold) for fold in args.folds.split(",")]
    if args.gpus:
        devices = [f"cuda:{gpu}" for gpu in args.gpus.split(",")]
    else:
        try:
            devices = [str(resolve_device())]
        except DeviceError as error:
            parser.exit(2, f"train.py: error: {error}\n")
    jobs = args.jobs or len(devices)
    print(f"training folds {folds} on {devices}, {jobs} at a time; logs in {config.out}/fold<N>/train.log")
    outcomes = train_folds(config, folds, devices, jobs, resume=args.resume)
    for outcome in outcomes:
        print(f"fold {outcome.fold}: {'ok' if outcome.ok else 'FAILED'}: {outcome.message} (log: {outcome.log})")
    if not all(outcome.ok for outcome in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
