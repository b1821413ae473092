"""User-written ``mask_mod`` / ``score_mod`` / ``score_mod_grad`` (kernels/mods.py).

Oracles: plain torch tensor maths (the scores built by hand, the mods written again in torch,
autograd for every gradient -- so torch, not score_mod_grad, differentiates the score_mod),
the reference (for dropout, which torch cannot draw), the same pattern through built-in
keywords (causal, a boolean mask), float64 finite differences; and the clear errors.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

import microattn as ma
from microattn import functional as F
from microattn.kernels import reference
from microattn.kernels.spec import make_attention_spec
from tests.grid import (
    MOD_CAP, MOD_PREFIX, MOD_SHIFT, capped_relative, capped_relative_grad, prefix_lm_holes,
)

BACKENDS = ["reference", "composed", "numba"]
B, HQ, HKV, NQ, NK, D, DV = 2, 4, 2, 9, 11, 5, 3  # GQA; Nk > Nq: bottom-right offsets matter


# -- the mods of the examples, in NumPy and in torch ---------------------------------------

PREFIX = 4


def prefix_lm(b, h, i, j):  # keys of the prefix for everybody, causal after it
    return (j < PREFIX) | (j <= i + (NK - NQ))


def document(b, h, i, j):  # documents of 4 tokens each, by packed position
    return (i + (NK - NQ)) // 4 == j // 4


def odd_heads_none(b, h, i, j):  # head 1 of batch row 1 and query 0 see no key at all
    return ~((b == 1) & (h == 1)) & (i != 0)


# prefix_lm_holes (prefix-LM, and query 1 + h of batch row 1 sees nothing), capped_relative
# and capped_relative_grad: the grid's set (tests/grid.py, MODS), the very functions, so
# that numba compiles its kernels for them once for both
assert (MOD_PREFIX, MOD_SHIFT) == (PREFIX, NK - NQ)


def capped_relative_torch(score, b, h, i, j):
    return CAP * torch.tanh((score - 0.1 * (i - j).abs().double()) / CAP)


def relative(score, b, h, i, j):  # score + a bias of the distance, per head
    return score + 0.25 * (h + 1) * np.cos(0.3 * (i - j))


def relative_torch(score, b, h, i, j):
    return score + 0.25 * (h + 1) * torch.cos(0.3 * (i - j).double())


def one(score, b, h, i, j):
    return 1.0


CAP = 2.0
assert MOD_CAP == CAP  # capped_relative's cap


def tanh_cap(score, b, h, i, j):
    return CAP * np.tanh(score / CAP)


def tanh_cap_grad(score, b, h, i, j):
    return 1.0 - np.tanh(score / CAP) ** 2


def tanh_cap_torch(score, b, h, i, j):
    return CAP * torch.tanh(score / CAP)


def scalar_cap(score, b, h, i, j):  # math.tanh and an `if`: only runs element by element
    if i < 0:
        return score
    return CAP * math.tanh(score / CAP)


def scalar_cap_grad(score, b, h, i, j):
    return 1.0 - math.tanh(score / CAP) ** 2


MODS = {  # name: (sdpa mod keywords, torch's score_mod or None)
    "prefix-lm": (dict(mask_mod=prefix_lm), None),
    "document": (dict(mask_mod=document), None),
    "empty-rows": (dict(mask_mod=odd_heads_none), None),
    "relative": (dict(score_mod=relative, score_mod_grad=one), relative_torch),
    "softcap": (dict(score_mod=tanh_cap, score_mod_grad=tanh_cap_grad), tanh_cap_torch),
    "scalar-softcap": (dict(score_mod=scalar_cap, score_mod_grad=scalar_cap_grad), tanh_cap_torch),
    "document+relative": (dict(mask_mod=document, score_mod=relative, score_mod_grad=one),
                          relative_torch),
    "numba-set": (dict(mask_mod=prefix_lm_holes, score_mod=capped_relative,
                       score_mod_grad=capped_relative_grad), capped_relative_torch),
}
NUMBA_SET = MODS["numba-set"][0]
# numba compiles its kernels once per set of mods (seconds each): its tests all use one set
# (NUMBA_SET: prefix-LM with empty rows, a capped relative bias), the others run every set
OTHERS = {  # name: the other keywords the mods combine with
    "plain": {},
    "causal": dict(is_causal=True),
    "window": dict(window=(3, 1)),
    "bool-mask": dict(attn_mask="bool"),
    "float-mask": dict(attn_mask="float"),
}


def problem(dtype=np.float64, seed=0, nq=NQ, nk=NK):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s) * 1.5 for s in
              ((B, HQ, nq, D), (B, HKV, nk, D), (B, HKV, nk, DV), (B, HQ, nq, DV), (B, HQ, nq))]
    return [a.astype(dtype) for a in arrays]


def with_masks(others, seed=1, nq=NQ, nk=NK):
    kw = dict(others)
    rng = np.random.default_rng(seed)
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = rng.random((B, 1, nq, nk)) < 0.8
    elif kw.get("attn_mask") == "float":
        mask = rng.standard_normal((nq, nk))
        mask[rng.random(mask.shape) < 0.15] = -np.inf
        kw["attn_mask"] = mask
    return kw


def ours(backend, q, k, v, g_out, g_lse, **kw):
    """out, lse, dq, dk, dv for the loss sum(out g_out) + sum(lse g_lse) (finite lse only)."""
    leaves = [ma.tensor(x, requires_grad=True) for x in (q, k, v)]
    out, lse = F.scaled_dot_product_attention(*leaves, return_lse=True, backend=backend, **kw)
    live = ma.where(np.isneginf(lse.data), 0.0, lse)
    ((out * g_out).sum() + (live * g_lse).sum()).backward()
    return [out.data, lse.data] + [x.grad for x in leaves]


def torch_maths(q, k, v, g_out, g_lse, torch_score=None, mask_mod=None, attn_mask=None,
                is_causal=False, window=None, **_):
    """The same call in plain torch tensor maths; autograd differentiates everything."""
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    group = HQ // HKV
    kk, vv = tk.repeat_interleave(group, 1), tv.repeat_interleave(group, 1)
    nq, nk = q.shape[2], k.shape[2]
    s = tq @ kk.transpose(-1, -2) / math.sqrt(D)
    b, h, i, j = (torch.arange(n).reshape(shape) for n, shape in
                  ((B, (-1, 1, 1, 1)), (HQ, (1, -1, 1, 1)), (nq, (1, 1, -1, 1)), (nk, (1, 1, 1, -1))))
    if torch_score is not None:
        s = torch_score(s, b, h, i, j)
    allowed = torch.ones((B, HQ, nq, nk), dtype=torch.bool)
    d = j - (i + nk - nq)
    if is_causal:
        allowed &= d <= 0
    if window is not None:
        allowed &= (d >= -window[0]) & (d <= window[1])
    if attn_mask is not None:
        m = torch.tensor(attn_mask)
        if m.dtype == torch.bool:
            allowed &= m
        else:
            s = s + m
            allowed &= m > -math.inf
    if mask_mod is not None:
        allowed &= torch.tensor(np.broadcast_to(mask_mod(*(x.numpy() for x in (b, h, i, j))),
                                                allowed.shape))
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    empty = torch.isneginf(lse)
    p = torch.where(empty[..., None], torch.zeros_like(s), torch.exp(s - lse.nan_to_num(0, 0, 0)[..., None]))
    out = p @ vv
    live = torch.where(empty, torch.zeros_like(lse), lse)
    ((out * torch.tensor(g_out)).sum() + (live * torch.tensor(g_lse)).sum()).backward()
    return [out.detach().numpy(), lse.detach().numpy(), tq.grad.numpy(), tk.grad.numpy(),
            tv.grad.numpy()]


def assert_close(got, want, rtol, atol, what=""):
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{what} {name}")


# -- every backend against torch maths -----------------------------------------------------


# numba compiles its kernels once per set of mods (14-24 s): it runs one set, "numba-set";
# the other sets run on the backends that evaluate mods without compiling
TORCH_CASES = [(backend, mods) for backend in BACKENDS for mods in MODS
               if backend != "numba" or mods == "numba-set"]


@pytest.mark.parametrize("backend, mods", TORCH_CASES)
@pytest.mark.parametrize("others", list(OTHERS))
def test_against_torch_maths(backend, mods, others):
    q, k, v, g_out, g_lse = problem()
    mod_kw, torch_score = MODS[mods]
    kw = with_masks(OTHERS[others])
    got = ours(backend, q, k, v, g_out, g_lse, **mod_kw, **kw)
    want = torch_maths(q, k, v, g_out, g_lse, torch_score, mod_kw.get("mask_mod"), **kw)
    assert_close(got, want, 1e-9, 1e-10, f"{backend} {mods} {others}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_against_the_float64_reference(backend):
    arrays = problem()
    kw = dict(NUMBA_SET, is_causal=True)
    want = ours("reference", *arrays, **kw)
    got = ours(backend, *(a.astype(np.float32) for a in arrays), **kw)
    assert_close(got, want, 2e-4, 2e-5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_with_mods_against_the_reference(backend):
    arrays = problem()
    kw = dict(NUMBA_SET, dropout_p=0.3, seed=5)
    assert_close(ours(backend, *arrays, **kw), ours("reference", *arrays, **kw), 1e-9, 1e-10)


# -- the same patterns through built-ins ----------------------------------------------------


def causal(b, h, i, j):
    return j <= i + (NK - NQ)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numba"])  # numba: see below
def test_mask_mod_equals_the_builtin_pattern(backend):
    """(numba's kernels for these mods: test_numba_tiles_skipped_partial_and_whole, and
    benchmarks/compare_mods.py, which checks causal-as-mask_mod equals is_causal.)"""
    arrays = problem()
    assert_close(ours(backend, *arrays, mask_mod=causal), ours(backend, *arrays, is_causal=True),
                 1e-12, 1e-13, "causal")
    b, h, i, j = np.ix_(*(np.arange(n) for n in (B, HQ, NQ, NK)))
    mask = np.broadcast_to(odd_heads_none(b, h, i, j), (B, HQ, NQ, NK))
    assert_close(ours(backend, *arrays, mask_mod=odd_heads_none), ours(backend, *arrays, attn_mask=mask),
                 1e-12, 1e-13, "mask")


def test_numba_tiles_skipped_partial_and_whole():
    """Lengths of many block-mask chunks (flash.MOD_CHUNK) and small tiles: tiles mask_mod
    forbids entirely (skipped), allows entirely (no per-pair test) and partly, in forward and
    both backward passes, against the reference; and mask_mod without score_mod against the
    same pattern as a boolean mask."""
    from microattn.kernels.cpu import flash

    nq, nk = 150, 152  # Nk - Nq = NK - NQ, as prefix_lm_holes assumes
    q, k, v, g_out, _ = problem(nq=nq, nk=nk)
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, **NUMBA_SET)
    classes = flash.block_mask(spec, flash.specialised(spec))
    assert {0, 1, 2} <= set(np.unique(classes))
    want_out, stats = reference.forward(q, k, v, spec)
    want = reference.backward(q, k, v, want_out, stats, g_out, spec)
    for blocks in ((16, 24), (40, 64)):
        out, st = flash.forward(q, k, v, spec, blocks=blocks)
        np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-12)
        for fused in (False, True):
            got = flash.backward(q, k, v, out, st, g_out, spec, fused=fused, blocks=blocks)
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tanh_score_mod_equals_softcap_and_combines_with_it_and_alibi(backend):
    """A tanh cap written as a score_mod gives softcap='s result; with softcap= and ALiBi
    both given, score_mod sees the capped score and ALiBi is added after it."""
    arrays = problem()
    if backend != "numba":  # (one set of mods on numba: compile cost)
        assert_close(ours(backend, *arrays, score_mod=tanh_cap, score_mod_grad=tanh_cap_grad),
                     ours(backend, *arrays, softcap=CAP), 1e-12, 1e-13, "cap")
    slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    kw = dict(NUMBA_SET, softcap=3.0, alibi_slopes=slopes, is_causal=True)
    q, k, v, g_out, g_lse = arrays
    got = ours(backend, q, k, v, g_out, g_lse, **kw)

    def by_hand(score, b, h, i, j):  # cap, then the mod, then ALiBi (torch, autograd)
        capped = 3.0 * torch.tanh(score / 3.0)
        return capped_relative_torch(capped, b, h, i, j) - torch.tensor(slopes)[h] * (
            i + (NK - NQ) - j).abs().double()

    want = torch_maths(q, k, v, g_out, g_lse, by_hand, prefix_lm_holes, is_causal=True)
    assert_close(got, want, 1e-9, 1e-10, backend)


def test_a_mod_that_only_runs_on_scalars_is_evaluated_element_by_element():
    arrays = problem()
    want = ours("reference", *arrays, score_mod=tanh_cap, score_mod_grad=tanh_cap_grad)
    got = ours("reference", *arrays, score_mod=scalar_cap, score_mod_grad=scalar_cap_grad)
    assert_close(got, want, 1e-13, 1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_show_the_mods_packed_positions(backend):
    """A varlen call: mods see positions in the packed row, as a dense call with the
    block-diagonal mask does."""
    lengths = [3, 5, 4]
    cu = np.array([0, 3, 8, 12])
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, HQ if n == "q" else HKV, 12, D)) for n in "qkv")
    g_out, g_lse = rng.standard_normal((1, HQ, 12, D)), rng.standard_normal((1, HQ, 12))
    block = np.zeros((12, 12), dtype=bool)
    for s, n in enumerate(lengths):
        block[cu[s]:cu[s] + n, cu[s]:cu[s] + n] = True

    kw = NUMBA_SET
    packed = ours(backend, q, k, v, g_out, g_lse, cu_seqlens_q=cu, cu_seqlens_k=cu, **kw)
    dense = ours(backend, q, k, v, g_out, g_lse, attn_mask=block, **kw)
    assert_close(packed, dense, 1e-11, 1e-12, backend)


def test_block_mask_classes():
    """mods.block_mask (the CUDA kernels' tile skipping) on a causal mask_mod over 4 x 4
    chunks: below the diagonal all (2), on it some (1), above none (0); the ragged last chunks
    counted by their own size; the origin of a packed sequence shifts the indices."""
    from microattn.kernels import mods

    def causal_mod(b, h, i, j):
        return j <= i

    spec = make_attention_spec((1, 2, 10, 4), (1, 1, 10, 4), (1, 1, 10, 4), (np.float64,) * 3,
                               mask_mod=causal_mod)
    classes = mods.block_mask(spec, 4, 4)
    assert classes.shape == (1, 2, 3, 3) and classes.dtype == np.int8
    for h in range(2):
        np.testing.assert_array_equal(classes[0, h], [[1, 0, 0], [2, 1, 0], [2, 2, 1]])
    shifted = dataclasses.replace(spec, origin=(0, 4, 0))  # queries 4.. of a larger call
    np.testing.assert_array_equal(mods.block_mask(shifted, 4, 4)[0, 0], [[2, 1, 0], [2, 2, 1], [2, 2, 2]])


# -- gradcheck -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_through_score_mod(backend):
    rng = np.random.default_rng(3)
    q, k, v = (ma.tensor(rng.standard_normal(s), requires_grad=True) for s in
               ((1, 2, 5, 3), (1, 1, 6, 3), (1, 1, 6, 2)))

    def fn(q, k, v):
        return F.scaled_dot_product_attention(
            q, k, v, **NUMBA_SET, window=(4, 1), backend=backend)

    assert ma.gradcheck(fn, [q, k, v])


# -- errors --------------------------------------------------------------------------------


def spec_of(**kw):
    shapes = ((1, 2, 3, 4), (1, 2, 3, 4), (1, 2, 3, 4))
    return make_attention_spec(*shapes, (np.float64,) * 3, **kw)


@pytest.mark.parametrize("kw, error, fragment", [
    (dict(mask_mod=3), TypeError, "mask_mod must be a function (b, h, i, j) -> bool"),
    (dict(score_mod="tanh"), TypeError, "score_mod must be a function"),
    (dict(score_mod=tanh_cap, score_mod_grad=np.zeros(3)), TypeError, "score_mod_grad must be a function"),
    (dict(score_mod_grad=tanh_cap_grad), ValueError, "score_mod_grad was given without score_mod"),
])
def test_bad_mods_are_clear_errors(kw, error, fragment):
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        spec_of(**kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_mod_without_its_grad_runs_forward_but_refuses_a_graph(backend):
    q, k, v, _, _ = problem()
    no_grad = {"mask_mod": prefix_lm_holes, "score_mod": capped_relative}
    out = F.scaled_dot_product_attention(q, k, v, **no_grad, backend=backend)  # no graph
    want = F.scaled_dot_product_attention(q, k, v, **NUMBA_SET, backend="reference")
    np.testing.assert_allclose(out.data, want.data, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="score_mod was given without score_mod_grad"):
        F.scaled_dot_product_attention(ma.tensor(q, requires_grad=True), k, v, **no_grad,
                                       backend=backend)
    with ma.no_grad():
        F.scaled_dot_product_attention(ma.tensor(q, requires_grad=True), k, v, **no_grad,
                                       backend=backend)


def test_a_kernel_backward_without_score_mod_grad_is_an_error():
    q, k, v, g_out, _ = problem()
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, score_mod=tanh_cap)
    out, stats = reference.forward(q, k, v, spec)
    with pytest.raises(ValueError, match="score_mod was given without score_mod_grad"):
        reference.backward(q, k, v, out, stats, g_out, spec)
