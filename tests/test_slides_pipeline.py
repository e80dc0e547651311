"""make slides' commands on tiny slides: synthetic HuBMAP-like slides, folds by slide, training on tiles, the
sliding window into sample_submission.csv's id,predicted rows (column-major RLE), and competition.metrics' score."""

import pandas as pd
import pytest

from competition import synthetic
from competition.rle import rle_decode

SLIDE_FLAGS = ["--masks-csv", "train.csv", "--rle-columns", "id,encoding", "--rle-order", "column"]


@pytest.mark.slow
def test_slides_train_on_tiles_predict_the_samples_rows_and_score_as_numpy_does(tmp_path, capsys):
    import infer
    import make_folds
    import train
    from competition import metrics

    data = synthetic.generate_slides(tmp_path / "slides", size=1024, count=2, test_count=1, seed=5)
    folds, run, submission = tmp_path / "folds.csv", tmp_path / "run", tmp_path / "slides.csv"
    make_folds.main(["--data-dir", str(data), *SLIDE_FLAGS, "--n-folds", "2", "--out", str(folds), "--quiet"])
    train.main(
        ["--data-dir", str(data), *SLIDE_FLAGS, "--folds-csv", str(folds), "--out", str(run), "--fold", "0"]
        + ["--tile", "256", "--tile-overlap", "0", "--epochs", "1", "--batch-size", "4", "--workers", "0"]
        + ["--encoder", "resnet18", "--encoder-weights", "none", "--quiet"]
    )
    infer.main(
        ["--checkpoints", str(run), "--data-dir", str(data), "--tile", "256", "--tile-overlap", "0.25"]
        + ["--sample-submission", str(data / "sample_submission.csv"), "--rle-order", "column"]
        + ["--out", str(submission), "--quiet"]
    )
    rows = pd.read_csv(submission, dtype=str, keep_default_na=False)
    truth = pd.read_csv(data / "test_masks.csv", dtype=str, keep_default_na=False)
    assert list(rows.columns) == ["id", "predicted"] and rows["id"].tolist() == truth["id"].tolist()
    capsys.readouterr()
    metrics.main([str(submission), str(data / "test_masks.csv")])
    predicted, true = (rle_decode(table.iat[0, 1], (1024, 1024), order="column") != 0 for table in (rows, truth))
    assert true.any()
    expected = 2 * (predicted & true).sum() / (predicted.sum() + true.sum())
    assert capsys.readouterr().out.startswith(f"mean Dice {expected:.5f} over 1 images")
