"""The errors a user can fix: one small hierarchy, each message one line naming the file or flag and the fix.

Entry points catch ``ProjectError`` alone and print its message; anything else is a bug and keeps its
traceback. ``refusal`` is the one line for a weights file ``torch.load`` refused: checkpoints and encoder
weights files both say it, without importing each other.
"""

import pickle
from pathlib import Path

# How torch.save's files begin: a zip archive, or the legacy format's pickle protocol byte.
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


class ProjectError(Exception):
    """A mistake in the input or the settings, or a state of the machine, that the message tells how to fix."""


class ConfigError(ProjectError):
    """A setting or flag that cannot be used as given; the message names the flag and its choices."""


class DataError(ProjectError):
    """Input data that does not follow its documented format; the message names the file."""


class CheckpointError(ProjectError):
    """A checkpoint or run folder that cannot be used as asked; the message names the file."""


class DeviceError(ProjectError):
    """A device that cannot run the job: absent, unsupported by this PyTorch, or out of memory."""


class TrainingError(ProjectError):
    """Training that stopped on its own guard (e.g. a non-finite loss), its checkpoints kept."""


class OutputError(ProjectError):
    """An output that cannot be written: its path is not in a folder one can write to, another process is
    writing it, or the disk is full; the message names the path and what to do."""


class DiskFullError(OutputError):
    """An output folder's file system has no room left; the message says what was kept and how to go on."""


class DeviceMemoryError(DeviceError):
    """The device ran out of memory; the message says which setting to lower."""


class ModelError(ConfigError):
    """A model that cannot be built as asked; the message says what to pass instead."""


def refusal(path: Path, error: Exception, what: str = "checkpoint") -> str:
    """One line for a file ``torch.load(weights_only=True)`` refused, instead of PyTorch's paragraphs."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and "GLOBAL" in text:
        return (
            f"{path}: not a weights file of this project: it holds pickled Python objects, refused unread "
            "(nothing in it was run)"
        )
    foreign = None if path.suffix == ".safetensors" else _foreign_start(path)
    if foreign:  # PyTorch's own error for these says nothing a user can read (a text file gives "KeyError: 101")
        return f"{path}: not a PyTorch {what} ({foreign}, where PyTorch's files begin as a zip archive); check the path"
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if isinstance(error, pickle.UnpicklingError):
        first_line = "not a PyTorch file of tensors"
    return f"{path}: not a readable {what} ({first_line}); it is corrupt or incomplete"


def _foreign_start(path: Path) -> str | None:
    """What a file is instead, when its first bytes are not PyTorch's; None when they are (or it cannot be read)."""
    try:
        with open(path, "rb") as file:
            start = file.read(16)
    except OSError:
        return None
    if not start:
        return "the file is empty"
    if start.startswith(TORCH_FILE_STARTS):
        return None
    return f"it begins {start!r}"
