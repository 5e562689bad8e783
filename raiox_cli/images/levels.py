"""High-bit-depth grey to 8 bits: a robust window (percentiles, or the file's own), never
wrapping; shared by 16-bit PNG/TIFF and DICOM."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# Robust window for high-bit-depth images without their own window: outliers
# (dead pixels, burnt-in labels) must not squash the anatomy into a few greys.
WINDOW_PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLE = 4_000_000  # pixels looked at to estimate the window


def window(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Scale to uint8 between lo and hi (default: robust percentiles); never wraps."""
    distinct = distinct_levels(arr)
    if distinct is not None:
        if lo is None or hi is None:
            lo, hi = robust_range(distinct.domain, distinct.counts)
        return distinct.map(window(distinct.domain.astype(np.float64), lo, hi))
    if lo is None or hi is None:
        lo, hi = robust_range(arr)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (arr.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.nan_to_num(scaled, nan=0.0).round().astype(np.uint8)


@dataclass(frozen=True)
class Levels:
    """The distinct values of an integer image: every value from its min to its max
    (`domain`) and how often each occurs (`counts`). Per-pixel maps then run once per
    value, and `map` puts the results back on the pixels."""

    domain: np.ndarray
    counts: np.ndarray
    index: np.ndarray  # each pixel's position in `domain`, less `offset`
    offset: int

    def map(self, table: np.ndarray) -> np.ndarray:
        """`table[i]` (the value for `domain[i]`) at every pixel."""
        if self.offset:
            padded = np.zeros((self.offset + len(table), *table.shape[1:]), dtype=table.dtype)
            padded[self.offset :] = table
            table = padded
        return np.take(table, self.index, axis=0)


def distinct_levels(arr: np.ndarray) -> Levels | None:
    """For <=16-bit integers: their Levels (None for other images)."""
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2 or arr.size == 0:
        return None
    low, high = int(arr.min()), int(arr.max())
    domain = np.arange(low, high + 1, dtype=np.int64)
    if arr.dtype.kind == "u":  # the pixels index a table padded below `low`: no copy
        counts = np.bincount(arr.ravel(), minlength=high + 1)[low:]
        return Levels(domain, counts, arr, low)
    index = arr.astype(np.int32)
    index -= low
    return Levels(domain, np.bincount(index.ravel(), minlength=domain.size), index, 0)


def robust_range(values: np.ndarray, counts: np.ndarray | None = None) -> tuple[float, float]:
    """The WINDOW_PERCENTILES of the values (weighted by counts when given); the full
    range when those coincide (a nearly flat image)."""
    flat = values.ravel()
    if counts is None and flat.size > _PERCENTILE_SAMPLE:
        flat = flat[:: flat.size // _PERCENTILE_SAMPLE + 1]
    flat = flat.astype(np.float64)
    weights = np.ones(flat.size) if counts is None else counts.ravel().astype(np.float64)
    keep = np.isfinite(flat) & (weights > 0)
    flat, weights = flat[keep], weights[keep]
    if flat.size == 0:
        return 0.0, 0.0
    order = np.argsort(flat, kind="stable")
    flat, cdf = flat[order], np.cumsum(weights[order])
    lo, hi = (
        float(flat[min(int(np.searchsorted(cdf, q / 100 * cdf[-1])), flat.size - 1)])
        for q in WINDOW_PERCENTILES
    )
    if hi <= lo:
        lo, hi = float(flat[0]), float(flat[-1])
    return lo, hi


def grey_image(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(grey))
