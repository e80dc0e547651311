"""Output files: checked writable before any work, written under a temporary name beside the target, renamed into
place when complete; and locks."""

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from competition.errors import OutputError

# The errors of a write that found no room: a full file system, or the user's disk quota reached.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch.save writes through C++ (caffe2's inline_container.cc), which says a failed write in a RuntimeError without
# an errno ("file write failed", or "unexpected pos" at the write after a short one).
TORCH_WRITE_FAILED = ("inline_container", "PytorchStreamWriter")
# A write that failed for want of room leaves its file system full to the last blocks; under this many bytes free,
# torch's failed write is taken for a full disk rather than another fault (a bad sector, a lost network mount).
NEARLY_FULL_BYTES = 64 * 2**20


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


def no_space_left(error: BaseException) -> bool:
    """Whether ``error`` is a write the operating system refused for want of room (a full disk, a quota)."""
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether ``error``, raised writing into ``folder``, means its file system has no room left: the operating
    system's refusal, or torch.save's error on a nearly full disk. Ask before removing what the failed write left:
    that frees the room again."""
    if isinstance(error, OSError):
        return no_space_left(error)
    if isinstance(error, RuntimeError) and any(mark in str(error) for mark in TORCH_WRITE_FAILED):
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    return False


def tagged_partial_path(path: Path, tag: str) -> Path:
    """``best.pt`` -> ``best.pt.<tag>.partial``: a temporary name that says which write it belongs to."""
    return path.with_name(f"{path.name}.{tag}.partial")


def write_all_then_rename(writes: list[tuple[Path, Callable[[Path], None]]], tag: str) -> None:
    """Write every file of ``writes`` ((target, write(temporary path))) under its temporary name
    ``<name>.<tag>.partial``, and only then rename them onto their targets, in the order given. A failure while
    writing removes every temporary file and leaves the targets as they were; a full disk is raised as OSError
    ENOSPC, whatever the writer raised (torch.save: a RuntimeError)."""
    written = []
    try:
        for target, write in writes:
            written.append(tagged_partial_path(target, tag))
            write(written[-1])
    except BaseException as error:
        full = is_disk_full(error, written[-1].parent)
        for partial in written:
            partial.unlink(missing_ok=True)
        if full and not isinstance(error, OSError):
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({error})", str(written[-1])) from error
        raise
    for target, _ in writes:
        os.replace(tagged_partial_path(target, tag), target)


def reserve_space(path: str | Path, size: int) -> None:
    """Allocate ``size`` bytes of ``path`` on its disk now (OSError ENOSPC when there is no room): a file written
    through a memory map must not be sparse, since a page that finds the disk full kills the process (SIGBUS)."""
    with open(path, "r+b") as file:
        os.posix_fallocate(file.fileno(), 0, size)


def format_bytes(count: float) -> str:
    """``48.2 MB``: a size in decimal units, as file managers and ``df -H`` say it."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


@contextlib.contextmanager
def exclusive_lock(path: str | Path, remove: bool = False) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if absent) while the block runs; yields False at once,
    without waiting, when another process holds it. The operating system drops the lock when its
    holder dies, however it dies, so a lock never outlives a killed run. With ``remove`` the holder removes
    the file as it lets go (a file removed under a process that just opened it is locked again, afresh)."""
    while True:
        handle = open(path, "a+")  # noqa: SIM115 - held until the block ends
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            if remove and not _same_file(handle, path):
                continue  # its last holder removed it between our open and our lock
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            try:
                yield True
            finally:
                if remove:
                    Path(path).unlink(missing_ok=True)
            return
        finally:
            handle.close()


def _same_file(handle, path: str | Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def output_lock(path: str | Path, flag: str) -> Iterator[None]:
    """``path`` (a file or a folder, given by ``flag``) written by this process alone while the block runs: a
    second command on it is refused at once in one line naming the first's pid. The lock is ``<path>.lock``
    beside it (its folder made if missing), removed when the block ends; a killed holder leaves no lock."""
    path = Path(path).resolve()  # "." and "/" have no name to put .lock after
    lock = path.parent / f"{path.name or 'root'}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(lock, remove=True) as locked:
        if not locked:
            raise OutputError(
                f"{flag} {path} is being written by another process (pid {lock_holder(lock)}); wait for it or stop "
                "it first, or name another output"
            )
        yield


def check_writable(path: str | Path, flag: str, folder: bool = False) -> None:
    """One line (OutputError) unless ``path``, given by ``flag``, can be written: a file replaced in its folder, or
    (``folder``) a folder written in; either made with its missing parents. The nearest folder that exists must be a folder (not a file
    such as ``README.md`` in ``README.md/x``) where a file can be made: tried for real, since root passes every
    permission check and ``/proc`` refuses files to root too. Nothing is left behind."""
    path = Path(path)
    nearest = next((folder for folder in (path, *path.parents) if _exists(folder, path, flag)), Path("."))
    if (nearest != path or folder) and not nearest.is_dir():
        raise OutputError(f"{flag} {path}: {nearest} is a file, not a folder; name a path in a folder")
    writable = nearest if nearest.is_dir() else nearest.parent  # an existing file: replaced in its folder
    try:
        if not os.access(writable, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        handle, probe = tempfile.mkstemp(prefix=".write-check-", dir=writable)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        missing = "" if writable in (path, path.parent) else f", where {path.parent} would be made"
        raise OutputError(
            f"{flag} {path}: cannot write in {writable}{missing} ({error.strerror}); name a folder you can write to"
        ) from None


def _exists(folder: Path, path: Path, flag: str) -> bool:
    try:
        folder.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as error:
        raise OutputError(f"{flag} {path}: cannot look into {folder} ({error.strerror}); name another path") from None
    return True


def lock_holder(path: str | Path) -> str:
    """The process id written in a lock file by its holder, or "unknown"."""
    try:
        return Path(path).read_text().strip() or "unknown"
    except OSError:
        return "unknown"
