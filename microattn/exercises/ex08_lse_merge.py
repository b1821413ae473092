"""Exercise 8: the lse merge of two partial attention results (and why it is associative).

``(out_a, lse_a)`` and ``(out_b, lse_b)``, attention over two disjoint key sets, give the
attention over their union: ``lse = log(e^lse_a + e^lse_b)``, ``out = e^(lse_a - lse) out_a +
e^(lse_b - lse) out_b``. The library's is ``functional.merge_attention_states`` (on
``kernels/merge.py``'s ``merge_lse`` / ``merge_rows``, the formula that sinks and split-KV
decoding use too). Graded against ``reference.forward`` over the union of the keys: odd
sizes, parts that allow no key (lse -inf, on one side and on both), lse near 1000 and 800
apart; and the merge of three parts in both groupings.
"""

from __future__ import annotations

import types

import numpy as np

from .. import functional
from ..kernels import protocol, reference
from ..kernels.spec import make_attention_spec
from .grading import Failure, call
from .grading import compare as _compare

NUMBER = 8
SLUG = "lse_merge"
TITLE = "Merge two partial attention results by their lse (and why the merge is associative)"
FILE = "lse_merge.py"
READ = "docs/attention-backward.md (\"lse and merging partial results\") and kernels/merge.py"
HINTS = [
    "lse = log(e^lse_a + e^lse_b) = m + log(e^(lse_a - m) + e^(lse_b - m)) with m = max(lse_a, lse_b): "
    "every exponent is then <= 0, so nothing overflows.",
    "Weights w_x = e^(lse_x - lse) (they sum to 1); out = w_a[..., None] * out_a + w_b[..., None] * out_b. "
    "A part with lse = -inf gets w = e^(-inf) = 0. Where both are -inf, m is -inf too: shift by 0 "
    "there (np.where(m == -np.inf, 0, m)), so the row ends with out 0 and lse -inf, not NaN.",
    "Why associative: (out, lse) is the pair of sums (Z, Y) = (sum_j e^s_j, sum_j e^s_j v_j) in "
    "disguise: Z = e^lse and Y = e^lse * out. Merging adds them, (Z_a + Z_b, Y_a + Y_b), and "
    "addition is associative (and commutative). The max shift only rescales both sums by one "
    "factor, which the division Y / Z cancels.",
]

# (what, Nq, the key sets (a partition of range(Nk)), mask maker or None, bias maker or None)
D, DV, H = 4, 3, 2


def _halves(Nk):
    return [np.arange(0, 4), np.arange(4, Nk)]


def _thirds(Nk):
    return [np.arange(0, 3), np.arange(3, 7), np.arange(7, Nk)]


def _interleaved(Nk):
    return [np.arange(0, Nk, 2), np.arange(1, Nk, 2)]


def _in_threes(Nk):
    return [np.arange(0, Nk, 3), np.arange(1, Nk, 3), np.arange(2, Nk, 3)]


def _one_side_masks(Nq, Nk, parts):
    """Row 0 sees only the first part, row 1 only the second, row 2 no key at all."""
    mask = np.ones((Nq, Nk), dtype=bool)
    mask[0, parts[1]] = False
    mask[1, parts[0]] = False
    mask[2] = False
    return mask


def _large(Nq, Nk, parts):
    """Scores near 1000 (e^lse overflows float64); on rows 0-2 the first part 800 above the rest."""
    bias = np.full((Nq, Nk), 1000.0)
    bias[:3, parts[0]] += 800.0
    return bias


CASES = [
    ("two parts, odd sizes", 5, 11, _halves, _thirds, None),
    ("interleaved keys; a row sees only a, a row only b, a row nothing (lse -inf)", 6, 9, _interleaved,
     _in_threes, "mask"),
    ("scores near 1000 (e^lse overflows) and parts 800 apart", 5, 11, _halves, _thirds, "large"),
]


def solution():
    return types.SimpleNamespace(merge_attention_states=functional.merge_attention_states)


def compare(*args, **kwargs):
    with np.errstate(invalid="ignore"):  # -inf - (-inf) where lse is -inf in both
        _compare(*args, **kwargs)


def _attention(q, k, v, plane, keys):
    """(out, lse) of the reference over the key set ``keys``, the mask/bias restricted to it."""
    kx, vx = k[:, :, keys], v[:, :, keys]
    restricted = None if plane is None else plane[:, keys]
    spec = make_attention_spec(q.shape, kx.shape, vx.shape, (q.dtype,) * 3, attn_mask=restricted)
    out, stats = reference.forward(q, kx, vx, spec)
    return out, protocol.lse_of(stats)


def _merge(ns, a, b, what):
    got = call(ns, "merge_attention_states", a[0].copy(), a[1].copy(), b[0].copy(), b[1].copy())
    if not isinstance(got, tuple) or len(got) != 2:
        raise Failure(f"merge_attention_states must return the pair (out, lse), got {type(got).__name__} "
                      f"({what})")
    return np.asarray(got[0], dtype=np.float64), np.asarray(got[1], dtype=np.float64)


def check(ns) -> list[str]:
    rng = np.random.default_rng(8)
    done = []
    for what, Nq, Nk, split2, split3, kind in CASES:
        q = rng.standard_normal((1, H, Nq, D))
        k = rng.standard_normal((1, H, Nk, D))
        v = rng.standard_normal((1, H, Nk, DV))
        two, three = split2(Nk), split3(Nk)
        plane = (_one_side_masks(Nq, Nk, two) if kind == "mask" else _large(Nq, Nk, two) if kind == "large"
                 else None)
        whole = _attention(q, k, v, plane, np.arange(Nk))
        a, b = (_attention(q, k, v, plane, keys) for keys in two)
        got = _merge(ns, a, b, what)
        meaning = _mistakes(a, b, large=kind == "large")
        compare(f"lse of merge(a, b) ({what})", got[1], whole[1], rtol=1e-12, atol=1e-12, meaning=meaning["lse"])
        compare(f"out of merge(a, b) ({what})", got[0], whole[0], rtol=1e-10, atol=1e-12, meaning=meaning["out"])
        done.append(f"merge(a, b) = attention over all the keys: {what}")
        # three parts, both groupings: each against the whole, then against each other
        a, b, c = (_attention(q, k, v, plane, keys) for keys in three)
        left = _merge(ns, _merge(ns, a, b, what), c, what)
        right = _merge(ns, a, _merge(ns, b, c, what), what)
        for name, result in (("merge(merge(a, b), c)", left), ("merge(a, merge(b, c))", right)):
            compare(f"lse of {name} ({what})", result[1], whole[1], rtol=1e-12, atol=1e-12)
            compare(f"out of {name} ({what})", result[0], whole[0], rtol=1e-10, atol=1e-12)
        associative = [(lambda got, expected: True,
                        "your merge depends on how the parts are grouped; the right one cannot (hint 3 says why)")]
        compare(f"lse of merge(merge(a, b), c) vs merge(a, merge(b, c)) ({what})", left[1], right[1],
                rtol=1e-13, atol=1e-13, meaning=associative)
        compare(f"out of merge(merge(a, b), c) vs merge(a, merge(b, c)) ({what})", left[0], right[0],
                rtol=1e-12, atol=1e-13, meaning=associative)
        done.append(f"merge(merge(a, b), c) = merge(a, merge(b, c)) = the whole: {what}")
    return done


def _close(got, other):
    got, other = np.asarray(got, dtype=np.float64), np.asarray(other, dtype=np.float64)
    return got.shape == other.shape and bool(np.allclose(got, other, rtol=1e-8, atol=1e-12))


def _mistakes(a, b, large):
    (out_a, lse_a), (out_b, lse_b) = a, b
    empty = (lse_a == -np.inf) | (lse_b == -np.inf)
    with np.errstate(over="ignore", invalid="ignore"):
        unnormalised = np.exp(lse_a)[..., None] * out_a + np.exp(lse_b)[..., None] * out_b

    def blew_up(got, expected):
        return bool(np.any(~np.isfinite(got) & np.isfinite(expected)))

    overflow = (lambda got, expected: large and blew_up(got, expected),
                "e^lse overflowed (lse near 1000; float64's exp overflows above 709): subtract "
                "m = max(lse_a, lse_b) first, lse = m + log(e^(lse_a - m) + e^(lse_b - m))")
    empty_nan = (lambda got, expected: bool(np.any(np.isnan(got) & ~np.isnan(expected))),
                 "NaN where a part has no key (lse = -inf): such a part weighs e^(-inf) = 0; where "
                 "both are -inf, shift by 0 instead of m = -inf (-inf - (-inf) is NaN): out 0, lse -inf")
    return {
        "lse": [overflow, empty_nan,
                (lambda got, expected: _close(got, np.maximum(lse_a, lse_b)),
                 "lse is the max of the two: it is log(e^lse_a + e^lse_b), the max plus log of a sum"),
                (lambda got, expected: _close(np.asarray(got)[~empty], ((lse_a + lse_b) / 2)[~empty]),
                 "you averaged the lse: the masses add, lse = log(e^lse_a + e^lse_b)")],
        "out": [overflow, empty_nan,
                (lambda got, expected: _close(np.asarray(got)[~empty], ((out_a + out_b) / 2)[~empty]),
                 "you averaged the two outs: each part weighs by its share of the softmax mass, "
                 "w_x = e^(lse_x - lse)"),
                (lambda got, expected: _close(got, unnormalised),
                 "the weights e^lse_x are not normalised: divide by e^lse_a + e^lse_b (w_x = e^(lse_x - lse))")],
    }
