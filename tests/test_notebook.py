"""The Kaggle notebook, executed top to bottom on CPU against a tiny synthetic copy of Kaggle's input folder."""

from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

from competition.submission import validate_submission
from tests.conftest import HEIGHT, WIDTH

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = """# injected by the test, as papermill would: a schedule that runs in seconds on a CPU
ENCODER_WEIGHTS = "none"
FOLDS = [0, 1]  # two folds, as the full schedule on a T4 x2 (here one after the other on the CPU)
TRAIN_CONFIG = "configs/cpu_demo.toml"
EXTRA_TRAIN_FLAGS = ["--epochs", "1", "--size", "64x96", "--encoder", "resnet18", "--workers", "0"]
"""


@pytest.mark.slow
def test_notebook_runs_offline_from_the_competition_zips(zip_dir, tmp_path, monkeypatch):
    work = tmp_path / "working"
    work.mkdir()
    monkeypatch.setenv("CARVANA_DATA_DIR", str(zip_dir))  # laid out as /kaggle/input/carvana-image-masking-challenge
    monkeypatch.setenv("CARVANA_WORK_DIR", str(work))  # stands for /kaggle/working
    monkeypatch.setenv("CARVANA_REPO_DIR", str(REPO))
    notebook = nbformat.read(REPO / "notebooks" / "carvana.ipynb", as_version=4)
    position = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(position + 1, new_code_cell(OVERRIDES))
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()

    submission = work / "submission.csv"
    test_images = pd.read_csv(zip_dir / "sample_submission.csv.zip")["img"].tolist()
    rows = validate_submission(submission, test_images, (HEIGHT, WIDTH))
    assert rows["img"].tolist() == test_images and rows["area"].between(0.01, 0.9).all()
    shown = [
        output for cell in notebook.cells for output in cell.get("outputs", []) if "image/png" in output.get("data", {})
    ]
    assert len(shown) >= 1 + 3, "the training curves and three validation overlays are shown inline"
    printed = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []) if "text" in output
    )
    assert "Unet-resnet18 at 64x96, AdamW; GiB counted per step" in printed, "the memory count follows the flags"
    shown_last = [output for output in notebook.cells[-1].outputs if output["output_type"] == "display_data"]
    assert "rle_mask" in shown_last[0]["data"]["text/plain"], "the head of the submission is shown"
