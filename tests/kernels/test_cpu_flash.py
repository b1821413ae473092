"""The numba CPU flash kernels (kernels/cpu/flash.py) and their ladder (kernels/cpu/ladder.py)
against the NumPy reference, on the shared case grid and its one error yardstick
(``tests/grid.py``: ``check_against_reference``), plus what only these kernels have: tile
sizes, the split and fused backward, the kept shift of the forward, bit-identical reruns.

Rows under huge finite masks (-1e9, finfo.min, -1e30; Hugging Face's padding masks) are
checked three ways here, for every variant: against the grid's reference (the ``huge_mask``
regime), against the "composed" backend (Tensor ops, autograd-derived backward) through
the same ``Attention`` Function ``F.scaled_dot_product_attention`` uses, and against
float64 finite differences (``microattn.gradcheck``).
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest

import microattn as ma
from microattn import functional as F
from microattn.kernels import reference
from microattn.kernels.cpu import flash
from microattn.kernels.protocol import lse_of
from microattn.kernels.spec import make_attention_spec
from tests.grid import (
    DLSE_CASES, NAMES, NAN_CASES, NAN_SOURCES, Case, build, check_against_reference,
    check_nan_propagation, grid, make_inputs, nan_dependents, nan_inputs, run_kernel, unsupported,
)

if flash.unavailable_reason() is not None:  # numba is a dependency: its absence is a failure
    pytest.fail(f"the numba CPU kernels cannot run: {flash.unavailable_reason()}", pytrace=False)

from microattn.kernels.cpu import ladder  # noqa: E402

CASES = grid()
# the slow rungs run on the cases with N <= 37, but not the user's mods, which they do not
# implement (grid.unsupported: functional.attend never sends mods to them)
SMALL_CASES = [c for c in grid(max_n=37) if unsupported(c, ladder) is None]
DTYPES = [np.float64, np.float32]


def flash_variant(fused: bool, blocks=(flash.BLOCK_M, flash.BLOCK_N)):
    """flash with the backward pass and the tile size pinned (tiny tiles cross many edges)."""
    return SimpleNamespace(forward=partial(flash.forward, blocks=blocks),
                           backward=partial(flash.backward, fused=fused, blocks=blocks))


TINY = (16, 24)  # BLOCK_M, BLOCK_N: every grid case with N > 16 spans several tiles


# -- rung 3, the "numba" backend: every grid case, both dtypes, both backward passes -------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_flash_matches_reference(case, dtype):
    check_against_reference(flash, case, dtype)  # what the backend runs
    check_against_reference(flash_variant(fused=False, blocks=TINY), case, dtype)
    check_against_reference(flash_variant(fused=True, blocks=TINY), case, dtype)


LARGE = [
    Case(1000, 1000, 2, 1, 64, 64, B=1, masking="window", window=(255, 0)),
    Case(1000, 1000, 2, 2, 64, 64, B=1, masking="window", window=(100, 37)),
    Case(777, 1000, 2, 1, 64, 48, B=1, masking="causal"),
    Case(300, 1000, 2, 2, 64, 64, B=1, masking="dropout+causal"),
    Case(400, 400, 2, 1, 64, 64, B=1, masking="bool_mask"),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", LARGE, ids=lambda c: c.id)
def test_flash_multi_block(case, dtype):
    """Sizes spanning several BLOCK_M x BLOCK_N tiles: the band-skipping and full-tile paths."""
    check_against_reference(flash_variant(fused=False), case, dtype)
    check_against_reference(flash_variant(fused=True), case, dtype)


DETERMINISM = [
    Case(203, 113, 4, 2, 8, 5, masking="dropout"),  # GQA + dropout
    Case(300, 300, 4, 1, 16, 16, masking="dropout+causal"),  # MQA, several tiles
    Case(203, 203, 4, 2, 8, 8, masking="window", window=(40, -1)),
]


@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
@pytest.mark.parametrize("case", DETERMINISM, ids=lambda c: c.id)
def test_backward_bit_identical_over_reruns(case, fused):
    q, k, v, dout, spec = build(case, np.float32)
    out, stats = flash.forward(q, k, v, spec)
    kernel = flash_variant(fused, blocks=(64, 64))  # several tiles per head
    first = kernel.backward(q, k, v, out, stats, dout, spec)
    for _ in range(20):
        again = kernel.backward(q, k, v, out, stats, dout, spec)
        assert all(np.array_equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_empty_rows_are_zero_and_never_nan(dtype):
    # causal with Nq > Nk: the first Nq - Nk queries see no key; a window that ends
    # before key 0 empties more; huge logits on the rest
    q, k, v, dout, _ = make_inputs(Case(300, 140, 4, 2, 64, 64, B=1), dtype)
    q = q * 100
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, window=(20, 0))
    empty = np.arange(300) < 160
    for fused in (False, True):
        module = flash_variant(fused, blocks=(64, 64))
        out, stats = module.forward(q, k, v, spec)
        got = run_kernel(module, q, k, v, dout, spec)
        for x in got.values():
            assert not np.isnan(x).any()
        assert np.all(out[:, :, empty] == 0) and np.all(got["dq"][:, :, empty] == 0)
        assert np.all(np.isneginf(stats[0][:, :, empty])) and np.all(stats[1][:, :, empty] == 0)
        lse = got["lse"]
        assert np.all(np.isneginf(lse[:, :, empty])) and np.all(np.isfinite(lse[:, :, ~empty]))


NAN_MODULES = {
    "reference": reference,
    "flash": flash,
    "flash-split-tiny": flash_variant(False, blocks=TINY),
    "flash-fused-tiny": flash_variant(True, blocks=TINY),
}


@pytest.mark.parametrize("source", NAN_SOURCES)
@pytest.mark.parametrize("case", NAN_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(NAN_MODULES))
def test_nan_inputs_give_nan_outputs(name, dtype, case, source):
    """A NaN in q, k or v makes every output that depends on it NaN, as in NumPy and
    PyTorch: never a finite answer computed as if the NaN were not there (a row whose
    running sum is NaN is not an empty row)."""
    check_nan_inputs(NAN_MODULES[name], case, dtype, source)


@pytest.mark.parametrize("source", NAN_SOURCES)
@pytest.mark.parametrize("rung", [1, 2])
def test_ladder_nan_inputs_give_nan_outputs(rung, source):
    for case in NAN_CASES[:3]:
        check_nan_inputs(ladder.RUNGS[rung], case, np.float64, source)


def check_nan_inputs(module, case, dtype, source):
    q, k, v, dout, kwargs, row = nan_inputs(case, dtype, source)
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, **kwargs)
    got = run_kernel(module, q, k, v, dout, spec)
    clean = run_kernel(module, *(np.nan_to_num(x, nan=0.0) for x in (q, k, v)), dout, spec)
    allowed = np.broadcast_to(reference.allowed_pairs(spec), (spec.B, spec.Hq, spec.Nq, spec.Nk))
    must = nan_dependents(allowed, spec.Hq // spec.Hkv, source, row)
    check_nan_propagation(got, clean, must, 1e-4 if dtype == np.float32 else 1e-10, source, row)


def test_any_strides_in():
    q, k, v, dout, spec = build(Case(113, 37, 4, 2, 8, 5, masking="causal"), np.float64)
    views = [np.asfortranarray(x)[..., ::1] for x in (q, k, v, dout)]
    strided = [np.repeat(x, 2, axis=-1)[..., ::2] for x in views]  # non-contiguous, same values
    got = run_kernel(flash, *strided, spec)
    want = run_kernel(flash, q, k, v, dout, spec)
    assert all(np.array_equal(got[name], want[name]) for name in NAMES)


# -- rungs 1 and 2 of the ladder: the small cases --------------------------------------------


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("rung", [1, 2])
def test_ladder_matches_reference(rung, case):
    """float64 only: the rungs share rung 3's dtype handling, and each dtype is another
    ~15 s of first-run compilation (benchmarks/compare_cpu.py --ladder runs them in float32;
    the padding-row tests below run them in float32 too)."""
    check_against_reference(ladder.RUNGS[rung], case, np.float64)


# -- a gradient reaching lse (dlse, folded into delta by _bwd_preprocess) ----------------------

DLSE_MODULES = {
    "flash-split-tiny": flash_variant(False, blocks=TINY),
    "flash-fused-tiny": flash_variant(True, blocks=TINY),
    "rung1": ladder.RUNGS[1],
    "rung2": ladder.RUNGS[2],
}


# the slow rungs in float64 only (see test_ladder_matches_reference)
DLSE_RUNS = [(name, dtype) for name in DLSE_MODULES for dtype in DTYPES
             if dtype == np.float64 or name.startswith("flash")]


@pytest.mark.parametrize("case", DLSE_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("name, dtype", DLSE_RUNS, ids=lambda x: getattr(x, "__name__", x))
def test_dlse_matches_reference(name, dtype, case):
    check_against_reference(DLSE_MODULES[name], case, dtype, with_dlse=True)


# -- rows under huge finite masks: composed and finite differences -----------------------------

HUGE = {"-1e9": -1e9, "finfo.min": None, "-1e30": -1e30}
PADDING_MODULES = {
    "flash": flash,
    "flash-split": flash_variant(False),
    "flash-fused": flash_variant(True),
    "flash-split-tiny": flash_variant(False, blocks=(4, 6)),
    "flash-fused-tiny": flash_variant(True, blocks=(4, 6)),
    "rung1": ladder.RUNGS[1],
    "rung2": ladder.RUNGS[2],
}


def padding_problem(dtype, big, Nq=13, Nk=17, seed=0):
    """q (1, 4, Nq, 4), k (1, 2, Nk, 4), v (1, 2, Nk, 3) (GQA), a random (Nq, Nk) float mask
    with ``big`` over whole rows 2 and Nq - 2 and over parts of rows 4 (its first half) and
    Nq - 1 (every other key, the last one included), and a cotangent."""
    rng = np.random.default_rng(seed)
    q, k, v, dout = (rng.standard_normal(shape).astype(dtype) for shape in
                     ((1, 4, Nq, 4), (1, 2, Nk, 4), (1, 2, Nk, 3), (1, 4, Nq, 3)))
    value = np.finfo(dtype).min if big is None else big
    mask = rng.standard_normal((Nq, Nk))
    mask[[2, Nq - 2], :] = value
    mask[4, : Nk // 2] = value
    mask[Nq - 1, ::2] = value
    return q, k, v, dout, mask.astype(dtype)


def attention_through(kernel, mask):
    """fn(q, k, v) -> out Tensor, through the Attention Function F.scaled_dot_product_attention
    runs, with ``kernel`` (a kernel module, or "composed")."""
    def fn(q, k, v):
        if kernel == "composed":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="composed")
        spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, attn_mask=mask)
        return F.Attention.apply(q, k, v, spec=spec, kernel=kernel)
    return fn


def out_and_grads(fn, arrays, dout):
    tensors = [ma.tensor(x, requires_grad=True) for x in arrays]
    out = fn(*tensors)
    out.backward(dout)
    return (out.data,) + tuple(t.grad for t in tensors)


@pytest.mark.parametrize("big", list(HUGE))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(PADDING_MODULES))
def test_huge_mask_rows_match_composed(name, dtype, big):
    """Whole and part rows under -1e9 / finfo.min / -1e30: out, dq, dk, dv as "composed"
    (plain softmax maths). Before the stats protocol the backward recomputed p = exp(s -
    lse) with lse = m + log(l) rounded to m, so a whole row's p was 1 per key, not 1/Nk."""
    q, k, v, dout, mask = padding_problem(dtype, HUGE[big])
    got = out_and_grads(attention_through(PADDING_MODULES[name], mask), (q, k, v), dout)
    want = out_and_grads(attention_through("composed", mask), (q, k, v), dout)
    tol = 1e-10 if dtype == np.float64 else 2e-5
    for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == np.dtype(dtype)
        err = np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1.0)
        assert err <= tol, f"{label}: {err:.3g}"
    if big != "-1e9" or dtype == np.float32:  # q.k rounds away: the whole rows are averages of v
        v_mean = np.repeat(v, 2, axis=1).mean(axis=2)  # (1, Hq, Dv)
        np.testing.assert_allclose(got[0][:, :, 2], v_mean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(PADDING_MODULES))
def test_huge_mask_rows_gradcheck_minus_1e9(name):
    """float64 beside -1e9 keeps q.k to ~1.2e-7 (the ulp of 1e9): finite differences see
    every gradient, blurred by that rounding (~1.2e-7 / (2 eps) of a score's derivative).
    eps = 3e-3 keeps the blur below gradcheck's tolerance; at eps = 1e-3 "composed" itself
    fails on this problem (q's row 2, by 5e-5), as every backend does."""
    q, k, v, _, mask = padding_problem(np.float64, -1e9, Nq=7, Nk=9, seed=3)
    tensors = [ma.tensor(x, requires_grad=True) for x in (q, k, v)]
    assert ma.gradcheck(attention_through(PADDING_MODULES[name], mask), tensors, eps=3e-3)


@pytest.mark.parametrize("big", ["finfo.min", "-1e30"])
@pytest.mark.parametrize("name", list(PADDING_MODULES))
def test_huge_mask_rows_gradcheck_value(name, big):
    """Beside finfo.min or -1e30, q.k rounds away entirely: the computed scores of a masked
    row do not depend on q or k, so finite differences of q and k see nothing there, while
    softmax maths (and "composed") give the gradient of the unrounded function
    (docs/semantics.md). The value gradient is visible to both: it is checked here, and q
    and k through the rows without huge entries (the cotangent is zero on the others)."""
    q, k, v, dout, mask = padding_problem(np.float64, HUGE[big], Nq=7, Nk=9, seed=3)
    fn = attention_through(PADDING_MODULES[name], mask)
    assert ma.gradcheck(fn, [ma.tensor(q), ma.tensor(k), ma.tensor(v, requires_grad=True)])
    clean_rows = ~(mask <= -1e29).any(axis=1)  # (Nq,): rows 0, 1, 3
    assert ma.gradcheck(lambda q, k, v: fn(q, k, v)[:, :, clean_rows],
                        [ma.tensor(q, requires_grad=True), ma.tensor(k, requires_grad=True), ma.tensor(v)])


# -- the forward's kept shift ---------------------------------------------------------------


def rising_scores_problem(growth, dtype, N=200, D=16):
    """Keys whose scores rise along the sequence by ``growth`` per key, for every query."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, N, D))
    k = rng.standard_normal((1, 2, N, D)) * 0.3
    direction = q.mean(axis=2, keepdims=True)  # a key direction every query agrees with
    k += np.arange(N)[None, None, :, None] * growth * direction / (direction ** 2).sum() * np.sqrt(D)
    v = rng.standard_normal((1, 2, N, D))
    return tuple(x.astype(dtype) for x in (q, k, v))


def shift_block(m, scores, block_n):
    """For each row, the key block whose largest score the forward's shift m is.

    Block 0 always runs the classic way (m is -inf before it). After that, the classic
    path (the ``alpha`` rescale) sets m = max(m, this block's max) and the kept-shift path
    leaves m alone. So m is the max of one block b, and it witnesses the paths: b > 0 means
    the classic path ran on block b; m below the row's max means the block holding that
    max took the kept shift (the classic path would have raised m to it)."""
    n_blocks = -(-scores.shape[-1] // block_n)
    block_max = np.stack([scores[..., b * block_n:(b + 1) * block_n].max(axis=-1)
                          for b in range(n_blocks)], axis=-1)
    distance = np.abs(block_max - m[..., None])
    assert (distance.min(axis=-1) <= 1e-4 * np.maximum(1.0, np.abs(m))).all()  # m is one of them
    return distance.argmin(axis=-1), n_blocks


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("growth", [0.0, 0.05, 3.0], ids=["flat", "slow", "steep"])
def test_forward_kept_shift_and_its_fallback(growth, dtype):
    """The forward keeps the shift m_i while later key blocks stay within STALE_LIMIT of it
    and redoes a block the classic way when they do not. Keys whose scores rise along the
    sequence by ``growth`` per key (per query: for some queries they fall) exercise both:
    flat (always kept), slow (kept, then refreshed every few blocks), steep (every block
    falls back). The stats tell which path ran (:func:`shift_block`); out and lse must be
    right either way."""
    q, k, v = rising_scores_problem(growth, dtype)
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3)
    blocks = (16, 24)
    out, stats = flash.forward(q, k, v, spec, blocks=blocks)
    lse = lse_of(stats)

    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    spec64 = make_attention_spec(q.shape, k.shape, v.shape, (np.float64,) * 3)
    r_out, r_stats = reference.forward(q64, k64, v64, spec64)
    r_lse = lse_of(r_stats)
    if dtype == np.float64:
        bounds = (1e-9 * np.abs(r_out).max(), 1e-9 * np.abs(r_lse).max())
    else:  # large logits: within 4x the float32 reference's own error (as in the grid)
        f_out, f_stats = reference.forward(q, k, v, spec)
        bounds = (4 * np.abs(f_out - r_out).max() + 1e-6,
                  4 * np.abs(lse_of(f_stats) - r_lse).max() + 1e-6)
    assert np.abs(out - r_out).max() <= bounds[0]
    assert np.abs(lse - r_lse).max() <= bounds[1]

    m = stats[0].astype(np.float64)
    scores = reference.scores(q64, k64, spec64)
    block, n_blocks = shift_block(m, scores, blocks[1])
    kept = scores.max(axis=-1) - m > 1e-3  # the kept shift ran on the block with the row max
    classic_later = block > 0  # the classic path ran on a block after the first
    if growth == 0.0:
        assert (block == 0).all() and kept.any()  # only the kept shift after block 0
    elif growth == 0.05:
        assert (kept & classic_later).any()  # both paths, in one row of one call
    else:
        # every row that rises reaches its max through the classic path (rows whose scores
        # fall have their max in block 0)
        assert (block == n_blocks - 1).any() and not kept.any()
