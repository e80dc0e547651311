"""Messages users read: one logging format, the verbosity flags, and the one-line exit on a ProjectError."""

import argparse
import contextlib
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator

from competition.errors import ProjectError

LOGGER_NAME = "competition"
FORMAT = "%(asctime)s %(message)s"
WARNING_FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%H:%M:%S"
# A value that starts like a negative number (-5m, -1, -.5): argparse takes all but the plainest for a flag.
DASH_VALUE = re.compile(r"-\.?\d")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes (an unknown flag, a missing value, two flags that exclude each other)
    end in one line and exit code 2, like every other refusal; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(self.dash_values_joined(sys.argv[1:] if args is None else args), namespace)

    def dash_values_joined(self, args) -> list[str]:
        """``--time-limit -5m`` -> ``--time-limit=-5m``: argparse would take ``-5m`` for a flag and say only
        "expected one argument"; joined, the flag's own check says what is wrong with the value."""
        joined: list[str] = []
        for arg in args:
            flag = self._option_string_actions.get(joined[-1]) if joined else None
            if flag is not None and flag.nargs is None and DASH_VALUE.match(arg):
                joined[-1] = f"{joined[-1]}={arg}"
            else:
                joined.append(arg)
        return joined


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("messages")
    loudness = group.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", action="store_true", help="warnings and errors only")
    loudness.add_argument("--verbose", action="store_true", help="also debugging detail")
    group.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")


class _LevelFormatter(logging.Formatter):
    """Information as ``time message``; warnings and errors say their level."""

    def __init__(self):
        super().__init__(FORMAT, DATE_FORMAT)
        self.loud = logging.Formatter(WARNING_FORMAT, DATE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return self.loud.format(record) if record.levelno >= logging.WARNING else super().format(record)


def configure(level: int = logging.INFO, stream=None) -> logging.Logger:
    """Route the project's messages: information to stdout (or ``stream``), warnings and errors to stderr.

    Replaces the handlers of an earlier call, so each entry point called from a notebook or a test
    writes to the streams of the moment.
    """
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    formatter = _LevelFormatter()
    information = logging.StreamHandler(stream or sys.stdout)
    information.addFilter(lambda record: record.levelno < logging.WARNING)
    problems = logging.StreamHandler(stream or sys.stderr)
    problems.setLevel(logging.WARNING)
    for handler in (information, problems):
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.setLevel(level)
    return logger


@contextlib.contextmanager
def redirected(stream, level: int | None = None) -> Iterator[None]:
    """Every message of the project to ``stream`` while the block runs (a fold's train.log), then back."""
    logger = logging.getLogger(LOGGER_NAME)
    handlers, previous_level = list(logger.handlers), logger.level
    configure(previous_level if level is None else level, stream)
    try:
        yield
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        for handler in handlers:
            logger.addHandler(handler)
        logger.setLevel(previous_level)


@contextlib.contextmanager
def said_every(interval: float, look: Callable[[], None], name: str) -> Iterator[None]:
    """``look()`` (which logs what is new since its last call) in a thread every ``interval`` seconds while the
    block runs, and once more as it ends, for what happened meanwhile."""
    done = threading.Event()

    def watch():
        while not done.wait(interval):
            look()
        look()

    thread = threading.Thread(target=watch, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def configure_from(args: argparse.Namespace) -> None:
    configure(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)


EXIT_INTERRUPTED = 130  # the shell's own status for a program ended by Ctrl-C (128 + SIGINT)


@contextlib.contextmanager
def exit_on_project_error(program: str, debug: bool = False, on_interrupt: str = "") -> Iterator[None]:
    """A ProjectError ends the program with its one-line message and exit code 2 (its traceback with
    ``--debug``); Ctrl-C with one line (``on_interrupt``: how to go on) and exit code 130; any other exception
    is a bug and propagates with its traceback."""
    try:
        yield
    except ProjectError as error:
        if debug:
            raise
        sys.stderr.write(f"{program}: error: {error}\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write(f"{program}: interrupted{'; ' + on_interrupt if on_interrupt else ''}\n")
        raise SystemExit(EXIT_INTERRUPTED) from None
