"""A spec's origin and band offset: a call that computes a block of a larger attention (a
sequence-parallel rank's rows, a share of the heads) gives exactly that block's rows."""

import dataclasses

import numpy as np
import pytest
from microattn.kernels import reference
from microattn.kernels.cpu import flash
from microattn.kernels.spec import make_attention_spec


@pytest.mark.parametrize("kernel", [reference, flash], ids=["reference", "numba"])
@pytest.mark.parametrize("window", [None, (3, 0)])
def test_a_block_of_rows_and_heads_is_the_same_block_of_the_whole(kernel, window):
    rng = np.random.default_rng(0)
    B, H, N, D = 2, 4, 13, 8
    q, k, v = (rng.standard_normal((B, H, N, D)) for _ in range(3))
    kw = dict(is_causal=True, window=window, dropout_p=0.3, seed=1234)
    whole = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, **kw)
    want, _ = kernel.forward(q, k, v, whole)
    h0, i0, i1 = 1, 5, 11  # heads 1..2, rows 5..10, every key
    qb, kb, vb = q[:, h0:h0 + 2, i0:i1], k[:, h0:h0 + 2], v[:, h0:h0 + 2]
    block = dataclasses.replace(
        make_attention_spec(qb.shape, kb.shape, vb.shape, (q.dtype,) * 3, **kw),
        origin=(h0, i0, 0), band_offset=i0 - 0)  # query i is row i0 + i of the whole
    got, _ = kernel.forward(qb, kb, vb, block)
    np.testing.assert_allclose(got, want[:, h0:h0 + 2, i0:i1], rtol=1e-12, atol=1e-13)
    # without the origin the dropout mask (and the band) would be another one
    plain, _ = kernel.forward(qb, kb, vb, make_attention_spec(qb.shape, kb.shape, vb.shape,
                                                             (q.dtype,) * 3, **kw))
    assert not np.allclose(plain, want[:, h0:h0 + 2, i0:i1])
