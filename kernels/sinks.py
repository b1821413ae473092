"""Attention sinks: one logit per query head added to every row's softmax denominator.

For query head ``h`` with sink logit ``sink_h`` (in the space of the scaled scores)::

    p_ij   = exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij))      (a row sums to 1 - p_sink)
    p_sink = exp(sink_h) / (exp(sink_h) + sum_j exp(s_ij))
    lse_i  = log(exp(sink_h) + sum_j exp(s_ij))               (lse includes the sink)

**A sink is a virtual key of value 0**, so a row with a sink is the row without it merged
(``merge.py``) with a part of statistics ``(m, l) = (sink, 1)`` and output 0. Every backend
therefore runs unchanged and the sink is folded in afterwards (:func:`fold`, called by
``functional.Attention`` on the forward's ``out`` and ``stats``)::

    (m', l', w, p_sink) = merge_rows(m, l, sink, 1)      out' = w * out

The backward kernels need nothing either: they recompute ``p = exp(s - shift) / norm``
from ``(m', l')``, whose norm holds the sink term, and ``delta = rowsum(out' * dout)``.
What is left is the sink's own gradient (:func:`grad`): its score is ``sink_h`` and its
value 0, so ``dp_sink = dout . 0 = 0`` and ``ds_sink = p_sink * (0 - delta + dlse)``::

    dsink_h = sum over b, i of p_sink[b, h, i] * (dlse[b, h, i] - delta[b, h, i])

A sink of ``-inf`` is no sink (that head's rows are unchanged, its gradient 0). A row that
allows no key but has a finite sink outputs 0, has ``lse = sink`` and ``p_sink = 1``.
Dropout never drops the sink (its value is 0 either way).

Where it runs: on host NumPy arrays, for every backend (the CUDA backend copies ``stats``
and ``out`` to the host for it and the folded ones back: two transfers of ``B * Hq * Nq *
(Dv + 2)`` numbers, only when sinks are given). The cost is one pass over ``out``.

Shapes: out (B, Hq, Nq, Dv), stats (2, B, Hq, Nq), sinks (Hq,), p_sink / dlse (B, Hq, Nq).
"""

from __future__ import annotations

import numpy as np

from .merge import lse_part, merge_rows


def fold(out, stats, sinks):
    """(out', stats', p_sink): the forward's result with each head's sink folded in."""
    sink = sinks[None, :, None]  # (1, Hq, 1): broadcast over batch and queries
    m, l, w, p_sink = merge_rows(stats[0], stats[1], sink, lse_part(sink))
    return out * w[..., None], np.stack([m, l]), p_sink


def grad(out, dout, dlse, p_sink):
    """dsinks (Hq,) from the folded ``out'``, the gradients reaching ``out'`` and lse
    (``dlse`` None: lse unused), and ``p_sink`` from :func:`fold`."""
    delta = np.einsum("bhid,bhid->bhi", out, dout)  # (B, Hq, Nq)
    ds_sink = p_sink * ((0 if dlse is None else dlse) - delta)
    return ds_sink.sum(axis=(0, 2))
