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


# -- the score terms: softcap and ALiBi --------------------------------------------------------


@pytest.mark.parametrize("rules", list(RULES))
def test_cap_worked_example_and_slope(rules):
    """The docstring's example (c = 2: s = 1 -> 2 tanh(0.5), s = 100 -> 2, -inf -> -2), and
    the slope against the derivative 1 - tanh(s / c)**2, in float32 and float64. Off means
    reals[2] == 0."""
    rule = RULES[rules]
    for dtype in (np.float32, np.float64):
        reals = (dtype(0.5), dtype(1.0), dtype(2.0))
        assert rule.has_softcap(reals) and not rule.has_softcap((dtype(0.5), dtype(1.0), dtype(0.0)))
        tol = 4 * np.finfo(dtype).eps
        for s, want in ((1.0, 2 * np.tanh(0.5)), (100.0, 2.0), (-np.inf, -2.0), (0.0, 0.0)):
            got = rule.cap(reals, dtype(s))
            assert abs(got - want) <= tol * 2, (dtype, s, got)
            capped, slope = rule.cap_and_slope(reals, dtype(s))
            assert capped == got
            assert abs(slope - (1 - np.tanh(s / 2) ** 2)) <= tol, (dtype, s, slope)


@pytest.mark.parametrize("rules", list(RULES))
def test_alibi_bias_worked_example(rules):
    """The docstring's example: slope 0.5, Nq = 2, Nk = 4 (offset 2): query 1 and key 0 are 3
    apart (-1.5), query 1 and key 3 on the diagonal (0); (Ba, Hq) slopes broadcast Ba = 1."""
    rule = RULES[rules]
    band = (2, -1, -1)
    one = np.array([[0.5, 0.25]])  # (1, Hq = 2): every batch entry reads row 0
    per_batch = np.array([[0.5, 0.25], [1.0, 2.0]])
    assert rule.alibi_bias(one, band, 1, 0, 1, 0) == -1.5
    assert rule.alibi_bias(one, band, 1, 0, 1, 3) == 0
    assert rule.alibi_bias(one, band, 0, 1, 0, 0) == -0.5
    assert rule.alibi_bias(per_batch, band, 1, 1, 1, 0) == -6.0
    assert rule.alibi_bias(per_batch, band, 1, 1, 0, 3) == -2.0  # key after the diagonal: |d|
    assert rule.has_alibi(one) and not rule.has_alibi(np.zeros((1, 0)))


def test_alibi_bias_broadcasts_over_index_arrays():
    """The reference's use: one call on (B, Hq, Nq, Nk) index grids, in the slopes' dtype."""
    slopes = np.array([[0.5, 0.25], [1.0, 2.0]], dtype=np.float32)
    b, h, i, j = np.ix_(np.arange(2), np.arange(2), np.arange(3), np.arange(5))
    got = masking.alibi_bias(slopes, (2, -1, -1), b, h, i, j)
    assert got.shape == (2, 2, 3, 5) and got.dtype == np.float32
    for index in np.ndindex(got.shape):
        bb, hh, ii, jj = index
        assert got[index] == -slopes[bb, hh] * abs(ii + 2 - jj)


def test_cpu_fast_tanh():
    """The float32 tanh the CPU kernels compile into the rules (``_compile.fast_tanh``): within
    2 ulp of tanh, +-1 at +-inf, odd, NaN for NaN, and step for step ``_fast_tanh_meaning``."""
    import numba

    @numba.njit(fastmath=_compile.FASTMATH)
    def rows(x):
        out = np.empty_like(x)
        for i in range(x.shape[0]):  # a loop LLVM vectorises, as in the kernels' sweeps
            out[i] = _compile.fast_tanh(x[i])
        return out

    x = np.concatenate([np.float32([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-30, -1e-38]),
                        np.linspace(-20, 20, 400_001, dtype=np.float32),
                        np.geomspace(1e-8, 1.0, 10_000).astype(np.float32)])
    got = rows(x)
    truth = np.tanh(x.astype(np.float64))
    finite = np.isfinite(x)
    ulp = np.spacing(np.abs(truth[finite]).astype(np.float32)).astype(np.float64)
    assert (np.abs(got[finite] - truth[finite]) <= 2 * ulp).all()
    assert got[0] == 1 and got[1] == -1 and np.isnan(got[2])
    np.testing.assert_array_equal(rows(-x[finite]), -got[finite])
    np.testing.assert_allclose(got[finite], _compile._fast_tanh_meaning(x[finite]), rtol=2.0**-22,
                               atol=1e-45)
    assert _compile.fast_tanh(0.5) == np.tanh(0.5)  # float64 (and plain Python): libm's


@pytest.mark.parametrize("rules", list(RULES))
def test_tile_class_never_skips_an_allowed_pair_nor_trusts_a_forbidden_one(rules):
    """tile_class over the block mask of mods.block_mask, against the pairs themselves: 0 only
    where the tile allows nothing, 2 only where it allows everything, exact on tiles made of
    whole chunks; plus the worked example."""
    import dataclasses

    from microattn.kernels import mods
    from microattn.kernels.spec import make_attention_spec

    tile_class = masking.tile_class if rules == "python" else _compile.rules.tile_class
    rng = np.random.default_rng(7)
    Nq, Nk, chunks = 21, 18, (4, 6)
    allowed = rng.random((2, Nq, Nk)) < 0.5
    allowed[:, :8] = True  # whole chunks of each class
    allowed[:, 12:16, :12] = False

    def lookup(b, h, i, j):
        return allowed[h, i, j]

    spec = make_attention_spec((1, 2, Nq, 4), (1, 2, Nk, 4), (1, 2, Nk, 4), (np.float64,) * 3,
                               mask_mod=lookup)
    blocks = mods.block_mask(spec, *chunks)
    seen = set()
    for _ in range(300):
        h = int(rng.integers(2))
        i0, j0 = int(rng.integers(Nq)), int(rng.integers(Nk))
        i1, j1 = int(rng.integers(i0 + 1, Nq + 1)), int(rng.integers(j0 + 1, Nk + 1))
        if rng.random() < 0.5:  # whole chunks
            i0, j0 = i0 // 4 * 4, j0 // 6 * 6
            i1, j1 = min(Nq, -(-i1 // 4) * 4), min(Nk, -(-j1 // 6) * 6)
        cls = int(tile_class(blocks, chunks, 0, h, i0, i1, j0, j1))
        tile = allowed[h, i0:i1, j0:j1]
        assert cls != 0 or not tile.any()
        assert cls != 2 or tile.all()
        if i0 % 4 == 0 and j0 % 6 == 0 and (i1 % 4 == 0 or i1 == Nq) and (j1 % 6 == 0 or j1 == Nk):
            assert cls == (0 if not tile.any() else 2 if tile.all() else 1)
        seen.add(cls)
    assert seen == {0, 1, 2}

    causal = dataclasses.replace(spec, Nq=8, Nk=8, mask_mod=lambda b, h, i, j: j <= i)
    example = mods.block_mask(causal, 4, 4)  # the docstring's worked example
    np.testing.assert_array_equal(example[0, 0], [[1, 0], [2, 1]])
    assert [int(tile_class(example, (4, 4), 0, 0, *t)) for t in
            ((4, 8, 0, 4), (0, 4, 4, 8), (2, 6, 0, 4))] == [2, 0, 1]
