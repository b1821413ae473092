"""What the benchmark classes share: problem shape, inputs, skip rules, timing, the oracle.

Shape of every attention problem (``N`` is the benchmark parameter)::

    query, key, value, dout: (BATCH, HEADS, N, HEAD_DIM) = (1, 4, N, 64)

Skip rules (the ``require_*`` helpers) raise ``NotImplementedError`` from ``setup``,
which asv records as "n/a" for that parameter combination. Apart from
``require_backend`` (a backend this machine cannot run, e.g. "cuda" without a GPU) they
look at the parameters only, never at the machine, so every machine skips the same
combinations and results stay comparable.
"""

from __future__ import annotations

import importlib
import time

import numpy as np

import microattn as ma
from microattn import backends
from microattn import functional as F

BATCH, HEADS, HEAD_DIM = 1, 4, 64
SDPA = "scaled_dot_product_attention"
LINEAR = "linear_attention"

GiB = 2**30
# Largest working set a combination may need (estimated by the *_bytes models below):
# the suite must run next to other work on a 24 GiB machine.
MEMORY_BUDGET_BYTES = 3 * GiB
# Largest amount of arithmetic one call may execute, per backend, in float32 GFLOP. On 2
# cores the NumPy oracles run near 1.5 GFLOP/s and the numba flash kernels near 25, so a
# call stays within about 3 s and `asv run --quick` within minutes; a GPU is limited by
# memory only. The cost: no dense (non-windowed) flash at N = 16384 on the CPU (137
# GFLOP causal forward); SlidingWindowAttention and LinearAttention do run there.
WORK_BUDGET_GFLOP = {"reference": 4.0, "composed": 2.5, "numba": 64.0, "cuda": 1e5}

# Query rows checked against the float64 oracle. Each output row and each row of dq
# depends only on its own query (and on all keys), so the last rows of a long problem
# can be checked with an oracle that is as long in keys but only ORACLE_ROWS in queries.
# Bottom-right alignment keeps causal and window masks right for such a slice. One head
# is checked (heads are independent and alike): the causal linear-attention oracle
# builds an O(N * D * Dv) prefix state per head, seconds at N = 16384.
ORACLE_ROWS = 32
ORACLE_HEAD = 0

FORWARD, BACKWARD = "forward", "forward+backward"


def _import_kernel_modules() -> None:
    """Import every backend's kernel module (and so numba and numba.cuda) once, now.

    asv's forkserver (``launch_method`` in asv.conf.json) imports this suite once and forks
    a child for each benchmark and parameter combination; what is imported here is
    inherited, so a child no longer spends ~1.3 s importing numba and numba.cuda before it
    can even decide to skip. Availability is *not* checked here: ``cuda.is_available()``
    initialises the CUDA driver, and a forked child cannot use a parent's CUDA context.
    """
    for table in backends.FAMILIES.values():
        for module_name in filter(None, table.values()):
            try:
                importlib.import_module(module_name)
            except ImportError:
                pass  # that backend is skipped in setup, where require_backend says why


_import_kernel_modules()


# -- skip rules --------------------------------------------------------------------------


def require_backend(name: str, family: str = SDPA) -> None:
    """Skip when backend ``name`` cannot run here (no GPU, numba missing, not written yet)."""
    reason = backends.unavailable_reason(name, family)
    if reason is not None:
        raise NotImplementedError(f"backend {name!r} is not available here: {reason}")


def require_budget(backend: str, gflop: float, nbytes: float, dtype: str) -> None:
    """Skip a combination whose work or memory exceeds the suite's budgets. On the CPU a
    float64 FLOP counts double: a SIMD instruction holds half as many of them."""
    cost = gflop * (2.0 if np.dtype(dtype) == np.float64 and backend != "cuda" else 1.0)
    if cost > WORK_BUDGET_GFLOP[backend]:
        raise NotImplementedError(
            f"{cost:.0f} GFLOP (float32-equivalent) for one call exceeds the {backend!r} "
            f"budget of {WORK_BUDGET_GFLOP[backend]:.0f} GFLOP"
        )
    if nbytes > MEMORY_BUDGET_BYTES:
        raise NotImplementedError(
            f"needs about {nbytes / GiB:.1f} GiB, over the {MEMORY_BUDGET_BYTES / GiB:.0f} GiB budget"
        )


# -- cost models -------------------------------------------------------------------------

# Dense (B, H, N, N) arrays alive at the peak, measured with ru_maxrss at N = 1024 (about
# 4 for the reference, 4 / 6.4 for composed forward / forward+backward), rounded up.
DENSE_ARRAYS = {("reference", FORWARD): 5, ("reference", BACKWARD): 5,
                ("composed", FORWARD): 5, ("composed", BACKWARD): 8}


def attention_pairs(N: int, window_left: int | None = None) -> int:
    """(query, key) pairs one head may attend: N * N (full), the lower triangle (causal,
    ``window_left=-1``) or the band of a causal sliding window ``(window_left, 0)``."""
    if window_left is None:
        return N * N
    if window_left < 0 or window_left >= N:
        return N * (N + 1) // 2
    w = window_left
    return (w + 1) * N - w * (w + 1) // 2  # rows i >= w see w + 1 keys, row i < w sees i + 1


def sdpa_gflop(pairs: int, which: str) -> float:
    """Useful FLOPs of softmax attention, as flash-attention papers count them: two matmuls
    (QK^T, PV) of 2 * D flops per pair forward; backward 2.5 times the forward."""
    forward = 4.0 * BATCH * HEADS * HEAD_DIM * pairs / 1e9
    return forward if which == FORWARD else 3.5 * forward


def sdpa_bytes(backend: str, N: int, itemsize: int, which: str) -> float:
    """Peak working set: the dense backends hold a few (B, H, N, N) arrays, the flash
    kernels only O(N) data (q, k, v, out, dout, lse and three gradients)."""
    small = 10 * BATCH * HEADS * N * HEAD_DIM * itemsize
    dense = DENSE_ARRAYS.get((backend, which), 0) * BATCH * HEADS * N * N * itemsize
    return small + dense


def executed_pairs(backend: str, N: int, window_left: int | None = None) -> int:
    """Pairs a backend computes: the dense backends score all N * N and mask afterwards."""
    return N * N if backend in ("reference", "composed") else attention_pairs(N, window_left)


def linear_gflop(N: int, which: str) -> float:
    """Useful FLOPs of linear attention: the key-value state (2 * D * Dv per key) and its
    read-out (2 * D * Dv per query) forward, about twice that again backward."""
    forward = 4.0 * BATCH * HEADS * N * HEAD_DIM * HEAD_DIM / 1e9
    return forward if which == FORWARD else 3.0 * forward


# The causal NumPy reference builds every prefix state (B, H, N, D, Dv) with einsum and
# cumsum, no BLAS: it runs about 50 times slower than its useful FLOPs suggest (0.03
# useful GFLOP/s against the dense reference's 1.5 on a 2-core machine).
REFERENCE_CAUSAL_LINEAR_OVERHEAD = 50.0


def linear_executed_gflop(backend: str, N: int, causal: bool, which: str) -> float:
    """What a linear-attention call costs, in the units of WORK_BUDGET_GFLOP."""
    useful = linear_gflop(N, which)
    return useful * REFERENCE_CAUSAL_LINEAR_OVERHEAD if backend == "reference" and causal else useful


def linear_bytes(backend: str, N: int, causal: bool, itemsize: int) -> float:
    """The NumPy reference keeps one (D, Dv) state per causal prefix: about four
    (B, H, N, D, Dv) arrays at the peak (measured). The numba kernel carries one state."""
    small = 10 * BATCH * HEADS * N * HEAD_DIM * itemsize
    states = 5 * BATCH * HEADS * N * HEAD_DIM * HEAD_DIM * itemsize
    return small + (states if backend == "reference" and causal else 0)


# -- inputs and calls --------------------------------------------------------------------


def make_inputs(N: int, dtype: str, seed: int = 0) -> tuple[np.ndarray, ...]:
    """query, key, value and an output cotangent, standard normal, (1, 4, N, 64) each."""
    rng = np.random.default_rng(seed)
    shape = (BATCH, HEADS, N, HEAD_DIM)
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(4))


def leaves(*arrays: np.ndarray) -> list[ma.Tensor]:
    return [ma.tensor(a, requires_grad=True) for a in arrays]


def synchronize(backend: str) -> None:
    """Wait for the GPU, so a timing covers the kernels and not just their launch."""
    if backend == "cuda":
        from numba import cuda

        cuda.synchronize()


def run_pass(attention, tensors, dout: np.ndarray, which: str):
    """One forward (without a graph) or one forward+backward of ``attention(q, k, v)``.
    Gradients are cleared first, so every call does the same work."""
    if which == FORWARD:
        with ma.no_grad():
            return attention(*tensors)
    for t in tensors:
        t.grad = None
    out = attention(*tensors)
    out.backward(dout)
    return out


def best_seconds(fn, budget_s: float = 0.5, max_runs: int = 3) -> float:
    """Fastest of up to ``max_runs`` calls, stopping once ``budget_s`` is spent."""
    best, spent, runs = np.inf, 0.0, 0
    while runs < max_runs and (runs == 0 or spent < budget_s):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


# -- the float64 oracle ------------------------------------------------------------------


def oracle_rows(attention64, q, k, v, dout, rows: int = ORACLE_ROWS, head: int = ORACLE_HEAD):
    """The float64 reference's output and dq for the last ``rows`` queries of one head.

    ``attention64(q, k, v)`` runs the reference backend; inputs are upcast first.
    Returns out (B, 1, rows, Dv) and dq (B, 1, rows, D), float64; compare them with
    ``oracle_slice`` of the benchmarked results.
    """
    heads = slice(head, head + 1)
    q, k, v = leaves(*(x[:, heads].astype(np.float64) for x in (q[:, :, -rows:], k, v)))
    out = attention64(q, k, v)
    out.backward(dout[:, heads, -rows:].astype(np.float64))
    return out.data, q.grad


def oracle_slice(x: np.ndarray, rows: int = ORACLE_ROWS, head: int = ORACLE_HEAD) -> np.ndarray:
    """The part of a (B, H, N, X) result that ``oracle_rows`` computes."""
    return x[:, head:head + 1, -rows:]


def max_abs_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - expected)))


def sdpa(backend: str, is_causal: bool = False, window=None):
    """``attention(q, k, v)`` for F.scaled_dot_product_attention with these options."""

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, window=window,
                                              backend=backend)

    return attention


def linear(backend: str, causal: bool):
    """``attention(q, k, v)`` for F.linear_attention with these options."""

    def attention(q, k, v):
        return F.linear_attention(q, k, v, causal=causal, backend=backend)

    return attention
