"""tests/xla_bits.py: the comparison the bitwise-against-XLA tests use, and its pin."""

from __future__ import annotations

import pathlib
import re

import ml_dtypes
import numpy as np
import pytest

from tests import xla_bits

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]


def test_the_pin_is_the_locked_jaxlib():
    """`make lock` moving jaxlib must come with the kernels matched again and the pin moved."""
    lock = pathlib.Path(__file__).parents[1] / "requirements" / "constraints.txt"
    locked = re.search(r"^jaxlib==(\S+)$", lock.read_text(), re.MULTILINE)
    assert locked is not None and locked.group(1) == xla_bits.PINNED_JAXLIB


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_one_ulp_apart_passes_only_off_the_pin(dtype):
    expected = np.array([1.0, -2.5, 0.0, np.inf, np.nan, 3e-3], dtype)
    up = np.nextafter(expected, np.array(np.inf, dtype))
    up[3:5] = expected[3:5]  # inf and NaN stay themselves
    xla_bits.assert_xla_bits(up, expected, exact=False)
    with pytest.raises(AssertionError):
        xla_bits.assert_xla_bits(up, expected, exact=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_two_ulps_nan_for_a_number_and_another_dtype_fail_everywhere(dtype):
    expected = np.array([1.0, -2.5, 7.0], dtype)
    two = np.nextafter(np.nextafter(expected, np.array(np.inf, dtype)), np.array(np.inf, dtype))
    nan = expected.copy()
    nan[1] = np.nan
    for actual in (two, nan, expected.astype(np.float32 if dtype != np.float32 else np.float64)):
        for exact in (True, False):
            with pytest.raises(AssertionError):
                xla_bits.assert_xla_bits(actual, expected, exact=exact)


def test_signed_zeros_differ_in_bits_only():
    xla_bits.assert_xla_bits(np.float32([-0.0]), np.float32([0.0]), exact=False)
    with pytest.raises(AssertionError):
        xla_bits.assert_xla_bits(np.float32([-0.0]), np.float32([0.0]), exact=True)


def test_complex_parts_and_integer_ids():
    expected = np.array([1 + 2j], np.complex64)
    actual = expected.view(np.float32).copy()
    actual[1] = np.nextafter(actual[1], np.float32(np.inf))
    xla_bits.assert_xla_bits(actual.view(np.complex64), expected, exact=False)
    with pytest.raises(AssertionError):
        xla_bits.assert_xla_bits(np.int32([4]), np.int32([5]), exact=False)
