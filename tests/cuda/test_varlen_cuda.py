"""Packed sequences (cu_seqlens) on the CUDA rungs: the same check as tests/test_varlen.py
(packed = dense with the block-diagonal mask, out, lse and gradients), in the simulator or
on a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from microattn import backends
from tests.test_varlen import dense_mask, offsets, run

pytestmark = pytest.mark.cuda

RUNGS = {"rung1": "microattn.kernels.cuda.flash", "rung2": "microattn.kernels.cuda.tiled"}


@pytest.mark.parametrize("rung", list(RUNGS))
@pytest.mark.parametrize("case", [dict(is_causal=True), dict(is_causal=True, window=(2, 0), dropout_p=0.2, seed=3)],
                         ids=["causal", "window+dropout"])
def test_packed_equals_dense_with_the_block_diagonal_mask(rung, case, monkeypatch):
    monkeypatch.setitem(backends.SDPA_KERNELS, "cuda", RUNGS[rung])
    rng = np.random.default_rng(0)
    cu_q, cu_k = offsets([2, 0, 5, 3]), offsets([4, 2, 5, 1])
    q = rng.standard_normal((1, 4, cu_q[-1], 8))
    k, v = rng.standard_normal((1, 2, cu_k[-1], 8)), rng.standard_normal((1, 2, cu_k[-1], 8))
    dout, dlse = rng.standard_normal(q.shape), rng.standard_normal(q.shape[:-1])
    got = run("cuda", q, k, v, dout, dlse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **case)
    extra = {key: val for key, val in case.items() if key in ("dropout_p", "seed")}
    mask = dense_mask(cu_q, cu_k, case.get("is_causal", False), case.get("window"))
    want = run("reference", q, k, v, dout, dlse, attn_mask=mask, **extra)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12, err_msg=name)
