"""Where a run happens: the data and output folders (a local checkout or a Kaggle notebook), and the device."""

import os
from pathlib import Path

import torch

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


class DeviceError(RuntimeError):
    """A GPU that this PyTorch build has no kernels for; the message says what to pick instead."""


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


def resolve_device(requested: str | None = None) -> torch.device:
    """``requested`` (``cuda``, ``cuda:1``, ``cpu``), else the GPU when there is one, else the CPU.

    A GPU the build cannot run on fails here with one message, not at the first kernel launch with
    "no kernel image is available": Kaggle's P100 since its image moved to a PyTorch without
    Pascal kernels.
    """
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
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
