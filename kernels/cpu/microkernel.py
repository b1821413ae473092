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

**How.** C is cut into micro-tiles of ``ROWS = 6`` rows by two SIMD vectors (16 float32
or 8 float64). One micro-tile keeps its 12 partial sums in registers for the whole K
loop; each step loads one row of B (two vectors), broadcasts six entries of A's column and
issues 12 fused multiply-adds. 12 accumulators + 2 B vectors + 1 broadcast = 15 of AVX2's
16 vector registers, and 12 independent FMAs cover the FMA latency (4 cycles, 2 units) --
the shape BLIS uses for AVX2 (its ``haswell`` 6x16 sgemm). Rows left over (M % 6) use
4-, 2- and 1-row micro-tiles; columns left over (N % 16) plain loops (head dimensions are multiples
of 8 in practice; the tests also cover odd ones).

The micro-tile is a numba ``@intrinsic`` that writes the LLVM IR directly: numba's own
loops cannot hold a 6 x 16 tile in registers (an array lives in memory), and LLVM's
auto-vectoriser does not find this blocking by itself. The IR below is the equivalent of
the C intrinsics version, ``_mm256_fmadd_ps`` on ``__m256`` values; LLVM picks the
instructions for this CPU (numba compiles for the host).

Shape legend: A (M, K), B (K, N), C (M, N); (i, j) the top-left corner of a micro-tile.
"""

from __future__ import annotations

import numpy as np

from ._compile import helper, numba

ROWS = 6  # rows of C in one micro-tile
VECTOR_BYTES = 32  # one AVX2 register; a micro-tile is two registers wide


def micro_tile_width(dtype) -> int:
    """Columns of C in one micro-tile: 16 for float32, 8 for float64."""
    return 2 * VECTOR_BYTES // np.dtype(dtype).itemsize


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
    from numba.extending import intrinsic

    def _make_micro_tile(rows: int):
        """The micro-tile intrinsic for ``rows`` rows of C (6, or 1 for the rows left over)."""

        @intrinsic
        def micro_tile(typingctx, A, B, C, i, j, accumulate):
            """C[i:i+rows, j:j+W] (+)= A[i:i+rows, :] @ B[:, j:j+W], W = micro_tile_width."""
            arrays = (A, B, C)
            if not all(isinstance(x, types.Array) and x.ndim == 2 for x in arrays):
                return None
            if C.dtype not in (types.float32, types.float64) or A.dtype != C.dtype or B.dtype != C.dtype:
                return None
            if not (isinstance(i, types.Integer) and isinstance(j, types.Integer)
                    and isinstance(accumulate, types.Boolean)):
                return None
            return types.void(A, B, C, i, j, accumulate), _codegen

        def _codegen(context, builder, signature, args):
            a_ty, b_ty, c_ty = signature.args[:3]
            a, b, c = (context.make_array(t)(context, builder, v) for t, v in zip(signature.args[:3], args[:3]))
            i, j = (context.cast(builder, v, t, types.intp) for v, t in zip(args[3:5], signature.args[3:5]))
            accumulate = args[5]

            itemsize = np.dtype(str(c_ty.dtype)).itemsize
            lanes = VECTOR_BYTES // itemsize
            scalar = context.get_value_type(c_ty.dtype)
            vector = ir.VectorType(scalar, lanes)
            intp = context.get_value_type(types.intp)
            byte_ptr = ir.IntType(8).as_pointer()
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fma.v{lanes}f{8 * itemsize}")

            def const(n):
                return ir.Constant(intp, n)

            def at(ary, offset, ty):  # a pointer to ty, `offset` bytes into ary's data
                return builder.bitcast(builder.gep(builder.bitcast(ary.data, byte_ptr), [offset]), ty.as_pointer())

            a_row_stride, a_k_stride = cgutils.unpack_tuple(builder, a.strides, 2)
            b_row_stride = cgutils.unpack_tuple(builder, b.strides, 2)[0]
            c_row_stride = cgutils.unpack_tuple(builder, c.strides, 2)[0]
            n_k = cgutils.unpack_tuple(builder, a.shape, 2)[1]
            j_bytes = builder.mul(j, const(itemsize))

            # the 2 * rows accumulators: C's tile if accumulating, else zeros (LLVM keeps them
            # in registers: these allocas become SSA values)
            c_offsets, sums = [], []
            for r in range(rows):
                row_offset = builder.add(builder.mul(builder.add(i, const(r)), c_row_stride), j_bytes)
                for half in range(2):
                    offset = builder.add(row_offset, const(half * VECTOR_BYTES))
                    old = builder.load(at(c, offset, vector), align=itemsize)
                    slot = cgutils.alloca_once(builder, vector)
                    builder.store(builder.select(accumulate, old, ir.Constant(vector, None)), slot)
                    c_offsets.append(offset)
                    sums.append(slot)

            a_rows = [builder.mul(builder.add(i, const(r)), a_row_stride) for r in range(rows)]
            splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
            with cgutils.for_range(builder, n_k) as loop:
                k = loop.index
                b_row = builder.add(builder.mul(k, b_row_stride), j_bytes)
                b_halves = [builder.load(at(b, builder.add(b_row, const(half * VECTOR_BYTES)), vector),
                                         align=itemsize) for half in range(2)]
                a_col = builder.mul(k, a_k_stride)
                for r in range(rows):
                    a_ik = builder.load(at(a, builder.add(a_rows[r], a_col), scalar))
                    lane0 = builder.insert_element(ir.Constant(vector, ir.Undefined), a_ik,
                                                   ir.Constant(ir.IntType(32), 0))
                    broadcast = builder.shuffle_vector(lane0, ir.Constant(vector, ir.Undefined), splat_mask)
                    for half in range(2):
                        slot = sums[2 * r + half]
                        builder.store(builder.call(fma, [broadcast, b_halves[half], builder.load(slot)]), slot)

            for offset, slot in zip(c_offsets, sums):
                builder.store(builder.load(slot), at(c, offset, vector), align=itemsize)
            return context.get_dummy_value()

        return micro_tile

    _micro_tile_6 = _make_micro_tile(ROWS)
    _micro_tile_4 = _make_micro_tile(4)
    _micro_tile_2 = _make_micro_tile(2)
    _micro_tile_1 = _make_micro_tile(1)
else:  # without numba the helpers below are never called (the kernels cannot run)
    _micro_tile_6 = _micro_tile_4 = _micro_tile_2 = _micro_tile_1 = None


@helper
def matmul(A, B, C, accumulate):
    """C = A @ B (``accumulate`` False) or C += A @ B (True); C (M, N), A (M, K), B (K, N).

    The rows of B and C must be contiguous (unit stride along N); A may have any strides.
    Loop order: a column panel of B (K x 16, a few KiB) stays in L1 while every 6-row
    group of A streams past it.
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
    for i in range(M):  # the columns past the last whole micro-tile
        for j in range(n_whole, N):
            total = C[i, j] if accumulate else 0.0
            for k in range(K):
                total += A[i, k] * B[k, j]
            C[i, j] = total
