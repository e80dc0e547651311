"""Where data is read from and outputs are written: a local checkout or a Kaggle notebook."""

import os
from pathlib import Path

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
