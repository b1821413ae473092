"""How the numba CPU attention kernels are compiled and run: written once, used by every rung.

What lives here, and why:

* ``NUMBA_ERROR``: None when numba imports, else the reason (the kernel modules still
  import without numba, so ``unavailable_reason()`` can say why they cannot run).
* ``kernel`` / ``helper``: the decorators. Kernels are ``njit(parallel=PARALLEL,
  cache=True)`` with ``FASTMATH`` (``prange`` loops only); helpers are plain ``njit``
  functions the kernels call.
* ``FASTMATH``: fastmath *without* ``nnan`` and ``ninf``. Masking writes ``-inf`` into the
  scores and relies on ``exp(-inf) == 0`` and ``max(-inf, x) == x``, and an empty row's
  norm is ``+inf`` (``masking.row_shift``); the flags that assume "no infinities" would
  make that undefined behaviour.
* The **rules** of ``kernels/masking.py`` (``in_band``, ``key_range``, ``query_range``,
  ``tile_in_band``, ``has_bias``, ``bias_index``, ``keep``, ``has_dropout``,
  ``row_shift``, ``has_softcap``, ``cap``, ``cap_and_slope``, ``has_alibi``,
  ``alibi_bias``), compiled as they are, never rewritten, by the one helper that compiles
  them for every target (``kernels/compile.py``). They are the only code that looks inside
  the spec's records (``AttentionSpec.pack()``: bias, band, dropout, reals, alibi), so every
  backend draws the same mask, skips the same tiles and recomputes the same probabilities.
  The one substitution: the rules' ``masking.tanh`` is ``fast_tanh`` here (same meaning).
* ``fast_exp`` and the row sweeps ``exp_sub`` / ``exp_sub_sum`` built on it. pip's llvmlite
  has no SVML, so ``math.exp`` stays a scalar libm call (~8 ns); the float32 version here is
  a polynomial the compiler vectorises (~0.5 ns, within 1 ulp of ``np.exp``,
  ``exp(-inf) == 0`` exactly, NaN in gives NaN out). float64 keeps ``math.exp``.
  ``fast_tanh`` likewise (softcap's tanh): a float32 polynomial near 0, ``1 - 2 / (exp(2x)
  + 1)`` on fast_exp beyond, within 2 ulp; float64 keeps libm's ``tanh``.
* ``blas_single_threaded()``: ``kernels/blas.py``'s one OpenBLAS thread pin (NumPy's and
  SciPy's copies), re-exported: inside a ``prange`` every worker already owns a core, so
  the BLAS that numba's ``np.dot`` calls must not spawn more. (The attention kernels call
  no BLAS; ``linear.py`` does.)
* The **threading layer**. numba picks ``omp`` when it can; on small VMs its per-call cost
  was measured at ~15 ms, far more than a whole N=1024 attention. So, *unless the user
  chose a layer* (``NUMBA_THREADING_LAYER`` in the environment), importing the kernels
  sets ``numba.config.THREADING_LAYER = "workqueue"``, a simple layer with near-zero launch
  cost. This must happen before the first parallel kernel runs anywhere in the process;
  a user who wants ``omp`` or ``tbb`` sets the environment variable.

Caching: ``cache=True`` stores compiled kernels next to the source (``__pycache__``). numba
checks only the kernel's own file, so after editing ``masking.py`` clear ``__pycache__``.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .. import masking
from ..blas import single_threaded as blas_single_threaded  # noqa: F401  (re-exported for the kernels)
from ..compile import compile_rules

try:
    import numba
    from numba import prange  # noqa: F401  (re-exported for the kernel modules)
    from numba.core import types
    from numba.extending import intrinsic, overload

    NUMBA_ERROR = None
except ImportError as exc:  # the reference backend still works without numba
    numba = None
    NUMBA_ERROR = f"numba is not importable ({exc})"
    prange = range

try:
    import scipy.linalg.cython_blas  # noqa: F401  numba's np.dot calls BLAS through SciPy
except ImportError as exc:
    if NUMBA_ERROR is None:
        NUMBA_ERROR = f"scipy is not importable ({exc}); numba needs it for np.dot"

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}  # no "nnan", no "ninf"


# Only explicit ``prange`` loops run in parallel. numba's other parallel transforms (array
# expressions, np.* calls and slice assignments turned into parallel loops) would only
# nest inside our prange, where they run serially anyway, and they tripled compile time.
PARALLEL = {"prange": True, "comprehension": False, "reduction": False, "inplace_binop": False,
            "setitem": False, "numpy": False, "stencil": False, "fusion": False}


def kernel(fn):
    """A parallel CPU kernel: njit(parallel=PARALLEL, cache=True) with FASTMATH."""
    if numba is None:
        return fn
    # NOTE: numba pops the options out of the dict it is given, so only the first kernel to
    # compile gets PARALLEL's restrictions and every later one gets {} (all of numba's
    # transforms on). A copy per kernel would apply them everywhere, but the ladder's row
    # updates (`dq[b, h, i, :] = dq_row * scale`) then fail to lower inside prange; until
    # those array expressions are loops, the kernels keep the behaviour they were tested with.
    return numba.njit(parallel=PARALLEL, cache=True, fastmath=FASTMATH, nogil=True)(fn)


def helper(fn):
    """A function called from the kernels, compiled once per signature and shared by every
    kernel that calls it (LLVM still inlines the small ones). Not numba's IR-level
    ``inline="always"``, which re-types the body at every call site and made the first
    compile several times slower."""
    if numba is None:
        return fn
    return numba.njit(fastmath=FASTMATH)(fn)


# -- the threading layer ------------------------------------------------------------------

if numba is not None and "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"


# -- exp over a row ------------------------------------------------------------------------


def _exp_coefficients(degree=6):
    """Minimax-like (Chebyshev-fitted) coefficients of exp(r) on [-ln2/2, ln2/2]."""
    half = math.log(2.0) / 2.0
    r = np.cos(np.linspace(0.0, np.pi, 4001)) * half
    fit = np.polynomial.chebyshev.Chebyshev.fit(r, np.exp(r), degree)
    return tuple(np.float32(c) for c in fit.convert(kind=np.polynomial.Polynomial).coef)


_C0, _C1, _C2, _C3, _C4, _C5, _C6 = _exp_coefficients()
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 = LN2_HI + LN2_LO, LN2_HI exact in 9 bits (Cody-Waite)
_LN2_LO = np.float32(-2.12194440e-4)
# Below _EXP_MIN, exp is 0. e**-64 = 1.6e-28: a probability that far below its row's shift
# adds nothing a float32 sum can hold (eps 6e-8), while kept it made denormal products
# (p * v, p * dO / l, ~1e-40): each such multiply costs ~100 cycles on x86. ALiBi puts
# scores hundreds below the row max: at N=4096 its backward ran 1.68x the plain one with
# the old cut at -87 (exp(-87) = 1.6e-38, the smallest normal float32), 1.01x with this one.
_EXP_MIN = np.float32(-64.0)
# Rounding by addition: in [2**23, 2**24) float32 steps by 1, so t = x*log2e + _ROUND holds
# n = round(x*log2e) exactly, t - _ROUND gives n back, and the low 9 bits of t's bit
# pattern are n + 127: shifted left by 23 they are the float 2**n. (1.5 * 2**23 keeps t
# inside that binade for either sign of n; +127 is the exponent bias.)
_ROUND = np.float32(1.5 * 2**23 + 127)


def _fast_exp_meaning(x: np.ndarray) -> np.ndarray:
    """The float32 ``fast_exp`` in NumPy, step by step (what the compiled versions do).

    exp(x) = 2**n * exp(r), n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2]; exp(r) is
    the degree-6 polynomial, 2**n is built from bits. Below _EXP_MIN: 0; NaN stays NaN.
    """
    x = np.asarray(x, dtype=np.float32)
    xc = np.where(x < _EXP_MIN, _EXP_MIN, x)  # NaN passes (the comparison is False)
    t = xc * _LOG2E + _ROUND
    n = t - _ROUND
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = _C6
    for c in (_C5, _C4, _C3, _C2, _C1, _C0):
        p = p * r + c
    two_n = (t.view(np.int32) << 23).view(np.float32)
    return np.where(x < _EXP_MIN, np.float32(0.0), p * two_n)


def fast_exp(x):
    """exp(x) for a float32 or float64 scalar; exp(-inf) == 0 exactly, exp(NaN) is NaN.

    Compiled per type by the overload below: float32 gets a branch-free polynomial that
    LLVM vectorises inside the row loops (``_fast_exp_meaning`` spells it out; within
    1 ulp of exp for x in [-64, 88], 0 below -64, see ``_EXP_MIN``); float64 keeps libm.
    This body is the meaning.
    """
    return math.exp(x)


if numba is not None:

    @intrinsic
    def _float32_from_bits(typingctx, bits):
        """Reinterpret the low 32 bits of an integer as a float32 (a bit cast, no conversion)."""
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            from llvmlite import ir

            value = args[0]
            if bits.bitwidth > 32:
                value = builder.trunc(value, ir.IntType(32))
            return builder.bitcast(value, ir.FloatType())

        return types.float32(bits), codegen

    @intrinsic
    def _bits_of_float32(typingctx, x):
        """The bit pattern of a float32 as an int32 (a bit cast, no conversion)."""
        if x != types.float32:
            return None

        def codegen(context, builder, signature, args):
            from llvmlite import ir

            return builder.bitcast(args[0], ir.IntType(32))

        return types.int32(x), codegen

    def _fast_exp_float32(x):
        # as _fast_exp_meaning; the comparisons are written so that NaN falls through
        xc = _EXP_MIN if x < _EXP_MIN else x
        t = xc * _LOG2E + _ROUND
        n = t - _ROUND
        r = xc - n * _LN2_HI
        r = r - n * _LN2_LO
        p = _C6
        p = p * r + _C5
        p = p * r + _C4
        p = p * r + _C3
        p = p * r + _C2
        p = p * r + _C1
        p = p * r + _C0
        e = p * _float32_from_bits(_bits_of_float32(t) << np.int32(23))
        return np.float32(0.0) if x < _EXP_MIN else e

    def _fast_exp_float64(x):
        return math.exp(x)

    # Without "reassoc": it would let LLVM fold (y + _ROUND) - _ROUND back to y.
    @overload(fast_exp, jit_options={"fastmath": FASTMATH - {"reassoc"}})
    def _fast_exp_overload(x):
        if x == types.float32:
            return _fast_exp_float32
        return _fast_exp_float64


# -- tanh (softcap) ------------------------------------------------------------------------

_TANH_SMALL = 0.625  # below: tanh(x) = x * P(x**2); above: 1 - 2 / (exp(2x) + 1), no cancellation


def _tanh_coefficients(degree=5):
    """Chebyshev-fitted coefficients of P(u) = tanh(sqrt(u)) / sqrt(u) on [0, _TANH_SMALL**2]."""
    u = (np.cos(np.linspace(0.0, np.pi, 4001)) + 1.0) / 2.0 * _TANH_SMALL**2
    x = np.sqrt(np.maximum(u, 1e-300))
    fit = np.polynomial.chebyshev.Chebyshev.fit(u, np.tanh(x) / x, degree)
    return tuple(np.float32(c) for c in fit.convert(kind=np.polynomial.Polynomial).coef)


_T0, _T1, _T2, _T3, _T4, _T5 = _tanh_coefficients()
_TANH_SMALL32 = np.float32(_TANH_SMALL)
_TANH_CLAMP = np.float32(10.0)  # tanh(10) = 1 - 4e-9 is 1.0 in float32; keeps exp(2x) finite
_ONE32, _TWO32 = np.float32(1.0), np.float32(2.0)


def _fast_tanh_meaning(x: np.ndarray) -> np.ndarray:
    """The float32 ``fast_tanh`` in NumPy, step by step (what the compiled version does)."""
    x = np.asarray(x, dtype=np.float32)
    ax = np.abs(x)
    u = x * x
    p = _T5
    for c in (_T4, _T3, _T2, _T1, _T0):
        p = p * u + c
    a = np.where(ax > _TANH_CLAMP, _TANH_CLAMP, ax)
    big = _ONE32 - _TWO32 / (_fast_exp_meaning(_TWO32 * a) + _ONE32)
    return np.where(ax < _TANH_SMALL32, x * p, np.copysign(big, x)).astype(np.float32)


def fast_tanh(x):
    """tanh(x) for a float32 or float64 scalar; +-1 at +-inf, NaN for NaN.

    Compiled per type by the overload below: float32 gets a branch-free form LLVM vectorises
    (``_fast_tanh_meaning`` spells it out; within 2 ulp of tanh); float64 keeps libm. This
    body is the meaning. The rules of masking.py call it where they say ``tanh``."""
    return math.tanh(x)


if numba is not None:

    def _fast_tanh_float32(x):
        # as _fast_tanh_meaning; NaN falls through every comparison and comes out NaN
        ax = -x if x < 0 else x
        u = x * x
        p = _T5
        p = p * u + _T4
        p = p * u + _T3
        p = p * u + _T2
        p = p * u + _T1
        p = p * u + _T0
        a = _TANH_CLAMP if ax > _TANH_CLAMP else ax
        big = _ONE32 - _TWO32 / (fast_exp(_TWO32 * a) + _ONE32)
        big = -big if x < 0 else big
        return x * p if ax < _TANH_SMALL32 else big

    def _fast_tanh_float64(x):
        return math.tanh(x)

    # NumPy's error model: 2 / (e + 1) without a ZeroDivisionError check (see ``rule``)
    @overload(fast_tanh, jit_options={"fastmath": FASTMATH - {"reassoc"}, "error_model": "numpy"})
    def _fast_tanh_overload(x):
        if x == types.float32:
            return _fast_tanh_float32
        return _fast_tanh_float64


# -- masking.py's rules, compiled as they are ----------------------------------------------



def rule(fn):
    """How the rules are compiled: like ``helper`` (LLVM inlines them into the tile loops),
    with NumPy's error model: a float division by zero is IEEE inf/NaN, as the rules mean
    on NumPy arrays, and not a Python ZeroDivisionError check, whose branch per element
    (softcap's ``s / c``) kept the row loops from vectorising (5 ns instead of ~0.5 ns a
    score). Without numba they stay plain Python, which is what they are."""
    if numba is None:
        return fn
    return numba.njit(fastmath=FASTMATH, error_model="numpy")(fn)


rules = compile_rules(rule, replace={masking.tanh: fast_tanh})  # the one substitution
in_band = rules.in_band  # (band, i, j): may query i see key j
key_range = rules.key_range  # (band, i_start, i_stop, Nk): the keys a query block visits
query_range = rules.query_range  # (band, j_start, j_stop, Nq): the queries a key block visits
tile_in_band = rules.tile_in_band  # (band, i0, bm, j0, bn): the whole tile allowed
has_bias = rules.has_bias  # (bias): the record holds a bias
bias_index = rules.bias_index  # (bias, b, h) -> (bb, hh): the plane batch b, head h reads
keep = rules.keep  # (dropout, b, h, i, j): dropout keeps the pair
has_dropout = rules.has_dropout  # (dropout): dropout is on
row_shift = rules.row_shift  # (m, l) -> (shift, norm): p = exp(s - shift) / norm


has_softcap = rules.has_softcap  # (reals): the scores are capped
cap = rules.cap  # (reals, s) -> c * tanh(s / c)
cap_and_slope = rules.cap_and_slope  # (reals, s) -> (cap, d cap / d s)
has_alibi = rules.has_alibi  # (alibi): the record holds ALiBi slopes
alibi_bias = rules.alibi_bias  # (alibi, band, b, h, i, j) -> -slope * |i + offset - j|
tile_class = rules.tile_class  # (blocks, chunks, b, h, i0, i1, j0, j1): 0 skip, 1 some, 2 all


@helper
def exp_sub(row, shift):
    """``row[i] = exp(row[i] - shift[i])`` in place, over contiguous 1-D arrays.

    ``-inf - shift`` and ``x - inf`` both give exactly 0, never NaN.
    """
    for i in range(row.shape[0]):
        row[i] = fast_exp(row[i] - shift[i])


@helper
def exp_sub_sum(row, shift, sums):
    """``exp_sub(row, shift)`` and ``sums += row`` in one sweep."""
    for i in range(row.shape[0]):
        e = fast_exp(row[i] - shift[i])
        row[i] = e
        sums[i] += e
