import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from competition.rle import RLEError, rle_decode, rle_decode_numpy, rle_encode, rle_encode_numpy

shapes = st.tuples(st.integers(1, 40), st.integers(1, 70))
masks = shapes.flatmap(lambda shape: arrays(np.uint8, shape, elements=st.integers(0, 1)))


@settings(max_examples=300, deadline=None)
@given(masks)
def test_encode_matches_canonical_numpy_byte_for_byte(mask):
    assert rle_encode(mask) == rle_encode_numpy(mask)


@settings(max_examples=300, deadline=None)
@given(masks)
def test_decode_inverts_encode(mask):
    decoded = rle_decode(rle_encode(mask), mask.shape)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, mask)


@settings(max_examples=100, deadline=None)
@given(masks)
def test_decode_matches_numpy_decoder(mask):
    rle = rle_encode_numpy(mask)
    np.testing.assert_array_equal(rle_decode(rle, mask.shape), rle_decode_numpy(rle, mask.shape))


@pytest.mark.parametrize(
    "mask, expected",
    [
        (np.zeros((3, 4), np.uint8), ""),
        (np.ones((3, 4), np.uint8), "1 12"),
        (np.eye(1, 12, 0, dtype=np.uint8).reshape(3, 4), "1 1"),
        (np.eye(1, 12, 11, dtype=np.uint8).reshape(3, 4), "12 1"),
        (np.array([[1, 0, 0, 1], [1, 1, 0, 0]], np.uint8), "1 1 4 3"),
    ],
)
def test_edge_cases_by_hand(mask, expected):
    assert rle_encode(mask) == expected == rle_encode_numpy(mask)
    np.testing.assert_array_equal(rle_decode(expected, mask.shape), mask)


def test_row_major_order_on_a_real_size_mask():
    rng = np.random.default_rng(0)
    mask = np.zeros((1280, 1918), np.uint8)
    mask[300:1000, 200:1700] = 1
    mask[rng.integers(0, 1280, 5000), rng.integers(0, 1918, 5000)] ^= 1
    assert rle_encode(mask) == rle_encode_numpy(mask)
    assert rle_encode(mask).split()[0] == str(int(np.flatnonzero(mask.ravel())[0]) + 1)


def test_bool_255_and_non_contiguous_inputs_mean_the_same_mask():
    rng = np.random.default_rng(1)
    mask = (rng.random((37, 53)) < 0.5).astype(np.uint8)
    expected = rle_encode_numpy(mask)
    assert rle_encode(mask.astype(bool)) == expected
    assert rle_encode(mask * 255) == expected
    assert rle_encode(mask.astype(np.float32)) == expected
    wide = np.zeros((37, 106), np.uint8)
    wide[:, ::2] = mask
    assert rle_encode(wide[:, ::2]) == expected


@pytest.mark.parametrize(
    "rle, problem",
    [
        ("1 2 3", "odd count"),
        ("1 x", "not a digit"),
        ("1 -2", "not a digit"),
        ("1 0", "length zero"),
        ("0 2", "start of zero"),
        ("11 3", "past the end"),
        ("5 2 1 2", "out of order"),
        ("1 3 3 2", "overlapping"),
        ("1 2 3 é", "non-ASCII"),
    ],
)
def test_malformed_strings_are_rejected_with_a_reason(rle, problem):
    with pytest.raises(RLEError, match=problem):
        rle_decode(rle, (3, 4))


def test_whitespace_only_is_an_empty_mask_and_adjacent_runs_are_accepted():
    assert rle_decode("  ", (2, 2)).sum() == 0
    np.testing.assert_array_equal(rle_decode("1 2 3 2", (2, 2)), np.ones((2, 2), np.uint8))
