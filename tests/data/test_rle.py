"""Run-length codecs: hand-made cases with known lists, round trips, errors."""

import numpy as np
import pytest

from brushnet.data.rle import (
    decode_brushbench_rle,
    decode_brushdata_rle,
    encode_brushbench_rle,
    encode_brushdata_rle,
)

# A 3x4 mask; column-major order visits (0,0) (1,0) (2,0) (0,1) (1,1) ...
MASK_3x4 = np.array(
    [
        [1, 0, 0, 1],
        [1, 1, 0, 1],
        [0, 1, 0, 1],
    ],
    dtype=bool,
)
# Column-major flat: 1 1 0 | 0 1 1 | 0 0 0 | 1 1 1 → runs at 1-based 1 (len 2), 5 (len 2), 10 (len 3).
COLUMN_MAJOR_3x4 = [1, 2, 5, 2, 10, 3]
# Row-major flat: 1 0 0 1 | 1 1 0 1 | 0 1 0 1 → runs at 1 (1), 4 (3), 8 (1), 10 (1), 12 (1).
ROW_MAJOR_3x4 = [1, 1, 4, 3, 8, 1, 10, 1, 12, 1]


def test_brushdata_hand_made_case():
    assert encode_brushdata_rle(MASK_3x4) == COLUMN_MAJOR_3x4
    np.testing.assert_array_equal(decode_brushdata_rle(COLUMN_MAJOR_3x4, 3, 4), MASK_3x4)


def test_brushbench_hand_made_case():
    assert encode_brushbench_rle(MASK_3x4) == ROW_MAJOR_3x4
    np.testing.assert_array_equal(decode_brushbench_rle(ROW_MAJOR_3x4, 3, 4), MASK_3x4)


def test_orders_differ_on_non_symmetric_mask():
    assert not np.array_equal(decode_brushdata_rle(ROW_MAJOR_3x4, 3, 4), MASK_3x4)


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (16, 3), (31, 64)])
def test_random_round_trips(shape):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    for density in (0.0, 0.1, 0.5, 1.0):
        mask = rng.random(shape) < density
        np.testing.assert_array_equal(decode_brushdata_rle(encode_brushdata_rle(mask), *shape), mask)
        np.testing.assert_array_equal(decode_brushbench_rle(encode_brushbench_rle(mask), *shape), mask)


def test_empty_and_full_masks():
    assert encode_brushdata_rle(np.zeros((4, 5), bool)) == []
    assert encode_brushdata_rle(np.ones((4, 5), bool)) == [1, 20]
    assert not decode_brushdata_rle([], 4, 5).any()


@pytest.mark.parametrize("rle", [[1], [0, 3], [19, 3], [1, -1]])
def test_invalid_lists_raise(rle):
    with pytest.raises(ValueError):
        decode_brushdata_rle(rle, 4, 5)
