"""Exercise 4: the attention backward, step by step (docs/attention-backward.md).

Shapes, every (batch, head) at once: q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv),
p (B, H, Nq, Nk), out and dout (B, H, Nq, Dv), delta (B, H, Nq). Matrix products over the
last two axes: ``a @ b`` and ``x.swapaxes(-1, -2)`` (the transpose) work on the leading axes.

The forward, and the backward line by line (each step reverses one forward line):

    S = scale * Q K^T   (-inf where a mask forbids)   ->  dQ = scale * dS K,   dK = scale * dS^T Q
    P = softmax(S) by rows                            ->  dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij
    O = P V                                           ->  dV = P^T dO,   dP = dO V^T

and delta_i = sum_j P_ij dP_ij = sum_j P_ij (dO_i . V_j) = dO_i . O_i: one dot product per
query row, no sum over the Nk keys. A masked pair has P_ij = 0, so its dS_ij is 0: no
gradient flows through a mask. A row that allows no key has P = 0 and gets no gradient.

Write the four steps; ``attention_backward`` below (written out) chains them, and
``python attention_backward.py`` compares its dq, dk, dv with microattn's own attention.
Grade your work:

    microattn exercise check 4 DIR        (DIR: the directory holding this file)
    microattn exercise hint 4             (if stuck)
"""

import numpy as np


def value_grads(p, v, dout):
    """forward: out = p @ v.  Returns (dv, dp):

    dv: (B, H, Nk, Dv) = P^T dO
    dp: (B, H, Nq, Nk) = dO V^T
    """
    raise NotImplementedError  # your code here


def row_delta(out, dout):
    """delta (B, H, Nq): delta_i = sum_j P_ij dP_ij, computed as dO_i . O_i (the same number)."""
    raise NotImplementedError  # your code here


def score_grads(p, dp, delta):
    """forward: p = softmax(s) by rows.  Returns ds (B, H, Nq, Nk) = P * (dP - delta),
    delta_i subtracted from every entry of row i."""
    raise NotImplementedError  # your code here


def query_key_grads(ds, q, k, scale):
    """forward: s = scale * q @ k^T.  Returns (dq, dk):

    dq: (B, H, Nq, D) = scale * dS K
    dk: (B, H, Nk, D) = scale * dS^T Q
    """
    raise NotImplementedError  # your code here


# ----------------------------------------------------------------------------- written out for you


def probabilities(q, k, scale, causal=False):
    """P (B, H, Nq, Nk) = softmax(scale * q @ k^T), -inf where causal forbids. Causal is
    bottom-right aligned, as in microattn and flash-attention: query i sees key j <= i + Nk - Nq
    (so with Nq > Nk the first rows see no key, and their P is 0)."""
    s = scale * q @ k.swapaxes(-1, -2)
    if causal:
        Nq, Nk = s.shape[-2:]
        allowed = np.arange(Nk)[None, :] <= np.arange(Nq)[:, None] + (Nk - Nq)
        s = np.where(allowed, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(m == -np.inf, 0.0, m)  # a row with no key: exp(-inf - 0) = 0, not NaN
    e = np.exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    return e / np.where(total == 0, 1.0, total)


def attention_backward(q, k, v, dout, scale, causal=False):
    """Your four steps chained: a dict of the forward (p, out) and every gradient."""
    p = probabilities(q, k, scale, causal)
    out = p @ v
    dv, dp = value_grads(p, v, dout)
    delta = row_delta(out, dout)
    ds = score_grads(p, dp, delta)
    dq, dk = query_key_grads(ds, q, k, scale)
    return {"p": p, "out": out, "dv": dv, "dp": dp, "delta": delta, "ds": ds, "dq": dq, "dk": dk}


if __name__ == "__main__":
    import microattn as ma

    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal(shape) for shape in [(1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3), (1, 2, 5, 3)])
    mine = attention_backward(q, k, v, dout, 0.5, causal=True)
    tq, tk, tv = (ma.tensor(x, requires_grad=True) for x in (q, k, v))
    ma.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=0.5).backward(dout)
    for name, t in (("dq", tq), ("dk", tk), ("dv", tv)):
        print(f"{name}: largest difference from microattn's {np.abs(mine[name] - t.grad).max():.2e}")
