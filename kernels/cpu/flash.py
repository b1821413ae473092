"""Tiled flash attention on the CPU (numba, ``njit(parallel=True)``): the ``"numba"`` backend.

This is rung 3 of the ladder in ``ladder.py`` (rung 1: plain loops; rung 2: tiles with
hand-written tile products). The maths is the reference's (``kernels/reference.py``); the
tiling is Triton's fused-attention tutorial; docs/flash-cpu.md walks through it.

Shape legend (see ``spec.py``)::

    q (B, Hq, Nq, D)   k (B, Hkv, Nk, D)   v (B, Hkv, Nk, Dv)   out (B, Hq, Nq, Dv)
    stats (2, B, Hq, Nq) = (m, l)        rows (3, B, Hq, Nq) = (shift, 1 / norm, delta)
    a tile: BLOCK_N keys x BLOCK_M queries; bn, bm its actual (edge-clipped) sizes

The kernels take the spec as its records, ``*spec.pack()`` = (bias, band, dropout, reals,
alibi), and the tile size as one more, ``blocks`` = (BLOCK_M, BLOCK_N)::

    _flash_forward(q, k, vT, bias, band, dropout, reals, alibi, blocks, bmask, out, stats)
    _bwd_dkdv(q, k, v, dout, rows, bias, band, dropout, reals, alibi, blocks, bmask, grads)   # grads = (dq, dk, dv)
    _bwd_dq / _bwd_fused(q, k, v, kT, dout, rows, bias, band, dropout, reals, alibi, blocks, bmask, grads)

``bmask`` is the block mask of a user's mask_mod (see ``specialised`` and ``block_mask``
below; a dummy without one). User-written mods enter as compile-time globals: the order of
a score's terms is then ``score_mod(cap(x)) + alibi + bias``, masked by band, mask and
mask_mod.

Only ``masking.py``'s rules (compiled in ``_compile.py``) look inside bias, band, dropout,
the softcap of reals and alibi. Scores are built in the one order (``scores_t``): the tile
product ``x = k @ (scale q).T``, then ``cap(x)`` (softcap), ``+ alibi_bias`` and ``+ bias``,
then -inf outside the band; the backward multiplies dS by the cap's slope (``bwd_tile``).

**Tiles are stored keys-major**, ``sT[jj, ii]`` = score of key ``j0 + jj`` for query
``i0 + ii`` (Triton's ``qkT``). Every per-query quantity (``m_i``, ``l_i``, the
backward's shift and ``delta``) is then a contiguous vector along the tile's rows, so the
running max, the exp and the row sums are element-wise loops the compiler vectorises; no
tile needs a horizontal reduction. All tile products are ``microkernel.matmul`` (a register-tile FMA
micro-kernel; ``microkernel.py`` says why not BLAS), on tile buffers whose rows are padded
off power-of-two strides (``tile_buffer``).

Forward (``_flash_forward``), one task per (b, h, query block), the query block resident::

    for each key block in key_range(query block):          # band-skipping, see below
        if every m_i is finite and the block is unmasked     # the kept shift, see below
                and has no softcap, ALiBi or bias:
            pT = exp(k_blk @ qsT - m_i) in one pass (matmul_exp); if max(sT - m_i) <= STALE_LIMIT:
                l_i += sum_j pT[j];  accT += vT_blk @ (pT * dropout);  next block
        sT    = k_blk @ qsT, capped, + alibi + bias, -inf outside the band   # qsT = (scale q_blk).T
        m_new = max(m_i, max_j sT[j])
        alpha = exp(m_i - m_new)                             # rescales what was summed so far
        pT    = exp(sT - m_new);  l_i = alpha * l_i + sum_j pT[j]
        accT  = alpha * accT + vT_blk @ (pT * dropout)       # accT = acc.T (Dv, bm)
    out = accT.T / l_i;  stats = (m_i, l_i)                  # empty row: 0 and (-inf, 0)

The kept shift: any shift gives the same softmax (out, lse = m + log(l) and p = exp(s -
m) / l do not depend on it, so the stored m is the kept one); the running max only
prevents overflow. So while a block's scores stay within ``STALE_LIMIT`` of the shift a
row already has, the exp runs inside the score product and nothing is rescaled;
otherwise the block is redone the classic way. docs/flash-cpu.md has the details.

Backward (Triton's three pieces): ``_bwd_preprocess`` (delta = rowsum(dO * O), and
``(shift, norm) = masking.row_shift(m, l)`` per row), ``_bwd_dkdv`` (one task per (b, kv
head, key block), the key block resident, looping over the group's query heads and their
query blocks), ``_bwd_dq`` (one task per (b, h, query block), the query block resident,
looping over key blocks). Each tile recomputes ``pT = exp(sT - shift) / norm`` instead of
storing P -- never ``exp(sT - lse)``, which is Nk times too large on a row masked by -1e9
(lse = m + log(l) rounds log(l) away there). The tile code is that of the lse version: it
takes ``eT = exp(sT - shift)``, and ``1 / norm`` is folded into the query block's operands
(dO / norm, delta / norm), so that ``dsT = eT * (dpT - delta / norm) = pT * (dp - delta)``
(docs/flash-cpu.md). No task writes where another task writes, so there are no atomics and
the result does not depend on thread timing: reruns are bit-identical. GQA needs no
reduction afterwards: a kv head's task sums its whole group.

When there are enough heads to keep every thread busy (``B * Hkv >= 2 * threads``),
``_bwd_fused`` replaces the dkdv/dq pair: one task per (b, kv head) walks the key blocks
with dK/dV resident, exactly as ``_bwd_dkdv`` does, and also adds each tile's ``dsT.T @
k_blk`` into that head's dQ rows, which only this task writes. That is 5 tile products
per tile instead of 7 (the split version recomputes sT and dpT for dQ) -- the same work
PyTorch's CPU flash backward does -- and still no atomics.

**Sliding windows and causal masks cost O(N * w)**: a query block visits only the key
blocks in ``key_range(i0, i1)`` (the keys its band can reach), and a key block only the
query blocks in ``query_range(j0, j1)``. With ``window=(w, 0)`` a query block of
``BLOCK_M`` rows touches ``w + BLOCK_M`` keys, whatever N is: time grows linearly with N
(measured in docs/performance.md). Blocks the band excludes entirely are never touched;
blocks it includes entirely skip the per-element band test.

Measured (float32, B=1, H=8, D=64, shared 2-core VM, medians; docs/performance.md has the
tables, the command and how much the figures move from run to run), against PyTorch 2.13's
CPU ``scaled_dot_product_attention`` in the same process: forward+backward 0.95-1.52x
as fast at N=1024/4096 over the runs of stops 8 and 9 (below 1.0 only at N=1024 full, in
one run of each); forward alone 0.85-1.24x (at parity at N=1024 full); window (255, 0) at
N=8192 14-17x as fast as PyTorch given the equivalent boolean mask; twice N costs ~2x the
time (2.07-2.33x on a noisy day). Single-threaded inside the forward (N=4096) the two tile
products run at ~91 and ~89 GF/s (1.4 ns per score each), the exp adds ~0.4 ns.

Threads: numba's ``workqueue`` layer unless ``NUMBA_THREADING_LAYER`` says otherwise (see
``_compile.py``).
"""

from __future__ import annotations

import types

import numpy as np

from ..mods import MISSING_GRAD
from ..protocol import dlse_or_empty
from ..spec import AttentionSpec
from ._compile import (
    FASTMATH, NUMBA_ERROR, PARALLEL, alibi_bias, bias_index, cap, cap_and_slope, exp_sub, exp_sub_sum,
    has_alibi, has_bias, has_dropout, has_softcap, helper, in_band, keep, kernel, key_range, numba,
    prange, query_range, row_shift, tile_in_band,
)
from ._compile import tile_class as _chunk_classes
from .microkernel import matmul, matmul_exp

BLOCK_M = 128  # queries per tile (a runtime argument of the kernels: tests also run tiny tiles)
BLOCK_N = 256  # keys per tile
SHORT = 512  # up to this many queries and keys, smaller tiles (SHORT_BLOCKS) are faster
SHORT_BLOCKS = (64, 128)  # (BLOCK_M, BLOCK_N) for short sequences, see _blocks
STALE_LIMIT = 10.0  # how far (in natural-log units) a score may exceed the kept shift m_i
SUPPORTS_MODS = True  # mask_mod / score_mod compiled in (see specialised)


def unavailable_reason() -> str | None:
    """None when the numba kernels can run here, else why not."""
    return NUMBA_ERROR


# -- the protocol -----------------------------------------------------------------------


def forward(q, k, v, spec: AttentionSpec, blocks=None):
    """out (B, Hq, Nq, Dv), stats (2, B, Hq, Nq) for q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv).

    stats = (m, l) per query row (``protocol.py``): the shift the row's exps were taken
    against and their sum. ``blocks`` = (BLOCK_M, BLOCK_N), the tile size; any positive
    sizes give the same out, lse and probabilities up to rounding (m itself may differ: it
    is whichever shift the row kept). The tests use tiny tiles to cross many tile edges;
    None picks by length (:func:`_blocks`).
    """
    q, k, v = (np.ascontiguousarray(x, dtype=spec.dtype) for x in (q, k, v))
    out = np.empty((spec.B, spec.Hq, spec.Nq, spec.Dv), dtype=spec.dtype)
    stats = np.empty((2, spec.B, spec.Hq, spec.Nq), dtype=spec.dtype)
    vT = _transposed(v)  # (B, Hkv, Dv, Nk)
    ns = specialised(spec)
    records = _records(spec)
    with _compile_errors_named(spec):
        ns._flash_forward(q, k, vT, *records, _blocks(blocks, spec), block_mask(spec, ns),
                          out, stats)
    return out, stats


def backward(q, k, v, out, stats, dout, spec: AttentionSpec, dlse=None, fused=None, blocks=None):
    """dq (B, Hq, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv) from dout (B, Hq, Nq, Dv)
    and dlse (B, Hq, Nq) or None, the gradient reaching lse (folded into delta by
    ``_bwd_preprocess``, see ``protocol.py``).

    ``fused`` picks the single-pass backward (None: when ``B * Hkv`` keeps every thread
    busy). Both passes give the same result up to rounding; each is deterministic.
    ``blocks`` as in :func:`forward`.
    """
    if spec.score_mod is not None and spec.score_mod_grad is None:
        raise ValueError(MISSING_GRAD)
    q, k, v, out, stats, dout = (
        np.ascontiguousarray(x, dtype=spec.dtype) for x in (q, k, v, out, stats, dout)
    )
    grads = (np.zeros_like(q), np.empty_like(k), np.empty_like(v))  # dq, dk, dv
    rows = np.empty((3, spec.B, spec.Hq, spec.Nq), dtype=spec.dtype)  # shift, 1 / norm, delta
    if fused is None:
        fused = spec.B * spec.Hkv >= 2 * _num_threads()
    records = _records(spec)
    ns = specialised(spec, backward=True)
    bmask, tiles = block_mask(spec, specialised(spec)), _blocks(blocks, spec)
    _bwd_preprocess(out, dout, stats, _dlse_array(dlse, spec), rows)
    with _compile_errors_named(spec):
        if fused:
            ns._bwd_fused(q, k, v, _transposed(k), dout, rows, *records, tiles, bmask, grads)
        else:
            ns._bwd_dkdv(q, k, v, dout, rows, *records, tiles, bmask, grads)
            ns._bwd_dq(q, k, v, _transposed(k), dout, rows, *records, tiles, bmask, grads)
    return grads


def _records(spec: AttentionSpec):
    """spec.pack(); with mods, the bias as a writable C-contiguous array (a copy if it is
    not), so that each specialisation compiles once, not per array layout (seconds each)."""
    records = spec.pack()
    if spec.has_mods and not (records.bias.flags.c_contiguous and records.bias.flags.writeable):
        records = records._replace(bias=np.array(records.bias, order="C"))
    return records


def _dlse_array(dlse, spec: AttentionSpec) -> np.ndarray:
    """dlse as ``_bwd_preprocess`` takes it: (B, Hq, Nq) contiguous, or empty for None."""
    return np.ascontiguousarray(dlse_or_empty(dlse, spec.dtype), dtype=spec.dtype)


def _blocks(blocks, spec: AttentionSpec) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) as the kernels take it: one record of two ints.

    None: (BLOCK_M, BLOCK_N), or ``SHORT_BLOCKS`` when both lengths are at most ``SHORT``.
    A causal 256-token row spans one 128 x 256 tile per query block, half of it above the
    diagonal; 64 x 128 tiles skip most of that (measured fwd+bwd, B=8, H=8, N=256, D=32,
    float32: causal 12.5 -> 10.4 ms, full 14.8 -> 15.2 ms; B=2, N=512, D=64 causal 16.9
    -> 15.2 ms; at N=1024 the large tiles are as fast or faster).
    """
    if blocks is None:
        blocks = SHORT_BLOCKS if max(spec.Nq, spec.Nk) <= SHORT else (BLOCK_M, BLOCK_N)
    block_m, block_n = blocks
    return int(block_m), int(block_n)


def _num_threads() -> int:
    import numba

    return numba.get_num_threads()


# -- user mods (mask_mod, score_mod: kernels/mods.py) ---------------------------------------
#
# The kernels below call ``user_mask_mod`` / ``user_score_mod`` / ``user_score_mod_grad``
# behind the compile-time flags ``HAS_MASK_MOD`` / ``HAS_SCORE_MOD``. Here they are no-ops
# and the flags False, so the plain kernels compile without any of that code (and stay
# cached). ``specialised`` rebuilds, from their ``py_func``, every kernel and helper of this
# module that reaches those names, with the user's functions (``numba.njit``-ed) and True
# flags bound as globals: one compile per set of mods (seconds), kept for the process.
#
# Tiles that mask_mod forbids entirely are never touched: ``block_mask`` evaluates mask_mod
# once per call over (MOD_CHUNK x MOD_CHUNK) chunks of the (Nq, Nk) plane of every (b, h):
# 0 = no pair allowed, 1 = some, 2 = all (cached per mask_mod, shape and origin: mods are
# pure functions). A tile (any alignment) takes the classes of the chunks it overlaps
# (``tile_class``): skipped when all are 0, no per-element mask_mod when all are 2.

HAS_MASK_MOD = False
HAS_SCORE_MOD = False
MOD_CHUNK = 32  # rows and columns of one block-mask entry
MOD_NAMES = ("user_mask_mod", "user_score_mod", "user_score_mod_grad", "HAS_MASK_MOD",
             "HAS_SCORE_MOD")


@helper
def user_mask_mod(b, h, i, j):
    return True


@helper
def user_score_mod(score, b, h, i, j):
    return score


@helper
def user_score_mod_grad(score, b, h, i, j):
    return 1.0


@kernel
def _mod_block_mask(Nq, Nk, dropout, bmask):
    """bmask (B, Hq, nr, nc) int8: per MOD_CHUNK x MOD_CHUNK chunk of queries x keys, 0 if
    mask_mod allows none of its pairs, 2 if all, else 1. The mods see the call's origin
    (the dropout record's h0, i0, j0) added to h, i and j."""
    B, Hq, nr, nc = bmask.shape
    h0, oi, oj = dropout[3], dropout[4], dropout[5]
    for task in prange(B * Hq * nr):
        b = task // (Hq * nr)
        h = task // nr % Hq
        r0 = task % nr * MOD_CHUNK
        r1 = min(r0 + MOD_CHUNK, Nq)
        for c in range(nc):
            c0 = c * MOD_CHUNK
            c1 = min(c0 + MOD_CHUNK, Nk)
            count = 0
            for i in range(r0, r1):
                for j in range(c0, c1):
                    if user_mask_mod(b, h + h0, i + oi, j + oj):
                        count += 1
            bmask[b, h, task % nr, c] = 0 if count == 0 else (2 if count == (r1 - r0) * (c1 - c0) else 1)


@helper
def tile_class(bmask, b, h, i0, i1, j0, j1):
    """What mask_mod allows in the tile [i0, i1) x [j0, j1): 0 nothing (skip it), 1 some
    pairs (test each), 2 every pair (or no mask_mod)."""
    if not HAS_MASK_MOD:
        return 2
    return _chunk_classes(bmask, (MOD_CHUNK, MOD_CHUNK), b, h, i0, i1, j0, j1)  # masking.tile_class


_NO_BLOCK_MASK = np.zeros((1, 1, 1, 1), dtype=np.int8)
_BLOCK_MASKS: dict = {}  # (mask_mod, B, Hq, Nq, Nk, origin) -> bmask, a few kept
_SPECIALISED: dict = {}  # (mask_mod, score_mod, score_mod_grad) -> namespace of kernels


def block_mask(spec: AttentionSpec, ns) -> np.ndarray:
    """The call's block mask (see above), or a dummy the kernels never read."""
    if spec.mask_mod is None:
        return _NO_BLOCK_MASK
    key = (spec.mask_mod, spec.B, spec.Hq, spec.Nq, spec.Nk, tuple(spec.origin))
    if key not in _BLOCK_MASKS:
        nr, nc = -(-spec.Nq // MOD_CHUNK), -(-spec.Nk // MOD_CHUNK)
        bmask = np.empty((spec.B, spec.Hq, nr, nc), dtype=np.int8)
        with _compile_errors_named(spec):
            ns._mod_block_mask(spec.Nq, spec.Nk, spec.pack().dropout, bmask)
        if len(_BLOCK_MASKS) >= 8:
            _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
        _BLOCK_MASKS[key] = bmask
    return _BLOCK_MASKS[key]


def _jit_user(fn):
    """The user's function compiled for the kernels (a numba dispatcher is taken as is)."""
    if hasattr(fn, "py_func"):
        return fn
    return numba.njit(fastmath=FASTMATH)(fn)


def specialised(spec: AttentionSpec, backward: bool = False):
    """A namespace with this module's kernels (``_flash_forward``, ``_bwd_dkdv``,
    ``_bwd_dq``, ``_bwd_fused``, ``_mod_block_mask``) compiled for the spec's mods: the
    module's own without mods. The forward's namespace leaves score_mod_grad out of the
    key (it does not use it), so a forward-only call shares the forward's compile."""
    import sys

    module = sys.modules[__name__]
    if not spec.has_mods:
        return module
    grad = spec.score_mod_grad if backward else None
    key = (spec.mask_mod, spec.score_mod, grad)
    if key in _SPECIALISED:
        return _SPECIALISED[key]
    overrides = {}
    if spec.mask_mod is not None:
        overrides.update(user_mask_mod=_jit_user(spec.mask_mod), HAS_MASK_MOD=True)
    if spec.score_mod is not None:
        overrides.update(user_score_mod=_jit_user(spec.score_mod), HAS_SCORE_MOD=True)
        if grad is not None:
            overrides.update(user_score_mod_grad=_jit_user(grad))
    namespace = module.__dict__
    memo: dict = {}

    def own(name):  # a dispatcher of this module
        fn = namespace.get(name)
        return hasattr(fn, "py_func") and fn.py_func.__module__ == __name__

    def needs(name, seen=()):
        code = namespace[name].py_func.__code__
        return any(n in MOD_NAMES or (own(n) and n not in seen and needs(n, (*seen, name)))
                   for n in code.co_names)

    def rebuild(name):
        if name not in memo:
            dispatcher = namespace[name]
            py = dispatcher.py_func
            callees = {n: rebuild(n) for n in py.__code__.co_names
                       if own(n) and n not in MOD_NAMES and needs(n)}
            fn = types.FunctionType(py.__code__, {**py.__globals__, **overrides, **callees},
                                    py.__name__, py.__defaults__, py.__closure__)
            # copies: numba consumes the option dicts it is given (a shared one passed on
            # would leave the next kernel compiled without parallel=)
            options = {key: (value.copy() if isinstance(value, (dict, set)) else value)
                       for key, value in dispatcher.targetoptions.items()}
            if "parallel" in options:
                options["parallel"] = dict(PARALLEL)
            memo[name] = numba.jit(**options)(fn)
        return memo[name]

    ns = types.SimpleNamespace(**{name: rebuild(name) for name in (
        "_flash_forward", "_bwd_dkdv", "_bwd_dq", "_bwd_fused", "_mod_block_mask")})
    _SPECIALISED[key] = ns
    return ns


class _compile_errors_named:
    """Turns numba's failure to compile a user's mod into a TypeError that says so."""

    def __init__(self, spec):
        self.spec = spec

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None and self.spec.has_mods and issubclass(kind, numba.core.errors.TypingError):
            raise TypeError(
                "numba could not compile mask_mod / score_mod / score_mod_grad for the CPU kernels "
                "(write them with scalar arithmetic, comparisons, math or np functions numba "
                f"supports, or use backend='reference'):\n{exc}") from exc
        return False


# -- shared tile helpers ------------------------------------------------------------------


@helper
def scores_t(k_blk, qsT, s_rows, bias, band, reals, alibi, b, h, i0, j0, slopes, dropout, cls):
    """sT = score_mod(cap(k_blk @ qsT)) + alibi + bias.T, with -inf where the band or
    mask_mod forbids a pair.

    k_blk (bn, D); qsT (D, bm) the *scaled* queries, transposed; the tile is
    ``s_rows[:, :bm]`` of a (bn, padded) buffer (see :func:`tile_buffer`), the pairs of
    queries i0.. and keys j0.. of batch b, query head h. The cap (softcap), the ALiBi term
    and the bias are ``masking.py``'s rules. With softcap and ``slopes`` of ``bn`` rows (the
    backward), ``slopes[:, :bm]`` gets each pair's d cap / d x; the forward passes none (an
    empty array). A tile inside the band with none of those terms costs nothing beyond the
    product. The user's mods (compiled in only by ``specialised``) see the origin of the
    dropout record added to h, i, j; with a score_mod the slopes are d cap / d x times
    score_mod_grad (0 on forbidden pairs); ``cls`` is the tile's ``tile_class`` (1:
    mask_mod tested per pair).
    """
    bn = k_blk.shape[0]
    bm = qsT.shape[1]
    matmul(k_blk, qsT, s_rows[:, :bm], False)
    use_bias = has_bias(bias)
    use_cap = has_softcap(reals)
    use_alibi = has_alibi(alibi)
    whole = tile_in_band(band, i0, bm, j0, bn)
    partial = HAS_MASK_MOD and cls == 1
    if whole and not (use_bias or use_cap or use_alibi or HAS_SCORE_MOD or partial):
        return
    with_slopes = (use_cap or HAS_SCORE_MOD) and slopes.shape[0] > 0
    h0, oi, oj = dropout[3], dropout[4], dropout[5]
    bias_qk = bias[bias_index(bias, b, h)]  # the (Nq, Nk) plane this head reads
    for jj in range(bn):
        row = s_rows[jj, :bm]
        j = j0 + jj
        if with_slopes and use_cap:
            slope_row = slopes[jj, :bm]
            for ii in range(bm):
                row[ii], slope_row[ii] = cap_and_slope(reals, row[ii])
        elif with_slopes:
            slopes[jj, :bm] = 1.0
        elif use_cap:
            for ii in range(bm):
                row[ii] = cap(reals, row[ii])
        if HAS_SCORE_MOD:  # on the capped score; slope *= score_mod_grad
            if with_slopes:
                mod_slope_row = slopes[jj, :bm]
                for ii in range(bm):
                    mod_slope_row[ii] *= user_score_mod_grad(row[ii], b, h + h0, i0 + ii + oi, j + oj)
            for ii in range(bm):
                row[ii] = user_score_mod(row[ii], b, h + h0, i0 + ii + oi, j + oj)
        if use_alibi:
            for ii in range(bm):
                row[ii] += alibi_bias(alibi, band, b, h, i0 + ii, j)
        if use_bias:
            for ii in range(bm):
                row[ii] += bias_qk[i0 + ii, j]
        if not whole:
            for ii in range(bm):
                if not in_band(band, i0 + ii, j):
                    row[ii] = -np.inf
        if partial:
            for ii in range(bm):
                if not user_mask_mod(b, h + h0, i0 + ii + oi, j + oj):
                    row[ii] = -np.inf
        if HAS_SCORE_MOD and with_slopes:  # a forbidden pair's score_mod_grad is never used
            zero_row = slopes[jj, :bm]
            for ii in range(bm):
                if row[ii] == -np.inf:
                    zero_row[ii] = 0.0


@helper
def dropout_t(s_rows, bm, dropout, drop_scale, b, h, i0, j0):
    """pT *= keep(dropout, b, h, i, j) / (1 - p) on ``s_rows[:, :bm]``: the same mask as
    every other backend."""
    for jj in range(s_rows.shape[0]):
        row = s_rows[jj, :bm]
        for ii in range(bm):
            row[ii] = row[ii] * drop_scale if keep(dropout, b, h, i0 + ii, j0 + jj) else 0.0


@helper
def tile_buffer(rows, cols, like):
    """An uninitialised (rows, padded) buffer for a tile of up to ``cols`` columns.

    The row stride is padded to an odd number of 64-byte lines: with a power-of-two stride
    (128 float32 = 512 bytes) the column panels that ``matmul`` walks down map to a few
    L1 cache sets and evict each other (measured: 58 -> 87 GF/s for ``sT.T @ v``).
    """
    return np.empty((rows, padded_length(cols, like)), dtype=like.dtype)


@helper
def padded_length(n, like):
    """n rounded up to an odd number of 64-byte lines of ``like``'s items."""
    per_line = 64 // like.itemsize
    lines = (n + per_line - 1) // per_line
    lines += 1 - lines % 2
    return lines * per_line


@helper
def transposed_copy(x, scale, outT):
    """outT = scale * x.T for x (rows, cols): packs a query block, scaled, as the right-hand
    operand of a tile product, whose rows must run along the queries."""
    for r in range(x.shape[0]):
        for c in range(x.shape[1]):
            outT[c, r] = x[r, c] * scale


@helper
def scale_columns(x, factors):
    """x[:, c] *= factors[c] for x (rows, cols) with contiguous rows."""
    for r in range(x.shape[0]):
        row = x[r]
        for c in range(x.shape[1]):
            row[c] *= factors[c]


# -- forward ------------------------------------------------------------------------------


@kernel
def _transposed(x):
    """xT (B, H, D, N) = x (B, H, N, D) with the last two axes swapped, as a view of a buffer
    whose rows are padded (see :func:`tile_buffer`). The left operand of ``accT += vT @ pT``
    (forward) and ``dqT += kT @ dsT`` (backward): six contiguous rows per micro-tile."""
    B, H, N, D = x.shape
    xT = np.empty((B, H, D, padded_length(N, x)), dtype=x.dtype)
    for task in prange(B * H):
        b = task // H
        h = task % H
        for j in range(N):
            for d in range(D):
                xT[b, h, d, j] = x[b, h, j, d]
    return xT[:, :, :, :N]


@kernel
def _flash_forward(q, k, vT, bias, band, dropout, reals, alibi, blocks, bmask, out, stats):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], vT.shape[2]
    BLOCK_M, BLOCK_N = blocks
    scale, drop_scale = reals[0], reals[1]
    plain = not (has_bias(bias) or has_softcap(reals) or has_alibi(alibi)  # scores = the product
                 or HAS_SCORE_MOD)
    no_slopes = np.empty((0, 0), dtype=q.dtype)  # the forward needs no softcap slopes
    use_dropout = has_dropout(dropout)
    group = Hq // Hkv
    n_qblocks = (Nq + BLOCK_M - 1) // BLOCK_M
    for task in prange(B * Hq * n_qblocks):
        b = task // (Hq * n_qblocks)
        h = task // n_qblocks % Hq
        i0 = task % n_qblocks * BLOCK_M
        i1 = min(i0 + BLOCK_M, Nq)
        bm = i1 - i0
        kv = h // group  # GQA: query head h reads kv head h // group
        qsT = tile_buffer(D, bm, q)[:, :bm]  # (D, bm) = scale * q_blk.T, resident for the task
        transposed_copy(q[b, h][i0:i1], scale, qsT)

        m_i = np.full(bm, -np.inf, dtype=q.dtype)  # the shift of the row's exps (a running max)
        l_i = np.zeros(bm, dtype=q.dtype)  # running sum of exp(score - m_i)
        accT = tile_buffer(Dv, bm, q)[:, :bm]  # running sum of exp(score - m_i) * v, transposed
        accT[:] = 0.0
        m_new = np.empty(bm, dtype=q.dtype)
        m_safe = np.empty(bm, dtype=q.dtype)
        alpha = np.empty(bm, dtype=q.dtype)
        s_buf = tile_buffer(BLOCK_N, bm, q)  # tile sT = s_buf[:bn, :bm]
        x_max = np.empty(bm, dtype=q.dtype)
        p_sum = np.empty(bm, dtype=q.dtype)
        m_finite = False  # every row has a finite m_i: the stale shift below may be tried

        j_start, j_stop = key_range(band, i0, i1, Nk)
        for j0 in range(j_start, j_stop, BLOCK_N):
            j1 = min(j0 + BLOCK_N, j_stop)
            bn = j1 - j0
            cls = tile_class(bmask, b, h, i0, i1, j0, j1)
            if cls == 0:  # mask_mod allows no pair here
                continue

            # Fast path: keep the shift m_i instead of raising it to this block's max, so
            # the exp can run inside the score product (matmul_exp) and nothing needs a
            # rescale. Any shift gives the same softmax; the true max only guards against
            # overflow, so the shift is kept while no score exceeds it by more than
            # STALE_LIMIT (then every p <= e**STALE_LIMIT). Otherwise, or on masked,
            # biased, capped or ALiBi tiles, the block is redone the classic way below.
            if m_finite and plain and cls == 2 and tile_in_band(band, i0, bm, j0, bn):
                x_max[:] = -np.inf
                p_sum[:] = 0.0
                matmul_exp(k[b, kv][j0:j1], qsT, s_buf[:bn, :bm], m_i, x_max, p_sum)
                if np.max(x_max) <= STALE_LIMIT:
                    for ii in range(bm):
                        l_i[ii] += p_sum[ii]
                    if use_dropout:
                        dropout_t(s_buf[:bn], bm, dropout, drop_scale, b, h, i0, j0)
                    matmul(vT[b, kv][:, j0:j1], s_buf[:bn, :bm], accT, True)  # accT += v_blk.T @ pT
                    continue

            scores_t(k[b, kv][j0:j1], qsT, s_buf[:bn], bias, band, reals, alibi, b, h, i0, j0,
                     no_slopes, dropout, cls)

            # m_new = max(m_i, max over this block's keys)
            m_new[:] = m_i
            for jj in range(bn):
                row = s_buf[jj, :bm]
                for ii in range(bm):
                    m_new[ii] = np.fmax(m_new[ii], row[ii])  # fmax: this form vectorises
            # a row that has seen only -inf keeps m = -inf; subtract 0 instead (no NaN)
            for ii in range(bm):
                m_safe[ii] = m_new[ii] if m_new[ii] != -np.inf else 0.0
                alpha[ii] = m_i[ii]
            exp_sub(alpha, m_safe)  # alpha = exp(m_i - m_new): 0 on a row's first keys
            for ii in range(bm):
                l_i[ii] *= alpha[ii]
            for jj in range(bn):
                exp_sub_sum(s_buf[jj, :bm], m_safe, l_i)  # pT = exp(sT - m_new); l_i += pT[jj]
            if use_dropout:  # l_i above saw every p: the stats are those of the undropped softmax
                dropout_t(s_buf[:bn], bm, dropout, drop_scale, b, h, i0, j0)
            scale_columns(accT, alpha)
            matmul(vT[b, kv][:, j0:j1], s_buf[:bn, :bm], accT, True)  # accT += v_blk.T @ pT
            m_i[:] = m_new
            m_finite = np.min(m_i) > -np.inf

        # stats = (m_i, l_i) as they stand: an empty row has (-inf, 0); a NaN stays NaN
        for ii in range(bm):
            stats[0, b, h, i0 + ii] = m_i[ii]
            stats[1, b, h, i0 + ii] = l_i[ii]
            if l_i[ii] == 0.0:  # no key allowed: zeros out
                out[b, h, i0 + ii, :] = 0.0
            else:  # (a NaN l_i, from a NaN input, lands here and stays NaN)
                inv = 1.0 / l_i[ii]
                for d in range(Dv):
                    out[b, h, i0 + ii, d] = accT[d, ii] * inv


# -- backward -----------------------------------------------------------------------------


@kernel
def _bwd_preprocess(out, dout, stats, dlse, rows):
    """The per-row terms of the backward, rows (3, B, Hq, Nq) = (shift, 1 / norm, delta):
    ``(shift, norm) = row_shift(m, l)``, so that ``p = exp(s - shift) / norm`` (never from
    lse; an empty row gets 1 / norm = 0), and ``delta[b, h, i] = sum_d out * dout - dlse``:
    the gradient reaching lse, dlse (B, Hq, Nq) or an empty array for none, enters the
    scores' gradient as ``ds = p * (dp - delta + dlse)`` (``protocol.py``)."""
    B, Hq, Nq, Dv = out.shape
    use_dlse = dlse.shape[0] > 0
    for task in prange(B * Hq):
        b = task // Hq
        h = task % Hq
        for i in range(Nq):
            shift, norm = row_shift(stats[0, b, h, i], stats[1, b, h, i])
            rows[0, b, h, i] = shift
            rows[1, b, h, i] = 1.0 / norm
            o_row = out[b, h, i]
            do_row = dout[b, h, i]
            total = 0.0
            for d in range(Dv):
                total += o_row[d] * do_row[d]
            if use_dlse:  # forward: lse = log(sum_j exp(s_j))  ->  ds += p * dlse
                total -= dlse[b, h, i]
            rows[2, b, h, i] = total


@helper
def bwd_tile(k_blk, v_blk, qsT, doT, shift, delta_blk, s_rows, dp_rows, slope_rows, bias, band,
             dropout, reals, alibi, b, h, i0, j0, cls):
    """One (key block, query block) tile of the backward: on return ``s_rows[:, :bm]``
    holds the dropped exps ``eT * z`` and ``dp_rows[:, :bm]`` holds ``dsT``, the gradient
    of the tile product ``x = k @ (scale q).T`` (through the softcap: ``slope_rows``, as
    many rows as the tile with softcap, else none, holds its slopes).

    k_blk (bn, D), v_blk (bn, Dv), qsT (D, bm) scaled queries transposed; shift (bm,) the
    rows' shifts; s_rows, dp_rows (bn, padded) tile buffers. The probabilities are
    ``pT = eT / norm`` with ``eT = exp(sT - shift)``; the tile never divides: 1 / norm is
    folded into the query block's operands (:func:`load_query_block`), doT (Dv, bm) =
    (dO / norm).T and delta_blk (bm,) = delta / norm. Then ``dpT`` below is dp / norm,
    ``dsT = eT * (dpT * z - delta_blk) = pT * (dp * z - delta)`` exactly, and
    ``(eT * z) @ (dO / norm) = (pT * z) @ dO``.
    """
    # forward: pT = exp(sT - m) / l, recomputed instead of stored
    scores_t(k_blk, qsT, s_rows, bias, band, reals, alibi, b, h, i0, j0, slope_rows, dropout, cls)
    bn = k_blk.shape[0]
    bm = qsT.shape[1]
    drop_scale = reals[1]
    for jj in range(bn):
        exp_sub(s_rows[jj, :bm], shift)  # eT = pT * norm
    # forward: out = (pT * z).T @ v  ->  dpT = z * (v @ dO.T)   (here / norm)
    matmul(v_blk, doT, dp_rows[:, :bm], False)
    # forward: p = softmax(s)  ->  ds = p * (dp - delta)
    use_cap = has_softcap(reals) or HAS_SCORE_MOD  # dS times the slopes (softcap, score_mod)
    use_dropout = has_dropout(dropout)
    if use_dropout:
        for jj in range(bn):
            p_row = s_rows[jj, :bm]
            dp_row = dp_rows[jj, :bm]
            for ii in range(bm):
                z = drop_scale if keep(dropout, b, h, i0 + ii, j0 + jj) else 0.0
                dp_row[ii] = p_row[ii] * (dp_row[ii] * z - delta_blk[ii])
                p_row[ii] *= z
    elif use_cap:  # and the softcap's factor below, in the same sweep
        for jj in range(bn):
            p_row = s_rows[jj, :bm]
            dp_row = dp_rows[jj, :bm]
            slope_row = slope_rows[jj, :bm]
            for ii in range(bm):
                dp_row[ii] = p_row[ii] * (dp_row[ii] - delta_blk[ii]) * slope_row[ii]
    else:
        for jj in range(bn):
            p_row = s_rows[jj, :bm]
            dp_row = dp_rows[jj, :bm]
            for ii in range(bm):
                dp_row[ii] = p_row[ii] * (dp_row[ii] - delta_blk[ii])
    # forward: sT = cap(xT) + alibi + bias  ->  dxT = dsT * cap'(xT)   (done above without dropout)
    if use_cap and use_dropout:
        for jj in range(bn):
            dp_row = dp_rows[jj, :bm]
            slope_row = slope_rows[jj, :bm]
            for ii in range(bm):
                dp_row[ii] *= slope_row[ii]


@helper
def load_query_block(q, dout, rows, scale, b, h, i0, i1, bufs):
    """The query block's operands of a backward tile, copied into the padded buffers
    ``bufs`` = (qsT, doT, q, dO, terms) of shapes (D, *), (Dv, *), (*, D), (*, Dv), (2, *):
    qsT (D, bm) = scale * q.T and doT (Dv, bm) = (dO / norm).T (the right operands of the
    score products), q and dO / norm themselves (of dk += dsT @ q and dv += eT @ (dO /
    norm)), the rows' shifts and delta / norm (see :func:`bwd_tile`). Returns the views
    in use: qsT, doT, q_blk, do_blk, shift, delta_blk."""
    bm = i1 - i0
    qsT, doT, q_blk, do_blk = bufs[0][:, :bm], bufs[1][:, :bm], bufs[2][:bm], bufs[3][:bm]
    shift, delta_blk = bufs[4][0, :bm], bufs[4][1, :bm]
    transposed_copy(q[b, h][i0:i1], scale, qsT)
    q_blk[:] = q[b, h][i0:i1]
    for ii in range(bm):
        inv_norm = rows[1, b, h, i0 + ii]  # 0 on an empty row
        shift[ii] = rows[0, b, h, i0 + ii]
        delta_blk[ii] = rows[2, b, h, i0 + ii] * inv_norm
        do_row = dout[b, h, i0 + ii]
        for d in range(do_row.shape[0]):
            x = do_row[d] * inv_norm
            doT[d, ii] = x
            do_blk[ii, d] = x
    return qsT, doT, q_blk, do_blk, shift, delta_blk


@helper
def query_block_buffers(rows, D, Dv, like):
    """The padded buffers :func:`load_query_block` fills, for up to ``rows`` queries."""
    return (tile_buffer(D, rows, like), tile_buffer(Dv, rows, like),
            tile_buffer(rows, D, like)[:, :D], tile_buffer(rows, Dv, like)[:, :Dv],
            np.empty((2, rows), dtype=like.dtype))


@kernel
def _bwd_dkdv(q, k, v, dout, rows, bias, band, dropout, reals, alibi, blocks, bmask, grads):
    """dK, dV (grads[1], grads[2]): one task per (b, kv head, key block), the key block resident."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    BLOCK_M, BLOCK_N = blocks
    scale = reals[0]
    use_cap = has_softcap(reals) or HAS_SCORE_MOD
    dk, dv = grads[1], grads[2]
    group = Hq // Hkv
    n_kblocks = (Nk + BLOCK_N - 1) // BLOCK_N
    for task in prange(B * Hkv * n_kblocks):
        b = task // (Hkv * n_kblocks)
        kv = task // n_kblocks % Hkv
        j0 = task % n_kblocks * BLOCK_N
        j1 = min(j0 + BLOCK_N, Nk)
        bn = j1 - j0
        k_blk = k[b, kv][j0:j1]  # (bn, D), resident
        v_blk = v[b, kv][j0:j1]  # (bn, Dv), resident
        dk_acc = np.zeros((bn, D), dtype=q.dtype)  # dK / scale (scale applied at the end)
        dv_acc = np.zeros((bn, Dv), dtype=q.dtype)
        s_buf = tile_buffer(bn, BLOCK_M, q)
        dp_buf = tile_buffer(bn, BLOCK_M, q)
        slope_buf = tile_buffer(bn if use_cap else 0, BLOCK_M, q)  # the softcap's / score_mod's slopes
        bufs = query_block_buffers(BLOCK_M, D, Dv, q)

        i_start, i_stop = query_range(band, j0, j1, Nq)
        for h in range(kv * group, (kv + 1) * group):  # GQA: the group's query heads, in order
            for i0 in range(i_start, i_stop, BLOCK_M):
                i1 = min(i0 + BLOCK_M, i_stop)
                bm = i1 - i0
                cls = tile_class(bmask, b, h, i0, i1, j0, j1)
                if cls == 0:  # mask_mod allows no pair here
                    continue
                qsT, doT, q_blk, do_blk, shift, delta_blk = load_query_block(
                    q, dout, rows, scale, b, h, i0, i1, bufs)
                bwd_tile(k_blk, v_blk, qsT, doT, shift, delta_blk, s_buf, dp_buf, slope_buf, bias,
                         band, dropout, reals, alibi, b, h, i0, j0, cls)
                # forward: out = (pT * z).T @ v  ->  dv = (pT * z) @ dO = (eT * z) @ (dO / norm)
                matmul(s_buf[:, :bm], do_blk, dv_acc, True)
                # forward: sT = k @ (scale * q).T  ->  dk = scale * dsT @ q
                matmul(dp_buf[:, :bm], q_blk, dk_acc, True)
        for jj in range(bn):
            for d in range(D):
                dk[b, kv, j0 + jj, d] = dk_acc[jj, d] * scale
            for d in range(Dv):
                dv[b, kv, j0 + jj, d] = dv_acc[jj, d]


@kernel
def _bwd_dq(q, k, v, kT, dout, rows, bias, band, dropout, reals, alibi, blocks, bmask, grads):
    """dQ (grads[0]): one task per (b, h, query block), the query block resident."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    BLOCK_M, BLOCK_N = blocks
    scale = reals[0]
    use_cap = has_softcap(reals) or HAS_SCORE_MOD
    dq = grads[0]
    group = Hq // Hkv
    n_qblocks = (Nq + BLOCK_M - 1) // BLOCK_M
    for task in prange(B * Hq * n_qblocks):
        b = task // (Hq * n_qblocks)
        h = task // n_qblocks % Hq
        i0 = task % n_qblocks * BLOCK_M
        i1 = min(i0 + BLOCK_M, Nq)
        bm = i1 - i0
        kv = h // group
        qsT, doT, _, _, shift, delta_blk = load_query_block(
            q, dout, rows, scale, b, h, i0, i1, query_block_buffers(bm, D, Dv, q))
        dqT = tile_buffer(D, bm, q)[:, :bm]  # dQ.T / scale (scale applied at the end)
        dqT[:] = 0.0
        s_buf = tile_buffer(BLOCK_N, bm, q)
        dp_buf = tile_buffer(BLOCK_N, bm, q)
        slope_buf = tile_buffer(BLOCK_N if use_cap else 0, bm, q)  # the softcap's / score_mod's slopes

        j_start, j_stop = key_range(band, i0, i1, Nk)
        for j0 in range(j_start, j_stop, BLOCK_N):
            j1 = min(j0 + BLOCK_N, j_stop)
            bn = j1 - j0
            cls = tile_class(bmask, b, h, i0, i1, j0, j1)
            if cls == 0:  # mask_mod allows no pair here
                continue
            bwd_tile(k[b, kv][j0:j1], v[b, kv][j0:j1], qsT, doT, shift, delta_blk, s_buf[:bn],
                     dp_buf[:bn], slope_buf[:bn], bias, band, dropout, reals, alibi, b, h, i0, j0,
                     cls)
            # forward: sT = scale * k @ q.T  ->  dq.T = scale * k.T @ dsT
            matmul(kT[b, kv][:, j0:j1], dp_buf[:bn, :bm], dqT, True)
        for ii in range(bm):
            for d in range(D):
                dq[b, h, i0 + ii, d] = dqT[d, ii] * scale


@kernel
def _bwd_fused(q, k, v, kT, dout, rows, bias, band, dropout, reals, alibi, blocks, bmask, grads):
    """dkdv with the key block resident, plus dq added from the same tiles (see the module
    docstring). One task per (b, kv head): it owns dq of the group's query heads."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    BLOCK_M, BLOCK_N = blocks
    scale = reals[0]
    use_cap = has_softcap(reals) or HAS_SCORE_MOD
    dq, dk, dv = grads
    group = Hq // Hkv
    for task in prange(B * Hkv):
        b = task // Hkv
        kv = task % Hkv
        dk_acc = np.empty((BLOCK_N, D), dtype=q.dtype)  # dK / scale
        dv_acc = np.empty((BLOCK_N, Dv), dtype=q.dtype)
        s_buf = tile_buffer(BLOCK_N, BLOCK_M, q)
        dp_buf = tile_buffer(BLOCK_N, BLOCK_M, q)
        slope_buf = tile_buffer(BLOCK_N if use_cap else 0, BLOCK_M, q)  # the softcap's / score_mod's slopes
        bufs = query_block_buffers(BLOCK_M, D, Dv, q)
        dqT = np.zeros((group, D, Nq), dtype=q.dtype)  # the group's dQ.T / scale
        for j0 in range(0, Nk, BLOCK_N):
            j1 = min(j0 + BLOCK_N, Nk)
            bn = j1 - j0
            k_blk = k[b, kv][j0:j1]  # (bn, D), resident
            v_blk = v[b, kv][j0:j1]  # (bn, Dv), resident
            dk_acc[:bn] = 0.0
            dv_acc[:bn] = 0.0
            i_start, i_stop = query_range(band, j0, j1, Nq)
            for h in range(kv * group, (kv + 1) * group):
                for i0 in range(i_start, i_stop, BLOCK_M):
                    i1 = min(i0 + BLOCK_M, i_stop)
                    bm = i1 - i0
                    cls = tile_class(bmask, b, h, i0, i1, j0, j1)
                    if cls == 0:  # mask_mod allows no pair here
                        continue
                    qsT, doT, q_blk, do_blk, shift, delta_blk = load_query_block(
                        q, dout, rows, scale, b, h, i0, i1, bufs)
                    bwd_tile(k_blk, v_blk, qsT, doT, shift, delta_blk, s_buf[:bn], dp_buf[:bn],
                             slope_buf[:bn], bias, band, dropout, reals, alibi, b, h, i0, j0, cls)
                    eT = s_buf[:bn, :bm]
                    dsT = dp_buf[:bn, :bm]
                    matmul(eT, do_blk, dv_acc[:bn], True)  # dv += (eT * z) @ (dO / norm)
                    matmul(dsT, q_blk, dk_acc[:bn], True)  # dk += dsT @ q (x scale)
                    # dq.T += k.T @ dsT: only this task writes the group's dq
                    matmul(kT[b, kv][:, j0:j1], dsT, dqT[h - kv * group][:, i0:i1], True)
            for jj in range(bn):
                for d in range(D):
                    dk[b, kv, j0 + jj, d] = dk_acc[jj, d] * scale
                for d in range(Dv):
                    dv[b, kv, j0 + jj, d] = dv_acc[jj, d]
        for h in range(kv * group, (kv + 1) * group):
            for i in range(Nq):
                for d in range(D):
                    dq[b, h, i, d] = dqT[h - kv * group, d, i] * scale
