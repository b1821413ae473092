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
from .autograd import Function, is_grad_enabled
from .kernels import merge as merge_rule
from .kernels import mods, varlen
from .kernels import sinks as sinks_rule
from .kernels.cpu import decode
from .kernels.masking import alibi_bias, in_band, keep
from .kernels.protocol import lse_of
from .kernels.spec import AttentionSpec, make_attention_spec, make_linear_spec
from .losses import cross_entropy
from .tensor import Tensor, concatenate, where

__all__ = ["scaled_dot_product_attention", "merge_attention_states", "linear_attention",
           "cross_entropy", "Attention", "MergeAttentionStates", "LinearAttention"]


def _identity(x):
    return x


class Attention(Function):
    """Softmax attention through any kernel module of the protocol (``kernels/protocol.py``).

    The kernel returns ``out`` and the row statistics ``stats`` = (m, l) that its backward
    recomputes probabilities from.

    * ``with_lse=True``: the result is ``out`` and ``lse = m + log(l)`` packed along the
      last axis, (B, Hq, Nq, Dv + 1), lse in the last column (the engine's Functions have
      one output); ``scaled_dot_product_attention`` slices it into two Tensors, whose
      gradients meet again here as one array: ``dout = grad[..., :Dv]`` and ``dlse =
      grad[..., Dv]``, which the kernel's backward folds into its delta. Without it the
      result is ``out`` itself and the backward passes ``dlse=None``: the plain path pays
      nothing.
    * ``sinks`` (Hq,), a fourth positional input when ``spec.sinks`` is set (so that a
      Tensor of sinks gets its gradient): folded into out and stats after the kernel's
      forward (``kernels/sinks.py``), the kernel's backward unchanged, ``dsinks`` from
      ``sinks.grad``.
    """

    @staticmethod
    def forward(ctx, q, k, v, sinks=None, *, spec: AttentionSpec, kernel, with_lse=False):
        to_device = getattr(kernel, "to_device", _identity)
        to_host = getattr(kernel, "to_host", _identity)
        q, k, v = to_device(q), to_device(k), to_device(v)  # stay there until backward
        out, stats = kernel.forward(q, k, v, spec)
        ctx.spec, ctx.kernel, ctx.with_lse = spec, kernel, with_lse
        ctx.sinks_input = sinks is not None  # a fourth input, which gets dsinks
        result, host_stats = to_host(out), None
        if spec.sinks is not None:  # a virtual key of value 0 per head, merged in on the host
            result, host_stats, ctx.p_sink = sinks_rule.fold(result, to_host(stats), spec.sinks)
            out, stats = to_device(result), to_device(host_stats)
        ctx.save_for_backward(q, k, v, out, stats)
        if not with_lse:
            return result
        lse = lse_of(to_host(stats) if host_stats is None else host_stats)  # (B, Hq, Nq)
        return np.concatenate([result, lse[..., None]], axis=-1)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, stats = ctx.saved_tensors
        kernel, spec = ctx.kernel, ctx.spec
        to_device = getattr(kernel, "to_device", _identity)
        to_host = getattr(kernel, "to_host", _identity)
        dlse = None
        if ctx.with_lse:  # forward: result = concatenate([out, lse], -1)
            grad, dlse = grad[..., :-1], np.ascontiguousarray(grad[..., -1])
        dout = np.ascontiguousarray(grad)
        dq, dk, dv = kernel.backward(q, k, v, out, stats, to_device(dout), spec,
                                     dlse=None if dlse is None else to_device(dlse))
        grads = (to_host(dq), to_host(dk), to_host(dv))
        if not ctx.sinks_input:
            return grads
        if not ctx.needs_input_grad[3]:
            return (*grads, None)
        # forward: out', stats' = fold(out, stats, sinks)  ->  dsinks = sum p_sink (dlse - delta)
        return (*grads, sinks_rule.grad(to_host(out), dout, dlse, ctx.p_sink))


class ScoreMod(Function):
    """The user's score_mod applied to every score (``kernels/mods.py``), for the composed
    backend: s (B, Hq, Nq, Nk) -> score_mod(s, b, h, i, j). ``allowed`` (broadcasting to s)
    marks the pairs that reach the softmax; elsewhere the gradient is 0, whatever
    score_mod_grad says there (a forbidden pair's mod may be inf or NaN)."""

    @staticmethod
    def forward(ctx, s, *, spec: AttentionSpec, allowed):
        ctx.save_for_backward(s)
        ctx.spec, ctx.allowed = spec, allowed
        return mods.score_mod_array(ctx.spec, s)

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        # forward: s' = score_mod(s)  ->  ds = grad * score_mod_grad(s)
        slope = mods.score_mod_slope(ctx.spec, s)
        return np.where(ctx.allowed, grad * slope, 0).astype(s.dtype, copy=False)


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
                                 return_lse=False, seed=None, sinks=None, cu_seqlens_q=None,
                                 cu_seqlens_k=None, mask_mod=None, score_mod=None,
                                 score_mod_grad=None, backend="auto", softcap=None,
                                 alibi_slopes=None):
    """softmax(query @ key^T * scale + mask) @ value, with dropout on the probabilities.

    query (B, Hq, Nq, D), key (B, Hkv, Nk, D), value (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    Query head ``h`` uses key/value head ``h // (Hq // Hkv)`` (grouped-query attention).

    * ``attn_mask``: boolean (True = may attend) or float (added to the scaled scores;
      -inf forbids), broadcastable to (B, Hq, Nq, Nk); a constant.
    * ``is_causal``: bottom-right aligned, query i sees key j iff j <= i + (Nk - Nq).
    * ``window=(left, right)``: i + (Nk-Nq) - left <= j <= i + (Nk-Nq) + right; -1/None unbounded.
    * A query allowed no key outputs zeros, has lse -inf and gets zero gradient.
    * ``return_lse=True`` returns ``(out, lse)``, lse (B, Hq, Nq) = log of the row's softmax
      denominator, differentiable (its gradient enters the backward as ``ds = p * (dp -
      delta + dlse)``), so that partial results merged by :func:`merge_attention_states`
      backpropagate exactly.
    * ``sinks``: (Hq,) logits, one per query head (a Tensor gets a gradient), added to every
      row's softmax denominator in the space of the scaled scores: a virtual key of value
      0. Rows then sum to less than 1, and lse includes the sink. -inf: no sink.
    * ``cu_seqlens_q``, ``cu_seqlens_k``: (S + 1,) int offsets, B = 1: S sequences packed in
      the row, sequence s the queries [cu_q[s], cu_q[s+1]) and keys [cu_k[s], cu_k[s+1]),
      attending only within itself; causal and windows bottom-right aligned per sequence;
      i, j of dropout (and of the mask) are positions in the packed row. Cost: the sum of
      n_q * n_k over sequences (``kernels/varlen.py``).
    * ``dropout_p``/``seed``: element (b, h, i, j) is kept iff ``keep(seed, b, h, i, j)``.
    * ``softcap=c`` (> 0; None or 0: off): the scaled scores s become ``c * tanh(s / c)``
      before ALiBi, the mask and the band apply (Gemma 2); gradients flow through the tanh.
    * ``alibi_slopes`` (Hq,) or (B, Hq), floating, a constant: ``-slope * |i + Nk - Nq - j|``
      is added to the (capped) scores (flash-attention's ALiBi).
    * ``mask_mod(b, h, i, j) -> bool``: plain Python; False forbids query i to see key j
      (with the band and attn_mask). ``score_mod(score, b, h, i, j) -> float`` replaces the
      scaled score ``q . k * scale`` (after softcap) before ALiBi and attn_mask's float terms are added;
      ``score_mod_grad(score, b, h, i, j)`` is its derivative in ``score``, which the
      backward needs: a call that records a graph with a score_mod but no score_mod_grad is
      a ValueError. i, j: the call's query and key indices (in a packed call, positions in
      the packed row). The reference evaluates them on arrays (``kernels/mods.py``), numba
      compiles them into the CPU kernels, "cuda" into the GPU kernels (cuda.jit(device=True)).
    * ``backend``: "reference", "composed", "numba", "cuda" or "auto". On "numba", a call
      of at most 16 queries that records no graph (inference, decoding) runs
      ``kernels/cpu/decode.py``: the keys split across threads, each K/V row read once
      per kv head; with a graph, the tiled flash kernel (whose backward needs its own
      forward's rounding of the scores).

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
        sinks=sinks.data if isinstance(sinks, Tensor) else sinks, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, mask_mod=mask_mod, score_mod=score_mod,
        score_mod_grad=score_mod_grad,
        softcap=softcap, alibi_slopes=_mask_array(alibi_slopes, "alibi_slopes"),
    )
    if spec.score_mod is not None and spec.score_mod_grad is None and _records_graph(q, k, v, sinks):
        raise ValueError(mods.MISSING_GRAD)
    out, lse = attend(q, k, v, spec, backend, sinks=sinks, return_lse=return_lse)
    return (out, lse) if return_lse else out


def attend(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, backend: str = "auto", *,
           sinks=None, return_lse: bool = False):
    """(out, lse or None) of a validated call: the backend's kernel through ``Attention``,
    or "composed" from Tensor ops. ``scaled_dot_product_attention`` and the sequence-parallel
    attention of ``microattn.distributed`` (a spec of its own making) both end here."""
    name, kernel = backends.resolve(backend, "scaled_dot_product_attention")
    if spec.has_mods and kernel is not None and not getattr(kernel, "SUPPORTS_MODS", False):
        if backend != "auto":
            raise ValueError(f"mask_mod / score_mod are not implemented on the {name!r} backend; "
                             f"use backend='numba' (compiled), 'reference' or 'composed'")
        name, kernel = _mods_backend()
    if spec.cu_seqlens_q is not None:  # packed sequences: one call per sequence
        if name == "composed":
            return _composed_varlen(q, k, v, spec, sinks, return_lse)
        kernel = varlen.Varlen(kernel)
    elif (name == "numba" and spec.Nq <= decode.MAX_QUERIES and not spec.has_mods
          and not _records_graph(q, k, v, sinks)):
        kernel = decode  # inference on a few queries: keys split across threads (decode.py)
    sink_input = () if sinks is None else (sinks,)
    if name == "composed":
        return _composed_attention(q, k, v, spec, sinks, return_lse)
    if return_lse:
        both = Attention.apply(q, k, v, *sink_input, spec=spec, kernel=kernel, with_lse=True)
        return both[..., :spec.Dv], both[..., spec.Dv]  # (B, Hq, Nq, Dv), (B, Hq, Nq)
    return Attention.apply(q, k, v, *sink_input, spec=spec, kernel=kernel), None


def _composed_varlen(q, k, v, spec: AttentionSpec, sinks, return_lse):
    """Packed sequences from Tensor ops: each sequence composed alone (varlen.sequences),
    the rows concatenated; a sequence with queries but no keys gives zeros and lse -inf."""
    outs, lses = [], []
    for rows, cols, sub in varlen.sequences(spec):  # in order; sequences without queries skipped
        if sub.Nk == 0:
            outs.append(Tensor(np.zeros((1, spec.Hq, sub.Nq, spec.Dv), dtype=spec.dtype)))
            lses.append(Tensor(np.full((1, spec.Hq, sub.Nq), -np.inf, dtype=spec.dtype)))
            continue
        out, lse = _composed_attention(q[:, :, rows], k[:, :, cols], v[:, :, cols], sub, sinks, True)
        outs.append(out)
        lses.append(lse)
    out, lse = concatenate(outs, axis=2), concatenate(lses, axis=2)
    return out, (lse if return_lse else None)


def _mods_backend():
    """What "auto" runs mods on when its pick cannot: numba where it works, else the reference."""
    for name in ("numba", "reference"):
        if backends.unavailable_reason(name) is None:
            name, kernel = backends.resolve(name, "scaled_dot_product_attention")
            if getattr(kernel, "SUPPORTS_MODS", False):
                return name, kernel
    return backends.resolve("reference", "scaled_dot_product_attention")


def _records_graph(*tensors) -> bool:
    return is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _composed_attention(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, sinks, return_lse):
    """The same maths as the kernels, built from Tensor ops: autograd derives the backward.

    A sink is one more column of the scores, ``sinks[h]`` in every row of head h, whose
    probability is dropped before ``p @ v`` (its value is 0). lse is the logsumexp of the
    scores (sink column included), built from Tensor ops too.
    """
    if spec.group > 1:
        kv_head = np.arange(spec.Hq) // spec.group  # query head h reads kv head h // group
        k, v = k[:, kv_head], v[:, kv_head]  # (B, Hq, Nk, D), (B, Hq, Nk, Dv)
    s = (q @ k.swapaxes(-1, -2)) * spec.scale  # (B, Hq, Nq, Nk)
    if spec.has_softcap:
        s = (s / spec.softcap).tanh() * spec.softcap  # masking.cap, as Tensor ops
    allowed = in_band(spec.band, np.arange(spec.Nq)[:, None], np.arange(spec.Nk)[None, :])  # (Nq, Nk)
    if spec.has_bias:
        allowed = allowed & (spec.bias > -np.inf)  # (Bm, Hm, Nq, Nk)
    if spec.mask_mod is not None:  # a constant mask (mods.py)
        allowed = allowed & mods.mask_array(spec)  # (B, Hq, Nq, Nk)
    if spec.score_mod is not None:  # on the capped score, before ALiBi and the bias
        s = ScoreMod.apply(s, spec=spec, allowed=allowed)
    if spec.has_alibi:  # a constant term (masking.alibi_bias): no gradient to the slopes
        b, h, i, j = np.ix_(*(np.arange(n) for n in (spec.B, spec.Hq, spec.Nq, spec.Nk)))
        s = s + alibi_bias(spec.pack().alibi, spec.band, b, h, i, j)
    if spec.has_bias:
        s = s + spec.bias
    s = s.masked_fill(~allowed, -np.inf)
    if sinks is not None:
        sink_column = _as_operand(sinks, "sinks").reshape(1, spec.Hq, 1, 1) + np.zeros(
            (spec.B, spec.Hq, spec.Nq, 1), dtype=spec.dtype)  # (B, Hq, Nq, 1)
        s = concatenate([s, sink_column], axis=-1)  # (B, Hq, Nq, Nk + 1)
    p = s.softmax(axis=-1)  # a row with no allowed key gives zeros, not NaN
    if sinks is not None:
        p = p[..., :spec.Nk]  # the sink's value is 0: its probability reaches no output
    if spec.dropout_p > 0:
        b, h, i, j = np.ix_(*(np.arange(n) for n in (spec.B, spec.Hq, spec.Nq, spec.Nk)))
        kept = keep(spec.pack().dropout, b, h, i, j)
        p = p * (kept * spec.dropout_scale).astype(spec.dtype)
    out = p @ v  # (B, Hq, Nq, Dv)
    return out, (_logsumexp(s) if return_lse else None)


def _logsumexp(s: Tensor) -> Tensor:
    """log(sum(exp(s), -1)) from Tensor ops, with the row max (a constant) subtracted; -inf
    and zero gradient for a row that is all -inf (never NaN: log sees 1 there)."""
    m = s.data.max(axis=-1, keepdims=True)
    m = np.where(m == -np.inf, 0, m).astype(s.dtype)  # a row of -inf: subtract 0
    total = (s - m).exp().sum(axis=-1)  # (B, Hq, Nq)
    empty = total.data == 0
    safe = where(empty, np.ones_like(total.data), total)
    return where(empty, np.full(empty.shape, -np.inf, dtype=s.dtype), safe.log() + m[..., 0])


# -- merging partial results ----------------------------------------------------------------


class MergeAttentionStates(Function):
    """Two partial attention results over disjoint key sets merged into the one over their
    union (``kernels/merge.py`` has the formula): out (..., Dv) and lse (...) packed along the
    last axis, (..., Dv + 1), as ``Attention`` does; ``merge_attention_states`` slices it."""

    @staticmethod
    def forward(ctx, out_a, lse_a, out_b, lse_b):
        lse, w_a, w_b = merge_rule.merge_lse(lse_a, lse_b)  # w_x = e^(lse_x - lse), 0 if empty
        out = w_a[..., None] * out_a + w_b[..., None] * out_b
        ctx.save_for_backward(out_a, out_b, out, w_a, w_b)
        return np.concatenate([out, lse[..., None]], axis=-1)

    @staticmethod
    def backward(ctx, grad):
        out_a, out_b, out, w_a, w_b = ctx.saved_tensors
        g, g_lse = grad[..., :-1], grad[..., -1]  # d out, d lse
        # forward: out = w_a out_a + w_b out_b  ->  d out_x = w_x g
        # forward: w_x = e^(lse_x - lse), lse = log(e^lse_a + e^lse_b)  (d lse / d lse_x = w_x)
        #   ->  d lse_x = w_x (g . out_x)  +  w_x (g_lse - sum_y w_y (g . out_y))
        #             = w_x (g . out_x - g . out + g_lse)      (an empty part: w_x = 0, nothing)
        g_out = np.einsum("...d,...d->...", g, out)
        d_lse_a = w_a * (np.einsum("...d,...d->...", g, out_a) - g_out + g_lse)
        d_lse_b = w_b * (np.einsum("...d,...d->...", g, out_b) - g_out + g_lse)
        return w_a[..., None] * g, d_lse_a, w_b[..., None] * g, d_lse_b


def merge_attention_states(out_a, lse_a, out_b, lse_b):
    """(out, lse) of attention over the union of two disjoint key sets, from each set's own
    result: ``lse = log(e^lse_a + e^lse_b)``, ``out = e^(lse_a - lse) out_a + e^(lse_b - lse)
    out_b``. Differentiable in all four inputs.

    out_a, out_b (..., Dv) and lse_a, lse_b (...) as ``scaled_dot_product_attention(...,
    return_lse=True)`` returns them (Tensors or arrays, one float dtype). A part with lse
    -inf (no key) weighs 0; both empty: out 0, lse -inf. Never NaN unless an input is.

    Example::

        >>> out_a, lse_a = F.scaled_dot_product_attention(q, k[:, :, :8], v[:, :, :8], return_lse=True)
        >>> out_b, lse_b = F.scaled_dot_product_attention(q, k[:, :, 8:], v[:, :, 8:], return_lse=True)
        >>> out, lse = F.merge_attention_states(out_a, lse_a, out_b, lse_b)  # = attention over all k
    """
    names = ("out_a", "lse_a", "out_b", "lse_b")
    parts = [_as_operand(x, n) for x, n in zip((out_a, lse_a, out_b, lse_b), names)]
    dtypes = {p.dtype for p in parts}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float64):
        got = ", ".join(f"{n}={p.dtype}" for n, p in zip(names, parts))
        raise TypeError(f"merge_attention_states needs one float dtype (float32 or float64), got {got}")
    oa, la, ob, lb = parts
    if oa.ndim < 1 or oa.shape != ob.shape:
        raise ValueError(f"out_a and out_b must have one shape (..., Dv), got {oa.shape} and {ob.shape}")
    if la.shape != oa.shape[:-1] or lb.shape != oa.shape[:-1]:
        raise ValueError(f"lse_a and lse_b must have the shape of out without its last axis, "
                         f"{oa.shape[:-1]}, got {la.shape} and {lb.shape}")
    both = MergeAttentionStates.apply(oa, la, ob, lb)
    Dv = oa.shape[-1]
    return both[..., :Dv], both[..., Dv]


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
