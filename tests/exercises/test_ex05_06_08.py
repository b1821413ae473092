"""Exercises 5 (online softmax), 6 (the flash tile loop in numba) and 8 (the lse merge): the
common mistakes, written as a learner would, fail with the diagnosis that names them."""

import pytest

from microattn.exercises import (
    ex05_online_softmax,
    ex06_flash_tile_loop,
    ex08_lse_merge,
)
from tests.exercises.learner import fails_saying, whole_file

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the learners' overflows are the point






# -- 5: online softmax -------------------------------------------------------------------

UPDATE = """
import numpy as np

def online_softmax_update(m, l, acc, s, v):
    m_new = np.maximum(m, s.max(axis=1))
    shift = {shift}
    alpha = np.exp(m - shift)
    p = np.exp(s - shift[:, None])
    return m_new, alpha * l + p.sum(axis=1), {acc} + p @ v
"""
RIGHT_SHIFT = "np.where(m_new == -np.inf, 0.0, m_new)"


def test_05_a_learners_own_update_passes(tmp_path):
    module = whole_file(tmp_path, ex05_online_softmax, UPDATE.format(shift=RIGHT_SHIFT, acc="alpha[:, None] * acc"))
    assert ex05_online_softmax.check(module)


@pytest.mark.parametrize("shift, acc, phrases", [
    (RIGHT_SHIFT, "acc", ["acc after keys 8:16", "you rescaled l but not acc"]),
    ("m_new", "alpha[:, None] * acc", ["l after keys 0:3", "NaN on a row whose keys so far are all masked"]),
], ids=["acc not rescaled", "no empty-row shift"])
def test_05_mistakes_are_named(tmp_path, shift, acc, phrases):
    fails_saying(ex05_online_softmax, whole_file(tmp_path, ex05_online_softmax, UPDATE.format(shift=shift, acc=acc)),
                 *phrases)


def test_05_exp_without_the_max_overflows_and_is_named(tmp_path):
    module = whole_file(tmp_path, ex05_online_softmax, """
        import numpy as np

        def online_softmax_update(m, l, acc, s, v):
            m_new = np.maximum(m, s.max(axis=1))
            alpha = np.where(m_new == -np.inf, 0.0, np.exp(m - m_new))
            p = np.exp(s)  # the mistake: no max subtracted
            return m_new, alpha * l + p.sum(axis=1) * np.exp(-m_new), alpha[:, None] * acc + p @ v * np.exp(-m_new)[:, None]
    """)
    fails_saying(ex05_online_softmax, module, "after keys 0:5 (scores near 1e4)", "exp overflowed")


# -- 6: the flash tile loop --------------------------------------------------------------

TILE_LOOP = """
import numba
import numpy as np

from microattn.kernels.cpu.ladder import key_range, online_softmax_update
from microattn.exercises.stubs.flash_tile_loop import block_scores

{decorator}
def flash_forward_tiles(q, k, v, bias, band, dropout, reals, alibi, block_m, block_n, out, stats):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scratch = np.empty((block_m, block_n), dtype=q.dtype)
    for b in range(B):
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            m = np.full(block_m, -np.inf)  # the mistake: made once per head, not per query block
            l = np.zeros(block_m)
            acc = np.zeros((block_m, Dv))
            for i0 in range(0, Nq, block_m):
                i1 = min(i0 + block_m, Nq)
                rows = i1 - i0
                j_start, j_stop = key_range(band, i0, i1, Nk)
                for j0 in range(j_start, j_stop, block_n):
                    j1 = min(j0 + block_n, j_stop)
                    s = block_scores(q, k, bias, band, reals, alibi, b, h, i0, i1, j0, j1, scratch)
                    online_softmax_update(m[:rows], l[:rows], acc[:rows], s, v[b, kv, j0:j1])
                for ii in range(rows):
                    stats[0, b, h, i0 + ii] = m[ii]
                    stats[1, b, h, i0 + ii] = l[ii]
                    for d in range(Dv):
                        out[b, h, i0 + ii, d] = acc[ii, d] / l[ii] if l[ii] > 0 else 0.0
"""


def test_06_not_compiled_is_named(tmp_path):
    fails_saying(ex06_flash_tile_loop, whole_file(tmp_path, ex06_flash_tile_loop, TILE_LOOP.format(decorator="")),
                 "`flash_forward_tiles` is not compiled by numba")


def test_06_state_kept_across_query_blocks_is_named(tmp_path):
    module = whole_file(tmp_path, ex06_flash_tile_loop, TILE_LOOP.format(decorator="@numba.njit"))
    fails_saying(ex06_flash_tile_loop, module, "(7 x 7, two heads; block_m 4, block_n 3)",
                 "start m, l, acc afresh")


# -- 8: the lse merge --------------------------------------------------------------------

MERGE = """
import numpy as np

def merge_attention_states(out_a, lse_a, out_b, lse_b):
    {body}
"""


def test_08_a_learners_own_merge_passes(tmp_path):
    module = whole_file(tmp_path, ex08_lse_merge, MERGE.format(body="""
    m = np.maximum(lse_a, lse_b)
    shift = np.where(m == -np.inf, 0.0, m)
    a, b = np.exp(lse_a - shift), np.exp(lse_b - shift)
    total = a + b
    norm = np.where(total == 0, 1.0, total)
    with np.errstate(divide="ignore"):
        lse = shift + np.log(total)
    return (a / norm)[..., None] * out_a + (b / norm)[..., None] * out_b, lse"""))
    assert ex08_lse_merge.check(module)


@pytest.mark.parametrize("body, phrases", [
    ("return (out_a + out_b) / 2, np.logaddexp(lse_a, lse_b)", ["out of merge(a, b) (two parts",
                                                                "you averaged the two outs"]),
    ("za, zb = np.exp(lse_a), np.exp(lse_b)\n    norm = np.where(za + zb == 0, 1.0, za + zb)\n"
     "    with np.errstate(divide='ignore'):\n        lse = np.log(za + zb)\n"
     "    return (za / norm)[..., None] * out_a + (zb / norm)[..., None] * out_b, lse",
     ["scores near 1000", "e^lse overflowed"]),
    ("m = np.maximum(lse_a, lse_b)\n    lse = m + np.log(np.exp(lse_a - m) + np.exp(lse_b - m))\n"
     "    return (np.exp(lse_a - lse)[..., None] * out_a + np.exp(lse_b - lse)[..., None] * out_b), lse",
     ["a row nothing (lse -inf)", "NaN where a part has no key"]),
], ids=["averaged", "no max shift", "NaN for an empty part"])
def test_08_mistakes_are_named(tmp_path, body, phrases):
    fails_saying(ex08_lse_merge, whole_file(tmp_path, ex08_lse_merge, MERGE.format(body=body)), *phrases)
