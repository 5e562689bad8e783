"""images.levels: the window of an integer image computed once per distinct value and
put back on the pixels gives what indexing every pixel by value did before."""

from __future__ import annotations

import numpy as np
import pytest

from raiox_cli.images import levels


def _per_pixel_window(arr: np.ndarray) -> np.ndarray:
    """The window as it was computed before Levels: a shifted int32 copy of the pixels
    indexing the table."""
    low = int(arr.min())
    index = arr.astype(np.int32) - low
    domain = np.arange(low, int(arr.max()) + 1, dtype=np.int64)
    lo, hi = levels.robust_range(domain, np.bincount(index.ravel(), minlength=domain.size))
    return levels.window(domain.astype(np.float64), lo, hi)[index]


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [
        (np.uint8, 0, 256),
        (np.uint16, 1000, 4096),  # 12 bits stored in 16
        (np.uint16, 30000, 65536),
        (np.int16, -2000, 3000),  # CT-like signed DICOM
        (np.uint16, 5, 7),  # two levels
    ],
)
def test_window_by_distinct_levels_matches_per_pixel_indexing(dtype, low, high) -> None:
    rng = np.random.default_rng(abs(low))
    arr = rng.integers(low, high, (120, 90)).astype(dtype)
    found = levels.distinct_levels(arr)
    assert found is not None
    assert found.counts.sum() == arr.size and found.domain[0] == arr.min()
    assert np.array_equal(found.map(found.domain), arr.astype(np.int64))  # back on the pixels
    windowed = levels.window(arr)
    assert windowed.dtype == np.uint8 and windowed.shape == arr.shape
    assert np.array_equal(windowed, _per_pixel_window(arr))


def test_images_that_are_not_small_integers_have_no_levels() -> None:
    assert levels.distinct_levels(np.zeros((4, 4), np.int32)) is None
    assert levels.distinct_levels(np.zeros((4, 4), np.float32)) is None
    assert levels.distinct_levels(np.zeros((0, 4), np.uint16)) is None
