"""Tiled flash attention on the GPU with numba.cuda: forward, and a backward without atomics.

Shape legend: see ``spec.py``::

    q (B, Hq, Nq, D)   k (B, Hkv, Nk, D)   v (B, Hkv, Nk, Dv)   bias (Bm, Hm, Nq, Nk)
    out (B, Hq, Nq, Dv)   lse (B, Hq, Nq)   delta (B, Hq, Nq)

Four kernels, named as in Triton's fused-attention tutorial:

``_attn_fwd``            grid (ceil(Nq / BLOCK_M), Hq, B), BLOCK_M threads. Thread ``t`` owns
                         query row ``i = tile * BLOCK_M + t``: its q row, ``acc`` (Dv),
                         ``m_i`` and ``l_i`` live in registers (local arrays). K/V tiles of
                         BLOCK_N rows are staged in shared memory by the whole block (coalesced
                         row-major loads) and every thread reads the same K/V row at the same
                         time (a shared-memory broadcast, no bank conflicts). Online softmax
                         with ``alpha = exp(m_old - m_new)``; ``lse = m_i + log(l_i)`` stored.
``_attn_bwd_preprocess`` ``delta_i = sum_d out_id * dout_id``, one thread per query row.
``_attn_bwd_dkdv``       grid (ceil(Nk / BLOCK_N), Hkv, B), BLOCK_N threads. Thread ``t`` owns
                         key row ``j``: k, v rows and the ``dk``/``dv`` accumulators in
                         registers. It loops over the GQA group's query heads and, for each,
                         over query tiles of BLOCK_M rows staged in shared memory (q, dout,
                         lse, delta). A kv head's gradient is summed over its group inside one
                         thread, so no atomics are needed.
``_attn_bwd_dq``         grid (ceil(Nq / BLOCK_M), Hq, B), BLOCK_M threads. Thread ``t`` owns
                         query row ``i``: q, dout rows, ``dq`` accumulator; K/V tiles staged.

Every output element is written by exactly one thread after a fixed-order loop, so forward
and backward are deterministic (bit-identical from run to run).

Masking: the band (causal + window, ``spec.window_left/right``, bottom-right aligned) decides
which tiles are visited at all: ``masking.key_range`` / ``masking.query_range`` (what
``AttentionSpec.key_range`` / ``query_range`` call), compiled
as device functions, so tiles outside the band are skipped. Inside a tile each pair is
checked with ``masking.in_band`` and the additive ``spec.bias`` (``-inf`` forbids); dropout
uses ``masking.keep``, the same counter-based hash as every other backend. Those helpers are
compiled from ``kernels/masking.py`` as-is with ``cuda.jit(device=True)``. A row with no
allowed key gets ``out = 0``, ``lse = -inf`` and zero gradients; nothing becomes NaN.

Tiles (``tile_config``). "Resident" rows are the ones a thread owns (query rows in the
forward and dQ kernels, key rows in dK/dV); "staged" rows are streamed through shared memory:

* forward / dQ: ``BLOCK_M = resident`` threads, ``BLOCK_N = staged`` key rows;
* dK/dV:        ``BLOCK_N = resident`` threads, ``BLOCK_M = staged`` query rows.

On a GPU: ``resident = 64`` threads (two warps; each thread holds ~D + Dv + BLOCK_N values in
registers, so more rows per block would mostly add register spills at D = 128) and ``staged``
is the largest power of two <= 64 whose tiles fit the 48 KiB of static shared memory a block
may use without opting in to dynamic shared memory: staged * (D + Dv + 2) * itemsize <= 48 KiB.
That gives staged = 64 for float32 up to D + Dv = 190 and 32 at D = Dv = 128 (32.3 KiB);
for float64, 32 and 16. These are design choices, **not measured**: no GPU was available when
this was written; ``benchmarks/gpu_flash.py`` measures them. Under numba's simulator
(``NUMBA_ENABLE_CUDASIM=1``) every thread is a Python thread, so ``SIM_TILES`` (8 x 8) keeps
the thread count small while still covering several tiles and ragged edges at N = 37.
``TILES_OVERRIDE`` forces other tiles (for tuning on a GPU, and for tests).

Kernels are built lazily, on first use, by a cached factory keyed on (dtype, D, Dv, tiles,
has_bias, has_dropout): head dims and tiles are compile-time constants (local and shared
array sizes must be), and a missing bias or dropout compiles to no code at all. Importing
this module needs neither a GPU nor numba-cuda. The scale and every floating constant are in
the tile dtype, so float32 kernels contain no float64 arithmetic (checked on the PTX).

Module protocol: ``forward(q, k, v, spec) -> (out, lse)`` and
``backward(q, k, v, out, lse, dout, spec) -> (dq, dk, dv)`` take NumPy arrays or CUDA device
arrays; results come back as device arrays when ``q`` is one, else as NumPy arrays.
``to_device`` / ``to_host`` move arrays; ``unavailable_reason()`` says why this backend cannot
run here (None when it can).
"""

from __future__ import annotations

import functools
import math
import types
from typing import NamedTuple

import numpy as np

from .. import masking
from ..spec import AttentionSpec

try:
    import numba
    from numba import cuda
except ImportError as exc:  # numba without the numba-cuda package, or no numba at all
    numba = cuda = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

SHARED_MEMORY_BUDGET = 48 * 1024  # bytes of static shared memory per block (no opt-in needed)


class Tiles(NamedTuple):
    resident: int  # rows owned by one thread each: BLOCK_M in fwd/dq, BLOCK_N in dkdv
    staged: int  # rows streamed through shared memory: BLOCK_N in fwd/dq, BLOCK_M in dkdv


GPU_RESIDENT = 64
GPU_MAX_STAGED = 64
SIM_TILES = Tiles(resident=8, staged=8)  # the simulator runs one Python thread per GPU thread
# A tuning and testing hook: when set, every launch uses these tiles (benchmarks/gpu_flash.py
# --resident/--staged sets it to try tiles on a GPU; tests set it to vary the tiling).
TILES_OVERRIDE: Tiles | None = None


def simulated() -> bool:
    """True when numba.cuda is the simulator (NUMBA_ENABLE_CUDASIM=1 before numba's import)."""
    return cuda is not None and bool(numba.config.ENABLE_CUDASIM)


def staged_rows(itemsize: int, D: int, Dv: int, budget: int = SHARED_MEMORY_BUDGET) -> int:
    """Largest power of two <= GPU_MAX_STAGED with staged * (D + Dv + 2) * itemsize <= budget.

    The ``+ 2`` is the lse and delta vectors staged beside q and dout in the dK/dV kernel.
    Worked example: float32, D = Dv = 128: 64 rows need 66 KiB, 32 rows 33 KiB -> 32.
    """
    rows = GPU_MAX_STAGED
    while rows > 1 and rows * (D + Dv + 2) * itemsize > budget:
        rows //= 2
    if rows * (D + Dv + 2) * itemsize > budget:
        raise ValueError(f"head dims D={D}, Dv={Dv} are too large for the cuda backend: one "
                         f"staged row needs more than {budget} bytes of shared memory")
    return rows


def tile_config(dtype, D: int, Dv: int) -> Tiles:
    """The tiles used for this dtype and these head dims (SIM_TILES under the simulator)."""
    if TILES_OVERRIDE is not None:
        return TILES_OVERRIDE
    if simulated():
        return SIM_TILES
    return Tiles(GPU_RESIDENT, staged_rows(np.dtype(dtype).itemsize, D, Dv))


def shared_memory_bytes(dtype, D: int, Dv: int, tiles: Tiles) -> dict[str, int]:
    """Static shared memory of each kernel, in bytes (what the PTX declares)."""
    itemsize = np.dtype(dtype).itemsize
    return {
        "_attn_fwd": tiles.staged * (D + Dv) * itemsize,
        "_attn_bwd_preprocess": 0,
        "_attn_bwd_dkdv": tiles.staged * (D + Dv + 2) * itemsize,
        "_attn_bwd_dq": tiles.staged * (D + Dv) * itemsize,
    }


# -- availability and transfers -------------------------------------------------------------


def unavailable_reason() -> str | None:
    """None when numba.cuda can run kernels here (a GPU, or the simulator), else why not."""
    if cuda is None:
        return (f"numba-cuda is not installed ({_IMPORT_ERROR}); "
                "install it with pip install 'numba-cuda[cu13]'")
    if cuda.is_available():
        return None
    return ("no CUDA GPU is usable here (numba.cuda.is_available() is False: no device or no "
            "driver); set NUMBA_ENABLE_CUDASIM=1 before numba is imported to use the simulator")


def is_device_array(x) -> bool:
    """A numba.cuda device array (or the simulator's stand-in for one)."""
    return hasattr(x, "copy_to_host") and not isinstance(x, np.ndarray)


def to_device(x):
    """A device copy of a NumPy array; device arrays are returned as they are."""
    if is_device_array(x):
        return x
    return cuda.to_device(np.ascontiguousarray(x))


def to_host(x):
    """A NumPy copy of a device array; NumPy arrays are returned as they are."""
    if is_device_array(x):
        return x.copy_to_host()
    return x


# -- the kernels ------------------------------------------------------------------------------


def compile_device_function(fn, compiled: dict | None = None):
    """``cuda.jit(device=True)(fn)``, after compiling the plain functions ``fn`` calls.

    ``masking.keep`` calls ``dropout_bits``, which calls ``mix32``: plain Python globals that
    numba cannot call from a kernel. So each callee defined in the same module is compiled
    first (once), and ``fn`` is compiled from a copy of itself whose globals name the
    compiled callees. The code object is the same: the helpers are compiled as written.
    """
    compiled = {} if compiled is None else compiled
    if fn in compiled:
        return compiled[fn]
    callees = {}
    for name in fn.__code__.co_names:
        callee = fn.__globals__.get(name)
        if isinstance(callee, types.FunctionType) and callee.__module__ == fn.__module__:
            callees[name] = compile_device_function(callee, compiled)
    rebound = types.FunctionType(fn.__code__, {**fn.__globals__, **callees}, fn.__name__,
                                 fn.__defaults__, fn.__closure__)
    compiled[fn] = cuda.jit(device=True)(rebound)
    return compiled[fn]


def device_helpers() -> tuple:
    """masking.in_band / masking.keep and the band ranges, compiled as device functions."""
    return tuple(compile_device_function(fn) for fn in (
        masking.in_band, masking.keep, masking.key_range, masking.query_range))


_shared_device_helpers = functools.lru_cache(maxsize=None)(device_helpers)


def kernel_functions(dtype_name: str, D: int, Dv: int, tiles: Tiles, has_bias: bool,
                     has_dropout: bool, helpers: tuple | None = None) -> dict:
    """The four kernels as plain Python functions with every size baked in as a constant.

    ``cuda.jit`` turns them into kernels (``_kernels``); ``cuda.compile_ptx`` compiles them
    with explicit signatures (``kernel_signatures``) for the PTX checks, which pass their own
    ``helpers`` (from :func:`device_helpers`) so nothing they compile is shared with launches.
    """
    in_band, keep, key_range, query_range = helpers or _shared_device_helpers()
    dtype = numba.from_dtype(np.dtype(dtype_name))
    np_type = np.dtype(dtype_name).type
    ZERO, ONE, NEG_INF, POS_INF = np_type(0), np_type(1), np_type(-np.inf), np_type(np.inf)
    HAS_BIAS, HAS_DROPOUT = has_bias, has_dropout
    DV = Dv
    RESIDENT, STAGED = tiles.resident, tiles.staged  # plain ints: compile-time constants

    def _attn_fwd(q, k, v, bias, out, lse, scale, offset, window_left, window_right,
                  seed_lo, seed_hi, threshold, dropout_scale):
        BLOCK_M, BLOCK_N = RESIDENT, STAGED
        k_tile = cuda.shared.array((BLOCK_N, D), dtype)  # (BLOCK_N, D)
        v_tile = cuda.shared.array((BLOCK_N, DV), dtype)  # (BLOCK_N, Dv)
        q_row = cuda.local.array(D, dtype)
        acc = cuda.local.array(DV, dtype)
        s_row = cuda.local.array(BLOCK_N, dtype)  # this tile's scores of query row i

        t = cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        Nq, Nk = q.shape[2], k.shape[2]
        h_kv = h // (q.shape[1] // k.shape[1])
        b_bias = b if bias.shape[0] > 1 else 0
        h_bias = h if bias.shape[1] > 1 else 0
        i_start = cuda.blockIdx.x * BLOCK_M
        i_stop = min(Nq, i_start + BLOCK_M)
        i = i_start + t
        row_valid = i < Nq

        for d in range(D):
            q_row[d] = q[b, h, i, d] if row_valid else ZERO
        for d in range(DV):
            acc[d] = ZERO
        m_i = NEG_INF  # running max of the scores seen so far
        l_i = ZERO  # running sum of exp(s - m_i)

        j_lo, j_hi = key_range(i_start, i_stop, Nk, offset, window_left, window_right)
        for j0 in range((j_lo // BLOCK_N) * BLOCK_N, j_hi, BLOCK_N):
            # Stage K/V rows j0 .. j0 + BLOCK_N: consecutive threads read consecutive elements.
            cuda.syncthreads()  # every thread is done with the previous tile
            for e in range(t, BLOCK_N * D, BLOCK_M):
                r, c = e // D, e % D
                k_tile[r, c] = k[b, h_kv, j0 + r, c] if j0 + r < Nk else ZERO
            for e in range(t, BLOCK_N * DV, BLOCK_M):
                r, c = e // DV, e % DV
                v_tile[r, c] = v[b, h_kv, j0 + r, c] if j0 + r < Nk else ZERO
            cuda.syncthreads()
            if not row_valid:
                continue

            m_tile = NEG_INF
            for jj in range(BLOCK_N):
                j = j0 + jj
                s = NEG_INF
                if j < Nk and in_band(i, j, offset, window_left, window_right):
                    s = ZERO
                    for d in range(D):
                        s += q_row[d] * k_tile[jj, d]
                    s *= scale
                    if HAS_BIAS:
                        s += bias[b_bias, h_bias, i, j]
                s_row[jj] = s
                if s > m_tile or s != s:  # max, but a NaN score sticks (NaN in, NaN out)
                    m_tile = s
            m_new = m_tile if (m_tile > m_i or m_tile != m_tile) else m_i
            if m_new == NEG_INF:
                continue  # nothing allowed so far: acc and l_i stay zero
            alpha = math.exp(m_i - m_new)  # exp(-inf) = 0 on the first allowed tile
            l_i *= alpha
            for d in range(DV):
                acc[d] *= alpha
            for jj in range(BLOCK_N):
                p = math.exp(s_row[jj] - m_new)
                if p == ZERO:
                    continue
                l_i += p  # lse is taken before dropout
                if HAS_DROPOUT:
                    if not keep(seed_lo, seed_hi, b, h, i, j0 + jj, threshold):
                        continue
                    p *= dropout_scale
                for d in range(DV):
                    acc[d] += p * v_tile[jj, d]
            m_i = m_new

        if row_valid:
            if l_i == ZERO:  # no allowed key: zeros and lse = -inf
                for d in range(DV):
                    out[b, h, i, d] = ZERO
                lse[b, h, i] = NEG_INF
            else:  # (a NaN l_i, from a NaN input, stays NaN)
                inv_l = ONE / l_i
                for d in range(DV):
                    out[b, h, i, d] = acc[d] * inv_l
                lse[b, h, i] = m_i + math.log(l_i)

    def _attn_bwd_preprocess(out, dout, delta):
        BLOCK_M = RESIDENT
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        i = cuda.blockIdx.x * BLOCK_M + cuda.threadIdx.x
        if i < out.shape[2]:
            # delta_i = sum_j p_ij dp_ij = sum_d out_id dout_id
            total = ZERO
            for d in range(DV):
                total += out[b, h, i, d] * dout[b, h, i, d]
            delta[b, h, i] = total

    def _attn_bwd_dkdv(q, k, v, bias, dout, lse, delta, dk, dv, scale, offset, window_left,
                       window_right, seed_lo, seed_hi, threshold, dropout_scale):
        BLOCK_N, BLOCK_M = RESIDENT, STAGED
        q_tile = cuda.shared.array((BLOCK_M, D), dtype)  # (BLOCK_M, D)
        do_tile = cuda.shared.array((BLOCK_M, DV), dtype)  # (BLOCK_M, Dv)
        lse_tile = cuda.shared.array(BLOCK_M, dtype)
        delta_tile = cuda.shared.array(BLOCK_M, dtype)
        k_row = cuda.local.array(D, dtype)
        v_row = cuda.local.array(DV, dtype)
        dk_acc = cuda.local.array(D, dtype)
        dv_acc = cuda.local.array(DV, dtype)

        t = cuda.threadIdx.x
        h_kv = cuda.blockIdx.y
        b = cuda.blockIdx.z
        Nq, Nk = q.shape[2], k.shape[2]
        group = q.shape[1] // k.shape[1]
        b_bias = b if bias.shape[0] > 1 else 0
        j_start = cuda.blockIdx.x * BLOCK_N
        j_stop = min(Nk, j_start + BLOCK_N)
        j = j_start + t
        col_valid = j < Nk

        for d in range(D):
            k_row[d] = k[b, h_kv, j, d] if col_valid else ZERO
            dk_acc[d] = ZERO
        for d in range(DV):
            v_row[d] = v[b, h_kv, j, d] if col_valid else ZERO
            dv_acc[d] = ZERO

        i_lo, i_hi = query_range(j_start, j_stop, Nq, offset, window_left, window_right)
        for g in range(group):  # GQA: kv head h_kv served query heads h_kv*group .. +group
            h = h_kv * group + g
            h_bias = h if bias.shape[1] > 1 else 0
            for i0 in range((i_lo // BLOCK_M) * BLOCK_M, i_hi, BLOCK_M):
                cuda.syncthreads()  # every thread is done with the previous tile
                for e in range(t, BLOCK_M * D, BLOCK_N):
                    r, c = e // D, e % D
                    q_tile[r, c] = q[b, h, i0 + r, c] if i0 + r < Nq else ZERO
                for e in range(t, BLOCK_M * DV, BLOCK_N):
                    r, c = e // DV, e % DV
                    do_tile[r, c] = dout[b, h, i0 + r, c] if i0 + r < Nq else ZERO
                for r in range(t, BLOCK_M, BLOCK_N):
                    # forward: p = exp(s - lse); an empty row (lse = -inf) must give p = 0,
                    # so its lse is staged as +inf: exp(s - inf) = 0
                    row_lse = lse[b, h, i0 + r] if i0 + r < Nq else POS_INF
                    lse_tile[r] = POS_INF if row_lse == NEG_INF else row_lse
                    delta_tile[r] = delta[b, h, i0 + r] if i0 + r < Nq else ZERO
                cuda.syncthreads()
                if not col_valid:
                    continue

                for ii in range(BLOCK_M):
                    i = i0 + ii
                    if not (i < Nq and in_band(i, j, offset, window_left, window_right)):
                        continue
                    # forward: s = scale * q @ k^T + bias
                    s = ZERO
                    for d in range(D):
                        s += q_tile[ii, d] * k_row[d]
                    s *= scale
                    if HAS_BIAS:
                        s += bias[b_bias, h_bias, i, j]
                    # forward: p = exp(s - lse), recomputed instead of stored
                    p = math.exp(s - lse_tile[ii])
                    if p == ZERO:
                        continue  # masked (s = -inf) or negligible: no gradient either way
                    # 1. forward: out = p_drop @ v  ->  dv += p_drop * dout_i, dp_drop = dout_i . v_j
                    dp = ZERO
                    for d in range(DV):
                        dp += do_tile[ii, d] * v_row[d]
                    p_drop = p
                    # 2. forward: p_drop = p * z  ->  dp = dp_drop * z
                    if HAS_DROPOUT:
                        if keep(seed_lo, seed_hi, b, h, i, j, threshold):
                            p_drop = p * dropout_scale
                            dp *= dropout_scale
                        else:
                            p_drop = ZERO
                            dp = ZERO
                    for d in range(DV):
                        dv_acc[d] += p_drop * do_tile[ii, d]
                    # 3. forward: p = softmax(s)  ->  ds = p * (dp - delta)
                    ds = p * (dp - delta_tile[ii])
                    # 4. forward: s = scale * q @ k^T  ->  dk = scale * ds^T @ q (scale at the end)
                    for d in range(D):
                        dk_acc[d] += ds * q_tile[ii, d]

        if col_valid:
            for d in range(D):
                dk[b, h_kv, j, d] = dk_acc[d] * scale
            for d in range(DV):
                dv[b, h_kv, j, d] = dv_acc[d]

    def _attn_bwd_dq(q, k, v, bias, dout, lse, delta, dq, scale, offset, window_left,
                     window_right, seed_lo, seed_hi, threshold, dropout_scale):
        BLOCK_M, BLOCK_N = RESIDENT, STAGED
        k_tile = cuda.shared.array((BLOCK_N, D), dtype)  # (BLOCK_N, D)
        v_tile = cuda.shared.array((BLOCK_N, DV), dtype)  # (BLOCK_N, Dv)
        q_row = cuda.local.array(D, dtype)
        do_row = cuda.local.array(DV, dtype)
        dq_acc = cuda.local.array(D, dtype)

        t = cuda.threadIdx.x
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        Nq, Nk = q.shape[2], k.shape[2]
        h_kv = h // (q.shape[1] // k.shape[1])
        b_bias = b if bias.shape[0] > 1 else 0
        h_bias = h if bias.shape[1] > 1 else 0
        i_start = cuda.blockIdx.x * BLOCK_M
        i_stop = min(Nq, i_start + BLOCK_M)
        i = i_start + t
        row_valid = i < Nq

        for d in range(D):
            q_row[d] = q[b, h, i, d] if row_valid else ZERO
            dq_acc[d] = ZERO
        for d in range(DV):
            do_row[d] = dout[b, h, i, d] if row_valid else ZERO
        lse_i = lse[b, h, i] if row_valid else POS_INF
        if lse_i == NEG_INF:
            lse_i = POS_INF  # empty row: p = exp(s - inf) = 0 everywhere
        delta_i = delta[b, h, i] if row_valid else ZERO

        j_lo, j_hi = key_range(i_start, i_stop, Nk, offset, window_left, window_right)
        for j0 in range((j_lo // BLOCK_N) * BLOCK_N, j_hi, BLOCK_N):
            cuda.syncthreads()  # every thread is done with the previous tile
            for e in range(t, BLOCK_N * D, BLOCK_M):
                r, c = e // D, e % D
                k_tile[r, c] = k[b, h_kv, j0 + r, c] if j0 + r < Nk else ZERO
            for e in range(t, BLOCK_N * DV, BLOCK_M):
                r, c = e // DV, e % DV
                v_tile[r, c] = v[b, h_kv, j0 + r, c] if j0 + r < Nk else ZERO
            cuda.syncthreads()
            if not row_valid:
                continue

            for jj in range(BLOCK_N):
                j = j0 + jj
                if not (j < Nk and in_band(i, j, offset, window_left, window_right)):
                    continue
                # forward: s = scale * q @ k^T + bias
                s = ZERO
                for d in range(D):
                    s += q_row[d] * k_tile[jj, d]
                s *= scale
                if HAS_BIAS:
                    s += bias[b_bias, h_bias, i, j]
                # forward: p = exp(s - lse)
                p = math.exp(s - lse_i)
                if p == ZERO:
                    continue
                # 1. forward: out = p_drop @ v  ->  dp_drop = dout_i . v_j
                dp = ZERO
                for d in range(DV):
                    dp += do_row[d] * v_tile[jj, d]
                # 2. forward: p_drop = p * z  ->  dp = dp_drop * z
                if HAS_DROPOUT:
                    if keep(seed_lo, seed_hi, b, h, i, j, threshold):
                        dp *= dropout_scale
                    else:
                        dp = ZERO
                # 3. forward: p = softmax(s)  ->  ds = p * (dp - delta)
                ds = p * (dp - delta_i)
                # 4. forward: s = scale * q @ k^T  ->  dq = scale * ds @ k (scale at the end)
                for d in range(D):
                    dq_acc[d] += ds * k_tile[jj, d]

        if row_valid:
            for d in range(D):
                dq[b, h, i, d] = dq_acc[d] * scale

    return {
        "_attn_fwd": _attn_fwd,
        "_attn_bwd_preprocess": _attn_bwd_preprocess,
        "_attn_bwd_dkdv": _attn_bwd_dkdv,
        "_attn_bwd_dq": _attn_bwd_dq,
    }


def kernel_signatures(dtype_name: str) -> dict[str, str]:
    """Explicit signatures of the four kernels (C-contiguous arrays), for cuda.compile_ptx."""
    if dtype_name not in ("float32", "float64"):
        raise ValueError(f"the cuda kernels take float32 or float64, got {dtype_name!r}")
    f = dtype_name
    a3, a4 = f"{f}[:, :, ::1]", f"{f}[:, :, :, ::1]"
    band = "int64, int64, int64"  # offset, window_left, window_right
    dropout = f"int64, int64, int64, {f}"  # seed_lo, seed_hi, threshold, dropout_scale
    return {
        "_attn_fwd": f"void({a4}, {a4}, {a4}, {a4}, {a4}, {a3}, {f}, {band}, {dropout})",
        "_attn_bwd_preprocess": f"void({a4}, {a4}, {a3})",
        "_attn_bwd_dkdv": (f"void({a4}, {a4}, {a4}, {a4}, {a4}, {a3}, {a3}, {a4}, {a4}, "
                           f"{f}, {band}, {dropout})"),
        "_attn_bwd_dq": f"void({a4}, {a4}, {a4}, {a4}, {a4}, {a3}, {a3}, {a4}, {f}, {band}, {dropout})",
    }


@functools.lru_cache(maxsize=None)
def _kernels(dtype_name: str, D: int, Dv: int, tiles: Tiles, has_bias: bool,
             has_dropout: bool) -> dict:
    """cuda.jit kernels for one (dtype, D, Dv, tiles, bias?, dropout?), compiled at first launch."""
    functions = kernel_functions(dtype_name, D, Dv, tiles, has_bias, has_dropout)
    return {name: cuda.jit(fn) for name, fn in functions.items()}


# -- host side ------------------------------------------------------------------------------


class _Launch(NamedTuple):
    kernels: dict
    tiles: Tiles
    bias: object  # device array (Bm, Hm, Nq, Nk), or a (1, 1, 1, 1) placeholder
    band_and_dropout: tuple  # the trailing scalar arguments every attention kernel takes


def _prepare(spec: AttentionSpec) -> _Launch:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the cuda attention backend is unavailable: {reason}")
    dtype = np.dtype(spec.dtype)
    tiles = tile_config(dtype, spec.D, spec.Dv)
    has_dropout = spec.dropout_p > 0.0
    kernels = _kernels(dtype.name, spec.D, spec.Dv, tiles, spec.has_bias, has_dropout)
    bias = spec.bias if spec.has_bias else np.zeros((1, 1, 1, 1), dtype=dtype)
    tail = (
        np.int64(spec.offset), np.int64(spec.window_left), np.int64(spec.window_right),
        np.int64(spec.seed_lo), np.int64(spec.seed_hi), np.int64(spec.dropout_threshold),
        dtype.type(spec.dropout_scale if has_dropout else 1.0),
    )
    return _Launch(kernels, tiles, cuda.to_device(np.ascontiguousarray(bias, dtype=dtype)), tail)


def _as_device(x, dtype):
    if is_device_array(x):
        return x
    return cuda.to_device(np.ascontiguousarray(x, dtype=dtype))


def forward(q, k, v, spec: AttentionSpec):
    """out (B, Hq, Nq, Dv), lse (B, Hq, Nq); device arrays in -> device arrays out."""
    on_device = is_device_array(q)
    launch = _prepare(spec)
    dtype = np.dtype(spec.dtype)
    q_d, k_d, v_d = (_as_device(x, dtype) for x in (q, k, v))
    out = cuda.device_array((spec.B, spec.Hq, spec.Nq, spec.Dv), dtype=dtype)
    lse = cuda.device_array((spec.B, spec.Hq, spec.Nq), dtype=dtype)
    BLOCK_M = launch.tiles.resident
    grid = (math.ceil(spec.Nq / BLOCK_M), spec.Hq, spec.B)
    scale = dtype.type(spec.scale)
    launch.kernels["_attn_fwd"][grid, BLOCK_M](
        q_d, k_d, v_d, launch.bias, out, lse, scale, *launch.band_and_dropout)
    if on_device:
        return out, lse
    return out.copy_to_host(), lse.copy_to_host()


def backward(q, k, v, out, lse, dout, spec: AttentionSpec):
    """dq (B, Hq, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv); deterministic, no atomics."""
    on_device = is_device_array(q)
    launch = _prepare(spec)
    dtype = np.dtype(spec.dtype)
    q_d, k_d, v_d, out_d, lse_d, dout_d = (
        _as_device(x, dtype) for x in (q, k, v, out, lse, dout))
    delta = cuda.device_array((spec.B, spec.Hq, spec.Nq), dtype=dtype)
    dq = cuda.device_array((spec.B, spec.Hq, spec.Nq, spec.D), dtype=dtype)
    dk = cuda.device_array((spec.B, spec.Hkv, spec.Nk, spec.D), dtype=dtype)
    dv = cuda.device_array((spec.B, spec.Hkv, spec.Nk, spec.Dv), dtype=dtype)
    resident = launch.tiles.resident
    query_grid = (math.ceil(spec.Nq / resident), spec.Hq, spec.B)
    key_grid = (math.ceil(spec.Nk / resident), spec.Hkv, spec.B)
    scale = dtype.type(spec.scale)
    kernels = launch.kernels
    kernels["_attn_bwd_preprocess"][query_grid, resident](out_d, dout_d, delta)
    kernels["_attn_bwd_dkdv"][key_grid, resident](
        q_d, k_d, v_d, launch.bias, dout_d, lse_d, delta, dk, dv, scale, *launch.band_and_dropout)
    kernels["_attn_bwd_dq"][query_grid, resident](
        q_d, k_d, v_d, launch.bias, dout_d, lse_d, delta, dq, scale, *launch.band_and_dropout)
    if on_device:
        return dq, dk, dv
    return dq.copy_to_host(), dk.copy_to_host(), dv.copy_to_host()
