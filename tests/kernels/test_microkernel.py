"""kernels/cpu/microkernel.py: the register-tile matmul against NumPy in float64."""

import numpy as np
import pytest

from microattn.kernels.cpu import _compile, microkernel
from microattn.kernels.cpu._compile import numba

# N covers: whole micro-tiles of either width (16, 32, 64), a left-over AVX2-width panel
# beside AVX-512 ones (48, 113 = 3 x 32 + 16 + 1), and plain-loop columns (3, 17, 113)
SIZES = [(1, 1, 1), (7, 5, 3), (6, 64, 16), (37, 64, 113), (203, 37, 16), (13, 0, 17), (128, 256, 64),
         (11, 32, 48)]


@numba.njit
def _matmul(A, B, C, accumulate):
    microkernel.matmul(A, B, C, accumulate)


@numba.njit
def _matmul_a_transposed(AT, B, C, accumulate):
    microkernel.matmul(AT.T, B, C, accumulate)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,N", SIZES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_matmul_matches_numpy(M, K, N, dtype, accumulate):
    rng = np.random.default_rng(M * 1000 + K * 10 + N)
    A = rng.standard_normal((M, K)).astype(dtype)
    B = rng.standard_normal((K, N)).astype(dtype)
    C0 = rng.standard_normal((M, N)).astype(dtype)
    expected = A.astype(np.float64) @ B + (C0 if accumulate else 0.0)
    tol = (1e-5 if dtype == np.float32 else 1e-13) * max(1, K) ** 0.5
    for run, A_arg in ((_matmul, A), (_matmul_a_transposed, np.ascontiguousarray(A.T))):
        C = C0.copy() if accumulate else np.full((M, N), np.nan, dtype)  # NaN: must be overwritten
        run(A_arg, B, C, accumulate)
        np.testing.assert_allclose(C, expected, rtol=tol, atol=tol)


def test_matmul_on_padded_views():
    """The kernels' case: B and C are column slices of wider buffers (rows strided)."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((40, 64)).astype(np.float32)
    B_buf = rng.standard_normal((64, 144)).astype(np.float32)
    C_buf = np.zeros((40, 144), np.float32)
    _matmul(A, B_buf[:, :100], C_buf[:, :100], False)
    np.testing.assert_allclose(C_buf[:, :100], A.astype(np.float64) @ B_buf[:, :100], rtol=1e-5, atol=1e-4)
    assert not C_buf[:, 100:].any()  # nothing written past the view


def test_micro_tile_reference_is_the_meaning():
    """One micro-tile equals its NumPy statement (6 rows, one micro-tile wide)."""
    width = microkernel.micro_tile_width(np.float32)
    rng = np.random.default_rng(1)
    A = rng.standard_normal((6, 9)).astype(np.float32)
    B = rng.standard_normal((9, width)).astype(np.float32)
    C, expected = np.zeros((6, width), np.float32), np.zeros((6, width), np.float32)
    _matmul(A, B, C, False)
    microkernel._micro_tile_reference(A, B, expected, 0, 0, False, 6)
    np.testing.assert_allclose(C, expected, rtol=1e-5, atol=1e-5)
    assert microkernel.micro_tile_width(np.float32, 32) == 16 and microkernel.micro_tile_width(np.float64, 32) == 8
    assert microkernel.micro_tile_width(np.float32, 64) == 32 and microkernel.micro_tile_width(np.float64, 64) == 16


def test_vector_width_is_the_compile_targets(monkeypatch):
    """Two AVX-512 registers a micro-tile row where numba compiles for AVX-512F, two AVX2
    ones elsewhere, and AVX2 width for a named CPU without features (a portable cache)."""
    import llvmlite.binding
    from numba.core import config

    host = llvmlite.binding.get_host_cpu_features().flatten().split(",")
    if config.CPU_FEATURES is None and config.CPU_NAME is None:
        assert microkernel.VECTOR_BYTES == (64 if "+avx512f" in host else 32)
    assert microkernel.HALF_TILES == (microkernel.VECTOR_BYTES == 64)
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+fma,+avx512f,+avx512vl")
    assert microkernel.target_vector_bytes() == 64
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,+fma,-avx512f")
    assert microkernel.target_vector_bytes() == 32
    monkeypatch.setattr(config, "CPU_FEATURES", None)
    monkeypatch.setattr(config, "CPU_NAME", "generic")
    assert microkernel.target_vector_bytes() == 32
    monkeypatch.setattr(config, "CPU_NAME", None)

    def no_features():
        raise RuntimeError("failed to get host cpu features")

    monkeypatch.setattr(llvmlite.binding, "get_host_cpu_features", no_features)
    assert microkernel.target_vector_bytes() == 32  # a host LLVM cannot describe: AVX2 width


def test_matmul_rejects_bad_shapes_and_strided_rows():
    A = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="chain"):
        _matmul(A, np.ones((5, 8), np.float32), np.ones((4, 8), np.float32), False)
    with pytest.raises(ValueError, match="contiguous"):
        _matmul(A, np.ones((3, 16), np.float32)[:, ::2], np.ones((4, 8), np.float32), False)


@numba.njit
def _matmul_exp(A, B, C, shift, colmax, colsum):
    microkernel.matmul_exp(A, B, C, shift, colmax, colsum)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,N", SIZES)
def test_matmul_exp_matches_numpy(M, K, N, dtype):
    """The fused scores-and-exp pass (float32: exp inside the micro-tile) against its
    NumPy statement, including -inf shifts' neighbours: x far below -64 gives exactly 0."""
    rng = np.random.default_rng(M + 7 * K + 11 * N)
    A = rng.standard_normal((M, K)).astype(dtype)
    B = rng.standard_normal((K, N)).astype(dtype)
    shift = rng.uniform(-3, 3, N).astype(dtype)
    shift[::5] = 1000.0  # these columns underflow to exactly 0 (in float64 too)
    colmax0 = rng.standard_normal(N).astype(dtype)
    colsum0 = rng.uniform(0, 1, N).astype(dtype)
    C = np.full((M, N), np.nan, dtype)
    colmax, colsum = colmax0.copy(), colsum0.copy()
    _matmul_exp(A, B, C, shift, colmax, colsum)
    x = A.astype(np.float64) @ B - shift
    expected = np.exp(x)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(C, expected, rtol=tol * max(1, K) ** 0.5, atol=1e-30)
    assert (C[:, ::5] == 0).all()
    np.testing.assert_allclose(colmax, np.maximum(colmax0, x.max(axis=0, initial=-np.inf)), rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(colsum, colsum0 + expected.sum(axis=0), rtol=tol * max(1, M), atol=tol)
    C_np, colmax_np, colsum_np = np.empty((M, N)), colmax0.astype(np.float64), colsum0.astype(np.float64)
    microkernel.matmul_exp(A.astype(np.float64), B.astype(np.float64), C_np, shift.astype(np.float64),
                           colmax_np, colsum_np)  # the NumPy statement of what is compiled
    np.testing.assert_allclose(C_np, expected, rtol=1e-12, atol=1e-30)


@numba.njit(fastmath=_compile.FASTMATH)
def _exp_rows(x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):  # a loop LLVM vectorises, as in the kernels' sweeps
        out[i] = _compile.fast_exp(x[i])
    return out


@numba.njit
def _exp_in_matmul_exp(x):
    """fast_exp as the micro-tile computes it: x = 1 @ x.T - 0, one row per micro-tile."""
    n = x.shape[0]
    C = np.empty((1, n), np.float32)
    A = np.ones((1, 1), np.float32)
    colmax = np.full(n, -np.inf, np.float32)
    colsum = np.zeros(n, np.float32)
    microkernel.matmul_exp(A, x.reshape(1, n), C, np.zeros(n, np.float32), colmax, colsum)
    return C[0]


@pytest.mark.parametrize("where", ["row sweep", "micro-tile"])
def test_float32_fast_exp(where):
    """The float32 exp of the kernels (``_compile.fast_exp``, and the same steps in the
    micro-tile's IR): within 1 ulp of exp on [-64, 88], exactly 0 below -64 (no denormal
    products downstream, ``_compile._EXP_MIN``) and at -inf,
    NaN for NaN (a NaN input must not vanish into a probability of 0); and step for step
    what ``_fast_exp_meaning`` says."""
    x = np.concatenate([np.float32([-np.inf, np.nan, -64.0, -64.001, 0.0, 1e-30, -1e-30]),
                        np.linspace(-100, 88, 1_000_000, dtype=np.float32)])
    width = microkernel.micro_tile_width(np.float32)
    x = x[: x.size - x.size % width]  # whole micro-tiles only: the columns past them use the sweep
    got = _exp_rows(x) if where == "row sweep" else _exp_in_matmul_exp(x)
    with np.errstate(over="ignore"):
        truth = np.exp(x.astype(np.float64))
    normal = (x >= -64) & (x <= 88)
    assert np.abs(got[normal] / truth[normal] - 1).max() < 2.0**-23  # 1 ulp of [1, 2)
    assert (got[(x < -64)] == 0).all()
    assert np.isnan(got[np.isnan(x)]).all()
    with np.errstate(invalid="ignore", over="ignore"):
        meaning = _compile._fast_exp_meaning(x)
    np.testing.assert_allclose(got[normal], meaning[normal], rtol=2.0**-22)
