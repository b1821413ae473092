"""Exercise 8: merge two partial attention results, and see why the merge is associative.

    out_a, out_b (..., Dv)    attention of the same queries over two disjoint sets of keys
    lse_a, lse_b (...)        their log-sum-exps, lse_x = log sum_{j in x} exp(s_j)
                              (-inf: the part allowed no key; its out is 0)
    -> out (..., Dv), lse (...): the attention over the union of the keys

Over the union, each part holds its share of the softmax mass:

    lse = log(e^lse_a + e^lse_b)
    out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b

Split-KV decoding, attention sinks and ring (sequence-parallel) attention all come down to
this. Written as it stands it overflows: lse is 1000 for a row of scores near 1000, and
e^1000 is inf. Subtract m = max(lse_a, lse_b) before exponentiating, and let a part with
lse = -inf weigh 0 (with both parts empty: out 0, lse -inf, and no NaN).

The grader also checks that merge(merge(a, b), c) == merge(a, merge(b, c)). Why must that
hold for the right formula? (Think of what (out, lse) summarises: which two sums over the keys
could you rebuild from it, and what does merging do to them? The last hint answers.)

Try it: `partial(q, k, v)` below gives (out, lse) over some keys; merge the results over
k[:5] and k[5:] and compare with partial over all of k. Then grade it:

    microattn exercise check 8 DIR        (DIR: the directory holding this file)
    microattn exercise hint 8             (if stuck)
"""

import numpy as np


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """(out, lse) of attention over the union of two disjoint key sets.

    out_a, out_b: (..., Dv) ndarrays    lse_a, lse_b: (...) ndarrays, -inf for an empty part
    returns (out (..., Dv), lse (...))
    """
    raise NotImplementedError  # your code here


def partial(q, k, v):
    """(out, lse) of softmax(q @ k.T / sqrt(D)) @ v for q (Nq, D), k (Nk, D), v (Nk, Dv)."""
    s = q @ k.T / np.sqrt(q.shape[1])
    m = s.max(axis=1, keepdims=True)
    e = np.exp(s - m)
    return e @ v / e.sum(axis=1, keepdims=True), m[:, 0] + np.log(e.sum(axis=1))
