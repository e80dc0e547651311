import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from competition.errors import DataError
from competition.metrics import dice_per_image, dice_score, iou_per_image, iou_score, rle_dice, score_submission
from competition.rle import rle_encode


def test_dice_and_iou_on_hand_computed_cases():
    a = np.array([[1, 1, 0, 0]])
    b = np.array([[0, 1, 1, 0]])
    assert dice_score(a, b) == pytest.approx(2 * 1 / 4)
    assert iou_score(a, b) == pytest.approx(1 / 3)
    assert dice_score(a, a) == 1.0 and iou_score(a, a) == 1.0
    assert dice_score(a, np.zeros_like(a)) == 0.0
    empty = np.zeros((2, 2))
    assert dice_score(empty, empty) == 1.0 and iou_score(empty, empty) == 1.0
    with pytest.raises(ValueError, match="shape"):
        dice_score(a, np.zeros((2, 2)))


def test_torch_batched_versions_agree_with_numpy():
    rng = np.random.default_rng(0)
    predicted = rng.random((6, 1, 9, 11)) < 0.4
    truth = rng.random((6, 1, 9, 11)) < 0.5
    predicted[0] = truth[0] = False
    dice = dice_per_image(torch.from_numpy(predicted), torch.from_numpy(truth))
    iou = iou_per_image(torch.from_numpy(predicted), torch.from_numpy(truth))
    assert dice.shape == iou.shape == (6,) and dice[0] == 1.0
    np.testing.assert_allclose(dice.numpy(), [dice_score(p, t) for p, t in zip(predicted, truth)], rtol=1e-6)
    np.testing.assert_allclose(iou.numpy(), [iou_score(p, t) for p, t in zip(predicted, truth)], rtol=1e-6)


def test_dice_on_runs_equals_dice_on_decoded_masks():
    rng = np.random.default_rng(1)
    for _ in range(50):
        a, b = rng.random((2, 13, 17)) < rng.random()
        assert rle_dice(rle_encode(a), rle_encode(b), a.size) == pytest.approx(dice_score(a, b))


@pytest.mark.slow
def test_score_submission_and_cli(tmp_path):
    masks = {f"c_{i:02d}.jpg": (np.random.default_rng(i).random((4, 5)) < 0.5) for i in range(1, 4)}
    truth = pd.DataFrame({"img": list(masks), "rle_mask": [rle_encode(m) for m in masks.values()]})
    perfect = score_submission(truth, truth, 20)
    assert (perfect == 1.0).all()
    submission = truth.copy()
    submission.loc[0, "rle_mask"] = ""
    scores = score_submission(submission, truth, 20)
    assert scores.iloc[0] == 0.0 and scores.iloc[1:].eq(1.0).all()
    submission.to_csv(tmp_path / "s.csv", index=False)
    truth.to_csv(tmp_path / "t.csv", index=False)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "competition.metrics",
            str(tmp_path / "s.csv"),
            str(tmp_path / "t.csv"),
            "--size",
            "5x4",
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and f"mean Dice {2 / 3:.5f}" in result.stdout
    with pytest.raises(DataError, match="no row"):
        score_submission(submission.iloc[1:], truth, 20)
    submission.loc[1, "rle_mask"] = "1 2 3"
    with pytest.raises(DataError, match="c_02.jpg: RLE has an odd count"):
        score_submission(submission, truth, 20)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.tuples(
            arrays(np.bool_, (n, 7), elements=st.booleans()), arrays(np.bool_, (n, 7), elements=st.booleans())
        )
    )
)
def test_dice_and_iou_properties(pair):
    a, b = pair
    dice, iou = dice_score(a, b), iou_score(a, b)
    assert 0.0 <= dice <= 1.0 and dice == dice_score(b, a)
    assert (dice == 1.0) == bool(np.array_equal(a, b))
    assert dice == pytest.approx(2 * iou / (1 + iou))
    assert rle_dice(rle_encode(a), rle_encode(b), a.size) == pytest.approx(dice)
