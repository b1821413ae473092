"""kernels/masking.py's band rules against a brute-force scan of ``in_band``, in Python and
compiled for the CPU kernels (``cpu/_compile.py``, through ``kernels/compile.py``).

``key_range`` / ``query_range`` decide which tiles the flash kernels visit at all (band
skipping) and ``tile_in_band`` which tiles skip the per-pair band test; if either were
too generous a kernel would silently drop keys or leave forbidden pairs in. The oracle is
``in_band`` itself, evaluated pair by pair on NumPy arrays: the range must contain every
key (query) some member of the block may see, and no more than the span of those. The
compiled copies the CPU kernels call are checked against the same oracle, never against
the Python copy.
"""

import numpy as np
import pytest

from microattn.kernels import masking
from microattn.kernels.cpu import _compile

WINDOWS = [(-1, -1), (0, 0), (3, 0), (-1, 0), (0, -1), (16, 16), (40, -1), (-1, 5), (2, 50)]
RULES = {"python": masking, "numba": _compile}


def visible(band, block, n_other, keys):
    """The keys (or queries) some member of ``block`` may pair with, by brute force."""
    other = np.arange(n_other)
    seen = set()
    for x in block:
        ok = masking.in_band(band, x, other) if keys else masking.in_band(band, other, x)
        seen.update(other[ok].tolist())
    return seen


def check_range(lo, hi, seen):
    assert seen <= set(range(lo, hi))  # never drops a visible key (query)
    if seen:  # and is no wider than the first and last visible one
        assert (lo, hi) == (min(seen), max(seen) + 1)
    else:
        assert lo == hi


@pytest.mark.parametrize("Nq, Nk", [(1, 1), (7, 7), (9, 40), (40, 9), (33, 64)])
@pytest.mark.parametrize("rules", list(RULES))
def test_band_ranges_cover_exactly_the_visible_pairs(Nq, Nk, rules):
    rule = RULES[rules]
    offset = Nk - Nq  # bottom-right aligned, as AttentionSpec
    for left, right in WINDOWS:
        band = (offset, left, right)
        for size in (1, 4, 8):
            for start in range(0, Nq, size):
                block = range(start, min(Nq, start + size))
                lo, hi = rule.key_range(band, block.start, block.stop, Nk)
                check_range(lo, hi, visible(band, block, Nk, keys=True))
            for start in range(0, Nk, size):
                block = range(start, min(Nk, start + size))
                lo, hi = rule.query_range(band, block.start, block.stop, Nq)
                check_range(lo, hi, visible(band, block, Nq, keys=False))


@pytest.mark.parametrize("Nq, Nk", [(7, 7), (9, 40), (40, 9)])
@pytest.mark.parametrize("rules", list(RULES))
def test_tile_in_band_is_every_pair_in_band(Nq, Nk, rules):
    """tile_in_band (two corners) is True exactly when every pair of the tile is allowed."""
    rule = RULES[rules]
    for left, right in WINDOWS:
        band = (Nk - Nq, left, right)
        for bm, bn in ((1, 1), (3, 5), (8, 8)):
            for i0 in range(0, Nq - bm + 1, 2):
                for j0 in range(0, Nk - bn + 1, 3):
                    i = np.arange(i0, i0 + bm)[:, None]
                    j = np.arange(j0, j0 + bn)[None, :]
                    every = bool(masking.in_band(band, i, j).all())
                    assert bool(rule.tile_in_band(band, i0, bm, j0, bn)) == every, (band, i0, bm, j0, bn)


def test_key_range_worked_example():
    """The docstring's example: Nq = Nk = 8, window (2, 0): queries 4..5 see keys 2..5."""
    for rule in RULES.values():
        assert tuple(rule.key_range((0, 2, 0), 4, 6, 8)) == (2, 6)
        assert tuple(rule.query_range((0, 2, 0), 2, 3, 8)) == (2, 5)  # key 2: queries 2, 3, 4


@pytest.mark.parametrize("rules", list(RULES))
def test_row_shift_gives_the_probabilities_exactly(rules):
    """p = exp(s - shift) / norm sums to 1 on a row whose scores are all -1e9 + a little
    (where exp(s - lse) with lse = m + log(l) gives 1 per key), and is 0 on an empty row."""
    rule = RULES[rules]
    for dtype in (np.float32, np.float64):
        s = (np.float64(-1e9) + np.arange(6) * 1e-3).astype(dtype)
        m = s.max()
        l = np.exp(s - m).sum(dtype=dtype)
        shift, norm = rule.row_shift(m, l)
        p = np.exp(s - shift) / norm
        assert abs(p.sum() - 1) < 1e-6
        shift, norm = rule.row_shift(dtype(-np.inf), dtype(0.0))  # no key allowed
        assert (np.exp(np.full(6, -np.inf, dtype) - shift) / norm == 0).all()


@pytest.mark.parametrize("rules", list(RULES))
def test_bias_index_broadcasts_size_one_axes(rules):
    rule = RULES[rules]
    for shape, want in (((1, 1, 2, 2), (0, 0)), ((3, 1, 2, 2), (2, 0)), ((1, 4, 2, 2), (0, 3)),
                        ((3, 4, 2, 2), (2, 3))):
        assert tuple(rule.bias_index(np.zeros(shape), 2, 3)) == want
    assert not rule.has_bias(np.zeros((1, 1, 0, 0))) and rule.has_bias(np.zeros((1, 1, 2, 2)))
