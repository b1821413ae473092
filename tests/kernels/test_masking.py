"""kernels/masking.py's band ranges against a brute-force scan of ``in_band``.

``key_range`` / ``query_range`` decide which tiles the flash kernels visit at all (band
skipping); if they were too narrow a kernel would silently drop keys. The oracle here is
``in_band`` itself, pair by pair: the range must contain every key (query) that some
member of the block may see. The numba-compiled copies the CPU kernels call are checked
against the same oracle.
"""

import numpy as np
import pytest

from microattn.kernels import masking
from microattn.kernels.cpu import _compile

WINDOWS = [(-1, -1), (0, 0), (3, 0), (-1, 0), (0, -1), (16, 16), (40, -1), (-1, 5), (2, 50)]


def visible(block, n_other, offset, left, right, keys):
    """The keys (or queries) some member of ``block`` may pair with, by brute force."""
    other = np.arange(n_other)
    seen = set()
    for x in block:
        ok = masking.in_band(x, other, offset, left, right) if keys else masking.in_band(other, x, offset, left, right)
        seen.update(other[ok].tolist())
    return seen


@pytest.mark.parametrize("Nq, Nk", [(1, 1), (7, 7), (9, 40), (40, 9), (33, 64)])
@pytest.mark.parametrize("compiled", [False, True], ids=["python", "numba"])
def test_band_ranges_cover_exactly_the_visible_pairs(Nq, Nk, compiled):
    key_range = _compile.key_range if compiled else masking.key_range
    query_range = _compile.query_range if compiled else masking.query_range
    offset = Nk - Nq  # bottom-right aligned, as AttentionSpec
    for left, right in WINDOWS:
        for size in (1, 4, 8):
            for start in range(0, Nq, size):
                block = range(start, min(Nq, start + size))
                lo, hi = key_range(block.start, block.stop, Nk, offset, left, right)
                seen = visible(block, Nk, offset, left, right, keys=True)
                assert seen <= set(range(lo, hi))  # never drops a visible key
                if seen:  # and is no wider than the first and last visible key
                    assert (lo, hi) == (min(seen), max(seen) + 1)
                else:
                    assert lo == hi
            for start in range(0, Nk, size):
                block = range(start, min(Nk, start + size))
                lo, hi = query_range(block.start, block.stop, Nq, offset, left, right)
                seen = visible(block, Nq, offset, left, right, keys=False)
                assert seen <= set(range(lo, hi))
                if seen:
                    assert (lo, hi) == (min(seen), max(seen) + 1)
                else:
                    assert lo == hi


def test_key_range_worked_example():
    """The docstring's example: Nq = Nk = 8, window (2, 0): queries 4..5 see keys 2..5."""
    assert masking.key_range(4, 6, 8, 0, 2, 0) == (2, 6)
    assert masking.query_range(2, 3, 8, 0, 2, 0) == (2, 5)  # key 2 is seen by queries 2, 3, 4
