"""User-written ``mask_mod`` / ``score_mod`` / ``score_mod_grad`` on the CUDA rungs (in the
simulator or on a GPU): forward and backward against plain torch maths (autograd, so torch and
not score_mod_grad differentiates the score_mod) and against the reference where torch cannot
draw the mask (dropout); the block mask's skipped, partial and whole tiles; packed sequences;
the error without score_mod_grad. The mods are tests/test_mods.py's; its sizes are small
(Nq = 9, Nk = 11), and the tile tests use N = 37 on one head.
"""

from __future__ import annotations

import numpy as np
import pytest

import microattn as ma
from microattn import backends
from microattn import functional as F
from microattn.kernels import reference
from microattn.kernels.cuda import flash, tiled
from microattn.kernels.spec import make_attention_spec
from tests.test_mods import (
    MODS,
    NUMBA_SET,
    assert_close,
    document,
    ours,
    prefix_lm,
    problem,
    tanh_cap,
    torch_maths,
    with_masks,
)

pytestmark = pytest.mark.cuda

RUNGS = {"rung1": "microattn.kernels.cuda.flash", "rung2": "microattn.kernels.cuda.tiled"}


@pytest.fixture(params=list(RUNGS))
def rung(request, monkeypatch):
    monkeypatch.setitem(backends.SDPA_KERNELS, "cuda", RUNGS[request.param])
    return request.param


@pytest.mark.parametrize("mods, others", [
    ("numba-set", dict(is_causal=True)),  # prefix-LM with empty rows + a capped relative bias
    ("document+relative", dict(attn_mask="float", window=(3, 1))),
    ("empty-rows", dict(attn_mask="bool")),  # rows and heads mask_mod leaves empty
])
def test_against_torch_maths(rung, mods, others):
    """out, lse, dq, dk, dv with GQA (4 query heads on 2 kv heads), Nk > Nq, float64."""
    q, k, v, g_out, g_lse = problem()
    mod_kw, torch_score = MODS[mods]
    kw = with_masks(others)
    got = ours("cuda", q, k, v, g_out, g_lse, **mod_kw, **kw)
    want = torch_maths(q, k, v, g_out, g_lse, torch_score, mod_kw.get("mask_mod"), **kw)
    assert_close(got, want, 1e-9, 1e-10, f"{rung} {mods}")


def test_with_softcap_alibi_and_dropout_against_the_reference(rung):
    """Every score term at once: score_mod sees the capped score, ALiBi and a float mask are
    added after it, dropout hashes the same pairs."""
    arrays = problem()
    kw = dict(NUMBA_SET, softcap=3.0, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]),
              dropout_p=0.3, seed=5, **with_masks(dict(attn_mask="float")))
    assert_close(ours("cuda", *arrays, **kw), ours("reference", *arrays, **kw), 1e-9, 1e-10)


def test_float32_against_the_float64_reference(monkeypatch):
    monkeypatch.setitem(backends.SDPA_KERNELS, "cuda", RUNGS["rung2"])
    arrays = problem()
    kw = dict(NUMBA_SET, is_causal=True)
    want = ours("reference", *arrays, **kw)
    got = ours("cuda", *(a.astype(np.float32) for a in arrays), **kw)
    assert_close(got, want, 2e-4, 2e-5, "float32")


def test_packed_sequences_show_the_mods_packed_positions(rung):
    """A varlen call (one kernel call per sequence, each with its origin): the mods see
    positions in the packed row, as a dense call with the block-diagonal mask does."""
    cu = np.array([0, 3, 8, 12])
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 2 if n == "q" else 1, 12, 5)) for n in "qkv")
    g_out, g_lse = rng.standard_normal((1, 2, 12, 5)), rng.standard_normal((1, 2, 12))
    block = np.zeros((12, 12), dtype=bool)
    for s in range(3):
        block[cu[s]:cu[s + 1], cu[s]:cu[s + 1]] = True
    packed = ours("cuda", q, k, v, g_out, g_lse, cu_seqlens_q=cu, cu_seqlens_k=cu, **NUMBA_SET)
    dense = ours("reference", q, k, v, g_out, g_lse, attn_mask=block, **NUMBA_SET)
    assert_close(packed, dense, 1e-11, 1e-12, rung)


@pytest.mark.parametrize("module", [flash, tiled], ids=["rung1", "rung2"])
def test_tiles_skipped_partial_and_whole(module):
    """N = 37 over the simulator's 8 x 8 tiles: prefix-LM (4 prefix keys, causal after) makes
    tiles mask_mod forbids entirely (skipped), allows entirely (no per-pair test) and partly;
    a document mask of 4-token documents forbids most off-diagonal tiles. Forward and
    backward against the reference."""
    n = 37
    rng = np.random.default_rng(4)
    q, k, v, g_out = (rng.standard_normal((1, 1, n, 8)) for _ in range(4))

    def prefix_37(b, h, i, j):
        return (j < 4) | (j <= i)

    for mask_mod in (prefix_37, document):
        spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, mask_mod=mask_mod,
                                   score_mod=NUMBA_SET["score_mod"],
                                   score_mod_grad=NUMBA_SET["score_mod_grad"])
        if mask_mod is prefix_37:
            classes = flash.block_mask_record(spec, (8, 8))
            assert {0, 1, 2} <= set(np.unique(classes).tolist())
        want_out, stats = reference.forward(q, k, v, spec)
        want = reference.backward(q, k, v, want_out, stats, g_out, spec)
        out, st = module.forward(q, k, v, spec)
        np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-12)
        for g, w, name in zip(module.backward(q, k, v, out, st, g_out, spec), want, ("dq", "dk", "dv")):
            np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11, err_msg=name)


def test_backward_without_score_mod_grad_is_an_error(rung):
    q, k, v, g_out, _ = problem()
    no_grad = dict(mask_mod=prefix_lm, score_mod=tanh_cap)
    with pytest.raises(ValueError, match="score_mod was given without score_mod_grad"):
        F.scaled_dot_product_attention(ma.tensor(q, requires_grad=True), k, v, **no_grad,
                                       backend="cuda")
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, **no_grad)
    module = flash if rung == "rung1" else tiled
    with pytest.raises(ValueError, match="score_mod was given without score_mod_grad"):
        module.backward(q, k, v, None, None, g_out, spec)  # refused before anything is read

