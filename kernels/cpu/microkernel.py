"""``matmul(A, B, C, accumulate)``: the tile products of the CPU flash kernels, on a register tile.

C (M, N) = A (M, K) @ B (K, N), or C += A @ B with ``accumulate``, for float32 and float64
2-D arrays whose rows of B and C are contiguous (any strides for A, so ``sT.T`` needs no
copy). This is ``np.dot(A, B, C)`` with a ``beta``, written for the shapes attention has:
K = 64 (head dimension) for the scores, N = 64 (value dimension) for ``P @ V``.

**Why not BLAS.** numba's ``np.dot`` calls SciPy's OpenBLAS, which packs both operands
into its own buffers on every call and then runs its micro-kernel. On a 256 x 64 x 128
tile that packing is a large share of the work: measured single-threaded on this 2-core
AMD EPYC (AVX2) VM, OpenBLAS gives 64-77 GF/s on the two attention products, this kernel
75-90 GF/s (``benchmarks/compare_cpu.py --gemm`` prints the side-by-side rates).

**How.** C is cut into micro-tiles of ``ROWS = 6`` rows by two SIMD vectors. One
micro-tile keeps its 12 partial sums in registers for the whole K loop; each step loads
one row of B (two vectors), broadcasts six entries of A's column and issues 12 fused
multiply-adds. With AVX2 (``VECTOR_BYTES = 32``: 16 float32 or 8 float64 columns) that is
12 accumulators + 2 B vectors + 1 broadcast = 15 of its 16 vector registers, and 12
independent FMAs cover the FMA latency (4 cycles, 2 units) -- the shape BLIS uses for AVX2
(its ``haswell`` 6x16 sgemm). Where numba compiles for a CPU with AVX-512
(``VECTOR_BYTES = 64``, from the compile target's features: ``target_vector_bytes``) the same
micro-tile is two 64-byte registers wide, 32 float32 or 16 float64 columns, twice the work
per instruction in 15 of its 32 registers; a column panel left over of at least half that
width takes the AVX2-width micro-tiles (``_half_tile_*``). Measured on a 2-core Xeon
(Sapphire Rapids) VM, the flash kernels at B=1, H=8, N=4096, D=64 float32
(``benchmarks/compare_cpu.py --dense-only``), AVX2 -> AVX-512 micro-tiles: forward 173 ->
102 ms, forward+backward 617 -> 379 ms (PyTorch's SDPA: 108 and 372 ms). Rows left over (M % 6) use
4-, 2- and 1-row micro-tiles; columns left over plain loops (head dimensions are multiples
of 8 in practice; the tests also cover odd ones).

The micro-tile is a numba ``@intrinsic`` that writes the LLVM IR directly: numba's own
loops cannot hold a 6 x 16 tile in registers (an array lives in memory), and LLVM's
auto-vectoriser does not find this blocking by itself. The IR below is the equivalent of
the C intrinsics version, ``_mm256_fmadd_ps`` on ``__m256`` values (``_mm512_fmadd_ps`` on
``__m512`` with AVX-512); LLVM picks the instructions for this CPU (numba compiles for the
host).

Shape legend: A (M, K), B (K, N), C (M, N); (i, j) the top-left corner of a micro-tile.
"""

from __future__ import annotations

import numpy as np

from ._compile import FASTMATH, helper, numba

ROWS = 6  # rows of C in one micro-tile
HALF_BYTES = 32  # one AVX2 register


def target_vector_bytes() -> int:
    """The bytes of one SIMD register of the CPU numba compiles for: 64 with AVX-512F,
    else 32 (AVX2; elsewhere LLVM splits the vectors into what the CPU has). The target's
    features are numba's: ``NUMBA_CPU_FEATURES`` when set, else the host's; a named
    ``NUMBA_CPU_NAME`` without features (e.g. ``generic``, for a portable cache) gets 32."""
    if numba is None:
        return HALF_BYTES
    from numba.core import config

    if config.CPU_FEATURES is not None:
        features = config.CPU_FEATURES
    elif config.CPU_NAME is not None:
        return HALF_BYTES
    else:
        import llvmlite.binding

        try:
            features = llvmlite.binding.get_host_cpu_features().flatten()
        except RuntimeError:  # LLVM cannot list this host's features (some non-x86 hosts)
            return HALF_BYTES
    return 2 * HALF_BYTES if "+avx512f" in features.split(",") else HALF_BYTES


VECTOR_BYTES = target_vector_bytes()  # a micro-tile is two such registers wide
HALF_TILES = VECTOR_BYTES > HALF_BYTES  # a left-over panel of AVX2-width micro-tiles


def micro_tile_width(dtype, vector_bytes: int = VECTOR_BYTES) -> int:
    """Columns of C in one micro-tile: two vectors, so 16 float32 or 8 float64 with AVX2,
    32 and 16 with AVX-512."""
    return 2 * vector_bytes // np.dtype(dtype).itemsize


def _micro_tile_reference(A, B, C, i, j, accumulate, rows):
    """What a micro-tile computes, in NumPy (the meaning of the IR below; used by the tests)."""
    width = micro_tile_width(C.dtype)
    block = A[i:i + rows] @ B[:, j:j + width]
    if accumulate:
        C[i:i + rows, j:j + width] += block
    else:
        C[i:i + rows, j:j + width] = block


if numba is not None:
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic, overload

    from ._compile import (
        _C0, _C1, _C2, _C3, _C4, _C5, _C6, _EXP_MIN, _LN2_HI, _LN2_LO, _LOG2E, _ROUND, fast_exp,
    )

    def _is_matrix(x, dtype=None):
        return (isinstance(x, types.Array) and x.ndim == 2 and x.dtype in (types.float32, types.float64)
                and (dtype is None or x.dtype == dtype))

    class _Tile:
        """IR helpers for one micro-tile of C = A @ B at (i, j): the K loop and C's addresses."""

        def __init__(self, context, builder, signature, args, rows, vector_bytes):
            self.builder = builder
            a_ty, b_ty, c_ty = signature.args[:3]
            self.a, self.b, self.c = (context.make_array(t)(context, builder, v)
                                      for t, v in zip(signature.args[:3], args[:3]))
            self.i, self.j = (context.cast(builder, v, t, types.intp)
                              for v, t in zip(args[3:5], signature.args[3:5]))
            self.rows, self.vector_bytes = rows, vector_bytes
            self.itemsize = np.dtype(str(c_ty.dtype)).itemsize
            self.lanes = vector_bytes // self.itemsize
            self.scalar = context.get_value_type(c_ty.dtype)
            self.vector = ir.VectorType(self.scalar, self.lanes)
            self.intp = context.get_value_type(types.intp)
            self.bits = 8 * self.itemsize

        def const(self, n):
            return ir.Constant(self.intp, n)

        def at(self, ary, offset, ty):
            """A pointer to ty, ``offset`` bytes into ary's data."""
            b = self.builder
            raw = b.bitcast(ary.data, ir.IntType(8).as_pointer())
            return b.bitcast(b.gep(raw, [offset]), ty.as_pointer())

        def load(self, ary, offset):
            return self.builder.load(self.at(ary, offset, self.vector), align=self.itemsize)

        def store(self, value, ary, offset):
            self.builder.store(value, self.at(ary, offset, self.vector), align=self.itemsize)

        def intrinsic(self, name, n_args):
            fnty = ir.FunctionType(self.vector, [self.vector] * n_args)
            return cgutils.get_or_insert_function(self.builder.module, fnty,
                                                  f"llvm.{name}.v{self.lanes}f{self.bits}")

        def splat(self, value):
            b = self.builder
            lane0 = b.insert_element(ir.Constant(self.vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
            mask = ir.Constant(ir.VectorType(ir.IntType(32), self.lanes), [0] * self.lanes)
            return b.shuffle_vector(lane0, ir.Constant(self.vector, ir.Undefined), mask)

        def c_offsets(self):
            """Byte offsets into C of the tile's 2 * rows vectors, row by row."""
            b = self.builder
            c_row_stride = cgutils.unpack_tuple(b, self.c.strides, 2)[0]
            j_bytes = b.mul(self.j, self.const(self.itemsize))
            offsets = []
            for r in range(self.rows):
                row = b.add(b.mul(b.add(self.i, self.const(r)), c_row_stride), j_bytes)
                offsets += [b.add(row, self.const(half * self.vector_bytes)) for half in range(2)]
            return offsets

        def sums(self, initial):
            """The K loop: ``initial[v] + sum_k A[i + r, k] * B[k, j + lanes]`` for each of the
            2 * rows vectors v (LLVM keeps the accumulators, allocas here, in registers)."""
            b = self.builder
            slots = []
            for value in initial:
                slot = cgutils.alloca_once(b, self.vector)
                b.store(value, slot)
                slots.append(slot)
            a_row_stride, a_k_stride = cgutils.unpack_tuple(b, self.a.strides, 2)
            b_row_stride = cgutils.unpack_tuple(b, self.b.strides, 2)[0]
            n_k = cgutils.unpack_tuple(b, self.a.shape, 2)[1]
            j_bytes = b.mul(self.j, self.const(self.itemsize))
            a_rows = [b.mul(b.add(self.i, self.const(r)), a_row_stride) for r in range(self.rows)]
            fma = self.intrinsic("fma", 3)
            with cgutils.for_range(b, n_k) as loop:
                k = loop.index
                b_row = b.add(b.mul(k, b_row_stride), j_bytes)
                b_halves = [self.load(self.b, b.add(b_row, self.const(half * self.vector_bytes)))
                            for half in range(2)]
                a_col = b.mul(k, a_k_stride)
                for r in range(self.rows):
                    a_ik = b.load(self.at(self.a, b.add(a_rows[r], a_col), self.scalar))
                    broadcast = self.splat(a_ik)
                    for half in range(2):
                        slot = slots[2 * r + half]
                        b.store(b.call(fma, [broadcast, b_halves[half], b.load(slot)]), slot)
            return [b.load(slot) for slot in slots]

        def exp(self, x):
            """exp(x) on a float32 vector: ``_compile.fast_exp`` (``_fast_exp_meaning``), in IR."""
            b = self.builder
            vec = self.vector
            c = lambda value: ir.Constant(vec, [float(value)] * self.lanes)  # noqa: E731
            fma = self.intrinsic("fma", 3)
            below = b.fcmp_ordered("<", x, c(_EXP_MIN))  # False for NaN, which passes through
            xc = b.select(below, c(_EXP_MIN), x)
            t = b.call(fma, [xc, c(_LOG2E), c(_ROUND)])
            n = b.fsub(t, c(_ROUND))
            r = b.call(fma, [n, c(-_LN2_HI), xc])
            r = b.call(fma, [n, c(-_LN2_LO), r])
            p = c(_C6)
            for coefficient in (_C5, _C4, _C3, _C2, _C1, _C0):
                p = b.call(fma, [p, r, c(coefficient)])
            i32 = ir.VectorType(ir.IntType(32), self.lanes)
            two_n = b.bitcast(b.shl(b.bitcast(t, i32), ir.Constant(i32, [23] * self.lanes)), vec)
            return b.select(below, ir.Constant(vec, None), b.fmul(p, two_n))

    def _make_micro_tile(rows: int, vector_bytes: int = VECTOR_BYTES):
        """The micro-tile intrinsic for ``rows`` rows of C (6; 4, 2, 1 for the rows left
        over), two registers of ``vector_bytes`` wide."""

        @intrinsic
        def micro_tile(typingctx, A, B, C, i, j, accumulate):
            """C[i:i+rows, j:j+W] (+)= A[i:i+rows, :] @ B[:, j:j+W], W = micro_tile_width."""
            if not (_is_matrix(C) and _is_matrix(A, C.dtype) and _is_matrix(B, C.dtype)
                    and isinstance(i, types.Integer) and isinstance(j, types.Integer)
                    and isinstance(accumulate, types.Boolean)):
                return None
            return types.void(A, B, C, i, j, accumulate), codegen

        def codegen(context, builder, signature, args):
            tile = _Tile(context, builder, signature, args, rows, vector_bytes)
            offsets = tile.c_offsets()
            zero = ir.Constant(tile.vector, None)
            initial = [builder.select(args[5], tile.load(tile.c, offset), zero) for offset in offsets]
            for offset, value in zip(offsets, tile.sums(initial)):
                tile.store(value, tile.c, offset)
            return context.get_dummy_value()

        return micro_tile

    def _make_micro_tile_exp(rows: int):
        """The float32 micro-tile with the softmax's exp fused in (see :func:`matmul_exp`)."""

        @intrinsic
        def micro_tile_exp(typingctx, A, B, C, i, j, shift, colmax, colsum):
            """x = A[i:i+rows] @ B[:, j:j+W] - shift[j:j+W]; C[i:i+rows, j:j+W] = exp(x);
            colmax[j:j+W] = max(colmax, max over rows of x); colsum[j:j+W] += sum over rows.
            W = micro_tile_width(float32)."""
            vectors = (shift, colmax, colsum)
            if not (_is_matrix(C, types.float32) and _is_matrix(A, types.float32)
                    and _is_matrix(B, types.float32) and isinstance(i, types.Integer)
                    and isinstance(j, types.Integer)
                    and all(isinstance(x, types.Array) and x.ndim == 1 and x.dtype == types.float32
                            for x in vectors)):
                return None
            return types.void(A, B, C, i, j, shift, colmax, colsum), codegen

        def codegen(context, builder, signature, args):
            tile = _Tile(context, builder, signature, args, rows, VECTOR_BYTES)
            shift, colmax, colsum = (context.make_array(t)(context, builder, v)
                                     for t, v in zip(signature.args[5:8], args[5:8]))
            zero = ir.Constant(tile.vector, None)
            sums = tile.sums([zero] * (2 * rows))
            j_bytes = builder.mul(tile.j, tile.const(tile.itemsize))
            halves = [builder.add(j_bytes, tile.const(half * VECTOR_BYTES)) for half in range(2)]
            shifts = [tile.load(shift, offset) for offset in halves]
            col_max = [tile.load(colmax, offset) for offset in halves]
            col_sum = [tile.load(colsum, offset) for offset in halves]
            for offset, index, value in zip(tile.c_offsets(), range(2 * rows), sums):
                half = index % 2
                x = builder.fsub(value, shifts[half])
                e = tile.exp(x)
                bigger = builder.fcmp_ordered(">", x, col_max[half])  # vmaxps (a NaN p is NaN anyway)
                col_max[half] = builder.select(bigger, x, col_max[half])
                col_sum[half] = builder.fadd(col_sum[half], e)
                tile.store(e, tile.c, offset)
            for half, offset in enumerate(halves):
                tile.store(col_max[half], colmax, offset)
                tile.store(col_sum[half], colsum, offset)
            return context.get_dummy_value()

        return micro_tile_exp

    _micro_tile_6 = _make_micro_tile(ROWS)
    _micro_tile_4 = _make_micro_tile(4)
    _micro_tile_2 = _make_micro_tile(2)
    _micro_tile_1 = _make_micro_tile(1)
    _half_tile_6, _half_tile_4, _half_tile_2, _half_tile_1 = (
        _make_micro_tile(rows, HALF_BYTES) for rows in (ROWS, 4, 2, 1))
    _micro_tile_exp_6 = _make_micro_tile_exp(ROWS)
    _micro_tile_exp_4 = _make_micro_tile_exp(4)
    _micro_tile_exp_2 = _make_micro_tile_exp(2)
    _micro_tile_exp_1 = _make_micro_tile_exp(1)
else:  # without numba the helpers below are never called (the kernels cannot run)
    _micro_tile_6 = _micro_tile_4 = _micro_tile_2 = _micro_tile_1 = None
    _half_tile_6 = _half_tile_4 = _half_tile_2 = _half_tile_1 = None
    _micro_tile_exp_6 = _micro_tile_exp_4 = _micro_tile_exp_2 = _micro_tile_exp_1 = None
    fast_exp = None


@helper
def matmul(A, B, C, accumulate):
    """C = A @ B (``accumulate`` False) or C += A @ B (True); C (M, N), A (M, K), B (K, N).

    The rows of B and C must be contiguous (unit stride along N); A may have any strides.
    Loop order: a column panel of B (K x 16 or K x 32, a few KiB) stays in L1 while every
    6-row group of A streams past it.
    """
    M, K = A.shape
    N = C.shape[1]
    if B.shape[0] != K or B.shape[1] != N or C.shape[0] != M:
        raise ValueError("matmul: shapes do not chain as (M, K) @ (K, N) -> (M, N)")
    if N > 1 and ((K > 0 and B.strides[1] != B.itemsize) or (M > 0 and C.strides[1] != C.itemsize)):
        raise ValueError("matmul: the rows of B and C must be contiguous")
    width = 2 * VECTOR_BYTES // C.itemsize
    n_whole = N - N % width
    for j in range(0, n_whole, width):
        i = 0
        while i + ROWS <= M:
            _micro_tile_6(A, B, C, i, j, accumulate)
            i += ROWS
        if i + 4 <= M:  # the rows left over (M % 6): 4, 2 and 1 rows
            _micro_tile_4(A, B, C, i, j, accumulate)
            i += 4
        if i + 2 <= M:
            _micro_tile_2(A, B, C, i, j, accumulate)
            i += 2
        if i < M:
            _micro_tile_1(A, B, C, i, j, accumulate)
    if HALF_TILES and N - n_whole >= width // 2:  # AVX-512: a panel of AVX2-width micro-tiles
        j = n_whole
        i = 0
        while i + ROWS <= M:
            _half_tile_6(A, B, C, i, j, accumulate)
            i += ROWS
        if i + 4 <= M:
            _half_tile_4(A, B, C, i, j, accumulate)
            i += 4
        if i + 2 <= M:
            _half_tile_2(A, B, C, i, j, accumulate)
            i += 2
        if i < M:
            _half_tile_1(A, B, C, i, j, accumulate)
        n_whole += width // 2
    for i in range(M):  # the columns past the last whole micro-tile
        for j in range(n_whole, N):
            total = C[i, j] if accumulate else 0.0
            for k in range(K):
                total += A[i, k] * B[k, j]
            C[i, j] = total


def matmul_exp(A, B, C, shift, colmax, colsum):
    """The scores and their exponent in one pass over the tile, for the forward's softmax.

    x = A @ B - shift (``shift`` per column); C = exp(x); ``colmax`` = max(colmax, column
    maxima of x); ``colsum`` += column sums of C. A (M, K), B (K, N), C (M, N); shift,
    colmax, colsum (N,). float32 fuses the exp into the micro-tile (the scores never reach
    memory); float64 runs ``matmul`` and then a sweep with libm's exp. This body is the
    meaning (NumPy); the compiled versions are registered below.
    """
    x = A @ B - shift
    C[...] = np.exp(x)
    colmax[...] = np.maximum(colmax, x.max(axis=0, initial=-np.inf))
    colsum += C.sum(axis=0)


def _matmul_exp_float32(A, B, C, shift, colmax, colsum):
    M, K = A.shape
    N = C.shape[1]
    width = 2 * VECTOR_BYTES // 4
    n_whole = N - N % width
    for j in range(0, n_whole, width):
        i = 0
        while i + ROWS <= M:
            _micro_tile_exp_6(A, B, C, i, j, shift, colmax, colsum)
            i += ROWS
        if i + 4 <= M:
            _micro_tile_exp_4(A, B, C, i, j, shift, colmax, colsum)
            i += 4
        if i + 2 <= M:
            _micro_tile_exp_2(A, B, C, i, j, shift, colmax, colsum)
            i += 2
        if i < M:
            _micro_tile_exp_1(A, B, C, i, j, shift, colmax, colsum)
    if n_whole < N:
        matmul(A, B[:, n_whole:], C[:, n_whole:], False)
        _exp_columns(C[:, n_whole:], shift[n_whole:], colmax[n_whole:], colsum[n_whole:])


def _matmul_exp_float64(A, B, C, shift, colmax, colsum):
    matmul(A, B, C, False)
    _exp_columns(C, shift, colmax, colsum)


@helper
def _exp_columns(C, shift, colmax, colsum):
    """The exp epilogue as a sweep over C (rows contiguous), in place."""
    for r in range(C.shape[0]):
        row = C[r]
        for c in range(C.shape[1]):
            x = row[c] - shift[c]
            colmax[c] = max(colmax[c], x)
            e = fast_exp(x)
            row[c] = e
            colsum[c] += e


if numba is not None:

    @overload(matmul_exp, jit_options={"fastmath": FASTMATH})
    def _matmul_exp_overload(A, B, C, shift, colmax, colsum):
        if C.dtype == types.float32:
            return _matmul_exp_float32
        return _matmul_exp_float64
