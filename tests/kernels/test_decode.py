"""kernels/cpu/decode.py: the decoding step against the reference on the shared grid (every
masking regime with Nq <= 16), split-KV merging, and reading a cache buffer in place."""

import numpy as np
import pytest

from microattn.kernels import protocol, reference
from microattn.kernels.cpu import decode
from microattn.kernels.spec import make_attention_spec
from tests.grid import DLSE_CASES, check_against_reference, grid, unsupported

pytestmark = pytest.mark.skipif(decode.unavailable_reason() is not None,
                                reason=str(decode.unavailable_reason()))

# not the user's mods, which decode does not implement (grid.unsupported: functional.attend
# runs numba's flash for them)
CASES = [case for case in grid() if case.Nq <= decode.MAX_QUERIES and unsupported(case, decode) is None]


def test_follows_the_protocol():
    protocol.check(decode, protocol.AttentionKernel)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_the_reference(case, dtype):
    check_against_reference(decode, case, dtype)


@pytest.mark.parametrize("case", [c for c in DLSE_CASES if c.Nq <= decode.MAX_QUERIES],
                         ids=lambda c: c.id)
def test_dlse_matches_the_reference(case):
    check_against_reference(decode, case, np.float64, with_dlse=True)


def cached_problem(Nq=3, Nk=50, capacity=64, Hq=4, Hkv=2, dtype=np.float64, seed=0, **spec_kw):
    """q and k, v as prefix views of (B, Hkv, capacity, D) buffers, like nn.KVCache's."""
    rng = np.random.default_rng(seed)
    k_buffer = rng.standard_normal((2, Hkv, capacity, 8)).astype(dtype)
    v_buffer = rng.standard_normal((2, Hkv, capacity, 5)).astype(dtype)
    q = rng.standard_normal((2, Hq, Nq, 8)).astype(dtype)
    k, v = k_buffer[:, :, :Nk], v_buffer[:, :, :Nk]
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, **spec_kw)
    return q, k, v, spec


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
@pytest.mark.parametrize("spec_kw", [dict(is_causal=True), dict(window=(4, 0), is_causal=True), {}],
                         ids=["causal", "window", "full"])
def test_split_kv_partials_merge_to_the_reference(splits, spec_kw):
    q, k, v, spec = cached_problem(**spec_kw)
    out, stats = decode.forward(q, k, v, spec, splits=splits)
    want_out, want_stats = reference.forward(q, k, v, spec)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(protocol.lse_of(stats), protocol.lse_of(want_stats), rtol=1e-12)


def test_reads_a_cache_buffer_in_place():
    q, k, v, spec = cached_problem()
    assert decode._cache_rows(k, spec.dtype) is k.base  # no copy of the past
    assert decode._cache_rows(v, spec.dtype) is v.base
    # rows past the length are never read: poison them
    k.base[:, :, spec.Nk:] = np.nan
    v.base[:, :, spec.Nk:] = np.nan
    out, _ = decode.forward(q, k, v, spec)
    np.testing.assert_allclose(out, reference.forward(q, k, v, spec)[0], rtol=1e-12, atol=1e-13)


def test_other_views_are_copied_not_misread():
    q, k, v, spec = cached_problem()
    middle = k.base[:, :, 3:3 + spec.Nk]  # a view not starting at row 0
    assert decode._cache_rows(middle, spec.dtype) is not middle.base
    out, _ = decode.forward(q, middle, v, spec)
    np.testing.assert_allclose(out, reference.forward(q, middle, v, spec)[0], rtol=1e-12, atol=1e-13)


def test_rows_masked_by_huge_floats_average_the_values():
    # float32: -1e9 + s rounds every score to the same value (ulp(1e9) = 64)
    q, k, v, spec = cached_problem(Nq=2, Nk=6, Hq=2, Hkv=2, dtype=np.float32,
                                   attn_mask=np.full((2, 6), -1e9, dtype=np.float32))
    out, stats = decode.forward(q, k, v, spec)
    np.testing.assert_allclose(out, np.broadcast_to(v.mean(axis=2, keepdims=True), out.shape),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats[1], 6.0)


def test_nan_query_gives_nan_row_only():
    q, k, v, spec = cached_problem()
    q[0, 1, 2, 3] = np.nan
    out, _ = decode.forward(q, k, v, spec)
    assert np.isnan(out[0, 1, 2]).all()
    out[0, 1, 2] = 0
    assert np.isfinite(out).all()


@pytest.mark.parametrize("B, Hkv, Nk, threads, want", [
    (1, 1, 8192, 2, 4),   # MQA, one step: both threads get two splits each
    (1, 8, 32768, 2, 1),  # kv heads enough: no split
    (1, 1, 1500, 2, 1),   # too few keys to be worth cutting
    (1, 2, 4096, 4, 4),
])
def test_splits_give_every_thread_work_without_tiny_splits(B, Hkv, Nk, threads, want):
    spec = make_attention_spec((B, Hkv, 1, 8), (B, Hkv, Nk, 8), (B, Hkv, Nk, 8), (np.float32,) * 3)
    assert decode.splits_for(spec, threads) == want
