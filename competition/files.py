"""Output files: written under a temporary name beside the target, renamed into place when complete."""

import contextlib
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
