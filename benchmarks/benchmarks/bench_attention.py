"""Attention, one class per operation: softmax attention (full, causal), causal
sliding-window attention, and linear attention, on every backend.

Every class measures the same four things for each parameter combination:

* ``time_attention``     seconds for one pass ("forward" without a graph, or
                         "forward+backward" with the gradients of q, k and v);
* ``peakmem_attention``  the process's peak memory over that pass: the dense backends
                         ("reference", "composed") hold (B, H, N, N) scores, O(N^2); the
                         flash and linear kernels hold O(N);
* ``track_max_error``    the largest absolute error of the pass's result (the output
                         for "forward", dq for "forward+backward") on the last
                         ``common.ORACLE_ROWS`` queries of one head, against the
                         float64 reference;
* ``track_gflops``       useful GFLOP/s of the pass (the FLOPs of the mask's allowed
                         pairs, as flash-attention papers count them).

Problem shape: ``common.BATCH, common.HEADS, N, common.HEAD_DIM`` = (1, 4, N, 64).
"""

from __future__ import annotations

import numpy as np

from . import common
from .common import BACKWARD, FORWARD

SIZES = [256, 1024, 4096, 16384]
DTYPES = ["float32", "float64"]
PASSES = [FORWARD, BACKWARD]
WARMUP_N = 128  # compiles every numba specialisation a call of this kind needs, quickly
WINDOW = 256  # causal sliding window (WINDOW, 0): each query sees itself and 256 keys back


class _Attention:
    """The measurements; a subclass's ``setup`` calls ``_prepare``."""

    timeout = 300.0

    def _prepare(self, backend, N, dtype, which, attention, attention64, useful_gflop):
        self.backend, self.which = backend, which
        self.attention, self.attention64 = attention, attention64
        self.useful_gflop = useful_gflop
        # Warm-up: compile the numba/CUDA kernels for this dtype and these flags (numba
        # caches them on disk, so this is fast after the first run on a machine).
        tiny = common.make_inputs(WARMUP_N, dtype, seed=1)
        common.run_pass(attention, common.leaves(*tiny[:3]), tiny[3], which)
        q, k, v, self.dout = common.make_inputs(N, dtype)
        self.tensors = common.leaves(q, k, v)

    def _run(self):
        out = common.run_pass(self.attention, self.tensors, self.dout, self.which)
        common.synchronize(self.backend)
        return out

    def time_attention(self, *params):
        self._run()

    def peakmem_attention(self, *params):
        self._run()

    def track_max_error(self, *params):
        out = self._run()
        q, k, v = (t.data for t in self.tensors)
        out64, dq64 = common.oracle_rows(self.attention64, q, k, v, self.dout)
        if self.which == FORWARD:
            return common.max_abs_error(common.oracle_slice(out.data), out64)
        return common.max_abs_error(common.oracle_slice(self.tensors[0].grad), dq64)

    track_max_error.unit = "max |error|"

    def track_gflops(self, *params):
        return self.useful_gflop / common.best_seconds(self._run)

    track_gflops.unit = "GFLOP/s"


class ScaledDotProductAttention(_Attention):
    """F.scaled_dot_product_attention, every key (full) or causal, per backend."""

    params = [["reference", "composed", "numba", "cuda"], SIZES, ["full", "causal"], DTYPES, PASSES]
    param_names = ["backend", "N", "mask", "dtype", "pass"]

    def setup(self, backend, N, mask, dtype, which):
        common.require_backend(backend)
        causal_left = -1 if mask == "causal" else None
        itemsize = np.dtype(dtype).itemsize
        common.require_budget(
            backend,
            common.sdpa_gflop(common.executed_pairs(backend, N, causal_left), which),
            common.sdpa_bytes(backend, N, itemsize, which),
            dtype,
        )
        is_causal = mask == "causal"
        self._prepare(
            backend, N, dtype, which,
            attention=common.sdpa(backend, is_causal=is_causal),
            attention64=common.sdpa("reference", is_causal=is_causal),
            useful_gflop=common.sdpa_gflop(common.attention_pairs(N, causal_left), which),
        )


class SlidingWindowAttention(_Attention):
    """F.scaled_dot_product_attention with window=(256, 0): causal, each query sees the
    256 keys before it. The numba backend runs a banded kernel, O(N * 256); the reference
    still scores all N * N pairs and masks them ("composed" adds nothing here that
    ScaledDotProductAttention does not show)."""

    params = [["reference", "numba", "cuda"], [1024, 4096, 16384], DTYPES, PASSES]
    param_names = ["backend", "N", "dtype", "pass"]

    def setup(self, backend, N, dtype, which):
        common.require_backend(backend)
        itemsize = np.dtype(dtype).itemsize
        common.require_budget(
            backend,
            common.sdpa_gflop(common.executed_pairs(backend, N, WINDOW), which),
            common.sdpa_bytes(backend, N, itemsize, which),
            dtype,
        )
        window = (WINDOW, 0)
        self._prepare(
            backend, N, dtype, which,
            attention=common.sdpa(backend, window=window),
            attention64=common.sdpa("reference", window=window),
            useful_gflop=common.sdpa_gflop(common.attention_pairs(N, WINDOW), which),
        )


class LinearAttention(_Attention):
    """F.linear_attention (elu + 1 features), over all keys (full) or causal."""

    params = [["reference", "numba"], SIZES, ["full", "causal"], DTYPES, PASSES]
    param_names = ["backend", "N", "mask", "dtype", "pass"]

    def setup(self, backend, N, mask, dtype, which):
        common.require_backend(backend, common.LINEAR)
        causal = mask == "causal"
        common.require_budget(
            backend,
            common.linear_executed_gflop(backend, N, causal, which),
            common.linear_bytes(backend, N, causal, np.dtype(dtype).itemsize),
            dtype,
        )
        self._prepare(
            backend, N, dtype, which,
            attention=common.linear(backend, causal),
            attention64=common.linear("reference", causal),
            useful_gflop=common.linear_gflop(N, which),
        )
