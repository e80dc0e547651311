"""RLE of masks written band by band: the strings of the whole-mask encoders, byte for byte, in either order."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from competition.band_runs import ColumnMajorRuns, RowMajorRuns, runs_of_order
from competition.rle import rle_encode
from competition.submission import ClassRows, ImageRows


def written_in_bands(runs, mask: np.ndarray, cuts: list[int]):
    """``runs`` handed ``mask`` in the bands between the rows of ``cuts`` (any rows; empty bands included)."""
    edges = sorted({0, mask.shape[0], *(cut % (mask.shape[0] + 1) for cut in cuts)})
    for top, bottom in itertools.pairwise(edges):
        runs.write(top, mask[top:bottom])
    return runs


masks = arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9)), elements=st.sampled_from([0, 0, 1, 3]))


@settings(max_examples=300, deadline=None)
@given(mask=masks, cuts=st.lists(st.integers(0, 10), max_size=4))
def test_runs_written_band_by_band_are_the_whole_masks_rle(mask, cuts):
    height, width = mask.shape
    row = written_in_bands(RowMajorRuns(height, width), mask, cuts)
    column = written_in_bands(ColumnMajorRuns(height, width), mask, cuts)
    assert row.encoding() == rle_encode(mask)
    assert column.encoding() == rle_encode(np.ascontiguousarray(mask.T))


def test_runs_that_cross_band_borders_and_column_ends_are_one_run():
    mask = np.zeros((6, 4), np.uint8)
    mask[2:, 0] = 1  # down to the last row of column 0 ...
    mask[:3, 1] = 1  # ... and on from the top of column 1: one column-major run, across the band border at row 2
    mask[5, 2:] = 1  # to the last pixel: a row-major run still open when the last band ends
    mask[1, 3], mask[2, 0] = 1, 1  # the end of row 1 and the start of row 2: one row-major run across the border
    assert (
        written_in_bands(ColumnMajorRuns(6, 4), mask, [2, 3]).encoding()
        == "3 7 18 1 20 1 24 1"
        == rle_encode(mask.T.copy())
    )
    assert written_in_bands(RowMajorRuns(6, 4), mask, [2, 3]).encoding() == rle_encode(mask)


@settings(max_examples=100, deadline=None)
@given(
    mask=arrays(np.uint8, st.tuples(st.integers(1, 8), st.integers(1, 8)), elements=st.integers(0, 3)),
    cuts=st.lists(st.integers(0, 9), max_size=3),
    order=st.sampled_from(["row", "column"]),
)
def test_an_images_rows_from_bands_are_its_rows_from_the_whole_mask(mask, cuts, order):
    binary = (mask == 1).astype(np.uint8)
    for rows, image in ((ClassRows(4, order), mask), (ClassRows(2, order, True), mask), (ImageRows(), binary)):
        bands = written_in_bands(rows.band_rows("a", image.shape), image, cuts)
        assert bands.finish() == rows.rows("a", image)


def test_bands_out_of_order_or_missing_rows_are_refused():
    runs = runs_of_order("row", 4, 3)
    runs.write(0, np.ones((2, 3), np.uint8))
    with pytest.raises(ValueError, match="expected row 2"):
        runs.write(3, np.ones((1, 3), np.uint8))
    with pytest.raises(ValueError, match="2 of the mask's 4 rows"):
        runs.encoding()
    with pytest.raises(ValueError, match="expected row 0 of a 4x3 mask"):
        runs_of_order("column", 4, 3).write(0, np.ones((2, 5), np.uint8))


@pytest.mark.parametrize("order", ["row", "column"])
def test_a_sample_submissions_rows_from_bands_are_its_rows_from_the_whole_mask(tmp_path, order):
    from competition.submission import SampleRows

    (tmp_path / "sample.csv").write_text("id,class,predicted\na,blue,\na,red,\nb,red,\n")
    rows = SampleRows(tmp_path / "sample.csv", ["red", "blue"], False, order)
    mask = np.random.default_rng(4).integers(0, 3, (23, 17), dtype=np.uint8)
    bands = written_in_bands(rows.band_rows("a", mask.shape), mask, [5, 6, 19])
    assert bands.finish() == rows.rows("a", mask) and [name for name, _ in bands.finish()] == ["0", "1"]
