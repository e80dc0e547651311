"""The errors a user can fix: one small hierarchy, each message one line naming the file or flag and the fix.

Entry points catch ``ProjectError`` alone and print its message; anything else is a bug and keeps its
traceback.
"""


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


class DeviceMemoryError(DeviceError):
    """The device ran out of memory; the message says which setting to lower."""
