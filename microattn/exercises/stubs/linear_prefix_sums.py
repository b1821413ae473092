"""Exercise 9: causal linear attention by prefix sums.

    q (B, Hq, Nq, D)   k (B, Hkv, Nk, D)   v (B, Hkv, Nk, Dv)   out (B, Hq, Nq, Dv)
    kf = phi(k), qf = phi(q),   phi(x) = elu(x) + 1 (``feature_map``, always > 0)

Replace softmax's exp(q . k) by phi(q) . phi(k) and the sum over keys can be pulled apart:

    S_i = sum_{j seen by i} phi(k_j) v_j^T     (D, Dv)   the key-value state
    z_i = sum_{j seen by i} phi(k_j)           (D,)      the normaliser state
    out_i = phi(q_i)^T S_i / (phi(q_i) . z_i + eps)

Causal (``spec.causal``), bottom-right aligned as in SDPA: query i sees keys
j <= i + (Nk - Nq), so S_i and z_i are *prefix sums* over keys: O(N D Dv), not O(N^2).
Otherwise every query sees every key (one total sum). Query head h reads kv head
h // spec.group (``expand_kv``). A query that sees no key has S = 0, z = 0 and out = 0.

Write ``prefix_states`` and ``linear_attention`` below (NumPy), then grade them:

    microattn exercise check 9 DIR        (DIR: the directory holding this file)
    microattn exercise hint 9             (if stuck)

The grader compares S, z with the library's and out with the quadratic form
sum_j (qf_i . kf_j) v_j / (sum_j qf_i . kf_j + eps) over the allowed pairs.
"""

import numpy as np  # noqa: F401 - for your code

from microattn.kernels.linear_reference import feature_map, keys_seen  # noqa: F401 - for your code
from microattn.kernels.reference import expand_kv  # noqa: F401 - for your code


def prefix_states(kf, v, spec):
    """The state each query reads: S (B, Hq, Nq, D, Dv) and z (B, Hq, Nq, D).

    kf: (B, Hkv, Nk, D) the key features phi(k);  v: (B, Hkv, Nk, Dv)
    spec: a LinearSpec (spec.causal, spec.Nq, spec.Nk, spec.group, ...)
    ``keys_seen(spec)`` (Nq,) says how many keys (a prefix) query i sees.
    returns (S, z) with S[b, h, i] = sum_{j seen by i} kf[b, h // group, j] v[b, h // group, j]^T
    """
    raise NotImplementedError  # your code here (np.cumsum over the key axis)


def linear_attention(q, k, v, spec):
    """out (B, Hq, Nq, Dv) = phi(q_i)^T S_i / (phi(q_i) . z_i + spec.eps).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv); spec: a LinearSpec.
    """
    raise NotImplementedError  # your code here (feature_map, your prefix_states, np.einsum)
