"""The CUDA rungs through ``F.scaled_dot_product_attention``: a differentiable lse (two key
halves merged by ``F.merge_attention_states`` are attention over all keys, gradients
included, to 1e-11 in float64) and ``sinks=`` against plain torch maths.

The same checks as tests/test_lse_merge.py and tests/test_sinks.py (their helpers), on
rung 1 (``cuda/flash.py``) and rung 2 (``cuda/tiled.py``, the "cuda" backend), in the
simulator or on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from microattn import backends
from tests.conftest import require
from tests.test_lse_merge import whole_and_merged
from tests.test_sinks import NAMES, ours, sink_problem, torch_maths

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.filterwarnings("ignore:overflow encountered in scalar multiply:RuntimeWarning"),
]

RUNGS = {"rung1": "microattn.kernels.cuda.flash", "rung2": "microattn.kernels.cuda.tiled"}


@pytest.fixture(params=list(RUNGS))
def cuda_rung(request, monkeypatch):
    """The "cuda" backend, run by the rung this test is parametrised with."""
    monkeypatch.setitem(backends.SDPA_KERNELS, "cuda", RUNGS[request.param])
    return "cuda"


@pytest.mark.parametrize("masking", ["bool", "empty_half"])
def test_two_halves_merged_are_attention_over_all_keys(cuda_rung, masking):
    whole, merged = whole_and_merged(cuda_rung, masking)
    for name, w, m in zip(("out", "lse", "dq", "dk", "dv"), whole, merged):
        assert np.array_equal(np.isneginf(w), np.isneginf(m)), name
        keep = np.isfinite(w)
        np.testing.assert_allclose(m[keep], w[keep], rtol=0, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("case", ["bool_mask+empty_row", "dropout"])
def test_sinks_match_torch_maths(cuda_rung, case):
    torch = require("torch")
    (q, k, v, sinks), kwargs, g_out, g_lse = sink_problem(case)
    got = ours(cuda_rung, q, k, v, sinks, kwargs, g_out, g_lse)
    want = torch_maths(torch, q, k, v, sinks, kwargs, g_out, g_lse)
    for name, a, b in zip(NAMES, got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)
