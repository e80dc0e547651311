"""Train folds: python train.py --fold 0, or python train.py --folds 0,1,2,3,4 --gpus 0,1,2,3 (--backend ray: on a
Ray cluster)."""

import argparse
import logging
import sys
import time
from pathlib import Path

from competition.board import require_tensorboard
from competition.cluster import add_cluster_arguments, check_cluster_arguments, train_folds_on_ray
from competition.config import add_config_arguments
from competition.environment import resolve_device
from competition.errors import ConfigError
from competition.files import check_writable
from competition.fold_data import fold_numbers
from competition.fold_runner import train_folds
from competition.logs import OneLineParser, add_logging_arguments, configure_from, exit_on_project_error
from competition.lr_find import with_found_lr
from competition.pseudo_data import read_manifest
from competition.recipes import resolve_run_config
from competition.run_folder import inspect_run_dir
from competition.training import train_fold

logger = logging.getLogger("competition.train")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__)
    add_config_arguments(parser)
    parser.add_argument("--device", help="for one fold: cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--folds", help="several folds, e.g. 0,1,2,3,4 (run in parallel with --gpus or --jobs)")
    parser.add_argument("--gpus", help="GPU ids for --folds, e.g. 0,1,2,3: one fold per GPU at a time")
    parser.add_argument("--jobs", type=int, help="folds run at once (default: one per GPU, else 1)")
    add_cluster_arguments(parser, "fold")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--resume", action="store_true", help="continue each fold from its last.pt")
    runs.add_argument("--overwrite", action="store_true", help="train again into a run folder that holds a run")
    add_logging_arguments(parser)
    return parser


def parse_numbers(text: str, flag: str, example: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]; one line naming ``flag`` for anything else, or a number given twice."""
    try:
        numbers = [int(item) for item in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: comma-separated whole numbers, e.g. {flag} {example}") from None
    repeated = sorted({number for number in numbers if numbers.count(number) > 1})
    if repeated:
        raise ConfigError(f"{flag} {text!r}: {repeated} given more than once")
    return numbers


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()  # --time-limit counts from here, in every fold worker too
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_from(args)
    with exit_on_project_error(
        "train.py", args.debug, on_interrupt="each fold's last.pt is kept: run the same command with --resume to go on"
    ):
        if args.folds is not None and args.fold is not None:
            raise ConfigError("--fold and --folds: give one (--fold 2 trains one fold, --folds 0,1 several)")
        folds = parse_numbers(args.folds, "--folds", "0,1,2,3,4") if args.folds is not None else None
        if args.out is not None:  # before any work: the data check and the learning-rate test take a while
            check_writable(args.out, "--out", folder=True)
        one_fold_here = folds is None and args.backend != "ray"
        if one_fold_here:
            resolve_device(args.device)  # a GPU this torch cannot use is said before the data is read
        find_lr, args.lr = args.lr == "auto", None if args.lr == "auto" else args.lr
        config = resolve_run_config(args, also_given=("lr",) if find_lr else ())
        check_writable(config.run_dir(), "--out", folder=True)  # its fold's folder, and an out set by --config
        progress = not args.quiet
        require_tensorboard(config)  # before the learning-rate test and the data: a missing package is said first
        if config.pseudo:  # likewise a --pseudo that is no folder of pseudo-labels
            read_manifest(Path(config.pseudo))
        if find_lr:  # a fresh fold's run folder checked first: the test takes minutes (a resumed one keeps its rate)
            if not args.resume:
                inspect_run_dir(config, resume=False, overwrite=args.overwrite)
            config = with_found_lr(config, args.device, progress, args.resume)
        check_cluster_arguments(args, {"--device": args.device, "--gpus": args.gpus, "--jobs": args.jobs})
        if one_fold_here:
            if args.gpus or args.jobs:
                raise ConfigError("--gpus and --jobs are for several folds (--folds 0,1,...); one fold takes --device")
            train_fold(config, args.device, args.resume, args.overwrite, progress, started)
            return
        if args.device:
            raise ConfigError("--device is for one fold; several folds take --gpus")
        folds = folds or [config.fold]
        available = fold_numbers(config.folds_csv)
        absent = [fold for fold in folds if fold not in available]
        if absent:
            raise ConfigError(f"--folds: {config.folds_csv} has no fold {absent}; its folds are {available}")
        # every fold's run folder checked before any starts; a resumed fold begun with other settings by the rule
        # (an earlier rule) sets them back for all, so that the folds of one run stay alike
        for fold in folds:
            config.fold = fold
            inspect_run_dir(config, args.resume, args.overwrite)
        level = logging.getLogger("competition").level
        if args.backend == "ray":
            outcomes = train_folds_on_ray(
                config,
                folds,
                address=args.address,
                retries=args.retries,
                resume=args.resume,
                overwrite=args.overwrite,
                log_level=level,
                started=started,
            )
        else:
            devices, jobs = local_devices(args)
            logger.info(
                "training folds %s on %s, %d at a time; logs in %s/fold<N>/train.log", folds, devices, jobs, config.out
            )
            outcomes = train_folds(config, folds, devices, jobs, args.resume, args.overwrite, level, started)
    report_outcomes(outcomes)
    if not all(outcome.ok for outcome in outcomes):
        sys.exit(1)


def local_devices(args: argparse.Namespace) -> tuple[list[str], int]:
    """The devices of --gpus (else the default one) and the folds run at once on them."""
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    if args.gpus:
        devices = [str(resolve_device(f"cuda:{gpu}")) for gpu in parse_numbers(args.gpus, "--gpus", "0,1")]
    else:
        devices = [str(resolve_device())]
    return devices, args.jobs or len(devices)


def report_outcomes(outcomes) -> None:
    """One line per fold; then which folds the time limit stopped, and how to continue them."""
    for outcome in outcomes:
        status = "FAILED" if not outcome.ok else "stopped by the time limit" if outcome.stopped else "ok"
        report = logger.error if not outcome.ok else logger.warning if outcome.stopped else logger.info
        report("fold %d: %s: %s (log: %s)", outcome.fold, status, outcome.message, outcome.log)
    stopped = [outcome.fold for outcome in outcomes if outcome.stopped]
    if stopped:
        logger.warning(
            "fold(s) %s stopped by --time-limit, their checkpoints saved: continue them in a new session with the "
            "same command and --resume (e.g. --folds %s --resume)",
            stopped,
            ",".join(map(str, stopped)),
        )


if __name__ == "__main__":
    main()
