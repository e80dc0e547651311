"""Output files: written under a temporary name beside the target, renamed into place when complete; and locks."""

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def partial_path(path: str | Path) -> Path:
    """``best.pt`` -> ``best.pt.partial``, in the same folder so that the final rename is atomic."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yields the temporary path to write; renames it to ``path`` on success, removes it on failure,
    so an interrupted or failed write never leaves a half-written ``path``."""
    partial = partial_path(path)
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if absent) while the block runs; yields False at once,
    without waiting, when another process holds it. The operating system drops the lock when its
    holder dies, however it dies, so a lock never outlives a killed run."""
    handle = open(path, "a+")  # noqa: SIM115 - held until the block ends
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield True
    finally:
        handle.close()


def lock_holder(path: str | Path) -> str:
    """The process id written in a lock file by its holder, or "unknown"."""
    try:
        return Path(path).read_text().strip() or "unknown"
    except OSError:
        return "unknown"
