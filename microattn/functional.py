"""Attention as autograd ops: validate once, build a spec, run one Function.

Shape legend::

    B batch, Hq query heads, Hkv key/value heads, Nq query length, Nk key length,
    D query/key head dim, Dv value head dim

    query (B, Hq, Nq, D)   key (B, Hkv, Nk, D)   value (B, Hkv, Nk, Dv)  ->  (B, Hq, Nq, Dv)

Data flow: ``scaled_dot_product_attention`` validates every argument and builds an
``AttentionSpec`` (``microattn.kernels.spec``) before any work; ``backends.resolve`` picks a
kernel module; the one ``Attention`` Function calls ``kernel.forward`` and, on the way
back, ``kernel.backward``. The "composed" backend is the exception on purpose: it builds
the same maths from Tensor ops, so the autograd engine derives its backward and checks the
hand-written ones.
"""

from __future__ import annotations

import numpy as np

from . import backends
from .autograd import Function
from .kernels.masking import alibi_bias, in_band, keep
from .kernels.protocol import lse_of
from .kernels.spec import AttentionSpec, make_attention_spec, make_linear_spec
from .losses import cross_entropy
from .tensor import Tensor

__all__ = ["scaled_dot_product_attention", "linear_attention", "cross_entropy", "Attention",
           "LinearAttention"]


def _identity(x):
    return x


class Attention(Function):
    """Softmax attention through any kernel module of the protocol (``kernels/protocol.py``).

    The kernel returns ``out`` and the row statistics ``stats`` = (m, l) that its backward
    recomputes probabilities from; ``lse = m + log(l)`` is an extra, non-differentiable
    result, left on ``ctx.lse``.
    """

    @staticmethod
    def forward(ctx, q, k, v, *, spec: AttentionSpec, kernel):
        to_device = getattr(kernel, "to_device", _identity)
        to_host = getattr(kernel, "to_host", _identity)
        q, k, v = to_device(q), to_device(k), to_device(v)  # stay there until backward
        out, stats = kernel.forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, stats)
        ctx.spec, ctx.kernel = spec, kernel
        ctx.lse = lse_of(to_host(stats))
        return to_host(out)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, stats = ctx.saved_tensors
        kernel = ctx.kernel
        to_device = getattr(kernel, "to_device", _identity)
        to_host = getattr(kernel, "to_host", _identity)
        dq, dk, dv = kernel.backward(q, k, v, out, stats, to_device(np.ascontiguousarray(dout)), ctx.spec)
        return to_host(dq), to_host(dk), to_host(dv)


class LinearAttention(Function):
    """Linear attention through a kernel module: forward(q, k, v, spec) / backward(q, k, v, out, dout, spec)."""

    @staticmethod
    def forward(ctx, q, k, v, *, spec, kernel):
        out = kernel.forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out)
        ctx.spec, ctx.kernel = spec, kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out = ctx.saved_tensors
        return ctx.kernel.backward(q, k, v, out, np.ascontiguousarray(dout), ctx.spec)


# -- argument handling ----------------------------------------------------------------------


def _as_operand(x, name: str):
    """A Tensor stays a Tensor; a NumPy array becomes a constant Tensor; anything else is refused."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return Tensor(x)
    raise TypeError(f"{name} must be a microattn Tensor or a NumPy array, got {type(x).__name__}")


def _mask_array(attn_mask, name="attn_mask"):
    """A constant's array (a Tensor's data: no gradient flows into it), or None."""
    if attn_mask is None:
        return None
    if isinstance(attn_mask, Tensor):
        return attn_mask.data
    if isinstance(attn_mask, np.ndarray):
        return attn_mask
    raise TypeError(f"{name} must be a Tensor, a NumPy array or None, got {type(attn_mask).__name__}")


# -- scaled dot-product attention ----------------------------------------------------------


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, window=None, *,
                                 return_lse=False, seed=None, backend="auto", softcap=None,
                                 alibi_slopes=None):
    """softmax(query @ key^T * scale + mask) @ value, with dropout on the probabilities.

    query (B, Hq, Nq, D), key (B, Hkv, Nk, D), value (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    Query head ``h`` uses key/value head ``h // (Hq // Hkv)`` (grouped-query attention).

    * ``attn_mask``: boolean (True = may attend) or float (added to the scaled scores;
      -inf forbids), broadcastable to (B, Hq, Nq, Nk); a constant.
    * ``is_causal``: bottom-right aligned, query i sees key j iff j <= i + (Nk - Nq).
    * ``window=(left, right)``: i + (Nk-Nq) - left <= j <= i + (Nk-Nq) + right; -1/None unbounded.
    * A query allowed no key outputs zeros, has lse -inf and gets zero gradient.
    * ``return_lse=True`` returns ``(out, lse)``, lse (B, Hq, Nq) a constant Tensor.
    * ``dropout_p``/``seed``: element (b, h, i, j) is kept iff ``keep(seed, b, h, i, j)``.
    * ``softcap=c`` (> 0; None or 0: off): the scaled scores s become ``c * tanh(s / c)``
      before ALiBi, the mask and the band apply (Gemma 2); gradients flow through the tanh.
    * ``alibi_slopes`` (Hq,) or (B, Hq), floating, a constant: ``-slope * |i + Nk - Nq - j|``
      is added to the (capped) scores (flash-attention's ALiBi).
    * ``backend``: "reference", "composed", "numba", "cuda" or "auto".

    Example::

        >>> q = ma.tensor(np.random.randn(1, 2, 5, 4), requires_grad=True)
        >>> out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        >>> out.shape
        (1, 2, 5, 4)
    """
    q, k, v = (_as_operand(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    spec = make_attention_spec(
        q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype), attn_mask=_mask_array(attn_mask),
        dropout_p=dropout_p, is_causal=is_causal, scale=scale, window=window, seed=seed,
        softcap=softcap, alibi_slopes=_mask_array(alibi_slopes, "alibi_slopes"),
    )
    name, kernel = backends.resolve(backend, "scaled_dot_product_attention")
    if name == "composed":
        out, lse = _composed_attention(q, k, v, spec)
    else:
        out = Attention.apply(q, k, v, spec=spec, kernel=kernel)
        lse = Tensor(out._ctx.lse)
    return (out, lse) if return_lse else out


def _composed_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec):
    """The same maths as the kernels, built from Tensor ops: autograd derives the backward."""
    if spec.group > 1:
        kv_head = np.arange(spec.Hq) // spec.group  # query head h reads kv head h // group
        k, v = k[:, kv_head], v[:, kv_head]  # (B, Hq, Nk, D), (B, Hq, Nk, Dv)
    s = (q @ k.swapaxes(-1, -2)) * spec.scale  # (B, Hq, Nq, Nk)
    if spec.has_softcap:
        s = (s / spec.softcap).tanh() * spec.softcap  # masking.cap, as Tensor ops
    if spec.has_alibi:  # a constant term (masking.alibi_bias): no gradient to the slopes
        b, h, i, j = np.ix_(*(np.arange(n) for n in (spec.B, spec.Hq, spec.Nq, spec.Nk)))
        s = s + alibi_bias(spec.pack().alibi, spec.band, b, h, i, j)
    allowed = in_band(spec.band, np.arange(spec.Nq)[:, None], np.arange(spec.Nk)[None, :])  # (Nq, Nk)
    if spec.has_bias:
        s = s + spec.bias
        allowed = allowed & (spec.bias > -np.inf)  # (Bm, Hm, Nq, Nk)
    s = s.masked_fill(~allowed, -np.inf)
    p = s.softmax(axis=-1)  # a row with no allowed key gives zeros, not NaN
    if spec.dropout_p > 0:
        b, h, i, j = np.ix_(*(np.arange(n) for n in (spec.B, spec.Hq, spec.Nq, spec.Nk)))
        kept = keep(spec.pack().dropout, b, h, i, j)
        p = p * (kept * spec.dropout_scale).astype(spec.dtype)
    out = p @ v  # (B, Hq, Nq, Dv)
    lse = _logsumexp(s.data)
    return out, Tensor(lse)


def _logsumexp(s: np.ndarray) -> np.ndarray:
    """log(sum(exp(s), -1)) with row-max subtraction; -inf for all -inf rows."""
    m = s.max(axis=-1, keepdims=True)
    m_safe = np.where(m == -np.inf, 0, m)
    with np.errstate(divide="ignore"):
        return (np.log(np.exp(s - m_safe).sum(axis=-1)) + m_safe[..., 0]).astype(s.dtype)


# -- linear attention -----------------------------------------------------------------------


def linear_attention(query, key, value, *, causal=False, feature_map="elu+1", eps=1e-6,
                     backend="auto"):
    """Kernelised attention with phi(x) = elu(x) + 1, O(N * D * Dv) time and memory.

    out_i = sum_j (phi(q_i) . phi(k_j)) v_j / (sum_j phi(q_i) . phi(k_j) + eps), the sums over
    all keys, or over j <= i + (Nk - Nq) when ``causal``. Shapes and the GQA rule as in
    :func:`scaled_dot_product_attention`. Backends: "reference", "numba", "auto".
    """
    q, k, v = (_as_operand(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    spec = make_linear_spec(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype), causal=causal,
                            eps=eps, feature_map=feature_map)
    _, kernel = backends.resolve(backend, "linear_attention")
    return LinearAttention.apply(q, k, v, spec=spec, kernel=kernel)
