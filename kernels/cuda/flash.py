"""Rung 1 of the CUDA ladder: flash attention with numba.cuda, one query (or key) row per
thread. Forward, and a backward without atomics.

Shape legend: see ``spec.py``::

    q (B, Hq, Nq, D)   k (B, Hkv, Nk, D)   v (B, Hkv, Nk, Dv)   bias (Bm, Hm, Nq, Nk)
    alibi (Ba, Hq)   out (B, Hq, Nq, Dv)   stats (2, B, Hq, Nq) = (m, l)   delta (B, Hq, Nq)

Module protocol (``kernels/protocol.py``): ``forward(q, k, v, spec) -> (out, stats)`` and
``backward(q, k, v, out, stats, dout, spec, dlse=None) -> (dq, dk, dv)`` take NumPy arrays or CUDA device
arrays; results come back as device arrays when ``q`` is one, else as NumPy arrays.
``to_device`` / ``to_host`` move arrays; ``unavailable_reason()`` says why this backend cannot
run here (None when it can).

Four kernels, named as in Triton's fused-attention tutorial; the spec reaches them as the
records of ``spec.pack()`` (``bias, band, dropout, reals, alibi``) and ``blocks``, the block
mask of a user's mask_mod (see "user mods" below), unpacked only by the rules of
``masking.py``::

    _attn_fwd(q, k, v, out, stats, bias, band, dropout, reals, alibi, blocks)
    _attn_bwd_preprocess(out, dout, dlse, delta)
    _attn_bwd_dkdv(q, k, v, dout, stats, delta, dk, dv, bias, band, dropout, reals, alibi, blocks)
    _attn_bwd_dq(q, k, v, dout, stats, delta, dq, bias, band, dropout, reals, alibi, blocks)

``_attn_fwd``            grid (ceil(Nq / BLOCK_M), Hq, B), BLOCK_M threads. Thread ``t`` owns
                         query row ``i = tile * BLOCK_M + t``: its q row, ``acc`` (Dv),
                         ``m_i`` and ``l_i`` live in registers (local arrays). K/V tiles of
                         BLOCK_N rows are staged in shared memory by the whole block (coalesced
                         row-major loads) and every thread reads the same K/V row at the same
                         time (a shared-memory broadcast, no bank conflicts). Online softmax
                         with ``alpha = exp(m_old - m_new)``; stores ``stats = (m_i, l_i)``.
``_attn_bwd_preprocess`` ``delta_i = sum_d out_id * dout_id - dlse_i``, one thread per query
                         row (dlse: the gradient reaching lse, an empty array for none;
                         ``protocol.py``).
``_attn_bwd_dkdv``       grid (ceil(Nk / BLOCK_N), Hkv, B), BLOCK_N threads. Thread ``t`` owns
                         key row ``j``: k, v rows and the ``dk``/``dv`` accumulators in
                         registers. It loops over the GQA group's query heads and, for each,
                         over query tiles of BLOCK_M rows staged in shared memory (q, dout,
                         and per row the shift, 1 / norm and delta). A kv head's gradient is
                         summed over its group inside one thread, so no atomics are needed.
``_attn_bwd_dq``         grid (ceil(Nq / BLOCK_M), Hq, B), BLOCK_M threads. Thread ``t`` owns
                         query row ``i``: q, dout rows, ``dq`` accumulator; K/V tiles staged.

Every output element is written by exactly one thread after a fixed-order loop, so forward
and backward are deterministic (bit-identical from run to run).

Probabilities. The backward recomputes ``p = exp(s - shift) / norm`` with
``(shift, norm) = masking.row_shift(m, l)``, never ``exp(s - lse)``: beside a float mask of
-1e9 (or finfo.min) ``m + log(l)`` rounds ``log(l)`` away and every key of the row would get
p = 1. A row that allowed no key has ``m = -inf, l = 0``; row_shift gives it shift 0 and
norm +inf, so its p (and the forward's ``out = acc / norm``) is 0: the one empty-row rule.

Scale. ``q`` is multiplied by ``scale`` once, as it is loaded, so the score
``s = (scale * q) . k + bias`` is one chain of FMAs in every kernel. With ``s = (q . k) * scale``
NVVM (which contracts a multiply and a following add into an FMA by default) fused the
backward's ``s * scale - m`` into one FMA, skipping the rounding of ``s`` that the forward's
``m`` was taken from: p moved by up to an ulp of ``s``, 1e-5 in dv at float32 scores of ~1e3
(measured on an H200; the simulator, which does not fuse, could not see it).

Masking: the band (``band`` record: causal + window, bottom-right aligned) decides which
tiles are visited at all: ``masking.key_range`` / ``masking.query_range``, so tiles outside
the band are skipped. Inside a tile each pair is checked with ``masking.in_band``; its score
``(scale q) . k`` is capped (``masking.cap``; the backward multiplies ds by
``masking.cap_and_slope``'s slope), gets ``masking.alibi_bias`` and then the bias plane
``masking.bias_index`` picks added (``-inf`` forbids); dropout uses
``masking.keep``, the same counter-based hash as every other backend. The rules are compiled
from ``kernels/masking.py`` as-is by ``compile.compile_rules(cuda.jit(device=True))``.

Tiles (``tile_config``). "Resident" rows are the ones a thread owns (query rows in the
forward and dQ kernels, key rows in dK/dV); "staged" rows are streamed through shared memory:

* forward / dQ: ``BLOCK_M = resident`` threads, ``BLOCK_N = staged`` key rows;
* dK/dV:        ``BLOCK_N = resident`` threads, ``BLOCK_M = staged`` query rows.

On a GPU: ``resident = 64`` threads (two warps) and ``staged`` is the largest power of two
<= 64 whose tiles fit the 48 KiB of static shared memory a block may use without opting in
to dynamic shared memory: staged * (D + Dv + 3) * itemsize <= 48 KiB. That gives staged = 64
for float32 up to D + Dv = 189 and 32 at D = Dv = 128 (32.4 KiB); for float64, 32 and 16.
Each thread keeps D + Dv (+ BLOCK_N) values in local arrays: on an H200 (``benchmarks/
gpu_flash.py --resources``) every float32 kernel but the preprocess uses 221-255 registers and
spills (dK/dV at D = 128: 1.7 KiB of local memory per thread), which is what limits rung 1
(docs/cuda-flash.md has the speeds). Under numba's simulator (``NUMBA_ENABLE_CUDASIM=1``)
every thread is a Python thread, so ``SIM_TILES`` (8 x 8) keeps the thread count small while
still covering several tiles and ragged edges at N = 37. ``TILES_OVERRIDE`` forces other
tiles (for tuning on a GPU, and for tests).

User mods (``mask_mod``, ``score_mod``, ``score_mod_grad``: ``kernels/mods.py``) are compiled
with ``cuda.jit(device=True)`` and called where the CPU kernels call them: ``score_mod`` on the
capped score before ALiBi and the bias, ``mask_mod`` beside the band test, ``score_mod_grad``
into the backward's slope; tiles a mask_mod forbids entirely are skipped through the block
mask (the section "user mods" below).

Kernels are built lazily, on first use, by a cached factory keyed on (dtype, D, Dv, tiles,
has_bias, has_dropout, has_softcap, has_alibi, mods): head dims and tiles are compile-time
constants (local and shared array sizes must be), and a missing bias, dropout, softcap,
ALiBi or mod compiles to no code at all (the empty (1, 1, 0, 0) bias and (1, 0) alibi records of
``spec.pack()`` are still passed). Importing this module needs
neither a GPU nor numba-cuda. The scale and every floating constant are in the tile dtype, so
float32 kernels contain no float64 arithmetic (checked on the PTX).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from .. import masking
from ..compile import compile_rules
from ..mods import MISSING_GRAD
from ..mods import block_mask as mods_block_mask
from ..protocol import dlse_or_empty
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
SUPPORTS_MODS = True  # mask_mod / score_mod compiled in with cuda.jit(device=True) (DeviceMods)


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


ROW_VECTORS = 3  # per staged query row of the dK/dV kernel: shift, 1 / norm and delta


def staged_rows(itemsize: int, D: int, Dv: int, budget: int = SHARED_MEMORY_BUDGET) -> int:
    """Largest power of two <= GPU_MAX_STAGED with staged * (D + Dv + 3) * itemsize <= budget.

    The ``+ 3`` is the row vectors staged beside q and dout in the dK/dV kernel
    (``ROW_VECTORS``: the shift, 1 / norm of ``masking.row_shift``, and delta).
    Worked example: float32, D = Dv = 128: 64 rows need 64.8 KiB, 32 rows 32.4 KiB -> 32.
    """
    rows = GPU_MAX_STAGED
    while rows > 1 and rows * (D + Dv + ROW_VECTORS) * itemsize > budget:
        rows //= 2
    if rows * (D + Dv + ROW_VECTORS) * itemsize > budget:
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
        "_attn_bwd_dkdv": tiles.staged * (D + Dv + ROW_VECTORS) * itemsize,
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


def ptx_compiler_missing() -> str | None:
    """None when PTX can be compiled here without a GPU (``cuda.compile_ptx``), else why not.

    numba still bundles an old ``numba.cuda`` that imports fine but cannot compile these
    kernels, so the numba-cuda package itself is looked for; the simulator has no compiler."""
    import importlib.util

    if importlib.util.find_spec("numba_cuda") is None or cuda is None:
        return "numba-cuda is not installed (the cuda extra: pip install -e '.[cuda]')"
    if simulated():
        return "the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) has no PTX compiler; run without it"
    try:
        from numba.cuda.cudadrv import nvvm

        nvvm.NVVM()
    except Exception as exc:  # noqa: BLE001 - any failure to load libNVVM means "no compiler"
        return f"numba-cuda's NVVM compiler cannot be loaded: {exc}"
    return None


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


def online_softmax_step(s_row, acc, m_i, l_i):
    """One thread's online-softmax step over one tile of its query row's scores.

    Shape legend: s_row (BLOCK_N,), acc (Dv,) (local arrays of the thread); m_i, l_i scalars::

        m_new = max(m_i, max_j s_j)          alpha = exp(m_i - m_new)
        p_j   = exp(s_j - m_new)             written over s_j in s_row
        l_new = alpha * l_i + sum_j p_j      acc *= alpha (the caller adds p_j v_j)

    s_row: the tile's scores, ``-inf`` for a masked key (or one past Nk). acc: sum_j p_j v_j
    of the earlier tiles against m_i, rescaled in place. Returns (m_new, l_new). While no key
    has been allowed (m_new = -inf) nothing changes and p = exp(-inf) = 0: never
    exp(-inf - -inf) = NaN. A NaN score sticks (NaN in, NaN out). Written once, plain Python:
    the forward kernel calls it compiled with ``cuda.jit(device=True)`` (:func:`device_rules`),
    and exercise 7 (``microattn exercise start 7 DIR``) has a learner write it.
    """
    m_new = m_i
    for jj in range(s_row.shape[0]):
        s = s_row[jj]
        if s > m_new or s != s:  # max, but a NaN score sticks
            m_new = s
    # While nothing is allowed (m_new = -inf) shift by 0, the rule of masking.row_shift:
    # p = exp(-inf) = 0 and never exp(-inf - -inf) = NaN. l_i is that 0 (no key allowed yet),
    # in the kernel's dtype: a literal 0.0 would make a float32 kernel compute in float64.
    shift = m_new if m_new != -math.inf else l_i
    alpha = math.exp(m_i - shift)  # exp(-inf) = 0 on the first allowed tile
    l_new = l_i * alpha
    for d in range(acc.shape[0]):
        acc[d] *= alpha
    for jj in range(s_row.shape[0]):
        p = math.exp(s_row[jj] - shift)
        s_row[jj] = p
        l_new += p  # l is summed before dropout
    return m_new, l_new


def device_rules():
    """Every rule of ``masking.py`` compiled as a CUDA device function (``compile.compile_rules``),
    and :func:`online_softmax_step`.

    Compiled fresh on each call; launches share one set (``_shared_device_rules``), and the PTX
    checks compile their own under a patched "current device" (tests/kernels/test_cuda_ptx.py).
    """
    rules = compile_rules(cuda.jit(device=True))
    rules.online_softmax_step = cuda.jit(device=True, inline="always")(online_softmax_step)
    return rules


_shared_device_rules = functools.lru_cache(maxsize=None)(device_rules)


# -- user mods (mask_mod, score_mod: kernels/mods.py) ------------------------------------------
#
# The kernels call ``mask_mod`` / ``score_mod`` / ``score_mod_grad`` behind compile-time flags,
# where the numba CPU kernels do (the same place in a score's pipeline): ``s = cap(x)`` ->
# ``score_mod(s, b, h, i, j)`` -> ``+ alibi + bias`` -> -inf where the band, the mask or
# mask_mod forbids; the backward multiplies dS by ``score_mod_grad`` at the capped score. The
# user's functions are compiled with ``cuda.jit(device=True)`` (``DeviceMods``) and the kernels
# are built per set of them (their identity is part of every kernel cache key). The indices
# they see are the call's plus its origin (the dropout record's h0, i0, j0: a packed
# sequence's position in the packed row), as ``mods.py`` says.
#
# Tiles mask_mod forbids entirely are skipped: the host evaluates mask_mod once per call into a
# block mask (``mods.block_mask``, one class per chunk of queries x keys: 0 none allowed, 1
# some, 2 all), which the kernels take as one more record, a (B, Hq, nr, nc) int8 device array
# (a (1, 1, 0, 0) dummy without a mask_mod), read through ``masking.tile_class``. A class 2
# tile needs no per-pair mask_mod call.


class DeviceMods(NamedTuple):
    """The user's mods as CUDA device functions (None where not given)."""

    mask_mod: object
    score_mod: object
    score_mod_grad: object


NO_MODS = (None, None, None)  # (mask_mod, score_mod, score_mod_grad) of a call without mods


def mods_key(spec: AttentionSpec, backward: bool) -> tuple:
    """(mask_mod, score_mod, score_mod_grad) for a kernel cache key: the forward leaves
    score_mod_grad out (it never calls it), so a forward-only call shares its kernels."""
    return (spec.mask_mod, spec.score_mod, spec.score_mod_grad if backward else None)


def device_mods(mask_mod=None, score_mod=None, score_mod_grad=None) -> DeviceMods | None:
    """The given mods compiled with ``cuda.jit(device=True)`` (a numba dispatcher's
    ``py_func`` is compiled again for the GPU); None when none is given. Compiled fresh on
    each call: launches share one compile per set (``_shared_device_mods``), the PTX checks
    compile their own for their target, as they do the rules."""
    if mask_mod is None and score_mod is None:
        return None

    def device(fn):
        return None if fn is None else cuda.jit(device=True)(getattr(fn, "py_func", fn))

    return DeviceMods(device(mask_mod), device(score_mod), device(score_mod_grad))


_shared_device_mods = functools.lru_cache(maxsize=None)(device_mods)


def backward_mods_check(spec: AttentionSpec) -> None:
    """A backward needs score_mod_grad wherever there is a score_mod (``mods.MISSING_GRAD``)."""
    if spec.score_mod is not None and spec.score_mod_grad is None:
        raise ValueError(MISSING_GRAD)


_BLOCK_MASKS: dict = {}  # (mask_mod, B, Hq, Nq, Nk, origin, chunks) -> host block mask, a few kept


def block_mask_record(spec: AttentionSpec, chunks: tuple) -> np.ndarray:
    """The call's block mask for ``chunks = (chunk_q, chunk_k)`` (``mods.block_mask``, cached
    per mask_mod, shape, origin and chunks: mods are pure functions), or the (1, 1, 0, 0) dummy
    the kernels never read without a mask_mod."""
    if spec.mask_mod is None:
        return np.zeros((1, 1, 0, 0), dtype=np.int8)
    key = (spec.mask_mod, spec.B, spec.Hq, spec.Nq, spec.Nk, tuple(spec.origin), tuple(chunks))
    if key not in _BLOCK_MASKS:
        if len(_BLOCK_MASKS) >= 8:
            _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
        _BLOCK_MASKS[key] = mods_block_mask(spec, *chunks)
    return _BLOCK_MASKS[key]


def mod_chunks(tiles: Tiles) -> tuple[int, int]:
    """(chunk_q, chunk_k) of rung 1's block mask: every tile (resident x staged queries x keys
    in the forward and dQ, staged x resident in dK/dV) is a whole number of chunks."""
    chunk = math.gcd(tiles.resident, tiles.staged)
    return chunk, chunk


def mods_defaults(device, ONE):
    """Stand-ins for absent mods (never called: the kernels test their flags first), so that
    every kernel types whatever mods it was given."""

    @device
    def allow_all(b, h, i, j):
        return True

    @device
    def same_score(score, b, h, i, j):
        return score

    @device
    def unit_slope(score, b, h, i, j):
        return ONE

    return allow_all, same_score, unit_slope


def kernel_mods(mods, ONE):
    """What a kernel factory compiles in for ``mods`` (None, or :func:`device_mods`' record):
    (mask_mod, score_mod, score_mod_grad, has_mask_mod, has_score_mod), the user's device
    functions where given and ``mods_defaults``' stand-ins elsewhere."""
    mask_mod, score_mod, score_mod_grad = mods_defaults(cuda.jit(device=True), ONE)
    has_mask_mod = mods is not None and mods.mask_mod is not None
    has_score_mod = mods is not None and mods.score_mod is not None
    if has_mask_mod:
        mask_mod = mods.mask_mod
    if has_score_mod:
        score_mod = mods.score_mod
        if mods.score_mod_grad is not None:
            score_mod_grad = mods.score_mod_grad
    return mask_mod, score_mod, score_mod_grad, has_mask_mod, has_score_mod


def kernel_functions(dtype_name: str, D: int, Dv: int, tiles: Tiles, has_bias: bool,
                     has_dropout: bool, rules=None, *, has_softcap: bool = False,
                     has_alibi: bool = False, mods: DeviceMods | None = None) -> dict:
    """The four kernels as plain Python functions with every size baked in as a constant.

    ``cuda.jit`` turns them into kernels (``_kernels``); ``cuda.compile_ptx`` compiles them
    with explicit signatures (``kernel_signatures``) for the PTX checks, which pass their own
    ``rules`` (from :func:`device_rules`) and ``mods`` (:func:`device_mods`) so nothing they
    compile is shared with launches. ``mods``: the user's mask_mod / score_mod /
    score_mod_grad as device functions, compiled in (None: none).
    """
    rules = rules or _shared_device_rules()
    online_softmax_step = rules.online_softmax_step
    in_band, key_range, query_range = rules.in_band, rules.key_range, rules.query_range
    bias_index, keep, row_shift = rules.bias_index, rules.keep, rules.row_shift
    cap, cap_and_slope, alibi_bias = rules.cap, rules.cap_and_slope, rules.alibi_bias
    tile_class = rules.tile_class
    dtype = numba.from_dtype(np.dtype(dtype_name))
    np_type = np.dtype(dtype_name).type
    ZERO, ONE, NEG_INF = np_type(0), np_type(1), np_type(-np.inf)
    HAS_BIAS, HAS_DROPOUT, HAS_SOFTCAP, HAS_ALIBI = has_bias, has_dropout, has_softcap, has_alibi
    mask_mod, score_mod, score_mod_grad, HAS_MASK_MOD, HAS_SCORE_MOD = kernel_mods(mods, ONE)
    CHUNKS = mod_chunks(tiles)
    CAST, INT = dtype, numba.int64  # a mod's score back to the tile dtype; the batch index as int64
    DV = Dv
    RESIDENT, STAGED = tiles.resident, tiles.staged  # plain ints: compile-time constants

    @cuda.jit(device=True)
    def score_and_slope(x, reals, alibi, band, bias, b_bias, h_bias, b, h, i, j, bm, hm, oi, oj):
        """The backward kernels' score of the pair (i, j), and its slope d s / d x:
        forward: s = score_mod(cap(x)) + alibi_ij + bias_ij, x = (scale * q_i) . k_j. The
        mods see (bm, hm, i + oi, j + oj)."""
        s, slope = x, ONE
        if HAS_SOFTCAP:
            s, slope = cap_and_slope(reals, s)
        if HAS_SCORE_MOD:  # slope: d score_mod(cap(x)) / dx
            slope *= CAST(score_mod_grad(s, bm, hm, i + oi, j + oj))
            s = CAST(score_mod(s, bm, hm, i + oi, j + oj))
        if HAS_ALIBI:
            s += alibi_bias(alibi, band, b, h, i, j)
        if HAS_BIAS:
            s += bias[b_bias, h_bias, i, j]
        return s, slope

    def _attn_fwd(q, k, v, out, stats, bias, band, dropout, reals, alibi, blocks):
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
        b_bias, h_bias = bias_index(bias, b, h)
        scale, dropout_scale = reals[0], reals[1]
        bm, hm, oi, oj = INT(b), h + dropout[3], dropout[4], dropout[5]  # what the mods see
        i_start = cuda.blockIdx.x * BLOCK_M
        i_stop = min(Nq, i_start + BLOCK_M)
        i = i_start + t
        row_valid = i < Nq

        for d in range(D):  # q pre-scaled: the score is one FMA chain (see "Scale" above)
            q_row[d] = q[b, h, i, d] * scale if row_valid else ZERO
        for d in range(DV):
            acc[d] = ZERO
        m_i = NEG_INF  # running max of the scores seen so far
        l_i = ZERO  # running sum of exp(s - m_i)

        j_lo, j_hi = key_range(band, i_start, i_stop, Nk)
        for j0 in range((j_lo // BLOCK_N) * BLOCK_N, j_hi, BLOCK_N):
            cls = 2  # mask_mod's class of the tile: 0 skipped (the same for the whole block)
            if HAS_MASK_MOD:
                cls = tile_class(blocks, CHUNKS, b, h, i_start, i_stop, j0, min(Nk, j0 + BLOCK_N))
                if cls == 0:
                    continue
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

            for jj in range(BLOCK_N):
                j = j0 + jj
                s = NEG_INF
                if j < Nk and in_band(band, i, j) and (cls == 2 or mask_mod(bm, hm, i + oi, j + oj)):
                    s = ZERO  # s = score_mod(cap((scale * q_i) . k_j)) + alibi_ij + bias_ij
                    for d in range(D):
                        s += q_row[d] * k_tile[jj, d]
                    if HAS_SOFTCAP:
                        s = cap(reals, s)
                    if HAS_SCORE_MOD:
                        s = CAST(score_mod(s, bm, hm, i + oi, j + oj))
                    if HAS_ALIBI:
                        s += alibi_bias(alibi, band, b, h, i, j)
                    if HAS_BIAS:
                        s += bias[b_bias, h_bias, i, j]
                s_row[jj] = s
            # m_i, l_i, acc rescaled by alpha; s_row now holds p_j = exp(s_j - m_new)
            m_i, l_i = online_softmax_step(s_row, acc, m_i, l_i)
            for jj in range(BLOCK_N):
                p = s_row[jj]
                if p == ZERO:
                    continue  # masked, past Nk, or nothing allowed so far
                if HAS_DROPOUT:  # l was summed before dropout
                    if not keep(dropout, b, h, i, j0 + jj):
                        continue
                    p *= dropout_scale
                for d in range(DV):
                    acc[d] += p * v_tile[jj, d]

        if row_valid:
            # out = acc / l; a row that allowed no key (m = -inf, l = 0) gets norm = +inf,
            # so out = 0 (masking.row_shift: the one empty-row rule). A NaN l stays NaN.
            _, norm = row_shift(m_i, l_i)
            inv_norm = ONE / norm
            for d in range(DV):
                out[b, h, i, d] = acc[d] * inv_norm
            stats[0, b, h, i] = m_i
            stats[1, b, h, i] = l_i

    def _attn_bwd_preprocess(out, dout, dlse, delta):
        BLOCK_M = RESIDENT
        h = cuda.blockIdx.y
        b = cuda.blockIdx.z
        i = cuda.blockIdx.x * BLOCK_M + cuda.threadIdx.x
        if i < out.shape[2]:
            # delta_i = sum_j p_ij dp_ij = sum_d out_id dout_id
            total = ZERO
            for d in range(DV):
                total += out[b, h, i, d] * dout[b, h, i, d]
            if dlse.shape[0] > 0:  # forward: lse = log(sum_j exp(s_j))  ->  ds += p * dlse
                total -= dlse[b, h, i]
            delta[b, h, i] = total

    def _attn_bwd_dkdv(q, k, v, dout, stats, delta, dk, dv, bias, band, dropout, reals, alibi,
                       blocks):
        BLOCK_N, BLOCK_M = RESIDENT, STAGED
        q_tile = cuda.shared.array((BLOCK_M, D), dtype)  # (BLOCK_M, D)
        do_tile = cuda.shared.array((BLOCK_M, DV), dtype)  # (BLOCK_M, Dv)
        shift_tile = cuda.shared.array(BLOCK_M, dtype)  # per query row: p = exp(s - shift) * inv_norm
        inv_norm_tile = cuda.shared.array(BLOCK_M, dtype)
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
        scale, dropout_scale = reals[0], reals[1]
        bm, oi, oj = INT(b), dropout[4], dropout[5]  # what the mods see (and h + dropout[3])
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

        i_lo, i_hi = query_range(band, j_start, j_stop, Nq)
        for g in range(group):  # GQA: kv head h_kv served query heads h_kv*group .. +group
            h = h_kv * group + g
            b_bias, h_bias = bias_index(bias, b, h)
            hm = h + dropout[3]
            for i0 in range((i_lo // BLOCK_M) * BLOCK_M, i_hi, BLOCK_M):
                cls = 2  # mask_mod's class of the tile: 0 skipped (the same for the whole block)
                if HAS_MASK_MOD:
                    cls = tile_class(blocks, CHUNKS, b, h, i0, min(Nq, i0 + BLOCK_M), j_start, j_stop)
                    if cls == 0:
                        continue
                cuda.syncthreads()  # every thread is done with the previous tile
                for e in range(t, BLOCK_M * D, BLOCK_N):  # q pre-scaled, as in the forward
                    r, c = e // D, e % D
                    q_tile[r, c] = q[b, h, i0 + r, c] * scale if i0 + r < Nq else ZERO
                for e in range(t, BLOCK_M * DV, BLOCK_N):
                    r, c = e // DV, e % DV
                    do_tile[r, c] = dout[b, h, i0 + r, c] if i0 + r < Nq else ZERO
                for r in range(t, BLOCK_M, BLOCK_N):
                    # forward: p = exp(s - m) / l; an empty row gets shift 0, norm +inf: p = 0
                    shift, inv_norm, row_delta = ZERO, ZERO, ZERO  # rows past Nq: never read
                    if i0 + r < Nq:
                        shift, norm = row_shift(stats[0, b, h, i0 + r], stats[1, b, h, i0 + r])
                        inv_norm = ONE / norm
                        row_delta = delta[b, h, i0 + r]
                    shift_tile[r] = shift
                    inv_norm_tile[r] = inv_norm
                    delta_tile[r] = row_delta
                cuda.syncthreads()
                if not col_valid:
                    continue

                for ii in range(BLOCK_M):
                    i = i0 + ii
                    if not (i < Nq and in_band(band, i, j)
                            and (cls == 2 or mask_mod(bm, hm, i + oi, j + oj))):
                        continue
                    x = ZERO  # x = (scale * q) @ k^T
                    for d in range(D):
                        x += q_tile[ii, d] * k_row[d]
                    s, slope = score_and_slope(x, reals, alibi, band, bias, b_bias, h_bias, b, h, i, j,
                                               bm, hm, oi, oj)
                    # forward: p = exp(s - m) / l, recomputed instead of stored
                    p = math.exp(s - shift_tile[ii]) * inv_norm_tile[ii]
                    if p == ZERO:
                        continue  # masked (s = -inf), an empty row, or negligible: no gradient
                    # 1. forward: out = p_drop @ v  ->  dv += p_drop * dout_i, dp_drop = dout_i . v_j
                    dp = ZERO
                    for d in range(DV):
                        dp += do_tile[ii, d] * v_row[d]
                    p_drop = p
                    # 2. forward: p_drop = p * z  ->  dp = dp_drop * z
                    if HAS_DROPOUT:
                        if keep(dropout, b, h, i, j):
                            p_drop = p * dropout_scale
                            dp *= dropout_scale
                        else:
                            p_drop = ZERO
                            dp = ZERO
                    for d in range(DV):
                        dv_acc[d] += p_drop * do_tile[ii, d]
                    # 3. forward: p = softmax(s)  ->  ds = p * (dp - delta)
                    ds = p * (dp - delta_tile[ii])
                    # 4. forward: s = score_mod(cap(x)) + alibi + bias
                    #    ->  dx = ds * score_mod_grad(cap(x)) * cap'(x)
                    if HAS_SOFTCAP or HAS_SCORE_MOD:
                        ds *= slope
                    # 5. forward: x = (scale * q) @ k^T  ->  dk = dx^T @ (scale * q)
                    for d in range(D):
                        dk_acc[d] += ds * q_tile[ii, d]

        if col_valid:
            for d in range(D):
                dk[b, h_kv, j, d] = dk_acc[d]
            for d in range(DV):
                dv[b, h_kv, j, d] = dv_acc[d]

    def _attn_bwd_dq(q, k, v, dout, stats, delta, dq, bias, band, dropout, reals, alibi, blocks):
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
        b_bias, h_bias = bias_index(bias, b, h)
        scale, dropout_scale = reals[0], reals[1]
        bm, hm, oi, oj = INT(b), h + dropout[3], dropout[4], dropout[5]  # what the mods see
        i_start = cuda.blockIdx.x * BLOCK_M
        i_stop = min(Nq, i_start + BLOCK_M)
        i = i_start + t
        row_valid = i < Nq

        for d in range(D):  # q pre-scaled, as in the forward
            q_row[d] = q[b, h, i, d] * scale if row_valid else ZERO
            dq_acc[d] = ZERO
        for d in range(DV):
            do_row[d] = dout[b, h, i, d] if row_valid else ZERO
        # forward: p = exp(s - m) / l; an empty row gets shift 0, norm +inf: p = 0
        shift_i, inv_norm_i, delta_i = ZERO, ZERO, ZERO  # a row past Nq computes nothing
        if row_valid:
            shift_i, norm_i = row_shift(stats[0, b, h, i], stats[1, b, h, i])
            inv_norm_i = ONE / norm_i
            delta_i = delta[b, h, i]

        j_lo, j_hi = key_range(band, i_start, i_stop, Nk)
        for j0 in range((j_lo // BLOCK_N) * BLOCK_N, j_hi, BLOCK_N):
            cls = 2  # mask_mod's class of the tile: 0 skipped (the same for the whole block)
            if HAS_MASK_MOD:
                cls = tile_class(blocks, CHUNKS, b, h, i_start, i_stop, j0, min(Nk, j0 + BLOCK_N))
                if cls == 0:
                    continue
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
                if not (j < Nk and in_band(band, i, j)
                        and (cls == 2 or mask_mod(bm, hm, i + oi, j + oj))):
                    continue
                x = ZERO  # x = (scale * q) @ k^T
                for d in range(D):
                    x += q_row[d] * k_tile[jj, d]
                s, slope = score_and_slope(x, reals, alibi, band, bias, b_bias, h_bias, b, h, i, j,
                                           bm, hm, oi, oj)
                # forward: p = exp(s - m) / l
                p = math.exp(s - shift_i) * inv_norm_i
                if p == ZERO:
                    continue
                # 1. forward: out = p_drop @ v  ->  dp_drop = dout_i . v_j
                dp = ZERO
                for d in range(DV):
                    dp += do_row[d] * v_tile[jj, d]
                # 2. forward: p_drop = p * z  ->  dp = dp_drop * z
                if HAS_DROPOUT:
                    if keep(dropout, b, h, i, j):
                        dp *= dropout_scale
                    else:
                        dp = ZERO
                # 3. forward: p = softmax(s)  ->  ds = p * (dp - delta)
                ds = p * (dp - delta_i)
                # 4. forward: s = score_mod(cap(x)) + alibi + bias
                #    ->  dx = ds * score_mod_grad(cap(x)) * cap'(x)
                if HAS_SOFTCAP or HAS_SCORE_MOD:
                    ds *= slope
                # 5. forward: x = (scale * q) @ k^T  ->  dq = scale * dx @ k (scale at the end)
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
    """Explicit signatures of the four kernels (C-contiguous arrays), for cuda.compile_ptx.

    The spec's records (``spec.pack()``) travel as tuples: a Python tuple of ints is a
    ``UniTuple(int64, n)`` to numba, a tuple of the dtype's scalars a ``UniTuple(dtype, 3)``;
    the bias and alibi records are arrays, and so is the block mask of a mask_mod (int8).
    """
    if dtype_name not in ("float32", "float64"):
        raise ValueError(f"the cuda kernels take float32 or float64, got {dtype_name!r}")
    f = dtype_name
    a3, a4 = f"{f}[:, :, ::1]", f"{f}[:, :, :, ::1]"
    # bias, band, dropout, reals, alibi, blocks
    packed = (f"{a4}, UniTuple(int64, 3), UniTuple(int64, 6), UniTuple({f}, 3), {f}[:, ::1], "
              "int8[:, :, :, ::1]")
    return {
        "_attn_fwd": f"void({a4}, {a4}, {a4}, {a4}, {a4}, {packed})",
        "_attn_bwd_preprocess": f"void({a4}, {a4}, {a3}, {a3})",
        "_attn_bwd_dkdv": f"void({a4}, {a4}, {a4}, {a4}, {a4}, {a3}, {a4}, {a4}, {packed})",
        "_attn_bwd_dq": f"void({a4}, {a4}, {a4}, {a4}, {a4}, {a3}, {a4}, {packed})",
    }


@functools.lru_cache(maxsize=None)
def _kernels(dtype_name: str, D: int, Dv: int, tiles: Tiles, has_bias: bool,
             has_dropout: bool, has_softcap: bool = False, has_alibi: bool = False,
             mods: tuple = NO_MODS) -> dict:
    """cuda.jit kernels for one (dtype, D, Dv, tiles, bias?, dropout?, softcap?, alibi?,
    (mask_mod, score_mod, score_mod_grad)), compiled at first launch."""
    functions = kernel_functions(dtype_name, D, Dv, tiles, has_bias, has_dropout,
                                 has_softcap=has_softcap, has_alibi=has_alibi,
                                 mods=_shared_device_mods(*mods))
    return {name: cuda.jit(fn) for name, fn in functions.items()}


# -- host side ------------------------------------------------------------------------------


class _Launch(NamedTuple):
    kernels: dict
    tiles: Tiles
    packed: tuple  # (bias on the device, band, dropout, reals, alibi, blocks): as kernels take them


def _prepare(spec: AttentionSpec, backward: bool = False) -> _Launch:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the cuda attention backend is unavailable: {reason}")
    dtype = np.dtype(spec.dtype)
    tiles = tile_config(dtype, spec.D, spec.Dv)
    packed = spec.pack()  # bias: (Bm, Hm, Nq, Nk), or (1, 1, 0, 0) for none
    kernels = _kernels(dtype.name, spec.D, spec.Dv, tiles, bool(masking.has_bias(packed.bias)),
                       bool(masking.has_dropout(packed.dropout)),
                       bool(masking.has_softcap(packed.reals)), bool(masking.has_alibi(packed.alibi)),
                       mods_key(spec, backward))
    return _Launch(kernels, tiles, device_records(spec, mod_chunks(tiles)))


def device_records(spec: AttentionSpec, chunks: tuple) -> tuple:
    """``spec.pack()`` as every CUDA rung's kernels take it: the bias and alibi records on the
    device, the band and dropout records as plain ints (``UniTuple(int64, 3)``, ``(int64,
    6)``), the reals in the dtype; then the block mask of a mask_mod for the rung's ``chunks``
    (``block_mask_record``), on the device."""
    dtype = np.dtype(spec.dtype)
    bias, band, dropout, reals, alibi = spec.pack()
    blocks = cuda.to_device(block_mask_record(spec, chunks))
    return (as_device(bias, dtype), tuple(int(x) for x in band), tuple(int(x) for x in dropout),
            tuple(dtype.type(x) for x in reals), as_device(alibi, dtype), blocks)


def as_device(x, dtype):
    """x as a C-contiguous device array of ``dtype`` (device arrays pass through)."""
    if is_device_array(x):
        return x
    return cuda.to_device(np.ascontiguousarray(x, dtype=dtype))


def forward(q, k, v, spec: AttentionSpec):
    """out (B, Hq, Nq, Dv), stats (2, B, Hq, Nq) = (m, l); device arrays in -> device arrays out."""
    on_device = is_device_array(q)
    launch = _prepare(spec)
    dtype = np.dtype(spec.dtype)
    q_d, k_d, v_d = (as_device(x, dtype) for x in (q, k, v))
    out = cuda.device_array((spec.B, spec.Hq, spec.Nq, spec.Dv), dtype=dtype)
    stats = cuda.device_array((2, spec.B, spec.Hq, spec.Nq), dtype=dtype)
    BLOCK_M = launch.tiles.resident
    grid = (math.ceil(spec.Nq / BLOCK_M), spec.Hq, spec.B)
    launch.kernels["_attn_fwd"][grid, BLOCK_M](q_d, k_d, v_d, out, stats, *launch.packed)
    if on_device:
        return out, stats
    return out.copy_to_host(), stats.copy_to_host()


def backward(q, k, v, out, stats, dout, spec: AttentionSpec, dlse=None):
    """dq (B, Hq, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv); deterministic, no atomics.
    ``dlse`` (B, Hq, Nq) or None: the gradient reaching lse, folded into delta."""
    backward_mods_check(spec)
    on_device = is_device_array(q)
    launch = _prepare(spec, backward=True)
    dtype = np.dtype(spec.dtype)
    q_d, k_d, v_d, out_d, stats_d, dout_d, dlse_d = (
        as_device(x, dtype) for x in (q, k, v, out, stats, dout, dlse_or_empty(dlse, dtype)))
    delta = cuda.device_array((spec.B, spec.Hq, spec.Nq), dtype=dtype)
    dq = cuda.device_array((spec.B, spec.Hq, spec.Nq, spec.D), dtype=dtype)
    dk = cuda.device_array((spec.B, spec.Hkv, spec.Nk, spec.D), dtype=dtype)
    dv = cuda.device_array((spec.B, spec.Hkv, spec.Nk, spec.Dv), dtype=dtype)
    resident = launch.tiles.resident
    query_grid = (math.ceil(spec.Nq / resident), spec.Hq, spec.B)
    key_grid = (math.ceil(spec.Nk / resident), spec.Hkv, spec.B)
    kernels = launch.kernels
    kernels["_attn_bwd_preprocess"][query_grid, resident](out_d, dout_d, dlse_d, delta)
    kernels["_attn_bwd_dkdv"][key_grid, resident](
        q_d, k_d, v_d, dout_d, stats_d, delta, dk, dv, *launch.packed)
    kernels["_attn_bwd_dq"][query_grid, resident](
        q_d, k_d, v_d, dout_d, stats_d, delta, dq, *launch.packed)
    if on_device:
        return dq, dk, dv
    return dq.copy_to_host(), dk.copy_to_host(), dv.copy_to_host()
