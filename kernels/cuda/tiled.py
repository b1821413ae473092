"""Flash attention on the GPU, rung 2: register micro-tiles (numba.cuda), forward and backward.

Rung 1 (``flash.py``) gives each thread one query row and scalar dot products: one
shared-memory load per FMA. Rung 2 is the design of every fast SGEMM (siboehm's SGEMM_CUDA,
kernel 5-6): a block of ``threads_rows x threads_cols`` threads computes a ``rows x cols``
tile of a product, each thread a small register tile of it, from operands staged in shared
memory *k-major* (the contraction index first), read four at a time (16-byte vector loads).
A 4 x 4 thread tile does 16 FMAs per two 16-byte loads: 8 FMA per shared load instead of 1.

Shape legend: see ``spec.py``::

    q (B, Hq, Nq, D)   k (B, Hkv, Nk, D)   v (B, Hkv, Nk, Dv)   bias (Bm, Hm, Nq, Nk)   alibi (Ba, Hq)
    out (B, Hq, Nq, Dv)   stats (2, B, Hq, Nq) = (m, l)   rows (3, B, Hq, Nq) = (shift, 1/norm, delta)

Who owns what (``Tiling(rows=64, cols=64, threads_rows=16, threads_cols=16, chunk=16)``, 256
threads; thread ``t = ty * 16 + tx``). In the forward a block owns query rows
``i0 .. i0+63``; for each key tile ``j0 .. j0+63`` thread (ty, tx) holds the scores of rows
``i0 + 4ty .. 4ty+3`` and keys ``j0 + 4tx .. 4tx+3`` in registers::

              keys j0 ..                                 (cols: 16 lanes x 4)
              tx=0      tx=1      ...   tx=15
    ty=0   [ t0: 4x4 ][ t1: 4x4 ] ... [ t15 ]      rows i0+0..3    } lanes 0..15 of warp 0
    ty=1   [ t16     ][ t17     ] ... [ t31 ]      rows i0+4..7    } lanes 16..31 of warp 0
    ...
    ty=15  [ t240    ][ t241    ] ... [ t255]      rows i0+60..63

A thread tile of more than 4 rows (or columns) takes several such 4-wide fragments, 64 apart
(``row(r) = (r // 4) * 4 * threads_rows + 4 * ty + r % 4``), so that the 16-byte loads of a
quarter warp stay on distinct banks. The 16 lanes of a row share it: the row max and row sum
are reduced across them with ``shfl_xor_sync`` (a butterfly: every lane ends with the same
bits). The output tile ``O (rows x Dv)`` is owned the same way (Dv over the 16 lanes, 4 or 8
columns each), so ``m_i``, ``l_i`` and the ``alpha`` rescale stay in the thread that owns
the row.

Four kernels, named as in Triton's fused-attention tutorial:

``_attn_fwd``            grid (ceil(Nq / rows), Hq, B). Per key tile: ``S = Q K^T`` over
                         head-dim chunks (Q^T and K^T chunks staged d-major, ``chunk x rows``
                         and ``chunk x cols``); scale, bias and (diagonal tiles only) the band;
                         online softmax; ``P^T`` written to shared memory; ``O += P V`` with V
                         staged ``chunk`` key rows at a time.
``_attn_bwd_preprocess`` ``rows = (shift, 1/norm, delta)`` per query row, from
                         ``masking.row_shift(m, l)`` and ``delta = out . dout - dlse``
                         (dlse: the gradient reaching lse, ``protocol.py``).
``_attn_bwd_dkdv``       grid (ceil(Nk / rows), Hkv, B): the key tile is resident (its rows are
                         the block's rows). For each query head of the GQA group and each
                         query tile: ``S^T = K Q^T``, ``dP^T = V dO^T``, then
                         ``p = exp(s - shift) / norm``, ``ds = p (dp - delta)``; ``P^T`` through
                         shared memory for ``dV += P^T dO``, then ``dS^T`` for ``dK += dS^T Q``.
                         A kv head's gradient is summed over its group in one block: no atomics.
``_attn_bwd_dq``         grid (ceil(Nq / rows), Hq, B): ``S``, ``dP = dO V^T``, ``dS``, then
                         ``dQ += dS K`` with K staged ``chunk`` key rows at a time.

Every output element is written by one thread after a fixed-order loop, and the shuffles
reduce in a fixed order, so results are bit-identical from run to run.

Masking, as in rung 1, only through the rules of ``masking.py`` compiled by
``compile.compile_rules(cuda.jit(device=True))``: ``key_range`` / ``query_range`` skip the
tiles outside the band; a tile wholly inside the band and the sequence (``tile_in_band``) takes
the *full* path, with no per-element test; the others (the diagonal) test ``in_band`` per
element. The test is outside the FMA loops either way, so those loops are the same on both
paths. A pair's score is ``score_at``: the product ``x = (scale q) . k``, capped
(``cap_and_slope``, softcap), plus ``alibi_bias`` and the bias (``has_bias`` /
``bias_index``, ``-inf`` forbids); the backward computes it inside its p loop and multiplies
dS by the cap's slope there. User mods (``flash.py``, "user mods") enter ``score_at`` too:
``score_mod`` on the capped score (its ``score_mod_grad`` into the slope), ``mask_mod`` beside
the band test, skipped on tiles whose block-mask class (``masking.tile_class``, read once per
tile by the whole block) says every pair is allowed; a tile it says none is allowed is
skipped like a tile outside the band. Dropout through ``keep``. Empty rows: ``out = 0``, ``m = -inf``, ``l = 0``, zero gradients. The backward
recomputes ``p = exp(s - shift) * (1 / norm)`` with ``(shift, norm) = row_shift(m, l)``:
exact where ``exp(s - lse)`` is not (a row masked by -1e9), zero on empty rows.

Head dims are padded (with zeros in shared memory, never read from global memory) to a
multiple of ``4 * threads_cols`` and of ``chunk``; sizes are compile-time constants (local
and shared array shapes must be), bias and dropout are run-time branches hoisted out of
every FMA loop. Every floating constant is in the tile dtype: float32 kernels contain no
float64 instruction.

Tiles (``gpu_tilings``, ``GPU_TILINGS`` says why each): float32 64 x 64 tiles on 16 x 16
threads at D <= 64, 32 x 128 tiles on 8 x 32 threads at D = 128; float64 16 x 64 or 16 x 128
tiles on 4 x 16 or 4 x 32 threads; at most 42 KiB of static shared memory (48 KiB allowed,
``shared_memory_bytes``). float32 kernels are compiled with launch bounds asking for 25%
occupancy (<= 128 registers). The dK/dV kernel may take tiles of its own (``Tilings``).
Global -> shared staging moves runs of 4 values, a fixed number per thread, each one 16-byte
load (``load4_4d``) when rows are a multiple of 4 values, from inputs on a 16-byte boundary
(``aligned``).
Under the simulator (one Python thread per GPU thread) ``SIM_TILING`` = 2 x 2 threads, 8 x 8
tiles, chunk 4. ``TILING_OVERRIDE`` forces other tiles (tests; ``benchmarks/gpu_tiled.py
--tiling``). Two things numba-cuda lacks are added here: 16-byte loads (``load4`` from
shared memory, ``load4_4d`` from global memory, LLVM vector loads: NVVM does not merge four
scalar loads of a numba array)
and, for the simulator only, ``shfl_xor_sync`` and ``syncwarp``.

Compiled figures (``benchmarks/cuda_resources.py``, sm_90, float32): see docs/cuda-flash.md,
"Rung 2". GPU timings (H100, float32, B = 4, H = 16, N = 4096-16384, docs/cuda-flash.md
"Rung 2 on an H100"): forward 20-24 TFLOP/s, forward+backward 14.8-17.3, 0.38-0.50x torch's
float32 SDPA; rung 1 ran forward 5-8, forward+backward 2-7 on an H200.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import NamedTuple

import numpy as np

from ..compile import compile_rules
from ..protocol import dlse_or_empty
from ..spec import AttentionSpec
from .flash import (  # noqa: F401  (to_device, to_host, unavailable_reason: this module's hooks too)
    NO_MODS,
    SHARED_MEMORY_BUDGET,
    SUPPORTS_MODS,
    DeviceMods,
    _shared_device_mods,
    as_device,
    backward_mods_check,
    device_records,
    is_device_array,
    kernel_mods,
    mods_key,
    simulated,
    to_device,
    to_host,
    unavailable_reason,
)

try:
    import numba
    from numba import cuda
except ImportError:  # flash.unavailable_reason() says why
    numba = cuda = None

__all__ = ["forward", "backward", "to_device", "to_host", "unavailable_reason", "Tiling",
           "Tilings", "tiling_for", "gpu_tilings", "shared_memory_bytes", "kernel_functions", "kernel_signatures"]

VEC = 4  # values per 16-byte shared load (two for float64, as two 16-byte loads)
PAD = 4  # extra columns on transposed tiles: keeps rows 16-byte aligned, spreads the banks
FULL_MASK = 0xFFFFFFFF


class Tiling(NamedTuple):
    rows: int  # the block's resident rows: queries (fwd, dq) or keys (dkdv)
    cols: int  # the streamed tile: keys (fwd, dq) or queries (dkdv)
    threads_rows: int  # threads along rows (ty)
    threads_cols: int  # threads along cols (tx): lanes of one warp sharing a row, a power of 2
    chunk: int  # contraction chunk staged per step (head dims in S, keys/queries in P V)

    @property
    def threads(self) -> int:
        return self.threads_rows * self.threads_cols


class Tilings(NamedTuple):
    main: Tiling  # _attn_fwd, _attn_bwd_preprocess (its threads), _attn_bwd_dq
    dkdv: Tiling  # _attn_bwd_dkdv: its own, because it holds two accumulators (dK and dV)


# (dtype, head dims > 64) -> tiles on a GPU, chosen from the compiled code
# (benchmarks/cuda_resources.py: no spills, 4 x 4 thread tiles, and for float32 at most 128
# registers, 25% occupancy, asked of ptxas by ``launch_bounds``) and from an H100 sweep at
# N = 4096 (docs/cuda-flash.md, "Rung 2 on an H100").
# * float32, D <= 64: 64 x 64 tiles on 16 x 16 threads; the forward and dQ stage 32 head dims
#   (keys) a step, half the barriers of 16: forward 21.7 against 20.5 TFLOP/s. 8 x 4 thread
#   tiles (8 x 16 threads) ran faster still (forward+backward 17.4 against 15.7) but put the
#   score tile in local memory and spilled 528 B in dK/dV: the 128-register bound does not
#   hold them.
# * float32, D = 128: 32 x 128 tiles on 8 x 32 threads (a row's keys over a whole warp).
#   64 x 64 tiles hold 4 x 8 of O (of dQ; of dK and of dV) per thread: 162 registers for
#   dK/dV on sm_90, and 104 bytes of spills for the forward on sm_80 under the bound. dK/dV
#   stages 8 rows a step: with 16 it spilled 4 B on sm_90 (and ran 7% faster).
# * float64 (two registers a value, no occupancy target): 16 x 64 (D <= 64) or 16 x 128 tiles
#   on 4 x 16 or 4 x 32 threads; 32 x 32 tiles on 8 x 8 threads spilled 1 KB (forward, sm_80).
GPU_TILINGS = {
    ("float32", False): Tilings(Tiling(64, 64, 16, 16, 32), Tiling(64, 64, 16, 16, 16)),
    ("float32", True): Tilings(Tiling(32, 128, 8, 32, 16), Tiling(32, 128, 8, 32, 8)),
    ("float64", False): Tilings(Tiling(16, 64, 4, 16, 8), Tiling(16, 64, 4, 16, 8)),
    ("float64", True): Tilings(Tiling(16, 128, 4, 32, 8), Tiling(16, 128, 4, 32, 8)),
}
SIM_TILING = Tiling(8, 8, 2, 2, 4)
# Tests and tuning: a Tiling (every kernel) or a Tilings pair forces the tiles of every launch.
TILING_OVERRIDE: Tiling | Tilings | None = None


def check_tiling(tiling: Tiling) -> None:
    ty, tx = tiling.threads_rows, tiling.threads_cols
    if tx & (tx - 1) or not 1 <= tx <= 32:
        raise ValueError(f"threads_cols must be a power of two <= 32 (one warp's lanes), got {tx}")
    if tiling.rows % (VEC * ty) or tiling.cols % (VEC * tx):
        raise ValueError(f"rows must be a multiple of {VEC} * threads_rows and cols of "
                         f"{VEC} * threads_cols: {tiling}")
    if tiling.cols % tiling.chunk or tiling.rows % tiling.chunk or tiling.chunk % VEC:
        raise ValueError(f"chunk must divide rows and cols and be a multiple of {VEC}: {tiling}")
    if not simulated() and tiling.threads % 32:
        raise ValueError(f"a block must be whole warps on a GPU: {tiling}")


def gpu_tilings(dtype, D: int, Dv: int) -> Tilings:
    """The tiles on a GPU (what benchmarks/cuda_resources.py compiles)."""
    return GPU_TILINGS[np.dtype(dtype).name, max(D, Dv) > 64]


def tiling_for(dtype, D: int, Dv: int) -> Tilings:
    """The tiles used here: the override, SIM_TILING under the simulator, else gpu_tilings."""
    if TILING_OVERRIDE is not None:
        override = TILING_OVERRIDE
        return override if isinstance(override, Tilings) else Tilings(override, override)
    if simulated():
        return Tilings(SIM_TILING, SIM_TILING)
    return gpu_tilings(dtype, D, Dv)


def mod_chunks(tilings: Tilings) -> tuple[int, int]:
    """(chunk_q, chunk_k) of the block mask of a mask_mod (``flash.block_mask_record``): every
    tile of every kernel is a whole number of chunks (queries: the forward's and dQ's rows,
    dK/dV's cols; keys the other way round)."""
    main, dkdv = tilings
    return math.gcd(main.rows, dkdv.cols), math.gcd(main.cols, dkdv.rows)


def padded(n: int, tiling: Tiling) -> int:
    """A head dim rounded up to a multiple of 4 * threads_cols and of chunk."""
    step = math.lcm(VEC * tiling.threads_cols, tiling.chunk)
    return -(-n // step) * step


def shared_memory_bytes(dtype, D: int, Dv: int, tiling: Tiling | Tilings) -> dict[str, int]:
    """Static shared memory of each kernel, in bytes (what the PTX declares)."""
    if isinstance(tiling, Tilings):
        result = shared_memory_bytes(dtype, D, Dv, tiling.main)
        result["_attn_bwd_dkdv"] = shared_memory_bytes(dtype, D, Dv, tiling.dkdv)["_attn_bwd_dkdv"]
        return result
    itemsize = np.dtype(dtype).itemsize
    R, C, K = tiling.rows, tiling.cols, tiling.chunk
    DP, DVP = padded(D, tiling), padded(Dv, tiling)
    transposed = K * (R + PAD) + K * (C + PAD) + C * (R + PAD)  # a, b chunks and the P tile
    return {
        "_attn_fwd": (transposed + K * DVP) * itemsize,
        "_attn_bwd_preprocess": 0,
        "_attn_bwd_dkdv": (transposed + K * max(DP, DVP)) * itemsize,
        "_attn_bwd_dq": (transposed + K * DP) * itemsize,
    }


# -- two pieces numba-cuda lacks: a 16-byte shared load, a simulated warp shuffle -------------


def _load4_python(a, i, j):
    return a[i, j], a[i, j + 1], a[i, j + 2], a[i, j + 3]


def _extending():
    """(cgutils, intrinsic) for CUDA: numba-cuda's own where it has them (>= 0.2x), else numba's."""
    try:
        from numba.cuda import cgutils
        from numba.cuda.extending import intrinsic
    except ImportError:  # an older numba-cuda, whose target shares numba's
        from numba.core import cgutils
        from numba.core.extending import intrinsic
    return cgutils, intrinsic


def _load4_4d_python(a, b, h, i, j):
    return a[b, h, i, j], a[b, h, i, j + 1], a[b, h, i, j + 2], a[b, h, i, j + 3]


def _load4_codegen(context, builder, sig, args):
    """``(a[idx], .., a[idx + 3 in the last index])`` as 16-byte vector loads: one ``<4 x
    float>`` load, or two ``<2 x double>`` loads."""
    from llvmlite import ir
    from numba.core import types

    cgutils, _ = _extending()
    aryty = sig.args[0]
    ary = context.make_array(aryty)(context, builder, args[0])
    index = [context.cast(builder, x, t, types.intp) for x, t in zip(args[1:], sig.args[1:])]
    ptr = cgutils.get_item_pointer2(
        context, builder, data=ary.data, shape=cgutils.unpack_tuple(builder, ary.shape),
        strides=cgutils.unpack_tuple(builder, ary.strides), layout=aryty.layout,
        inds=index, wraparound=False)
    elem = context.get_value_type(aryty.dtype)
    per = 16 // np.dtype(str(aryty.dtype)).itemsize
    vector = ir.VectorType(elem, per)
    values = []
    for part in range(VEC // per):
        p = builder.gep(ptr, [ir.Constant(ir.IntType(64), part * per)]) if part else ptr
        loaded = builder.load(builder.bitcast(p, vector.as_pointer()), align=16)
        values += [builder.extract_element(loaded, ir.Constant(ir.IntType(32), e))
                   for e in range(per)]
    return context.make_tuple(builder, sig.return_type, values)


@functools.lru_cache(maxsize=None)
def _load4_intrinsics():
    """``load4(a, i, j) -> (a[i, j], .., a[i, j+3])`` (shared memory: LDS.128) and
    ``load4_4d(a, b, h, i, j)`` (global memory: LDG.128), as 16-byte vector loads.

    NVVM does not merge four scalar loads from a numba array into one vector load (the
    address arithmetic hides the adjacency), so the vector load is written in LLVM IR. The
    first element must be 16-byte aligned: shared arrays declared with ``alignment=16``, rows
    a multiple of 16 bytes, the last index a multiple of 4; global arrays on a 16-byte
    boundary (``aligned``) with rows of a multiple of 4 values.
    """
    from numba.core import types

    _, intrinsic = _extending()

    @intrinsic
    def load4(typingctx, a, i, j):
        return types.UniTuple(a.dtype, 4)(a, i, j), _load4_codegen

    @intrinsic
    def load4_4d(typingctx, a, b, h, i, j):
        return types.UniTuple(a.dtype, 4)(a, b, h, i, j), _load4_codegen

    return load4, load4_4d


def _opaque_python(x):
    return x


@functools.lru_cache(maxsize=None)
def _opaque_intrinsic():
    """``opaque(x) -> x`` (as int64) through a volatile ``mov``: LLVM cannot hoist what depends
    on it out of a loop. Register pressure: LLVM hoists every loop-invariant address and index
    of the staging loops and the epilogue out of the key-tile loop and keeps them all live
    (measured: 160 registers for dq instead of 126); recomputing them costs a few integer
    instructions per tile, outside the FMA loop."""
    from llvmlite import ir
    from numba.core import types

    _, intrinsic = _extending()

    @intrinsic
    def opaque(typingctx, x):
        sig = types.int64(x)

        def codegen(context, builder, sig, args):
            value = context.cast(builder, args[0], sig.args[0], types.int64)
            mov = ir.InlineAsm(ir.FunctionType(ir.IntType(64), [ir.IntType(64)]),
                               "mov.b64 $0, $1;", "=l,l", side_effect=True)
            return builder.call(mov, [value])

        return sig, codegen

    return opaque


def _block_exchange():
    """(slots, barrier) shared by the simulated threads of the running block."""
    manager = threading.current_thread()._manager
    with _SHUFFLE_LOCK:
        state = manager.__dict__.get("_shuffle_state")
        if state is None:
            # a timeout, so that a thread that failed elsewhere breaks the barrier (an error)
            # instead of leaving the block's other threads waiting for ever
            threads = int(np.prod(manager._block_dim))
            state = manager._shuffle_state = ({}, threading.Barrier(threads, timeout=SIM_BARRIER_TIMEOUT_S))
    return state


def _simulated_shfl_xor_sync(self, mask, value, lane_mask):
    """The simulator's missing ``cuda.shfl_xor_sync``: every thread of the block posts its
    value, waits at a barrier, reads its partner's, waits again. Correct when every thread of
    the block calls it at the same point, which the kernels here do (the reductions are
    outside any per-thread branch)."""
    slots, barrier = _block_exchange()
    thread = threading.current_thread()
    slots[thread.thread_id] = value
    barrier.wait()
    partner = slots[thread.thread_id ^ lane_mask]
    barrier.wait()
    return partner


def _simulated_syncwarp(self, mask=FULL_MASK):
    """The simulator's missing ``cuda.syncwarp``: a barrier (the kernels call it uniformly)."""
    _block_exchange()[1].wait()


_SHUFFLE_LOCK = threading.Lock()
SIM_BARRIER_TIMEOUT_S = 300.0


def _install_simulated_shuffle() -> None:
    from numba.cuda.simulator import kernelapi

    if not hasattr(kernelapi.FakeCUDAModule, "shfl_xor_sync"):
        kernelapi.FakeCUDAModule.shfl_xor_sync = _simulated_shfl_xor_sync
    if not hasattr(kernelapi.FakeCUDAModule, "syncwarp"):
        kernelapi.FakeCUDAModule.syncwarp = _simulated_syncwarp


# -- the kernels ------------------------------------------------------------------------------


def kernel_functions(dtype_name: str, D: int, Dv: int, tiling: Tiling, rules=None,
                     mods: DeviceMods | None = None, chunks: tuple | None = None) -> dict:
    """The four kernels as plain Python functions, every size a compile-time constant.

    ``cuda.jit`` turns them into kernels (``_kernels``); ``cuda.compile_ptx`` compiles them
    with ``kernel_signatures`` (benchmarks/cuda_resources.py, the PTX tests), passing their
    own ``rules`` (``compile_rules(cuda.jit(device=True))``) and ``mods``
    (``flash.device_mods``) compiled for their target. ``mods``: the user's mask_mod /
    score_mod / score_mod_grad as device functions (None: none); ``chunks``: the block mask's
    (``mod_chunks``; default: this tiling's, for every kernel).
    """
    check_tiling(tiling)
    sim = simulated()
    rules = rules or _shared_rules()
    tile_class = rules.tile_class
    in_band, key_range, query_range, tile_in_band = (
        rules.in_band, rules.key_range, rules.query_range, rules.tile_in_band)
    has_bias, bias_index, keep, has_dropout, row_shift = (
        rules.has_bias, rules.bias_index, rules.keep, rules.has_dropout, rules.row_shift)
    has_softcap, cap_and_slope, has_alibi, alibi_bias = (
        rules.has_softcap, rules.cap_and_slope, rules.has_alibi, rules.alibi_bias)
    if sim:
        _install_simulated_shuffle()
    load4, load4_4d = (_load4_python, _load4_4d_python) if sim else _load4_intrinsics()
    opaque = _opaque_python if sim else _opaque_intrinsic()
    ALIGN = None if sim else 16  # 16-byte vector loads; the simulator refuses alignments
    device = cuda.jit(device=True, inline="always")

    dtype = numba.from_dtype(np.dtype(dtype_name))
    np_type = np.dtype(dtype_name).type
    ZERO, ONE, NEG_INF = np_type(0), np_type(1), np_type(-np.inf)
    # the user's mods (flash.py, "user mods"): compiled in behind these flags
    mask_mod, score_mod, score_mod_grad, HAS_MASK_MOD, HAS_SCORE_MOD = kernel_mods(mods, ONE)
    CHUNKS = chunks or mod_chunks(Tilings(tiling, tiling))
    CAST, INT = dtype, numba.int64  # a mod's score back to the tile dtype; the batch index as int64
    R, C, K = tiling.rows, tiling.cols, tiling.chunk
    TY, TX, NT = tiling.threads_rows, tiling.threads_cols, tiling.threads
    DV, DP, DVP = Dv, padded(D, tiling), padded(Dv, tiling)
    WP = max(DP, DVP)
    RP, CP = R + PAD, C + PAD  # padded row lengths of the transposed tiles
    RT, CT = R // TY, C // TX  # thread tile of S: RT x CT
    DT, VT = DP // TX, DVP // TX  # thread tile columns of dQ/dK (D) and O/dV (Dv)
    RY, CX = VEC * TY, VEC * TX  # fragment strides
    K4 = K // VEC  # runs of 4 columns in a chunk

    # -- thread-tile coordinates: 4-wide fragments, one per 4 * threads apart --------------

    @device
    def row_of(r, ty):
        return (r // VEC) * RY + ty * VEC + r % VEC

    @device
    def col_of(c, tx):
        return (c // VEC) * CX + tx * VEC + c % VEC

    # -- staging: global -> shared, zero outside the arrays --------------------------------

    def make_stage_transposed(length):
        """``stage(dst, src, b, h, row0, n_rows, width, col0, t, factor)``: dst[c, r] = factor *
        src[b, h, row0 + r, col0 + c] for r < length, c < chunk, zero outside src: a d-major
        (k-major) chunk of ``length`` rows. ``factor`` is the softmax scale for q (see
        ``scores``), else 1.

        Each thread moves runs of 4 consecutive columns, a fixed number of them (unrolled: no
        loop bounds to compute). Where the row length is a multiple of 4 (``width``, a
        constant after inlining) a run is inside the array or wholly outside it, and is read
        with one 16-byte load; otherwise value by value."""
        runs = length * K4
        trips = -(-runs // NT)

        @device
        def stage(dst, src, b, h, row0, n_rows, width, col0, t, factor):
            t, b, h = opaque(t), opaque(b), opaque(h)  # the row addresses too: not hoisted
            for it in range(trips):
                e = t + it * NT
                if runs % NT == 0 or e < runs:
                    r, c = e // K4, (e % K4) * VEC
                    i, d = row0 + r, col0 + c
                    if width % VEC == 0:
                        x0 = x1 = x2 = x3 = ZERO
                        if i < n_rows and d < width:
                            x0, x1, x2, x3 = load4_4d(src, b, h, i, d)
                        dst[c, r] = x0 * factor
                        dst[c + 1, r] = x1 * factor
                        dst[c + 2, r] = x2 * factor
                        dst[c + 3, r] = x3 * factor
                    else:
                        for u in range(VEC):
                            x = ZERO
                            if i < n_rows and d + u < width:
                                x = src[b, h, i, d + u] * factor
                            dst[c + u, r] = x
        return stage

    stage_t_rows, stage_t_cols = make_stage_transposed(R), make_stage_transposed(C)

    def make_stage_rows(padded_width):
        """``stage(dst, src, b, h, row0, n_rows, width, t)``: dst[r, c] = src[b, h, row0 + r, c]
        for r < chunk, c < padded_width, zero outside src; runs of 4 as above."""
        per_row = padded_width // VEC
        runs = K * per_row
        trips = -(-runs // NT)

        @device
        def stage(dst, src, b, h, row0, n_rows, width, t):
            t, b, h = opaque(t), opaque(b), opaque(h)
            for it in range(trips):
                e = t + it * NT
                if runs % NT == 0 or e < runs:
                    r, c = e // per_row, (e % per_row) * VEC
                    i = row0 + r
                    if width % VEC == 0:
                        x0 = x1 = x2 = x3 = ZERO
                        if i < n_rows and c < width:
                            x0, x1, x2, x3 = load4_4d(src, b, h, i, c)
                        dst[r, c] = x0
                        dst[r, c + 1] = x1
                        dst[r, c + 2] = x2
                        dst[r, c + 3] = x3
                    else:
                        for u in range(VEC):
                            x = ZERO
                            if i < n_rows and c + u < width:
                                x = src[b, h, i, c + u]
                            dst[r, c + u] = x
        return stage

    stage_rows_d, stage_rows_dv = make_stage_rows(DP), make_stage_rows(DVP)

    # -- the FMA loop: acc (RT x n) += A[a0 + kk, rows]^T B[b0 + kk, cols], kk < chunk -----

    def make_mma(n_cols):
        @device
        def mma(acc, a, a0, bmat, b0, ty, tx):
            a_reg = cuda.local.array(RT, dtype)
            b_reg = cuda.local.array(n_cols, dtype)
            kk = 0
            while kk < K:  # not range(): numba's range loop costs ~12 integer ops a step
                for f in range(RT // VEC):
                    x0, x1, x2, x3 = load4(a, a0 + kk, f * RY + ty * VEC)
                    a_reg[f * VEC] = x0
                    a_reg[f * VEC + 1] = x1
                    a_reg[f * VEC + 2] = x2
                    a_reg[f * VEC + 3] = x3
                for g in range(n_cols // VEC):
                    y0, y1, y2, y3 = load4(bmat, b0 + kk, g * CX + tx * VEC)
                    b_reg[g * VEC] = y0
                    b_reg[g * VEC + 1] = y1
                    b_reg[g * VEC + 2] = y2
                    b_reg[g * VEC + 3] = y3
                for r in range(RT):
                    for c in range(n_cols):
                        acc[r, c] += a_reg[r] * b_reg[c]
                kk += 1
        return mma

    mma_s, mma_dk, mma_dv = make_mma(CT), make_mma(DT), make_mma(VT)

    # -- reductions across the lanes that share a row ---------------------------------------

    @device
    def max_step(x, distance):
        for r in range(RT):
            y = cuda.shfl_xor_sync(FULL_MASK, x[r], distance)
            x[r] = y if (y > x[r] or y != y) else x[r]

    @device
    def sum_step(x, distance):
        for r in range(RT):
            x[r] += cuda.shfl_xor_sync(FULL_MASK, x[r], distance)

    @device
    def rows_max(x):
        """x[r] = max over the threads_cols lanes of row r, for every row of the thread tile
        (a butterfly; a NaN sticks: NaN in, NaN out). Written out step by step so every
        shuffle distance is a constant: a loop over distances compiled on sm_80 to calls of
        a shuffle subroutine, around which ptxas kept ~60 more registers live."""
        cuda.syncwarp(FULL_MASK)
        if TX >= 32:
            max_step(x, 16)
        if TX >= 16:
            max_step(x, 8)
        if TX >= 8:
            max_step(x, 4)
        if TX >= 4:
            max_step(x, 2)
        if TX >= 2:
            max_step(x, 1)

    @device
    def rows_sum(x):
        """x[r] = sum over the threads_cols lanes of row r (every lane gets the same bits)."""
        cuda.syncwarp(FULL_MASK)
        if TX >= 32:
            sum_step(x, 16)
        if TX >= 16:
            sum_step(x, 8)
        if TX >= 8:
            sum_step(x, 4)
        if TX >= 4:
            sum_step(x, 2)
        if TX >= 2:
            sum_step(x, 1)

    @device
    def lane_coords():
        """(ty, tx) of this thread, recomputed where called (``opaque``: not hoisted)."""
        t = opaque(cuda.threadIdx.x)
        return t // TX, t % TX

    @device
    def zero(acc, n_cols):
        for r in range(RT):
            for c in range(n_cols):
                acc[r, c] = ZERO

    @device
    def copy(dst, src):
        for r in range(RT):
            for c in range(CT):
                dst[r, c] = src[r, c]

    @device
    def row_terms(rows, b, h, i, Nq):
        """(shift, 1 / norm, delta) of query row i (``_attn_bwd_preprocess``); zeros for a
        padding row, so that its p is 0."""
        if i < Nq:
            return rows[0, b, h, i], rows[1, b, h, i], rows[2, b, h, i]
        return ZERO, ZERO, ZERO

    @device
    def tile_full(band, i0, rows_q, j0, rows_k, Nq, Nk):
        """Every pair of the tile (rows_q queries from i0, rows_k keys from j0) lies inside
        the sequences and the band: its scores need no per-element test."""
        return i0 + rows_q <= Nq and j0 + rows_k <= Nk and tile_in_band(band, i0, rows_q, j0, rows_k)

    @device
    def tile_class_of(blocks, b, h, i0, rows_q, j0, rows_k, Nq, Nk):
        """mask_mod's class of the tile (``masking.tile_class``): 0 none allowed (skip it), 1
        some, 2 all; 2 without a mask_mod. The same for every thread of the block."""
        if not HAS_MASK_MOD:
            return 2
        b, h, i0, j0 = opaque(b), opaque(h), opaque(i0), opaque(j0)  # nothing hoisted, see opaque
        return tile_class(blocks, CHUNKS, b, h, i0, min(Nq, i0 + rows_q), j0, min(Nk, j0 + rows_k))

    @device
    def score_at(x, full, cls, bias, band, dropout, reals, alibi, b, h, i, j, Nq, Nk):
        """(s, slope) of pair (i, j) from its product ``x = (scale q) . k``: ``s =
        score_mod(cap(x)) + alibi + bias`` (each where the spec has it), -inf outside the band
        and the sequences and where mask_mod forbids (tested unless the tile's class ``cls``
        is 2), and the slope ``d s / d x``: the softcap's times score_mod_grad (1 without
        either). The mods see the call's indices plus its origin (the dropout record's)."""
        slope = ONE
        if (full or (i < Nq and j < Nk and in_band(band, i, j))) and (
                cls == 2 or mask_mod(INT(b), h + dropout[3], i + dropout[4], j + dropout[5])):
            if has_softcap(reals):
                x, slope = cap_and_slope(reals, x)
            if HAS_SCORE_MOD:  # on the capped score, before ALiBi and the bias
                hm, im, jm = h + dropout[3], i + dropout[4], j + dropout[5]
                slope *= CAST(score_mod_grad(x, INT(b), hm, im, jm))
                x = CAST(score_mod(x, INT(b), hm, im, jm))
            if has_alibi(alibi):
                x += alibi_bias(alibi, band, b, h, i, j)
            if has_bias(bias):
                bb, hb = bias_index(bias, b, h)
                x += bias[bb, hb, i, j]
        else:
            x = NEG_INF
        return x, slope

    @device
    def plain_scores(bias, reals, alibi):
        """Whether a score is its product alone: no cap, score_mod, ALiBi or bias."""
        return not (HAS_SCORE_MOD or has_softcap(reals) or has_alibi(alibi) or has_bias(bias))

    @device
    def scores(acc, cls, bias, band, dropout, reals, alibi, b, h, i0, j0, Nq, Nk):
        """acc (``(scale q) . k``, queries x keys) -> the scores (``score_at``): capped, plus
        ALiBi and bias, -inf where the pair is forbidden. The forward's; the backward calls
        ``score_at`` inside its p loop, where it also needs the slope.

        The scale is folded into q as it is staged, so a score is one chain of FMAs and
        every kernel rounds it the same way. ``(q . k) * scale`` followed by ``- m`` is one
        FMA to NVVM (it contracts a multiply and an add by default), which skips the rounding
        of s that the forward's m was taken from: p moves by an ulp of s (6e-5 at scores of
        1e3; rung 1 measured it on an H200, docs/cuda-flash.md).

        Full tiles (inside the band and the sequences) skip the band test, and with no score
        term (cap, score_mod, ALiBi, bias) and no mask_mod test they skip the loop: acc holds
        the scores already."""
        full = tile_full(band, i0, R, j0, C, Nq, Nk)
        if full and cls == 2 and plain_scores(bias, reals, alibi):
            return
        ty, tx = lane_coords()
        for r in range(RT):
            i = i0 + row_of(r, ty)
            for c in range(CT):
                acc[r, c], _ = score_at(acc[r, c], full, cls, bias, band, dropout, reals, alibi,
                                        b, h, i, j0 + col_of(c, tx), Nq, Nk)

    # -- forward -------------------------------------------------------------------------------

    def _attn_fwd(q, k, v, bias, band, dropout, reals, alibi, blocks, out, stats):
        q_chunk = cuda.shared.array((K, RP), dtype, alignment=ALIGN)  # Q^T rows d0..d0+K
        k_chunk = cuda.shared.array((K, CP), dtype, alignment=ALIGN)  # K^T rows d0..d0+K
        p_tile = cuda.shared.array((C, RP), dtype, alignment=ALIGN)  # P^T (keys x queries)
        v_chunk = cuda.shared.array((K, DVP), dtype, alignment=ALIGN)  # V rows j0+jc .. +K
        s_acc = cuda.local.array((RT, CT), dtype)
        o_acc = cuda.local.array((RT, VT), dtype)
        m_i = cuda.local.array(RT, dtype)  # running max (the shift of the exps so far)
        l_i = cuda.local.array(RT, dtype)  # running sum of exp(s - m_i), before dropout
        shift = cuda.local.array(RT, dtype)
        row = cuda.local.array(RT, dtype)  # a per-row value being reduced across lanes

        t = cuda.threadIdx.x
        ty, tx = t // TX, t % TX
        h, b = cuda.blockIdx.y, cuda.blockIdx.z
        Nq, Nk = q.shape[2], k.shape[2]
        h_kv = h // (q.shape[1] // k.shape[1])
        scale, dropout_scale = reals[0], reals[1]
        with_dropout = has_dropout(dropout)
        i0 = cuda.blockIdx.x * R

        zero(o_acc, VT)
        for r in range(RT):
            m_i[r] = NEG_INF
            l_i[r] = ZERO

        j_lo, j_hi = key_range(band, i0, min(Nq, i0 + R), Nk)
        for j0 in range((j_lo // C) * C, j_hi, C):
            cls = tile_class_of(blocks, b, h, i0, R, j0, C, Nq, Nk)
            if cls == 0:  # mask_mod allows no pair of the tile
                continue
            # 1. S = Q K^T, head dims in chunks of K
            zero(s_acc, CT)
            for d0 in range(0, DP, K):
                cuda.syncthreads()  # every thread is done with the previous chunk
                stage_t_rows(q_chunk, q, b, h, i0, Nq, D, d0, t, scale)
                stage_t_cols(k_chunk, k, b, h_kv, j0, Nk, D, d0, t, ONE)
                cuda.syncthreads()
                mma_s(s_acc, q_chunk, 0, k_chunk, 0, ty, tx)
            scores(s_acc, cls, bias, band, dropout, reals, alibi, b, h, i0, j0, Nq, Nk)

            # 2. online softmax: m_new = max(m_i, max_j s_ij), alpha = exp(m_i - m_new)
            for r in range(RT):
                m_tile = NEG_INF
                for c in range(CT):
                    x = s_acc[r, c]
                    m_tile = x if (x > m_tile or x != x) else m_tile
                row[r] = m_tile
            rows_max(row)
            for r in range(RT):
                m_old = m_i[r]
                m_new = row[r] if (row[r] > m_old or row[r] != row[r]) else m_old
                # nothing allowed so far (m_new = -inf): shift 0, so exp(-inf - 0) = 0, never
                # NaN; alpha is then 0 too, which is right, since acc and l_i are still 0
                shift[r] = m_new if m_new != NEG_INF else ZERO
                alpha = math.exp(m_old - shift[r])  # 0 on the first allowed tile
                m_i[r] = m_new
                l_i[r] *= alpha
                for e in range(VT):
                    o_acc[r, e] *= alpha

            # 3. p = exp(s - m_new); l_i += rowsum(p) (before dropout); P^T to shared memory
            cuda.syncthreads()  # the previous tile's P V is done with p_tile
            ty, tx = lane_coords()
            for r in range(RT):
                i = i0 + row_of(r, ty)
                total = ZERO
                for c in range(CT):
                    p = math.exp(s_acc[r, c] - shift[r])
                    total += p
                    if with_dropout:
                        p = p * dropout_scale if keep(dropout, b, h, i, j0 + col_of(c, tx)) else ZERO
                    p_tile[col_of(c, tx), row_of(r, ty)] = p
                row[r] = total
            rows_sum(row)
            for r in range(RT):
                l_i[r] += row[r]

            # 4. O += P V, keys in chunks of K
            for jc in range(0, C, K):
                cuda.syncthreads()
                stage_rows_dv(v_chunk, v, b, h_kv, j0 + jc, Nk, DV, t)
                cuda.syncthreads()
                mma_dv(o_acc, p_tile, jc, v_chunk, 0, ty, tx)

        # 5. out = acc / l (0 on an empty row); stats = (m, l)
        for r in range(RT):
            i = i0 + row_of(r, ty)
            if i < Nq:
                inv_l = ONE / l_i[r] if l_i[r] != ZERO else ZERO  # a NaN l stays NaN
                for e in range(VT):
                    d = col_of(e, tx)
                    if d < DV:
                        out[b, h, i, d] = o_acc[r, e] * inv_l
                if tx == 0:
                    stats[0, b, h, i] = m_i[r]
                    stats[1, b, h, i] = l_i[r]

    # -- backward ------------------------------------------------------------------------------

    def _attn_bwd_preprocess(out, dout, stats, dlse, rows):
        """rows[:, b, h, i] = (shift, 1 / norm, delta): p = exp(s - shift) * (1 / norm);
        delta = out . dout - dlse (dlse: the gradient reaching lse, an empty array for none)."""
        h, b = cuda.blockIdx.y, cuda.blockIdx.z
        i = cuda.blockIdx.x * NT + cuda.threadIdx.x
        if i < out.shape[2]:
            shift, norm = row_shift(stats[0, b, h, i], stats[1, b, h, i])
            # delta_i = sum_j p_ij dp_ij = sum_d out_id dout_id
            total = ZERO
            for d in range(DV):
                total += out[b, h, i, d] * dout[b, h, i, d]
            if dlse.shape[0] > 0:  # forward: lse = log(sum_j exp(s_j))  ->  ds += p * dlse
                total -= dlse[b, h, i]
            rows[0, b, h, i] = shift
            rows[1, b, h, i] = ONE / norm  # 0 on an empty row (norm = +inf)
            rows[2, b, h, i] = total

    def _attn_bwd_dkdv(q, k, v, bias, band, dropout, reals, alibi, blocks, dout, rows, dk, dv):
        k_chunk = cuda.shared.array((K, RP), dtype, alignment=ALIGN)  # K^T or V^T chunk (keys)
        q_chunk = cuda.shared.array((K, CP), dtype, alignment=ALIGN)  # Q^T or dO^T chunk (queries)
        p_tile = cuda.shared.array((C, RP), dtype, alignment=ALIGN)  # dP, P_drop, dS (queries x keys)
        w_chunk = cuda.shared.array((K, WP), dtype, alignment=ALIGN)  # dO or Q rows i0+ic .. +K
        acc = cuda.local.array((RT, CT), dtype)  # dP^T, then S^T, then dS^T
        dk_acc = cuda.local.array((RT, DT), dtype)
        dv_acc = cuda.local.array((RT, VT), dtype)

        t = cuda.threadIdx.x
        ty, tx = t // TX, t % TX
        h_kv, b = cuda.blockIdx.y, cuda.blockIdx.z
        Nq, Nk = q.shape[2], k.shape[2]
        group = q.shape[1] // k.shape[1]
        scale, dropout_scale = reals[0], reals[1]
        with_dropout = has_dropout(dropout)
        j0 = cuda.blockIdx.x * R

        zero(dk_acc, DT)
        zero(dv_acc, VT)
        i_lo, i_hi = query_range(band, j0, min(Nk, j0 + R), Nq)
        for h in range(h_kv * group, (h_kv + 1) * group):  # GQA: the query heads of kv head h_kv
            for i0 in range((i_lo // C) * C, i_hi, C):
                cls = tile_class_of(blocks, b, h, i0, C, j0, R, Nq, Nk)
                if cls == 0:  # mask_mod allows no pair of the tile: no gradient
                    continue
                # 1. forward: out = p_drop @ v  ->  dp_drop^T = v @ dout^T, parked in p_tile
                #    (one tile of registers instead of two: dK and dV hold the rest)
                zero(acc, CT)
                for d0 in range(0, DVP, K):
                    cuda.syncthreads()  # (the first also: the previous dK product is done)
                    stage_t_rows(k_chunk, v, b, h_kv, j0, Nk, DV, d0, t, ONE)
                    stage_t_cols(q_chunk, dout, b, h, i0, Nq, DV, d0, t, ONE)
                    cuda.syncthreads()
                    mma_s(acc, k_chunk, 0, q_chunk, 0, ty, tx)
                ty, tx = lane_coords()
                for r in range(RT):
                    for c in range(CT):
                        p_tile[col_of(c, tx), row_of(r, ty)] = acc[r, c]
                # forward: s = scale * q @ k^T + bias  (here transposed: keys x queries)
                zero(acc, CT)
                for d0 in range(0, DP, K):
                    cuda.syncthreads()
                    stage_t_rows(k_chunk, k, b, h_kv, j0, Nk, D, d0, t, ONE)
                    stage_t_cols(q_chunk, q, b, h, i0, Nq, D, d0, t, scale)
                    cuda.syncthreads()
                    mma_s(acc, k_chunk, 0, q_chunk, 0, ty, tx)
                full = tile_full(band, i0, C, j0, R, Nq, Nk)
                ty, tx = lane_coords()
                for c in range(CT):
                    i = i0 + col_of(c, tx)
                    row_shift_i, inv_norm, delta = row_terms(rows, b, h, i, Nq)
                    for r in range(RT):
                        # forward: s = score_mod(cap(x)) + alibi + bias (score_at; keys x queries)
                        s, slope = score_at(acc[r, c], full, cls, bias, band, dropout, reals,
                                            alibi, b, h, i, j0 + row_of(r, ty), Nq, Nk)
                        # forward: p = exp(s - m) / l, recomputed (masking.row_shift)
                        p = math.exp(s - row_shift_i) * inv_norm
                        dp = p_tile[col_of(c, tx), row_of(r, ty)]  # this thread's own element
                        p_drop = p
                        # 2. forward: p_drop = p * z  ->  dp = dp_drop * z
                        if with_dropout:
                            if keep(dropout, b, h, i, j0 + row_of(r, ty)):
                                p_drop = p * dropout_scale
                                dp *= dropout_scale
                            else:
                                p_drop = ZERO
                                dp = ZERO
                        p_tile[col_of(c, tx), row_of(r, ty)] = p_drop
                        # 3. forward: p = softmax(s)  ->  ds = p * (dp - delta)
                        # 4. forward: s = score_mod(cap(x)) + alibi + bias
                        #    ->  dx = ds * score_mod_grad(cap(x)) * cap'(x)
                        acc[r, c] = ZERO if p == ZERO else p * (dp - delta) * slope
                # 5. forward: out = p_drop @ v  ->  dv += p_drop^T @ dout, queries in chunks of K
                for ic in range(0, C, K):
                    cuda.syncthreads()
                    stage_rows_dv(w_chunk, dout, b, h, i0 + ic, Nq, DV, t)
                    cuda.syncthreads()
                    mma_dv(dv_acc, p_tile, ic, w_chunk, 0, ty, tx)
                # 6. forward: x = scale * q @ k^T  ->  dk += dx^T @ q (scale at the end)
                cuda.syncthreads()
                ty, tx = lane_coords()
                for r in range(RT):
                    for c in range(CT):
                        p_tile[col_of(c, tx), row_of(r, ty)] = acc[r, c]
                for ic in range(0, C, K):
                    cuda.syncthreads()
                    stage_rows_d(w_chunk, q, b, h, i0 + ic, Nq, D, t)
                    cuda.syncthreads()
                    mma_dk(dk_acc, p_tile, ic, w_chunk, 0, ty, tx)

        ty, tx = lane_coords()
        for r in range(RT):
            j = j0 + row_of(r, ty)
            if j < Nk:
                for e in range(DT):
                    d = col_of(e, tx)
                    if d < D:
                        dk[b, h_kv, j, d] = dk_acc[r, e] * scale
                for e in range(VT):
                    d = col_of(e, tx)
                    if d < DV:
                        dv[b, h_kv, j, d] = dv_acc[r, e]

    def _attn_bwd_dq(q, k, v, bias, band, dropout, reals, alibi, blocks, dout, rows, dq):
        q_chunk = cuda.shared.array((K, RP), dtype, alignment=ALIGN)  # Q^T or dO^T chunk (queries)
        k_chunk = cuda.shared.array((K, CP), dtype, alignment=ALIGN)  # K^T or V^T chunk (keys)
        ds_tile = cuda.shared.array((C, RP), dtype, alignment=ALIGN)  # dP^T, then dS^T (keys x queries)
        w_chunk = cuda.shared.array((K, DP), dtype, alignment=ALIGN)  # K rows j0+jc .. +K
        acc = cuda.local.array((RT, CT), dtype)  # dP, then S
        dq_acc = cuda.local.array((RT, DT), dtype)
        work = cuda.local.array((RT, CT), dtype)  # acc in the general p loop

        t = cuda.threadIdx.x
        ty, tx = t // TX, t % TX
        h, b = cuda.blockIdx.y, cuda.blockIdx.z
        Nq, Nk = q.shape[2], k.shape[2]
        h_kv = h // (q.shape[1] // k.shape[1])
        scale, dropout_scale = reals[0], reals[1]
        with_dropout = has_dropout(dropout)
        i0 = cuda.blockIdx.x * R

        zero(dq_acc, DT)
        j_lo, j_hi = key_range(band, i0, min(Nq, i0 + R), Nk)
        for j0 in range((j_lo // C) * C, j_hi, C):
            cls = tile_class_of(blocks, b, h, i0, R, j0, C, Nq, Nk)
            if cls == 0:  # mask_mod allows no pair of the tile: no gradient
                continue
            # 1. forward: out = p_drop @ v  ->  dp_drop = dout @ v^T, parked in ds_tile
            zero(acc, CT)
            for d0 in range(0, DVP, K):
                cuda.syncthreads()  # (the first also: the previous dQ product is done)
                stage_t_rows(q_chunk, dout, b, h, i0, Nq, DV, d0, t, ONE)
                stage_t_cols(k_chunk, v, b, h_kv, j0, Nk, DV, d0, t, ONE)
                cuda.syncthreads()
                mma_s(acc, q_chunk, 0, k_chunk, 0, ty, tx)
            ty, tx = lane_coords()
            for r in range(RT):
                for c in range(CT):
                    ds_tile[col_of(c, tx), row_of(r, ty)] = acc[r, c]
            # forward: s = scale * q @ k^T + bias
            zero(acc, CT)
            for d0 in range(0, DP, K):
                cuda.syncthreads()
                stage_t_rows(q_chunk, q, b, h, i0, Nq, D, d0, t, scale)
                stage_t_cols(k_chunk, k, b, h_kv, j0, Nk, D, d0, t, ONE)
                cuda.syncthreads()
                mma_s(acc, q_chunk, 0, k_chunk, 0, ty, tx)
            full = tile_full(band, i0, R, j0, C, Nq, Nk)
            ty, tx = lane_coords()
            if full and cls == 2 and plain_scores(bias, reals, alibi) and not with_dropout:
                # the common tile: the loop below without its score terms, tests and dropout,
                # short enough for NVVM to unroll (acc stays in registers)
                for r in range(RT):
                    row_shift_i, inv_norm, delta = row_terms(rows, b, h, i0 + row_of(r, ty), Nq)
                    for c in range(CT):
                        p = math.exp(acc[r, c] - row_shift_i) * inv_norm
                        dp = ds_tile[col_of(c, tx), row_of(r, ty)]
                        ds_tile[col_of(c, tx), row_of(r, ty)] = ZERO if p == ZERO else p * (dp - delta)
            else:
                copy(work, acc)  # this loop stays a loop: it indexes work, in local memory
                for r in range(RT):
                    i = i0 + row_of(r, ty)
                    row_shift_i, inv_norm, delta = row_terms(rows, b, h, i, Nq)
                    for c in range(CT):
                        # forward: s = score_mod(cap(x)) + alibi + bias (score_at)
                        s, slope = score_at(work[r, c], full, cls, bias, band, dropout, reals, alibi,
                                            b, h, i, j0 + col_of(c, tx), Nq, Nk)
                        # forward: p = exp(s - m) / l
                        p = math.exp(s - row_shift_i) * inv_norm
                        dp = ds_tile[col_of(c, tx), row_of(r, ty)]  # this thread's own element
                        # 2. forward: p_drop = p * z  ->  dp = dp_drop * z
                        if with_dropout:
                            dp = dp * dropout_scale if keep(dropout, b, h, i, j0 + col_of(c, tx)) else ZERO
                        # 3. forward: p = softmax(s)  ->  ds = p * (dp - delta)
                        # 4. forward: s = score_mod(cap(x)) + alibi + bias
                        #    ->  dx = ds * score_mod_grad(cap(x)) * cap'(x)
                        ds_tile[col_of(c, tx), row_of(r, ty)] = ZERO if p == ZERO else p * (dp - delta) * slope
            # 5. forward: x = scale * q @ k^T  ->  dq += dx @ k (scale at the end), keys in chunks
            for jc in range(0, C, K):
                cuda.syncthreads()
                stage_rows_d(w_chunk, k, b, h_kv, j0 + jc, Nk, D, t)
                cuda.syncthreads()
                mma_dk(dq_acc, ds_tile, jc, w_chunk, 0, ty, tx)

        ty, tx = lane_coords()
        for r in range(RT):
            i = i0 + row_of(r, ty)
            if i < Nq:
                for e in range(DT):
                    d = col_of(e, tx)
                    if d < D:
                        dq[b, h, i, d] = dq_acc[r, e] * scale

    return {
        "_attn_fwd": _attn_fwd,
        "_attn_bwd_preprocess": _attn_bwd_preprocess,
        "_attn_bwd_dkdv": _attn_bwd_dkdv,
        "_attn_bwd_dq": _attn_bwd_dq,
    }


MIN_RESIDENT_THREADS = 512  # 25% of an SM's 2048: what the float32 launch bounds ask ptxas for


def launch_bounds(dtype_name: str, tiling: Tiling) -> tuple:
    """``(max threads per block[, min blocks per SM])`` for ``cuda.jit(launch_bounds=...)``.

    float32 asks for enough resident blocks for 25% occupancy, which caps registers at
    65536 / 512 = 128 per thread (ptxas alone chose 160-194 for the sm_80 forward, 96-123 for
    sm_90). float64 states the block size only: its 4 x 4 tiles of doubles need more than 128
    registers, and spilling them would cost more than the occupancy gains."""
    if dtype_name == "float32":
        return (tiling.threads, max(1, MIN_RESIDENT_THREADS // tiling.threads))
    return (tiling.threads,)


def kernel_signatures(dtype_name: str) -> dict[str, str]:
    """Explicit signatures of the four kernels (C-contiguous arrays), for cuda.compile_ptx."""
    if dtype_name not in ("float32", "float64"):
        raise ValueError(f"the cuda kernels take float32 or float64, got {dtype_name!r}")
    f = dtype_name
    a3, a4 = f"{f}[:, :, ::1]", f"{f}[:, :, :, ::1]"
    # bias, band, dropout, reals, alibi, blocks (the block mask of a mask_mod)
    records = (f"{a4}, UniTuple(int64, 3), UniTuple(int64, 6), UniTuple({f}, 3), {f}[:, ::1], "
               "int8[:, :, :, ::1]")
    return {
        "_attn_fwd": f"void({a4}, {a4}, {a4}, {records}, {a4}, {a4})",
        "_attn_bwd_preprocess": f"void({a4}, {a4}, {a4}, {a3}, {a4})",
        "_attn_bwd_dkdv": f"void({a4}, {a4}, {a4}, {records}, {a4}, {a4}, {a4}, {a4})",
        "_attn_bwd_dq": f"void({a4}, {a4}, {a4}, {records}, {a4}, {a4}, {a4})",
    }


@functools.lru_cache(maxsize=None)
def _shared_rules():
    return compile_rules(cuda.jit(device=True))


@functools.lru_cache(maxsize=None)
def _kernels(dtype_name: str, D: int, Dv: int, tilings: Tilings, mods: tuple = NO_MODS) -> dict:
    """cuda.jit kernels for one (dtype, D, Dv, tilings, (mask_mod, score_mod,
    score_mod_grad)), compiled at first launch."""
    device_mods, chunks = _shared_device_mods(*mods), mod_chunks(tilings)
    functions = kernel_functions(dtype_name, D, Dv, tilings.main, mods=device_mods, chunks=chunks)
    functions["_attn_bwd_dkdv"] = kernel_functions(dtype_name, D, Dv, tilings.dkdv, mods=device_mods,
                                                   chunks=chunks)["_attn_bwd_dkdv"]
    if simulated():
        return {name: cuda.jit(fn) for name, fn in functions.items()}
    return {name: cuda.jit(fn, launch_bounds=launch_bounds(
                dtype_name, tilings.dkdv if name == "_attn_bwd_dkdv" else tilings.main))
            for name, fn in functions.items()}


# -- host side ------------------------------------------------------------------------------


def _prepare(spec: AttentionSpec, backward: bool = False):
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the cuda attention backend is unavailable: {reason}")
    dtype = np.dtype(spec.dtype)
    tiling = tiling_for(dtype, spec.D, spec.Dv)
    shared = shared_memory_bytes(dtype, spec.D, spec.Dv, tiling)
    if max(shared.values()) > SHARED_MEMORY_BUDGET:
        raise ValueError(f"tiles {tiling} need {max(shared.values())} bytes of shared memory for "
                         f"{dtype.name}, D={spec.D}, Dv={spec.Dv}: over the {SHARED_MEMORY_BUDGET} "
                         "bytes of static shared memory a block may use")
    return (_kernels(dtype.name, spec.D, spec.Dv, tiling, mods_key(spec, backward)), tiling,
            device_records(spec, mod_chunks(tiling)))


def device_address(x) -> int:
    """The address of a device array's first element (the simulator's arrays: host memory)."""
    interface = getattr(x, "__cuda_array_interface__", None)
    return interface["data"][0] if interface is not None else x.ctypes.data


def aligned(x):
    """x on a 16-byte boundary, as the staging's 16-byte loads need (``load4_4d``): what
    ``cuda.to_device`` allocates is; a device array at an odd offset is copied."""
    if device_address(x) % 16 == 0:
        return x
    copy = cuda.device_array(x.shape, x.dtype)
    copy.copy_to_device(x)
    return copy


def forward(q, k, v, spec: AttentionSpec):
    """out (B, Hq, Nq, Dv), stats (2, B, Hq, Nq); device arrays in -> device arrays out."""
    on_device = is_device_array(q)
    kernels, tiling, records = _prepare(spec)
    dtype = np.dtype(spec.dtype)
    q_d, k_d, v_d = (aligned(as_device(x, dtype)) for x in (q, k, v))
    out = cuda.device_array((spec.B, spec.Hq, spec.Nq, spec.Dv), dtype=dtype)
    stats = cuda.device_array((2, spec.B, spec.Hq, spec.Nq), dtype=dtype)
    main = tiling.main
    grid = (math.ceil(spec.Nq / main.rows), spec.Hq, spec.B)
    kernels["_attn_fwd"][grid, main.threads](q_d, k_d, v_d, *records, out, stats)
    if on_device:
        return out, stats
    return out.copy_to_host(), stats.copy_to_host()


def backward(q, k, v, out, stats, dout, spec: AttentionSpec, dlse=None):
    """dq (B, Hq, Nq, D), dk (B, Hkv, Nk, D), dv (B, Hkv, Nk, Dv); deterministic, no atomics.
    ``dlse`` (B, Hq, Nq) or None: the gradient reaching lse, folded into delta."""
    backward_mods_check(spec)
    on_device = is_device_array(q)
    kernels, tiling, records = _prepare(spec, backward=True)
    dtype = np.dtype(spec.dtype)
    q_d, k_d, v_d, out_d, stats_d, dout_d, dlse_d = (
        aligned(as_device(x, dtype)) for x in (q, k, v, out, stats, dout, dlse_or_empty(dlse, dtype)))
    rows = cuda.device_array((3, spec.B, spec.Hq, spec.Nq), dtype=dtype)
    dq = cuda.device_array((spec.B, spec.Hq, spec.Nq, spec.D), dtype=dtype)
    dk = cuda.device_array((spec.B, spec.Hkv, spec.Nk, spec.D), dtype=dtype)
    dv = cuda.device_array((spec.B, spec.Hkv, spec.Nk, spec.Dv), dtype=dtype)
    main, wide = tiling
    threads = main.threads
    kernels["_attn_bwd_preprocess"][(math.ceil(spec.Nq / threads), spec.Hq, spec.B), threads](
        out_d, dout_d, stats_d, dlse_d, rows)
    kernels["_attn_bwd_dkdv"][(math.ceil(spec.Nk / wide.rows), spec.Hkv, spec.B), wide.threads](
        q_d, k_d, v_d, *records, dout_d, rows, dk, dv)
    kernels["_attn_bwd_dq"][(math.ceil(spec.Nq / main.rows), spec.Hq, spec.B), threads](
        q_d, k_d, v_d, *records, dout_d, rows, dq)
    if on_device:
        return dq, dk, dv
    return dq.copy_to_host(), dk.copy_to_host(), dv.copy_to_host()
