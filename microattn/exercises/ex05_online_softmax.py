"""Exercise 5: the online softmax update, ``(m, l, acc)`` folded over key blocks.

The flash forward keeps, per query row, the running max ``m``, the sum ``l`` of ``exp(s - m)``
and the weighted sum ``acc`` of values over the keys seen so far; a block that raises the max
rescales the old sums by ``alpha = exp(m - m')``. The library's step is
``kernels/cpu/ladder.py::online_softmax_update``, which rung 2 (``_forward_tiles``) calls once
per key block. Graded step by step against the closed forms (the prefix's row max and sums,
``reference.row_stats``) and end to end against ``reference.forward`` (out, m, l, lse).
"""

from __future__ import annotations

import types

import numpy as np

from ..kernels import protocol, reference
from ..kernels.cpu import ladder
from ..kernels.spec import make_attention_spec
from .grading import Failure, call
from .grading import compare as _compare

NUMBER = 5
SLUG = "online_softmax"
TITLE = "Online softmax: fold key blocks into (m, l, acc), rescaling by alpha = exp(m - m')"
FILE = "online_softmax.py"
READ = "docs/flash-cpu.md (\"Forward: online softmax\") and docs/attention-backward.md (\"Forward\")"
HINTS = [
    "Per row: m' = max(m, the block's largest score). Then alpha = exp(m - m') is what the old "
    "l and acc must be multiplied by, because they were summed against m, not m'.",
    "p = exp(s - m'[:, None]) for the block; l' = alpha * l + p.sum(axis=1); "
    "acc' = alpha[:, None] * acc + p @ v. Never exp(s) alone: exp(1e4) is inf.",
    "A row whose keys so far are all masked has m' = -inf, and exp(-inf - (-inf)) is NaN. Shift "
    "by 0 there (np.where(m' == -inf, 0, m')): alpha and p become exp(-inf) = 0, l and acc stay 0.",
]

# (what the case tests, Nq, Nk, Dv, block, spec keywords, bias added to every score)
CASES = [
    ("odd sizes, a max that grows from block to block", 5, 23, 3, 8, {}, "trend"),
    ("scores near 1e4", 4, 13, 2, 5, {}, "1e4"),
    ("a causal sliding window with Nq > Nk: rows that start masked, rows with no key", 9, 7, 3, 3,
     {"is_causal": True, "window": (2, 0)}, None),
]


def solution():
    return types.SimpleNamespace(online_softmax_update=ladder.online_softmax_update)


def _case(rng, Nq, Nk, Dv, keywords, bias):
    D = 4
    q, k = rng.standard_normal((1, 1, Nq, D)), rng.standard_normal((1, 1, Nk, D))
    v = rng.standard_normal((1, 1, Nk, Dv))
    plane = None
    if bias == "trend":  # the row max keeps rising, so every step rescales
        plane = np.broadcast_to(np.linspace(0.0, 6.0, Nk), (Nq, Nk)).copy()
    elif bias == "1e4":
        plane = np.broadcast_to(1e4 + np.linspace(0.0, 3.0, Nk), (Nq, Nk)).copy()
    spec = make_attention_spec(q.shape, k.shape, v.shape, (q.dtype,) * 3, attn_mask=plane, **keywords)
    return q, k, v, spec


def _prefix_state(s, v, j1):
    """(m, l, acc) over keys [0, j1): the closed forms, from the reference's row statistics."""
    m, l = reference.row_stats(s[:, :j1])
    shift = np.where(m == -np.inf, 0.0, m)
    return m, l, np.exp(s[:, :j1] - shift[:, None]) @ v[:j1]


def check(ns) -> list[str]:
    rng = np.random.default_rng(5)
    done = []
    for what, Nq, Nk, Dv, block, keywords, bias in CASES:
        q, k, v4, spec = _case(rng, Nq, Nk, Dv, keywords, bias)
        s, v = reference.scores(q, k, spec)[0, 0], v4[0, 0]  # (Nq, Nk), (Nk, Dv)
        large = bias == "1e4"
        # step by step, each step given the right state: a mistake is caught where it happens
        state = (np.full(Nq, -np.inf), np.zeros(Nq), np.zeros((Nq, Dv)))
        for j0 in range(0, Nk, block):
            j1 = min(j0 + block, Nk)
            s_blk, v_blk = np.ascontiguousarray(s[:, j0:j1]), np.ascontiguousarray(v[j0:j1])
            expected = _prefix_state(s, v, j1)
            got = call(ns, "online_softmax_update", *(x.copy() for x in state), s_blk.copy(), v_blk.copy())
            if not isinstance(got, tuple) or len(got) != 3:
                raise Failure(f"online_softmax_update must return the tuple (m, l, acc), got {type(got).__name__}")
            where = f"after keys {j0}:{j1} ({what})"
            mistakes = _mistakes(state, s_blk, v_blk, large)
            compare(f"m {where}", got[0], expected[0], rtol=1e-12, atol=0, meaning=mistakes["m"])
            compare(f"l {where}", got[1], expected[1], rtol=1e-10, atol=1e-300, meaning=mistakes["l"])
            compare(f"acc {where}", got[2], expected[2], rtol=1e-10, atol=1e-12, meaning=mistakes["acc"])
            state = expected
        done.append(f"each step of {Nq} rows x {Nk} keys in blocks of {block}: {what}")
        # end to end, the learner's own state carried from block to block, against the reference
        m, l, acc = np.full(Nq, -np.inf), np.zeros(Nq), np.zeros((Nq, Dv))
        for j0 in range(0, Nk, block):
            m, l, acc = call(ns, "online_softmax_update", m, l, acc, np.ascontiguousarray(s[:, j0:j0 + block]),
                             np.ascontiguousarray(v[j0:j0 + block]))
        m, l, acc = (np.asarray(x, dtype=np.float64) for x in (m, l, acc))
        out = np.zeros_like(acc)
        seen = l > 0
        out[seen] = acc[seen] / l[seen, None]
        ref_out, stats = reference.forward(q, k, v4, spec)
        stats = stats[:, 0, 0]
        compare(f"out = acc / l at the end ({what})", out, ref_out[0, 0], rtol=1e-10, atol=1e-12)
        compare(f"m at the end ({what})", m, stats[0], rtol=1e-12, atol=0)
        compare(f"l at the end ({what})", l, stats[1], rtol=1e-10, atol=1e-300)
        compare(f"lse = m + log(l) at the end ({what})", protocol.lse_of(np.stack([m, l])), protocol.lse_of(stats),
                rtol=1e-12, atol=1e-12)
        done.append(f"out, m, l and lse against reference.forward: {what}")
    return done


def compare(*args, **kwargs):
    with np.errstate(invalid="ignore", over="ignore"):  # -inf - (-inf) where both are -inf
        _compare(*args, **kwargs)


def _close(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-8, atol=1e-12, equal_nan=False)


def _mistakes(state, s, v, large):
    """The usual wrong answers for one step, computed from the step's inputs."""
    m, l, acc = state
    m_new = np.maximum(m, s.max(axis=1))
    shift = np.where(m_new == -np.inf, 0.0, m_new)
    p = np.exp(s - shift[:, None])
    with np.errstate(over="ignore", invalid="ignore"):
        raw = np.exp(s)  # no shift at all
        alpha = np.exp(m - shift)
        unshifted_l = alpha * l + raw.sum(axis=1)
        unshifted_acc = alpha[:, None] * acc + raw @ v

    def blew_up(got, expected):
        return bool(np.any(~np.isfinite(got) & np.isfinite(expected)))

    overflow = (lambda got, expected: large and blew_up(got, expected),
                "exp overflowed (exp(1e4) is inf in float64): take exp(s - m') with m' the new "
                "running max, never exp(s) alone")
    masked_nan = (lambda got, expected: not large and bool(np.any(np.isnan(got) & ~np.isnan(expected))),
                  "NaN on a row whose keys so far are all masked: there m' = -inf and "
                  "exp(m - m') = exp(-inf - (-inf)) is NaN. Shift by 0 when m' is -inf (the empty-row "
                  "rule of masking.row_shift): alpha and p are then exp(-inf) = 0")
    return {
        "m": [(lambda got, expected: _close(got, s.max(axis=1)),
               "m' must be the max over every key seen so far, max(m, the block's max), not the "
               "block's max alone")],
        "l": [overflow, masked_nan,
              (lambda got, expected: _close(got, l + p.sum(axis=1)),
               "the old l was not rescaled: it was summed against the old max m, so multiply it by "
               "alpha = exp(m - m') before adding the block (acc needs the same)"),
              (lambda got, expected: _close(got, unshifted_l),
               "the block's terms are exp(s) without subtracting the new max m': use exp(s - m')")],
        "acc": [overflow, masked_nan,
                (lambda got, expected: _close(got, acc + p @ v),
                 "you rescaled l but not acc: acc was summed against the old max too, so it needs "
                 "acc * alpha[:, None] before adding p @ v"),
                (lambda got, expected: _close(got, unshifted_acc),
                 "the block's terms are exp(s) without subtracting the new max m': use exp(s - m')"),
                (lambda got, expected: _close(np.asarray(got) * (alpha * l + p.sum(axis=1))[:, None], expected),
                 "acc was divided by l: keep acc a sum, out = acc / l is taken once, at the end")],
    }
