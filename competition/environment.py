"""Where a run happens: the data and output folders (a local checkout or a Kaggle notebook), and the device."""

import contextlib
import os
from pathlib import Path

import torch

from competition.errors import DeviceError, DeviceMemoryError

KAGGLE_DATA_DIR = Path("/kaggle/input/carvana-image-masking-challenge")
KAGGLE_WORK_DIR = Path("/kaggle/working")


def on_kaggle() -> bool:
    """True inside a Kaggle notebook or script (Kaggle sets this variable in every kernel)."""
    return "KAGGLE_KERNEL_RUN_TYPE" in os.environ


def default_data_dir() -> Path:
    """``$CARVANA_DATA_DIR``, else the competition's input folder on Kaggle, else ``input/``."""
    if "CARVANA_DATA_DIR" in os.environ:
        return Path(os.environ["CARVANA_DATA_DIR"])
    return KAGGLE_DATA_DIR if on_kaggle() else Path("input")


def default_work_dir() -> Path:
    """``$CARVANA_WORK_DIR``, else ``/kaggle/working`` on Kaggle, else the current folder.

    folds/, runs/ and submissions/ are made under it: Kaggle's input folder is read-only.
    """
    if "CARVANA_WORK_DIR" in os.environ:
        return Path(os.environ["CARVANA_WORK_DIR"])
    return KAGGLE_WORK_DIR if on_kaggle() else Path(".")


def gpu_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a PyTorch build for ``arch_list`` (``torch.cuda.get_arch_list()``) runs on a GPU of
    compute ``capability``: a cubin (sm_XY) runs on its major version from its minor up, PTX
    (compute_XY) is compiled for any GPU at least as new. A build that lists nothing is trusted."""
    for arch in arch_list:
        kind, _, version = arch.partition("_")
        code = divmod(int(version.rstrip("af")), 10)
        if kind == "sm" and code[0] == capability[0] and code[1] <= capability[1]:
            return True
        if kind == "compute" and code <= capability:
            return True
    return not arch_list


def _parse_device(requested: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` for a GPU that is here; one line for anything else."""
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {requested!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"--device {requested!r}: this project runs on cpu or cuda devices")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"--device {requested}: no CUDA device here (none visible to PyTorch); use --device cpu")
        if device.index is not None and device.index >= count:
            raise DeviceError(
                f"--device {requested}: there are {count} CUDA device(s) here, cuda:0 to cuda:{count - 1}"
            )
    return device


def resolve_device(requested: str | None = None) -> torch.device:
    """``requested`` (``cuda``, ``cuda:1``, ``cpu``), else the GPU when there is one, else the CPU.

    A GPU the build cannot run on fails here with one message, not at the first kernel launch with
    "no kernel image is available": Kaggle's P100 since its image moved to a PyTorch without
    Pascal kernels.
    """
    device = _parse_device(requested) if requested else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        capability, arch_list = torch.cuda.get_device_capability(device), torch.cuda.get_arch_list()
        if not gpu_supported(capability, arch_list):
            raise DeviceError(
                f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]}) is not "
                f"supported by this PyTorch {torch.__version__}, built for {' '.join(arch_list)}. On Kaggle choose "
                "the T4 x2 accelerator (or a newer GPU), or install a PyTorch built for this GPU; "
                "CUDA_VISIBLE_DEVICES= runs on the CPU instead"
            )
    return device


@contextlib.contextmanager
def explain_out_of_memory(context: str, fix: str):
    """The allocator's out-of-memory error (its first line, without the multi-line report) as a
    DeviceMemoryError that says what ran out (``context``) and which setting to lower (``fix``)."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        lines = str(error).strip().splitlines()
        cause = lines[0] if lines else "out of memory"
        raise DeviceMemoryError(f"{cause} ({context}): {fix}") from None
